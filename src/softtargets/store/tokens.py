"""Per-position top-k stores for language models, packed to 3 bytes a kept logit.

Every position of every block is a row: the teacher's ``k`` largest logits there, their tokens,
and the log-sum-exp of the other logits *at each temperature named when labelling*, so a
distillation at those temperatures is exact for the kept tokens and for the rest's mass
(:meth:`TokenStore.kept` gives what :class:`~softtargets.losses.chunked.KeptRows` holds); another
temperature is refused.

| part | per position | bytes (V = 128,000, k = 32, one temperature) |
| --- | --- | --- |
| token ids | ``k`` ids of ``ceil(log2 V)`` bits, bit-packed | 68 |
| logits | ``k`` codes of ``code_bits`` (:data:`CODE_BITS`, 6) bits below the row's largest logit, one step per block | 24 |
| largest logit | float16 | 2 |
| the rest's log-sum-exp | float16 per temperature | 2 |

Rows are ``(block, position)`` in order, so their ids are implicit: ``block_id * L + position``.
Blocks of prompt / completion examples (:attr:`~softtargets.data.sequences.Blocks.spans`) keep
rows for the positions that count only (the completion's), in order, with the spans saved beside
them (16 bytes a block): the prompt and the padding cost nothing. The block ids themselves are
saved as runs of consecutive ids (a split by file is a few runs, one per file or fewer): 16 bytes
a run, well under a hundredth of a byte a token; the code step is a float32 per block (4 / L
bytes a token), so a block is coded as soon as it is labelled.

:func:`label_tokens` keeps a store in memory, or writes it to a file batch by batch as it labels
(``path``): memory is then one batch of blocks whatever the corpus, and
:meth:`TokenStore.load` maps the file rather than reading it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from softtargets import distributed
from softtargets.config import check_budget
from softtargets.data.sequences import Blocks
from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_open, atomic_write_bytes, parse_json
from softtargets.store.layout import file_size, map_tensor, nbytes, safetensors_header
from softtargets.store.store import fingerprint_module

FORMAT = "softtargets-token-store"

#: bits of a kept logit's code: 6 distil as 16 do (``bench/lm_demo.py --arms
#: top32,top32-16bit``: 6-bit − 16-bit +0.002 bits per byte, 95% CI −0.012 to +0.017) and keep a
#: position at V = 128,000, k = 32 within 96 bytes (7 bits took 100)
CODE_BITS = 6


def id_runs(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(starts, lengths)`` (int64) of the runs of consecutive values in ``ids``: ``[4, 5, 6, 9,
    10]`` -> ``([4, 9], [3, 2])``."""
    if len(ids) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    breaks = torch.nonzero(ids[1:] != ids[:-1] + 1).squeeze(1) + 1
    firsts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    ends = torch.cat([breaks, torch.tensor([len(ids)])])
    return ids[firsts].long().clone(), (ends - firsts).long()


def ids_from_runs(starts: Tensor, lengths: Tensor) -> Tensor:
    """The ids :func:`id_runs` describes, in order."""
    if len(starts) != len(lengths) or bool((lengths < 0).any()):
        raise SoftTargetsError("the token store's block runs are damaged; label the blocks again")
    check_budget(8 * int(lengths.sum()), "the token store's block ids")
    return torch.cat(
        [torch.arange(int(s), int(s) + int(n)) for s, n in zip(starts, lengths, strict=True)]
        or [torch.zeros(0, dtype=torch.long)]
    )


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """``(N, k)`` non-negative integers below ``2**bits`` -> ``(N, ceil(k * bits / 8))`` uint8,
    bit-packed row by row (little-endian bit order)."""
    n, k = values.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    bitplanes = ((values.long()[..., None] >> shifts) & 1).reshape(n, k * bits)  # (N, k*bits)
    width = math.ceil(k * bits / 8)
    padded = torch.zeros(n, width * 8, dtype=torch.int64)
    padded[:, : k * bits] = bitplanes
    weights = 1 << torch.arange(8, dtype=torch.int64)
    return (padded.view(n, width, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, k: int, bits: int) -> Tensor:
    """The inverse of :func:`pack_bits`: ``(N, width)`` uint8 -> ``(N, k)`` int64."""
    n = packed.shape[0]
    planes = (packed.long()[..., None] >> torch.arange(8, dtype=torch.int64)) & 1
    planes = planes.reshape(n, -1)[:, : k * bits].view(n, k, bits)
    return (planes << torch.arange(bits, dtype=torch.int64)).sum(-1)


@dataclass(frozen=True)
class TokenStore:
    """A teacher's top-k logits for every position of some blocks (see the module doc)."""

    block_ids: Tensor  # (B,) int64
    block_length: int
    vocab_size: int
    top: int
    temperatures: tuple[float, ...]
    code_bits: int
    steps: Tensor  # (B,) float32: logit units per code step, one per block
    index_bits: int
    packed_ids: Tensor  # (B * L, ceil(top * index_bits / 8)) uint8
    packed_codes: Tensor  # (B * L, ceil(top * code_bits / 8)) uint8
    largest: Tensor  # (B * L,) float16
    rest: Tensor  # (B * L, len(temperatures)) float16
    blocks_fingerprint: str
    teacher_fingerprint: str
    #: (B, 2) int64 ``[first, stop)``: the positions of each block with rows (an example's
    #: completion), or ``None``: every position of every block has one
    spans: Tensor | None = None

    def __len__(self) -> int:
        return len(self.largest)

    @cached_property
    def row_starts(self) -> Tensor:
        """``(B + 1,)`` int64: where each block's rows start (and the end of the last)."""
        return row_starts(len(self.block_ids), self.block_length, self.spans)

    def rows_of(self, blocks: Tensor) -> Tensor:
        """``(b, L)`` int64: the row of every position of the store's blocks ``blocks`` ``(b,)``
        (indices into :attr:`block_ids`), ``-1`` at a position without one."""
        positions = torch.arange(self.block_length)[None, :]
        if self.spans is None:
            return blocks[:, None] * self.block_length + positions
        first, stop = self.spans[blocks].unbind(1)
        rows = self.row_starts[blocks][:, None] + positions - first[:, None]
        inside = (positions >= first[:, None]) & (positions < stop[:, None])
        return rows.masked_fill_(~inside, -1)

    @property
    def bytes_per_token(self) -> float:
        """Stored bytes per position (the block ids' runs amortised over the positions)."""
        per_row = self.packed_ids.shape[1] + self.packed_codes.shape[1] + 2 + 2 * self.rest.shape[1]
        starts, _ = id_runs(self.block_ids)
        spans = 0 if self.spans is None else self.spans.numel() * 8
        return per_row + (16 * len(starts) + 4 * len(self.steps) + spans) / max(len(self), 1)

    def kept(self, rows: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, classes, rest)``: the rows' kept logits ``(c, k)`` (decoded), their tokens
        ``(c, k)`` and the rest's log-sum-exp at ``temperature`` ``(c,)``, which must be one the
        store was labelled at."""
        matches = [i for i, t in enumerate(self.temperatures) if math.isclose(t, temperature)]
        if not matches:
            raise SoftTargetsError(
                f"the store keeps the rest's mass at T = {list(self.temperatures)}, not at "
                f"{temperature:g}: distil at one of those, or label again with "
                f"--store-temperatures including {temperature:g}"
            )
        if len(rows) and bool((rows < 0).any()):
            raise SoftTargetsError(
                "the store has no row at some positions asked for: it was labelled for other "
                "blocks (or their prompts); label these blocks"
            )
        codes = unpack_bits(self.packed_codes[rows], self.top, self.code_bits)
        block = torch.searchsorted(self.row_starts, rows, right=True) - 1
        step = self.steps[block].float()[:, None]
        values = self.largest[rows].float()[:, None] - codes.float() * step
        classes = unpack_bits(self.packed_ids[rows], self.top, self.index_bits)
        return values, classes, self.rest[rows, matches[0]].float()

    def save(self, path: str | Path) -> Path:
        starts, lengths = id_runs(self.block_ids)
        tensors = {
            "block_starts": starts, "block_runs": lengths, "steps": self.steps,
            "packed_ids": self.packed_ids, "packed_codes": self.packed_codes,
            "largest": self.largest, "rest": self.rest,
            **({} if self.spans is None else {"spans": self.spans}),
        }  # fmt: skip
        metadata = _metadata(
            self.block_length, self.vocab_size, self.top, self.temperatures, self.code_bits,
            self.index_bits, self.blocks_fingerprint, self.teacher_fingerprint,
        )  # fmt: skip
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, blocks: Blocks | None = None) -> TokenStore:
        """Map a token store's file (rows are read when a batch asks for them); with ``blocks``,
        refuse one made for other blocks or vocabulary."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                names = set(handle.keys())
                small = {
                    name: handle.get_tensor(name)
                    for name in ("block_starts", "block_runs", "block_ids", "steps", "spans")
                    if name in names
                }
            rows = {name: map_tensor(path, name) for name in _ROW_PARTS if name != "steps"}
        except Exception as err:
            raise SoftTargetsError(f"{path} is not a readable token store ({err})") from None
        if meta.get("format") != FORMAT:
            raise SoftTargetsError(f"{path} is not a softtargets token store")
        h = parse_json(meta["header"], f"{path}'s header")
        if "block_ids" in small:  # written before block ids were saved as runs
            block_ids = small["block_ids"]
        else:
            block_ids = ids_from_runs(small["block_starts"], small["block_runs"])
        # written before the step was one per block: the store's one step for every block
        steps = small["steps"] if "steps" in small else torch.full((len(block_ids),), h["step"])
        store = cls(
            block_ids, int(h["block_length"]), int(h["vocab_size"]), int(h["top"]),
            tuple(float(t) for t in h["temperatures"]), int(h["code_bits"]), steps.float(),
            int(h["index_bits"]), rows["packed_ids"], rows["packed_codes"], rows["largest"],
            rows["rest"], str(h["blocks"]), str(h["teacher"]), small.get("spans"),
        )  # fmt: skip
        if len(store) != int(store.row_starts[-1]):
            raise SoftTargetsError(f"{path}'s rows do not match its blocks; label them again")
        if blocks is not None:
            if blocks.vocab_size != store.vocab_size:
                raise SoftTargetsError(
                    f"{path} holds a teacher of vocabulary {store.vocab_size}; these blocks' is "
                    f"{blocks.vocab_size}: label them with a teacher of their tokenizer"
                )
            if blocks.fingerprint != store.blocks_fingerprint:
                raise SoftTargetsError(f"{path} was written for other blocks; label these again")
        return store


#: a store's parts with a row per position (``steps``: per block), in the file's order
_ROW_PARTS = ("steps", "packed_ids", "packed_codes", "largest", "rest")


def _metadata(
    block_length: int, vocab_size: int, top: int, temperatures: tuple[float, ...],
    code_bits: int, index_bits: int, blocks_fingerprint: str, teacher_fingerprint: str,
) -> dict[str, str]:  # fmt: skip
    header = {
        "block_length": block_length, "vocab_size": vocab_size, "top": top,
        "temperatures": list(temperatures), "code_bits": code_bits, "index_bits": index_bits,
        "blocks": blocks_fingerprint, "teacher": teacher_fingerprint,
    }  # fmt: skip
    return {"format": FORMAT, "header": json.dumps(header)}


def check_top(top: int, vocab_size: int) -> None:
    """Refuse a ``--top-k`` the vocabulary cannot have (the command line checks it before the
    corpus is read, :func:`label_tokens` again)."""
    if not 1 <= top < vocab_size:
        raise SoftTargetsError(
            f"--top-k must be from 1 to {vocab_size - 1} (the vocabulary has {vocab_size} "
            f"tokens), got {top}"
        )


def row_starts(blocks: int, block_length: int, spans: Tensor | None) -> Tensor:
    """``(blocks + 1,)`` int64: the first row of each block's positions with rows, and the end."""
    counts = (
        torch.full((blocks,), block_length, dtype=torch.long)
        if spans is None
        else (spans[:, 1] - spans[:, 0])
    )
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def _row_entries(
    blocks: int, rows: int, top: int, index_bits: int, code_bits: int, temperatures: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of each of :data:`_ROW_PARTS` for ``blocks`` blocks of ``rows`` rows."""
    return {
        "steps": (torch.float32, (blocks,)),
        "packed_ids": (torch.uint8, (rows, math.ceil(top * index_bits / 8))),
        "packed_codes": (torch.uint8, (rows, math.ceil(top * code_bits / 8))),
        "largest": (torch.float16, (rows,)),
        "rest": (torch.float16, (rows, temperatures)),
    }


@torch.no_grad()
def label_tokens(
    teacher: nn.Module,
    blocks: Blocks,
    top: int = 32,
    temperatures: Sequence[float] = (1.0,),
    code_bits: int = CODE_BITS,
    batch_blocks: int = 8,
    path: str | Path | None = None,
) -> TokenStore:
    """Run ``teacher`` (ids ``(b, L)`` -> logits ``(b, L, V)``) over ``blocks`` once and keep, at
    every position that counts (all, or an example's completion), its ``top`` largest logits
    (quantised, one code step per block), their tokens (bit-packed) and the rest's log-sum-exp at
    each of ``temperatures``.

    ``path``: write the store to that file as it is labelled, each batch at its place (memory:
    one batch of blocks' logits, whatever the corpus), and return it mapped from the file.
    Without it the store is kept in memory. Under torchrun each process labels its share of the
    blocks; with ``path`` rank 0 gathers one batch from every process at a time and writes them
    (one batch per process in memory), without it every process gets the whole store. Either way
    it is the store a single process makes."""
    check_top(top, blocks.vocab_size)
    if not temperatures or any(t <= 0 for t in temperatures):
        raise SoftTargetsError("give at least one positive temperature to keep the rest's mass at")
    temperatures = tuple(float(t) for t in temperatures)
    index_bits = max(1, math.ceil(math.log2(blocks.vocab_size)))
    was_training = teacher.training
    teacher.eval()
    try:
        device = next(teacher.parameters()).device
        # every process checks the vocabulary on the first block, so that none is left waiting in
        # a collective step for one that stopped (a process may have no blocks of its own)
        width = teacher(blocks.batch(slice(0, 1))[:, :-1].to(device)).shape[-1]
        if width != blocks.vocab_size:
            raise SoftTargetsError(
                f"the teacher's vocabulary is {width}, the blocks' {blocks.vocab_size}: teacher "
                "and tokenizer must match"
            )
        starts = row_starts(len(blocks), blocks.block_length, blocks.spans)
        entries = _row_entries(
            len(blocks), int(starts[-1]), top, index_bits, code_bits, len(temperatures)
        )
        teacher_fingerprint = fingerprint_module(teacher)
        mine = distributed.my_slice(len(blocks))  # under torchrun, this process's blocks
        batches = _labelled(
            teacher, blocks, mine, top, temperatures, code_bits, index_bits, batch_blocks
        )
        if path is not None:
            metadata = _metadata(
                blocks.block_length, blocks.vocab_size, top, temperatures, code_bits, index_bits,
                blocks.fingerprint, teacher_fingerprint,
            )  # fmt: skip
            share = -(-len(blocks) // distributed.world_size())  # the largest share of blocks
            rounds = -(-share // batch_blocks)
            _write(path, blocks, starts, entries, metadata, batches, rounds)
            return TokenStore.load(path, blocks)
        # this process's rows, allocated whole before labelling and filled batch by batch (small
        # kept pieces between a batch's large temporaries fragmented the C heap: 2 GB at the
        # peak for a 62 MB store, bench/lm_loss.py's label_peak_mb)
        mine_rows = int(starts[mine.stop] - starts[mine.start])
        mine_entries = _row_entries(
            len(mine), mine_rows, top, index_bits, code_bits, len(temperatures)
        )
        local = {
            name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in mine_entries.items()
        }
        for first, part in batches:
            for name, rows in part.items():
                at = _first_row(name, first, starts) - _first_row(name, mine.start, starts)
                local[name][at : at + len(rows)] = rows
    finally:
        teacher.train(was_training)
    everyone = distributed.gather_to_all(local)  # every process's rows, in block order
    whole = {
        name: everyone[0][name] if len(everyone) == 1 else torch.cat([r[name] for r in everyone])
        for name in _ROW_PARTS
    }
    return TokenStore(
        blocks.block_ids.clone(), blocks.block_length, blocks.vocab_size, top, temperatures,
        code_bits, whole["steps"], index_bits, whole["packed_ids"], whole["packed_codes"],
        whole["largest"], whole["rest"], blocks.fingerprint, teacher_fingerprint,
        None if blocks.spans is None else blocks.spans.clone(),
    )  # fmt: skip


def _first_row(part: str, first_block: int, starts: Tensor) -> int:
    """Row of ``part`` where block ``first_block``'s rows start: a row per block for the code
    steps, one per stored position (``starts``: :func:`row_starts`) for the rest."""
    return first_block if part == "steps" else int(starts[first_block])


def _labelled(
    teacher: nn.Module,
    blocks: Blocks,
    mine: range,
    top: int,
    temperatures: tuple[float, ...],
    code_bits: int,
    index_bits: int,
    batch_blocks: int = 8,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(first block, {part: rows})`` for each batch of the blocks ``mine``, packed (CPU)."""
    device = next(teacher.parameters()).device
    levels = (1 << code_bits) - 1
    for start in range(mine.start, mine.stop, batch_blocks):
        stop = min(start + batch_blocks, mine.stop)
        inputs = blocks.batch(slice(start, stop))[:, :-1].to(device)
        logits = teacher(inputs).float().reshape(-1, blocks.vocab_size)
        mask = blocks.mask(slice(start, stop))  # only the positions that count get rows
        if mask is not None:
            logits = logits[mask.reshape(-1).to(device)]
        kept = logits.topk(top, dim=1)
        others = logits.scatter(1, kept.indices, float("-inf"))
        rest = torch.stack([torch.logsumexp(others / t, dim=1) for t in temperatures], 1).cpu()
        values, ids = kept.values.cpu(), kept.indices.cpu()
        largest = values[:, 0].half().float()
        gaps = largest[:, None] - values  # (rows, k)
        # one code step per block: its largest spread over the levels
        counts = blocks.block_length if mask is None else mask.sum(1)
        block = torch.repeat_interleave(torch.arange(stop - start), counts)  # each row's block
        spread = torch.zeros(stop - start).scatter_reduce_(0, block, gaps.amax(1), "amax")
        steps = (spread / levels).clamp_min(1e-6)
        codes = (gaps / steps[block, None]).round().clamp(0, levels).long()
        yield start, {
            "steps": steps, "packed_ids": pack_bits(ids, index_bits),
            "packed_codes": pack_bits(codes, code_bits), "largest": largest.half(),
            "rest": rest.half(),
        }  # fmt: skip


def _write(
    path: str | Path,
    blocks: Blocks,
    starts: Tensor,
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    metadata: dict[str, str],
    batches: Iterator[tuple[int, dict[str, Tensor]]],
    rounds: int,
) -> None:
    """Write a token store's file on rank 0: header and block runs first, then, ``rounds``
    times, the next batch of every process, each at its rows' offsets (atomically: a temporary
    file renamed into place)."""
    if not distributed.is_main():
        for _ in range(rounds):
            distributed.gather_to_main(next(batches, None))
        distributed.barrier()  # the file is in place
        return
    small = dict(zip(("block_starts", "block_runs"), id_runs(blocks.block_ids), strict=True))
    if blocks.spans is not None:
        small["spans"] = blocks.spans.contiguous()
    entries = {**{name: (torch.int64, tuple(v.shape)) for name, v in small.items()}, **entries}
    header, offsets = safetensors_header(entries, metadata)
    with atomic_open(path, "wb") as handle:
        handle.truncate(file_size(header, entries))
        handle.write(header)
        for name, values in small.items():
            handle.seek(offsets[name])
            handle.write(values.numpy())
        for _ in range(rounds):
            for batch in distributed.gather_to_main(next(batches, None)) or []:
                if batch is None:  # that process has no blocks left
                    continue
                first, part = batch
                for name, rows in part.items():
                    dtype, shape = entries[name]
                    row_bytes = nbytes(dtype, shape[1:])
                    at = _first_row(name, first, starts)
                    handle.seek(offsets[name] + at * row_bytes)
                    handle.write(rows.contiguous().numpy())
    distributed.barrier()
