"""Prompt / completion examples: one padded block each, only the completion counts, split by
example; the same blocks in memory and in a token file; a fit never learns the prompt."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from softtargets.data.examples import example_pieces
from softtargets.data.sequences import (
    Blocks,
    ByteTokenizer,
    blocks_in_memory,
    blocks_to_file,
    split_by_file,
)
from softtargets.errors import SoftTargetsError
from softtargets.training.gpt import gpt
from softtargets.training.lm import _batch_loss, next_token_loss, sample_continuations

BYTES = ByteTokenizer()


def _write(path, examples) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")


def _examples(count: int = 20) -> list[dict[str, str]]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    return [
        {"prompt": f"{i}: {words[i % 5]} {words[(i + 2) % 5]} =>", "completion": f" {words[i % 3]}"}
        for i in range(count)
    ]


def _blocks(tmp_path, examples=None, length: int = 24) -> Blocks:
    _write(tmp_path / "ex.jsonl", examples or _examples())
    return blocks_in_memory(example_pieces(tmp_path / "ex.jsonl", BYTES, length), length, 258)


def test_an_example_is_one_padded_block_whose_span_predicts_its_completion(tmp_path) -> None:
    examples = [{"prompt": "ab", "completion": "cde"}, {"prompt": "", "completion": "x" * 40}]
    blocks = _blocks(tmp_path, examples, length=8)
    tokens = blocks.tokens
    # prompt + completion + <eos>, then padding: 2 + 3 + 1 ids in a window of 9
    assert tokens[0].tolist() == [*b"abcde", BYTES.eos_id, *[BYTES.pad_id] * 3]
    # position j predicts token j + 1: positions 1 to 4 predict "c", "d", "e" and <eos>
    assert blocks.spans[0].tolist() == [1, 5]
    assert blocks.mask(slice(0, 1)).tolist() == [
        [False, True, True, True, True, False, False, False]
    ]
    # no prompt: the completion's first token has nothing before it; a long one is cut
    assert blocks.spans[1].tolist() == [0, 8] and tokens[1].tolist() == [ord("x")] * 9
    assert blocks.positions == 4 + 8
    assert blocks.files == (f"{tmp_path / 'ex.jsonl'}:1", f"{tmp_path / 'ex.jsonl'}:2")


def test_a_split_by_example_keeps_each_example_and_its_span_whole(tmp_path) -> None:
    blocks = _blocks(tmp_path)
    parts = split_by_file(blocks, 0.2, 0.2, seed=0)
    assert sum(len(p) for p in parts) == len(blocks) == 20
    for part in parts:  # each block keeps its own span
        assert torch.equal(part.spans, blocks.spans[part.block_ids])
    owners = [set(p.file_index.tolist()) for p in parts]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])


def test_a_token_file_holds_the_examples_memory_holds(tmp_path) -> None:
    in_memory = _blocks(tmp_path)
    pieces = example_pieces(tmp_path / "ex.jsonl", BYTES, 24)
    mapped = blocks_to_file(pieces, 24, 258, tmp_path / "tokens.bin")
    assert torch.equal(mapped.tokens, in_memory.tokens)
    assert torch.equal(mapped.spans, in_memory.spans)
    assert mapped.fingerprint == in_memory.fingerprint
    # the same tokens with other spans are other data: a store of one must not serve the other
    other = Blocks(*[getattr(in_memory, f) for f in ("storage", "rows", "block_ids",
                                                     "file_index", "files", "vocab_size")],
                   spans=in_memory.spans + 1)  # fmt: skip
    assert other.fingerprint != in_memory.fingerprint


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "ex.jsonl:2 is not valid JSON"),
        ('["prompt", "completion"]', "ex.jsonl:2 is a list, not a JSON object"),
        ('{"prompt": "a"}', "ex.jsonl:2: needs two strings (prompt: str, completion: NoneType)"),
        (
            '{"prompt": "' + "p" * 30 + '", "completion": "c"}',
            "ex.jsonl:2: the prompt is 30 tokens",
        ),
        ("[" * 100_000 + "]" * 100_000, "ex.jsonl:2 is nested deeper than"),  # not a RecursionError
    ],
)
def test_a_bad_example_is_one_line_naming_it(tmp_path, line, message) -> None:
    (tmp_path / "ex.jsonl").write_text(json.dumps(_examples(1)[0]) + "\n" + line + "\n")
    with pytest.raises(SoftTargetsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(example_pieces(tmp_path / "ex.jsonl", BYTES, 24))


def test_a_line_that_is_not_utf8_or_a_path_that_is_not_a_file_is_named(tmp_path) -> None:
    (tmp_path / "ex.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xe9"}\n')
    with pytest.raises(SoftTargetsError, match="ex.jsonl:2 is not UTF-8"):
        list(example_pieces(tmp_path / "ex.jsonl", BYTES, 24))
    os.mkfifo(tmp_path / "fifo.jsonl")  # never opened: reading it would wait for a writer
    with pytest.raises(SoftTargetsError, match="fifo.jsonl is not a regular file"):
        list(example_pieces(tmp_path / "fifo.jsonl", BYTES, 24))


def _model():
    torch.manual_seed(0)
    return gpt(258, layers=1, heads=2, width=16, context=24)


def test_the_loss_counts_the_completion_only(tmp_path) -> None:
    blocks = _blocks(tmp_path)
    model = _model()
    tokens = blocks.tokens
    with torch.no_grad():  # written apart: cross-entropy at the span's positions only
        losses = F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:],
                                 reduction="none")  # fmt: skip
    expected = losses[blocks.mask(slice(None))].mean()
    assert next_token_loss(model, blocks) == pytest.approx(float(expected), rel=1e-5)
    assert next_token_loss(model, blocks) != pytest.approx(float(losses.mean()), rel=1e-3)


def test_a_training_step_does_not_see_what_the_padding_is(tmp_path) -> None:
    blocks = _blocks(tmp_path)
    repadded = blocks.tokens.clone()
    after = torch.arange(25)[None, :] > blocks.spans[:, 1:]  # past each example's <eos>
    repadded[after] = torch.randint(0, 256, (int(after.sum()),))
    other = Blocks(repadded, *[getattr(blocks, f) for f in ("rows", "block_ids", "file_index",
                                                           "files", "vocab_size", "spans")])  # fmt: skip
    grads = []
    for data in (blocks, other):
        model = _model()
        loss = _batch_loss(model, data, torch.arange(8), None, {}, False, torch.Generator(),
                           method="kd", temperature=1.0, alpha=0.0, chunk=64, device="cpu")  # fmt: skip
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])  # masked out, and causal: padding reaches nothing kept


def test_on_policy_samples_keep_each_rows_own_prompt() -> None:
    tokens = torch.randint(0, 256, (3, 12))
    prompts = torch.tensor([2, 5, 9])
    sampled = sample_continuations(_model(), tokens, prompts, torch.Generator().manual_seed(0))
    for row, prompt in enumerate(prompts.tolist()):
        assert torch.equal(sampled[row, :prompt], tokens[row, :prompt])
    assert not torch.equal(sampled[0, 2:], tokens[0, 2:])  # 10 draws over 258 ids


def test_a_store_of_examples_keeps_the_completions_positions_only(tmp_path, same_token_store):
    from softtargets.store.tokens import TokenStore, label_tokens

    blocks = _blocks(tmp_path)
    every = Blocks(*[getattr(blocks, f) for f in ("storage", "rows", "block_ids", "file_index",
                                                  "files", "vocab_size")])  # fmt: skip
    teacher = _model()
    kept = label_tokens(teacher, blocks, top=4, temperatures=(1.0, 2.0), batch_blocks=3)
    full = label_tokens(teacher, every, top=4, temperatures=(1.0, 2.0), batch_blocks=3)
    assert len(kept) == blocks.positions < len(full) == 20 * 24
    rows = kept.rows_of(torch.arange(20))  # (20, 24): -1 outside each completion
    mask = blocks.mask(slice(None))
    assert torch.equal(rows >= 0, mask) and torch.equal(rows[mask], torch.arange(len(kept)))
    # at a completion's positions the same tokens and rest as the store of every position (the
    # codes' step is per block, over the rows it keeps: within a step of each other)
    for t in (1.0, 2.0):
        values, classes, rest = kept.kept(rows[mask], t)
        every_values, every_classes, every_rest = full.kept(full.rows_of(torch.arange(20))[mask], t)
        assert torch.equal(classes, every_classes) and torch.equal(rest, every_rest)
        assert (values - every_values).abs().max() <= full.steps.max()
    with pytest.raises(SoftTargetsError, match="no row at some positions"):
        kept.kept(rows[~mask][:3], 1.0)
    # written as it is labelled, and read back: the store kept in memory
    path = tmp_path / "store.safetensors"
    label_tokens(teacher, blocks, top=4, temperatures=(1.0, 2.0), batch_blocks=3, path=path)
    kept.save(tmp_path / "saved.safetensors")
    same_token_store(path, tmp_path / "saved.safetensors")
    assert torch.equal(TokenStore.load(path, blocks).spans, blocks.spans)
    assert path.stat().st_size < 0.5 * full.save(tmp_path / "full.safetensors").stat().st_size


def test_a_corpus_mixing_text_and_examples_is_one_line(tmp_path) -> None:
    from softtargets.data.sequences import text_pieces

    _write(tmp_path / "ex.jsonl", _examples(3))
    (tmp_path / "notes.txt").write_text("soft targets " * 20)
    pieces = [*text_pieces([tmp_path / "notes.txt"], BYTES, 24),
              *example_pieces(tmp_path / "ex.jsonl", BYTES, 24)]  # fmt: skip
    with pytest.raises(SoftTargetsError, match="mixes text files and prompt / completion"):
        blocks_in_memory(pieces, 24, 258)


def test_a_conversation_learns_the_assistants_last_message_by_the_chat_template(
    tmp_path, chat_tokenizer
):
    from softtargets.run.sequence_data import SavedTokenizer

    tokenizer = SavedTokenizer(str(chat_tokenizer))
    messages = [{"role": "user", "content": "what is soft"},
                {"role": "assistant", "content": "targets carry structure"}]  # fmt: skip
    _write(tmp_path / "chat.jsonl", [{"messages": messages}])
    (piece,) = example_pieces(tmp_path / "chat.jsonl", tokenizer, 16)
    ids = tokenizer.tokenizer.convert_tokens_to_ids
    prompt = ids(["<user>", "what", "is", "soft", "<end>", "<assistant>"])
    completion = ids(["targets", "carry", "structure", "<end>"])  # closed by the template
    assert piece.windows[0, :10].tolist() == prompt + completion
    assert piece.windows[0, 10:].tolist() == [tokenizer.eos_id] * 7  # padding
    # positions 5 to 8 predict the assistant's words and its <end>, never the user's
    assert piece.spans.tolist() == [[5, 9]]
    bad = [
        ([messages[0]], "two or more {role, content} objects"),
        ([messages[1], messages[0]], "the last message is the user's"),
    ]
    for given, message in bad:
        _write(tmp_path / "bad.jsonl", [{"messages": given}])
        with pytest.raises(SoftTargetsError, match=message.replace("{", r"\{").replace("}", r"\}")):
            list(example_pieces(tmp_path / "bad.jsonl", tokenizer, 16))
    # the byte-level tokenizer has no template: named, with the fix
    with pytest.raises(SoftTargetsError, match="chat.jsonl:1: a conversation needs a tokenizer"):
        list(example_pieces(tmp_path / "chat.jsonl", BYTES, 16))


def test_a_file_of_examples_is_budgeted_as_padded_blocks(tmp_path) -> None:
    from softtargets.run.sequence_data import memory_bytes

    _write(tmp_path / "ex.jsonl", _examples(3))
    with (tmp_path / "ex.jsonl").open("a") as handle:
        handle.write(json.dumps(_examples(1)[0]))  # a last line without a newline
    (tmp_path / "notes.txt").write_text("x" * 50)
    # 4 examples of 101 ids as int64, and 50 bytes of text at most 50 tokens
    assert memory_bytes([tmp_path / "ex.jsonl", tmp_path / "notes.txt"], 100) == 8 * (4 * 101 + 50)


def test_too_few_examples_to_split_or_none_at_all_are_one_line(tmp_path) -> None:
    blocks = _blocks(tmp_path, _examples(2))
    with pytest.raises(
        SoftTargetsError, match="has 2 examples; a split by example needs at least 3"
    ):
        split_by_file(blocks, 0.2, 0.2)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(SoftTargetsError, match="blank.jsonl holds no examples"):
        list(example_pieces(tmp_path / "blank.jsonl", BYTES, 24))
