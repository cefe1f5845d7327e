"""Language-model data: bytes as tokens, blocks that never cross a file, a split by file."""

from __future__ import annotations

import pytest
import torch

from softtargets.data.sequences import (
    ByteTokenizer,
    pack_blocks,
    read_corpus,
    split_by_file,
    stdlib_files,
)
from softtargets.errors import SoftTargetsError


def test_bytes_round_trip_and_every_document_ends() -> None:
    tokenizer = ByteTokenizer()
    text = "soft targets: ÿ ∑ 🙂\n"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 258 and tokenizer.pad_id == 257


def test_blocks_never_cross_a_file_and_their_ids_are_stable(tmp_path) -> None:
    paths = []
    for i, length in enumerate((50, 23, 7)):
        path = tmp_path / f"f{i}.txt"
        path.write_text(chr(ord("a") + i) * length)
        paths.append(path)
    blocks = pack_blocks(read_corpus(paths), block_length=8, vocab_size=258)
    # 51 ids -> 6 windows, 24 -> 2, 8 -> 0 (shorter than a window: dropped)
    assert blocks.file_index.tolist() == [0] * 6 + [1] * 2
    for block, file in zip(blocks.tokens, blocks.file_index, strict=True):
        letter = ord("a") + int(file)
        assert set(block.tolist()) <= {letter, ByteTokenizer.eos_id}  # one file's bytes only
    # a window's last token is the next one's first: every position is predicted once
    assert torch.equal(blocks.tokens[1:6, 0], blocks.tokens[0:5, -1])
    ids = blocks.row_ids()
    assert ids.shape == (8, 8) and len(torch.unique(ids)) == 64
    assert torch.equal(blocks.take(torch.tensor([3])).row_ids(), ids[3:4])


def test_a_split_by_file_puts_no_file_in_two_parts() -> None:
    files = stdlib_files(count=12, seed=0)
    assert files == stdlib_files(count=12, seed=0)  # fixed and seeded
    blocks = pack_blocks(read_corpus(files), block_length=64, vocab_size=258)
    train, val, test = split_by_file(blocks, 0.2, 0.2, seed=1)
    assert len(train) + len(val) + len(test) == len(blocks)
    owners = [set(part.file_index.tolist()) for part in (train, val, test)]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert all(owners)
    ids = torch.cat([p.block_ids for p in (train, val, test)])
    assert torch.equal(ids.sort().values, blocks.block_ids)


def test_bad_corpora_are_one_line(tmp_path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SoftTargetsError, match="not UTF-8"):
        read_corpus([tmp_path / "latin1.txt"])
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(SoftTargetsError, match="shorter than one block"):
        pack_blocks(read_corpus([tmp_path / "short.txt"]), block_length=16, vocab_size=258)
    with pytest.raises(SoftTargetsError, match="no files"):
        read_corpus([])
