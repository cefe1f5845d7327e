"""Per-position top-k stores for language models: bit-packing, quantisation, the rest's mass at
each temperature, files, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from softtargets.data.sequences import ByteTokenizer, pack_blocks
from softtargets.errors import SoftTargetsError
from softtargets.store.tokens import TokenStore, label_tokens, pack_bits, unpack_bits
from softtargets.training.gpt import gpt


def test_bits_round_trip_at_every_width() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in (1, 7, 8, 13, 17):
        values = torch.randint(0, 1 << bits, (9, 32), generator=gen)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (9, -(-32 * bits // 8))
        assert torch.equal(unpack_bits(packed, 32, bits), values)


@pytest.fixture
def blocks():
    text = "the soft targets of a teacher carry what the hard labels do not. " * 12
    ids = [*ByteTokenizer().encode(text), ByteTokenizer.eos_id]
    return pack_blocks([("a", ids), ("b", ids[5:])], block_length=16, vocab_size=258)


def test_a_store_keeps_the_top_k_and_the_rest_at_each_temperature(blocks, tmp_path) -> None:
    torch.manual_seed(0)
    teacher = gpt(258, layers=1, heads=2, width=16, context=16)
    store = label_tokens(teacher, blocks, top=8, temperatures=(1.0, 2.0), batch_blocks=3)
    assert len(store) == len(blocks) * 16
    with torch.no_grad():
        logits = teacher(blocks.tokens[:, :-1]).reshape(-1, 258)
    rows = torch.arange(0, len(store), 7)
    for t in (1.0, 2.0):
        values, classes, rest = store.kept(rows, t)
        top = logits[rows].topk(8, dim=1)
        assert torch.equal(classes, top.indices)
        # 6-bit codes below a float16 maximum: within half a step (plus float16's rounding)
        step = store.steps[rows // 16][:, None]  # each block's own
        assert ((values - top.values).abs() <= step / 2 + 0.01).all()
        others = logits[rows].scatter(1, top.indices, float("-inf"))
        expected = torch.logsumexp(others / t, dim=1)
        torch.testing.assert_close(rest, expected, atol=0.02, rtol=1e-3)  # float16
    with pytest.raises(SoftTargetsError, match="not at 4"):
        store.kept(rows, 4.0)
    store.save(tmp_path / "s.safetensors")
    again = TokenStore.load(tmp_path / "s.safetensors", blocks=blocks)
    assert torch.equal(again.kept(rows, 2.0)[0], store.kept(rows, 2.0)[0])
    assert torch.equal(again.block_ids, store.block_ids)  # saved as runs, read back whole
    other = pack_blocks([("c", list(range(200)))], block_length=16, vocab_size=258)
    with pytest.raises(SoftTargetsError, match="other blocks"):
        TokenStore.load(tmp_path / "s.safetensors", blocks=other)


def test_a_store_written_as_it_is_labelled_is_the_one_in_memory_and_mapped(blocks, tmp_path):
    """``label_tokens(path=...)`` writes each batch at its place in the file as it goes: the same
    store as in memory, tensor for tensor, read back through a mapping of the file; a store of
    the format before per-block steps (one step in the header) still reads."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = gpt(258, layers=1, heads=2, width=16, context=16)
    kept = label_tokens(teacher, blocks, top=8, temperatures=(1.0, 2.0), batch_blocks=3)
    path = tmp_path / "s.safetensors"
    written = label_tokens(
        teacher, blocks, top=8, temperatures=(1.0, 2.0), batch_blocks=3, path=path
    )
    parts = ("block_ids", "steps", "packed_ids", "packed_codes", "largest", "rest")
    for part in parts:
        assert torch.equal(getattr(kept, part), getattr(written, part)), part
    assert len(set(written.steps.tolist())) > 1  # a step per block, not one for the store
    with open("/proc/self/maps") as maps:
        assert str(path) in maps.read()  # mapped, not read into memory
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left
    # the older format: one step for the whole store, in the header
    tensors = {p: getattr(kept, p) for p in parts if p != "steps"}
    header = json.loads(_header_of(path))
    header["step"] = 0.25
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, old,
              {"format": "softtargets-token-store", "header": json.dumps(header)})  # fmt: skip
    assert torch.equal(TokenStore.load(old, blocks).steps, torch.full((len(blocks),), 0.25))


def _header_of(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["header"]


def test_bytes_per_token_at_a_large_vocabulary() -> None:
    """The layout's size at V = 128,000 and k = 32 (the bench's figure), computed from a store
    of that layout: 17-bit ids and 6-bit codes."""
    n, k = 4, 32
    ids = torch.randint(0, 128_000, (n, k))
    codes = torch.randint(0, 64, (n, k))
    store = TokenStore(
        torch.arange(1), n, 128_000, k, (1.0,), 6, torch.tensor([0.1]), 17, pack_bits(ids, 17),
        pack_bits(codes, 6), torch.zeros(n).half(), torch.zeros(n, 1).half(), "b", "t",
    )  # fmt: skip
    # one run of block ids (16 bytes) and one block's step (4) over the store's n positions
    assert store.bytes_per_token == pytest.approx(68 + 24 + 2 + 2 + 20 / n)
    assert torch.equal(store.kept(torch.arange(n), 1.0)[1], ids)
    assert torch.equal(unpack_bits(store.packed_codes, k, 6), codes)
    assert torch.equal(store.kept(torch.arange(n), 1.0)[1], ids)


def test_block_ids_are_saved_as_runs_and_read_back(tmp_path) -> None:
    from softtargets.store.tokens import id_runs, ids_from_runs

    ids = torch.tensor([4, 5, 6, 9, 10, 2])
    starts, lengths = id_runs(ids)
    assert starts.tolist() == [4, 9, 2] and lengths.tolist() == [3, 2, 1]
    assert torch.equal(ids_from_runs(starts, lengths), ids)
    assert id_runs(torch.zeros(0, dtype=torch.long))[0].numel() == 0
    with pytest.raises(SoftTargetsError, match="block runs are damaged"):
        ids_from_runs(torch.tensor([1]), torch.tensor([-2]))


def test_a_teacher_of_another_vocabulary_is_refused_with_both_sizes(blocks) -> None:
    teacher = gpt(300, layers=1, heads=2, width=16, context=16)  # ids < 258 run; logits are 300
    with pytest.raises(SoftTargetsError, match="the teacher's vocabulary is 300, the blocks' 258"):
        label_tokens(teacher, blocks, top=8)
