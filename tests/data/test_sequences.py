"""Language-model data: bytes as tokens, blocks that never cross a file, a split by file."""

from __future__ import annotations

import pytest
import torch

from softtargets.data.sequences import (
    ByteTokenizer,
    pack_blocks,
    pack_to_file,
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


def test_a_token_file_holds_the_blocks_memory_holds_and_splits_copy_no_tokens(tmp_path) -> None:
    paths = stdlib_files(5, seed=1)
    in_memory = pack_blocks(read_corpus(paths), 64, 258)
    mapped = pack_to_file(paths, ByteTokenizer(), 64, tmp_path / "tokens.bin")
    assert mapped.storage.dtype == torch.int16  # 2 bytes a token on disk
    assert (tmp_path / "tokens.bin").stat().st_size == 2 * 65 * len(in_memory)
    assert torch.equal(mapped.tokens, in_memory.tokens)
    assert mapped.fingerprint == in_memory.fingerprint  # a store of one serves the other
    parts = split_by_file(mapped, 0.2, 0.2, seed=0)
    for part, expected in zip(parts, split_by_file(in_memory, 0.2, 0.2, seed=0), strict=True):
        assert part.storage is mapped.storage  # rows of the one mapped file
        assert torch.equal(part.batch(torch.tensor([0, len(part) - 1])),
                           expected.tokens[[0, len(expected) - 1]])  # fmt: skip
        assert part.fingerprint == expected.fingerprint
    (tmp_path / "tokens.bin").write_bytes(b"\0" * 10)  # not this corpus's file: refused
    from softtargets.data.sequences import map_token_file

    with pytest.raises(SoftTargetsError, match="not the token file of these blocks"):
        map_token_file(tmp_path / "tokens.bin", 64, mapped.file_index, mapped.files, 258)
