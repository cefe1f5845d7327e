"""Per-position top-k stores for language models, packed to 3 bytes a kept logit.

Every position of every block is a row: the teacher's ``k`` largest logits there, their tokens,
and the log-sum-exp of the other logits *at each temperature named when labelling*, so a
distillation at those temperatures is exact for the kept tokens and for the rest's mass
(:meth:`TokenStore.kept` gives what :class:`~softtargets.losses.chunked.KeptRows` holds); another
temperature is refused.

| part | per position | bytes (V = 128,000, k = 32, one temperature) |
| --- | --- | --- |
| token ids | ``k`` ids of ``ceil(log2 V)`` bits, bit-packed | 68 |
| logits | ``k`` codes of ``code_bits`` (:data:`CODE_BITS`, 6) bits below the row's largest logit, one step for the store | 24 |
| largest logit | float16 | 2 |
| the rest's log-sum-exp | float16 per temperature | 2 |

Rows are ``(block, position)`` in order, so their ids are implicit: ``block_id * L + position``.
The block ids themselves are saved as runs of consecutive ids (a split by file is a few runs, one
per file or fewer): 16 bytes a run, well under a hundredth of a byte a token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from softtargets import distributed
from softtargets.config import check_budget
from softtargets.data.sequences import Blocks
from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_write_bytes, parse_json
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
    step: float  # logit units per code step
    index_bits: int
    packed_ids: Tensor  # (B * L, ceil(top * index_bits / 8)) uint8
    packed_codes: Tensor  # (B * L, ceil(top * code_bits / 8)) uint8
    largest: Tensor  # (B * L,) float16
    rest: Tensor  # (B * L, len(temperatures)) float16
    blocks_fingerprint: str
    teacher_fingerprint: str

    def __len__(self) -> int:
        return len(self.largest)

    @property
    def bytes_per_token(self) -> float:
        """Stored bytes per position (the block ids' runs amortised over the positions)."""
        per_row = self.packed_ids.shape[1] + self.packed_codes.shape[1] + 2 + 2 * self.rest.shape[1]
        starts, _ = id_runs(self.block_ids)
        return per_row + 16 * len(starts) / max(len(self), 1)

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
        codes = unpack_bits(self.packed_codes[rows], self.top, self.code_bits)
        values = self.largest[rows].float()[:, None] - codes.float() * self.step
        classes = unpack_bits(self.packed_ids[rows], self.top, self.index_bits)
        return values, classes, self.rest[rows, matches[0]].float()

    def save(self, path: str | Path) -> Path:
        meta = {
            "format": FORMAT,
            "header": json.dumps(
                {
                    "block_length": self.block_length, "vocab_size": self.vocab_size,
                    "top": self.top, "temperatures": list(self.temperatures),
                    "code_bits": self.code_bits, "step": self.step,
                    "index_bits": self.index_bits, "blocks": self.blocks_fingerprint,
                    "teacher": self.teacher_fingerprint,
                }
            ),
        }  # fmt: skip
        starts, lengths = id_runs(self.block_ids)
        tensors = {
            "block_starts": starts, "block_runs": lengths, "packed_ids": self.packed_ids,
            "packed_codes": self.packed_codes, "largest": self.largest, "rest": self.rest,
        }  # fmt: skip
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, meta))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, blocks: Blocks | None = None) -> TokenStore:
        """Read a token store; with ``blocks``, refuse one made for other blocks or vocabulary."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:
            raise SoftTargetsError(f"{path} is not a readable token store ({err})") from None
        if meta.get("format") != FORMAT:
            raise SoftTargetsError(f"{path} is not a softtargets token store")
        h = parse_json(meta["header"], f"{path}'s header")
        if "block_ids" in tensors:  # written before block ids were saved as runs
            block_ids = tensors["block_ids"]
        else:
            block_ids = ids_from_runs(tensors["block_starts"], tensors["block_runs"])
        store = cls(
            block_ids, int(h["block_length"]), int(h["vocab_size"]), int(h["top"]),
            tuple(float(t) for t in h["temperatures"]), int(h["code_bits"]), float(h["step"]),
            int(h["index_bits"]), tensors["packed_ids"], tensors["packed_codes"],
            tensors["largest"], tensors["rest"], str(h["blocks"]), str(h["teacher"]),
        )  # fmt: skip
        if blocks is not None:
            if blocks.vocab_size != store.vocab_size:
                raise SoftTargetsError(
                    f"{path} holds a teacher of vocabulary {store.vocab_size}; these blocks' is "
                    f"{blocks.vocab_size}: label them with a teacher of their tokenizer"
                )
            if blocks.fingerprint != store.blocks_fingerprint:
                raise SoftTargetsError(f"{path} was written for other blocks; label these again")
        return store


@torch.no_grad()
def label_tokens(
    teacher: nn.Module,
    blocks: Blocks,
    top: int = 32,
    temperatures: Sequence[float] = (1.0,),
    code_bits: int = CODE_BITS,
    batch_blocks: int = 8,
) -> TokenStore:
    """Run ``teacher`` (ids ``(b, L)`` -> logits ``(b, L, V)``) over ``blocks`` once and keep, at
    every position, its ``top`` largest logits (quantised), their tokens (bit-packed) and the
    rest's log-sum-exp at each of ``temperatures``. Memory: one batch of blocks' logits.

    Under torchrun each process labels its share of the blocks and every process gets the whole
    store (the same one a single process writes: one code step, the largest spread of any row)."""
    if not 1 <= top < blocks.vocab_size:
        raise SoftTargetsError(f"--top-k must be from 1 to {blocks.vocab_size - 1}, got {top}")
    if not temperatures or any(t <= 0 for t in temperatures):
        raise SoftTargetsError("give at least one positive temperature to keep the rest's mass at")
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    # every process checks the vocabulary on the first block, so that none is left waiting in a
    # collective step for one that stopped (a process may have no blocks of its own)
    width = teacher(blocks.batch(slice(0, 1))[:, :-1].to(device)).shape[-1]
    if width != blocks.vocab_size:
        raise SoftTargetsError(
            f"the teacher's vocabulary is {width}, the blocks' {blocks.vocab_size}: teacher and "
            "tokenizer must match"
        )
    values, ids, rests = [], [], []
    mine = distributed.my_slice(len(blocks))  # under torchrun, this process's blocks
    for start in range(mine.start, mine.stop, batch_blocks):
        inputs = blocks.batch(slice(start, min(start + batch_blocks, mine.stop)))[:, :-1].to(device)
        logits = teacher(inputs).float().reshape(-1, blocks.vocab_size)
        kept = logits.topk(top, dim=1)
        others = logits.scatter(1, kept.indices, float("-inf"))
        rests.append(torch.stack([torch.logsumexp(others / t, dim=1) for t in temperatures], 1))
        values.append(kept.values.cpu())
        ids.append(kept.indices.cpu())
    teacher.train(was_training)
    empty = torch.zeros(0, top)
    values_t, ids_t = torch.cat([empty, *values]), torch.cat([empty.long(), *ids])
    rests_t = torch.cat([torch.zeros(0, len(temperatures)), *[r.cpu() for r in rests]])
    largest = values_t[:, 0].half().float() if len(values_t) else torch.zeros(0)
    # one code step for the whole store: the largest spread of any process's rows
    gaps = largest[:, None] - values_t
    spread = distributed.max_(torch.tensor(float(gaps.max()) if gaps.numel() else 0.0))
    levels = (1 << code_bits) - 1
    step = max(float(spread) / levels, 1e-6)
    codes = (gaps / step).round().clamp(0, levels).long()
    index_bits = max(1, math.ceil(math.log2(blocks.vocab_size)))
    # every process's rows, in block order, on every process (each row packs on its own)
    parts = distributed.gather_to_all(
        (pack_bits(ids_t, index_bits), pack_bits(codes, code_bits), largest.half(), rests_t.half())
    )
    packed_ids, packed_codes, largest_t, rest_t = (torch.cat(p) for p in zip(*parts, strict=True))
    return TokenStore(
        blocks.block_ids.clone(), blocks.block_length, blocks.vocab_size, top,
        tuple(float(t) for t in temperatures), code_bits, step, index_bits, packed_ids,
        packed_codes, largest_t, rest_t, blocks.fingerprint, fingerprint_module(teacher),
    )  # fmt: skip
