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
| :func:`pack_blocks` | ids per file -> ``(blocks, block_length + 1)`` windows (inputs and next tokens) |
| :func:`split_by_file` | a seeded split of the files, then their blocks |
| :func:`stdlib_files` | a fixed, seeded selection of the Python standard library's own source files |
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from softtargets.config import check_budget
from softtargets.errors import SoftTargetsError
from softtargets.files import read_small_text


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
        tokens: ``(num_blocks, block_length + 1)`` int64 token ids; a block's inputs are
            ``tokens[:, :-1]``, the next tokens to predict ``tokens[:, 1:]``.
        block_ids: ``(num_blocks,)`` int64 stable ids (positions in the whole packed corpus).
        file_index: ``(num_blocks,)`` int64, the file each block came from (into ``files``).
        files: the source files' names, in corpus order.
        vocab_size: the tokenizer's vocabulary size.
    """

    tokens: Tensor
    block_ids: Tensor
    file_index: Tensor
    files: tuple[str, ...]
    vocab_size: int

    @property
    def block_length(self) -> int:
        return int(self.tokens.shape[1]) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def row_ids(self) -> Tensor:
        """``(num_blocks, block_length)`` stable row ids, one per predicted position."""
        positions = torch.arange(self.block_length)
        return self.block_ids[:, None] * self.block_length + positions[None, :]

    def take(self, rows: Tensor) -> Blocks:
        """The blocks at positions ``rows`` (their ids and files kept)."""
        return Blocks(
            self.tokens[rows], self.block_ids[rows], self.file_index[rows], self.files,
            self.vocab_size,
        )  # fmt: skip

    @property
    def fingerprint(self) -> str:
        """A short hash of the tokens and their ids (a store made for other blocks is refused)."""
        digest = hashlib.sha256()
        digest.update(self.tokens.numpy().tobytes())
        digest.update(self.block_ids.numpy().tobytes())
        return digest.hexdigest()[:16]


def read_corpus(
    paths: Sequence[str | Path], tokenizer: ByteTokenizer | None = None
) -> list[tuple[str, list[int]]]:
    """``(name, token ids)`` per file, ``<eos>`` after each; a file that is not UTF-8 text is one
    line naming it."""
    tokenizer = tokenizer or ByteTokenizer()
    corpus = []
    for path in paths:
        text = read_small_text(path, "text file")  # refuses non-UTF-8, FIFOs, huge files
        corpus.append((str(path), [*tokenizer.encode(text), tokenizer.eos_id]))
    if not corpus:
        raise SoftTargetsError("the corpus has no files; give text files or a folder of them")
    return corpus


def pack_blocks(
    corpus: Sequence[tuple[str, list[int]]], block_length: int, vocab_size: int
) -> Blocks:
    """Cut each file's ids into non-overlapping windows of ``block_length + 1`` tokens (a window's
    last token is only a target; the next window starts there). A file's tail shorter than a
    window is dropped, so no block crosses a file's end."""
    if block_length < 1:
        raise SoftTargetsError(f"the block length must be at least 1, got {block_length}")
    total = sum(max(0, (len(ids) - 1) // block_length) for _, ids in corpus)
    check_budget(8 * total * (block_length + 1), f"{total:,} blocks of {block_length} tokens")
    windows, owners = [], []
    for index, (_, ids) in enumerate(corpus):
        ids_t = torch.tensor(ids, dtype=torch.long)
        count = (len(ids) - 1) // block_length
        for b in range(count):
            windows.append(ids_t[b * block_length : (b + 1) * block_length + 1])
            owners.append(index)
    if not windows:
        longest = max(len(ids) for _, ids in corpus)
        raise SoftTargetsError(
            f"the corpus is shorter than one block: its longest file has {longest} tokens, a "
            f"block needs {block_length + 1}; give more text or a shorter --block-length"
        )
    return Blocks(
        torch.stack(windows),
        torch.arange(len(windows), dtype=torch.long),
        torch.tensor(owners, dtype=torch.long),
        tuple(name for name, _ in corpus),
        vocab_size,
    )


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
        raise SoftTargetsError(
            f"the corpus has {len(present)} files with a whole block; a split by file needs at "
            "least 3 (one each for training, validation and test)"
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
