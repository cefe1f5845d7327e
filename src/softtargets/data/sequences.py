"""Token sequences for language models: text files become token ids, packed into fixed-length
blocks with stable ids, split into train / validation / test by file.

A language model classifies every position of a sequence over its vocabulary, so a row of
softtargets' data is one position: ``(block id, position)``, whose stable row id is
``block_id * block_length + position``. Blocks never cross a file's end, so a split by file is
exact: no file has rows in two parts.

| piece | does |
| --- | --- |
| :class:`ByteTokenizer` | UTF-8 bytes as tokens 0-255, plus ``<eos>`` and ``<pad>``: needs nothing installed |
| :func:`read_corpus` | text files (UTF-8, checked) -> token ids per file, ``<eos>`` after each |
| :func:`pack_blocks` | ids per file -> ``(blocks, block_length + 1)`` windows (inputs and next tokens), in memory |
| :class:`Piece`, :func:`blocks_in_memory`, :func:`blocks_to_file` | a file's (or an example's) windows -> blocks in memory, or in a token file mapped back (larger than memory) |
| :func:`pack_to_file` | text files -> their blocks in a token file, tokenised a file at a time |
| :func:`split_by_file` | a seeded split of the files (or examples), then their blocks |
| :func:`stdlib_files` | a fixed, seeded selection of the Python standard library's own source files |

Prompt / completion examples (:mod:`softtargets.data.examples`) are pieces too: one block each,
padded, with the span of positions that predict the completion (:attr:`Blocks.spans`); the
positions outside it (prompt and padding) are masked out of every loss.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softtargets.config import check_budget
from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_open, read_small_text


class ByteTokenizer:
    """Bytes as tokens: ids 0-255 are the UTF-8 bytes, 256 ends a document, 257 pads."""

    eos_id, pad_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Blocks:
    """Fixed-length token blocks and where they came from.

    Attributes:
        storage: ``(all blocks, block_length + 1)`` token ids these blocks are rows of: an int64
            tensor in memory, or an int16 / int32 one mapped from a token file
            (:func:`pack_to_file`: read from disk as batches ask for them). A block's inputs are
            its first ``block_length`` ids, the next tokens to predict its last ``block_length``.
        rows: ``(num_blocks,)`` int64, which rows of ``storage`` these blocks are (a split takes
            rows without copying tokens).
        block_ids: ``(num_blocks,)`` int64 stable ids (positions in the whole packed corpus).
        file_index: ``(num_blocks,)`` int64, the file each block came from (into ``files``).
        files: the source files' names, in corpus order (for examples: ``FILE:LINE`` each).
        vocab_size: the tokenizer's vocabulary size.
        spans: ``(num_blocks, 2)`` int64 ``[first, stop)`` of the positions that count in each
            block (prompt / completion examples: the positions predicting the completion), or
            ``None``: every position counts (packed text).
    """

    storage: Tensor
    rows: Tensor
    block_ids: Tensor
    file_index: Tensor
    files: tuple[str, ...]
    vocab_size: int
    spans: Tensor | None = None

    @property
    def block_length(self) -> int:
        return int(self.storage.shape[1]) - 1

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def positions(self) -> int:
        """Positions that count in all the blocks (``len(self) * block_length`` without spans)."""
        if self.spans is None:
            return len(self) * self.block_length
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())

    def mask(self, which: Tensor | slice) -> Tensor | None:
        """``(k, block_length)`` bool, the positions that count in the blocks ``which``, or
        ``None`` when every position does."""
        if self.spans is None:
            return None
        spans = self.spans[which]
        positions = torch.arange(self.block_length)[None, :]
        return (positions >= spans[:, :1]) & (positions < spans[:, 1:])

    def batch(self, which: Tensor | slice) -> Tensor:
        """``(k, block_length + 1)`` int64 ids of the blocks ``which`` (indices or a slice into
        these blocks), read from memory or the token file."""
        return self.storage[self.rows[which]].long()

    @property
    def tokens(self) -> Tensor:
        """``(num_blocks, block_length + 1)`` int64: every block at once, in memory (small corpora
        and tests; training reads :meth:`batch` by batch)."""
        check_budget(8 * len(self) * (self.block_length + 1), f"{len(self):,} token blocks")
        return self.batch(slice(None))

    def row_ids(self) -> Tensor:
        """``(num_blocks, block_length)`` stable row ids, one per predicted position."""
        positions = torch.arange(self.block_length)
        return self.block_ids[:, None] * self.block_length + positions[None, :]

    def take(self, rows: Tensor) -> Blocks:
        """The blocks at positions ``rows`` (their ids and files kept; no tokens copied)."""
        return Blocks(
            self.storage, self.rows[rows], self.block_ids[rows], self.file_index[rows],
            self.files, self.vocab_size, None if self.spans is None else self.spans[rows],
        )  # fmt: skip

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the tokens (as int64, however stored) and their ids, read a chunk of
        blocks at a time (a store made for other blocks is refused)."""
        digest = hashlib.sha256()
        for start in range(0, len(self), FINGERPRINT_BLOCKS):
            digest.update(self.batch(slice(start, start + FINGERPRINT_BLOCKS)).numpy().tobytes())
        digest.update(self.block_ids.numpy().tobytes())
        if self.spans is not None:  # the same tokens with other prompts are other data
            digest.update(self.spans.numpy().tobytes())
        return digest.hexdigest()[:16]


#: blocks hashed at a time by :attr:`Blocks.fingerprint`
FINGERPRINT_BLOCKS = 4096


def read_corpus(
    paths: Sequence[str | Path], tokenizer: ByteTokenizer | None = None
) -> list[tuple[str, list[int]]]:
    """``(name, token ids)`` per file, ``<eos>`` after each; a file that is not UTF-8 text is one
    line naming it."""
    tokenizer = tokenizer or ByteTokenizer()
    corpus = [(str(path), read_file_ids(path, tokenizer)) for path in paths]
    if not corpus:
        raise SoftTargetsError("the corpus has no files; give text files or a folder of them")
    return corpus


def read_file_ids(path: str | Path, tokenizer: Any) -> list[int]:
    """One text file's token ids, ``<eos>`` after them (not UTF-8: one line naming it)."""
    text = read_small_text(path, "text file")  # refuses non-UTF-8, FIFOs, huge files
    return [*tokenizer.encode(text), tokenizer.eos_id]


def file_windows(ids: Sequence[int] | Tensor, block_length: int) -> Tensor:
    """``(count, block_length + 1)`` int64: a file's ids cut into non-overlapping windows (a
    window's last token is only a target; the next window starts there); the tail shorter than
    a window is dropped, so no block crosses a file's end."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    count = max(0, (len(ids_t) - 1) // block_length)
    if count == 0:
        return torch.zeros(0, block_length + 1, dtype=torch.long)
    return ids_t[: count * block_length + 1].unfold(0, block_length + 1, block_length)


@dataclass(frozen=True)
class Piece:
    """One unit of a corpus, as packing takes it: a text file's windows, or one example's.

    Attributes:
        name: the file's name (an example's ``FILE:LINE``).
        windows: ``(count, block_length + 1)`` int64 token ids (:func:`file_windows`).
        tokens: how many tokens it had (for the message when no piece fills a block).
        spans: ``(count, 2)`` int64, each window's positions that count, or ``None`` for all.
    """

    name: str
    windows: Tensor
    tokens: int
    spans: Tensor | None = None


def text_pieces(paths: Iterable[str | Path], tokenizer: Any, block_length: int) -> Iterator[Piece]:
    """Each text file's windows, tokenised one file at a time."""
    for path in paths:
        ids = read_file_ids(path, tokenizer)
        yield Piece(str(path), file_windows(ids, block_length), len(ids))


def pack_blocks(
    corpus: Sequence[tuple[str, list[int]]], block_length: int, vocab_size: int
) -> Blocks:
    """Cut each file's ids into blocks (:func:`file_windows`), in memory."""
    _check_length(block_length)
    total = sum(max(0, (len(ids) - 1) // block_length) for _, ids in corpus)
    check_budget(
        8 * total * (block_length + 1), f"{total:,} blocks of {block_length} tokens",
        "pass --stream (a token file on disk)",
    )  # fmt: skip
    pieces = (Piece(n, file_windows(ids, block_length), len(ids)) for n, ids in corpus)
    return blocks_in_memory(pieces, block_length, vocab_size)


def blocks_in_memory(pieces: Iterable[Piece], block_length: int, vocab_size: int) -> Blocks:
    """The pieces' windows as blocks in memory (refused, as they come, beyond the budget)."""
    _check_length(block_length)
    windows: list[Tensor] = []
    index = _PieceIndex()
    held = 0  # bytes of int64 windows
    for piece in pieces:
        held += 8 * piece.windows.numel()
        check_budget(held, f"the blocks read so far ({held >> 20:,} MB)", "pass --stream")
        index.add(piece)
        windows.append(piece.windows)
    owners, names, spans = index.finish(block_length)
    return blocks_of(torch.cat(windows), owners, names, vocab_size, spans)


def blocks_to_file(
    pieces: Iterable[Piece], block_length: int, vocab_size: int, path: str | Path
) -> Blocks:
    """Write the pieces' windows to the token file ``path`` (:func:`token_dtype` ids, atomically)
    as they come, then map it back (:func:`map_token_file`): the blocks are read from disk as
    batches need them, so the corpus may be larger than memory."""
    _check_length(block_length)
    dtype = token_dtype(vocab_size)
    index = _PieceIndex()
    with atomic_open(path, "wb") as handle:
        for piece in pieces:
            handle.write(piece.windows.to(dtype).numpy().tobytes())
            index.add(piece)
    owners, names, spans = index.finish(block_length)
    return map_token_file(path, block_length, owners, names, vocab_size, spans)


class _PieceIndex:
    """What packing keeps of each piece beside its tokens: its blocks' owner, its name, its
    spans and its length (for the message when no piece fills a block)."""

    def __init__(self) -> None:
        self.owners: list[Tensor] = []
        self.names: list[str] = []
        self.spans: list[Tensor | None] = []
        self.lengths: list[int] = []

    def add(self, piece: Piece) -> None:
        self.owners.append(torch.full((len(piece.windows),), len(self.names), dtype=torch.long))
        self.names.append(piece.name)
        self.spans.append(piece.spans)
        self.lengths.append(piece.tokens)

    def finish(self, block_length: int) -> tuple[Tensor, tuple[str, ...], Tensor | None]:
        """``(owners (blocks,), names, spans (blocks, 2) or None)``; a corpus without a whole
        block, or mixing text files with examples, is one line."""
        _check_some(sum(map(len, self.owners)), self.lengths, block_length)
        if all(part is None for part in self.spans):
            spans = None
        elif any(part is None for part in self.spans):
            raise SoftTargetsError("a corpus mixes text files and prompt / completion examples")
        else:
            spans = torch.cat([part for part in self.spans if part is not None])
        return torch.cat(self.owners), tuple(self.names), spans


def pack_to_file(
    paths: Sequence[str | Path], tokenizer: Any, block_length: int, path: str | Path
) -> Blocks:
    """Tokenise the text files one at a time and write their blocks to the token file ``path``
    (:func:`blocks_to_file`)."""
    _check_length(block_length)
    return blocks_to_file(text_pieces(paths, tokenizer, block_length), block_length,
                          tokenizer.vocab_size, path)  # fmt: skip


def _check_length(block_length: int) -> None:
    if block_length < 1:
        raise SoftTargetsError(f"the block length must be at least 1, got {block_length}")


def token_dtype(vocab_size: int) -> torch.dtype:
    """The token file's id type: int16 (2 bytes a token) when the vocabulary fits, else int32."""
    return torch.int16 if vocab_size <= 1 << 15 else torch.int32


def map_token_file(
    path: str | Path,
    block_length: int,
    owners: Tensor,
    files: tuple[str, ...],
    vocab_size: int,
    spans: Tensor | None = None,
) -> Blocks:
    """The blocks of a token file :func:`blocks_to_file` wrote (``owners``: each block's file;
    ``spans``: their positions that count, see :class:`Blocks`), memory-mapped: nothing is read
    until a batch asks for its blocks."""
    count = len(owners)
    expected = count * (block_length + 1) * token_dtype(vocab_size).itemsize
    if Path(path).stat().st_size != expected:
        raise SoftTargetsError(f"{path} is not the token file of these blocks; write it again")
    storage = torch.from_file(
        str(path), shared=False, size=count * (block_length + 1), dtype=token_dtype(vocab_size)
    ).view(count, block_length + 1)
    return blocks_of(storage, owners, files, vocab_size, spans)


def _check_some(total: int, lengths: Sequence[int], block_length: int) -> None:
    if not lengths:
        raise SoftTargetsError("the corpus has no files; give text files or a folder of them")
    if not total:
        raise SoftTargetsError(
            f"the corpus is shorter than one block: its longest file has {max(lengths)} tokens, a "
            f"block needs {block_length + 1}; give more text or a shorter --block-length"
        )


def blocks_of(
    storage: Tensor,
    owners: Tensor,
    files: tuple[str, ...],
    vocab_size: int,
    spans: Tensor | None = None,
) -> Blocks:
    """Blocks of every row of ``storage`` ``(count, L + 1)``, ids in order, ``owners`` ``(count,)``
    the file of each (an index into ``files``), ``spans`` their positions that count."""
    count = len(storage)
    every = torch.arange(count, dtype=torch.long)
    return Blocks(storage, every, every.clone(), owners, files, vocab_size, spans)


def split_by_file(
    blocks: Blocks, val: float = 0.1, test: float = 0.2, seed: int = 0
) -> tuple[Blocks, Blocks, Blocks]:
    """``(train, val, test)``: the files in a seeded order, assigned to test, then validation,
    until each part holds about its fraction of the blocks; the rest train. Never a file in two
    parts."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise SoftTargetsError(f"split fractions val={val}, test={test} must sum to less than 1")
    present = torch.unique(blocks.file_index)
    if len(present) < 3 and (val > 0 and test > 0):
        unit, whole = ("file", " with a whole block") if blocks.spans is None else ("example", "")
        raise SoftTargetsError(
            f"the corpus has {len(present)} {unit}s{whole}; a split by {unit} needs at least 3 "
            "(one each for training, validation and test)"
        )
    order = present[torch.randperm(len(present), generator=torch.Generator().manual_seed(seed))]
    sizes = torch.bincount(blocks.file_index, minlength=len(blocks.files))
    parts: dict[str, list[int]] = {"test": [], "val": [], "train": []}
    wanted = {"test": test * len(blocks), "val": val * len(blocks)}
    taken = {"test": 0, "val": 0}
    for file in order.tolist():
        for part in ("test", "val"):
            if taken[part] < wanted[part] and (part != "val" or taken["test"] >= wanted["test"]):
                parts[part].append(file)
                taken[part] += int(sizes[file])
                break
        else:
            parts["train"].append(file)
    if not parts["train"]:
        raise SoftTargetsError("no file is left to train on; give more files or smaller fractions")

    def of(files: list[int]) -> Blocks:
        rows = torch.isin(blocks.file_index, torch.tensor(files, dtype=torch.long))
        return blocks.take(rows.nonzero().squeeze(1))

    return of(parts["train"]), of(parts["val"]), of(parts["test"])


def stdlib_files(count: int = 40, seed: int = 0, largest_bytes: int = 200_000) -> list[Path]:
    """A fixed, seeded selection of ``count`` of the Python standard library's own ``.py`` files
    (real text that is on every machine and nobody here wrote), skipping tests and files over
    ``largest_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted(
        p for p in root.glob("*.py")
        if p.is_file() and not p.name.startswith("test") and p.stat().st_size <= largest_bytes
    )  # fmt: skip
    if len(candidates) < count:
        raise SoftTargetsError(f"the standard library at {root} has only {len(candidates)} files")
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return [candidates[i] for i in sorted(order[:count].tolist())]
