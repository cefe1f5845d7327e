"""Shared fixtures. Every test runs on the CPU with a private dataset cache."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Generated datasets are cached per test session, never in the user's home.
    monkeypatch.setenv("SOFTTARGETS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(1)


@pytest.fixture
def same_token_store():
    """``check(path_a, path_b)``: the two token store files hold the same store, tensor for
    tensor (the processes and streamed-labelling tests compare stores made two ways)."""
    from softtargets.store.tokens import TokenStore

    def check(path_a, path_b) -> None:
        a, b = TokenStore.load(path_a), TokenStore.load(path_b)
        assert (a.top, a.temperatures, a.blocks_fingerprint, a.teacher_fingerprint) == (
            b.top, b.temperatures, b.blocks_fingerprint, b.teacher_fingerprint
        )  # fmt: skip
        for part in ("block_ids", "steps", "packed_ids", "packed_codes", "largest", "rest"):
            assert torch.equal(getattr(a, part), getattr(b, part)), part
        assert (a.spans is None) == (b.spans is None)
        assert a.spans is None or torch.equal(a.spans, b.spans)

    return check


@pytest.fixture
def chat_tokenizer(tmp_path):
    """A folder holding a word-level Hugging Face tokenizer with a chat template (``<user> ...
    <end> <assistant> ... <end>``), built here: nothing downloaded. Skipped without the hf
    extra."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[EOS]", "<user>", "<assistant>", "<end>"]
    text = "what is soft what is hard targets carry structure alpha beta gamma delta"
    words.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
        additional_special_tokens=["<user>", "<assistant>", "<end>"],
    )  # fmt: skip
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}> {{ m.content }} <end> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    folder = tmp_path / "chat-tokenizer"
    tokenizer.save_pretrained(folder)
    return folder
