"""Training a language model on token blocks: next-token labels, an online teacher, a store."""

from __future__ import annotations

import pytest
import torch

from softtargets.data.sequences import ByteTokenizer, pack_blocks, split_by_file
from softtargets.errors import SoftTargetsError
from softtargets.store.tokens import label_tokens
from softtargets.training.gpt import gpt
from softtargets.training.lm import fit_lm, next_token_loss

TEXT = "soft targets carry the similarity structure between classes. " * 8


@pytest.fixture
def parts():
    tokenizer = ByteTokenizer()
    corpus = [(f"f{i}", [*tokenizer.encode(TEXT[i:]), tokenizer.eos_id]) for i in range(6)]
    return split_by_file(pack_blocks(corpus, 16, tokenizer.vocab_size), 0.2, 0.2, seed=0)


def _student(seed: int = 0):
    torch.manual_seed(seed)
    return gpt(258, layers=1, heads=2, width=16, context=16)


def test_next_token_training_lowers_the_validation_loss(parts) -> None:
    train, val, _ = parts
    student = _student()
    before = next_token_loss(student, val)
    result = fit_lm(student, train, val, None, epochs=3, lr=1e-2)
    assert result.history[-1]["val_loss"] < before - 0.5  # from about ln 258 = 5.55 nats
    assert next_token_loss(result.model, val) == pytest.approx(
        min(h["val_loss"] for h in result.history), rel=1e-6
    )  # the best validation epoch's weights are kept


def test_distillation_from_a_teacher_or_its_store_moves_the_student_to_the_teacher(parts) -> None:
    train, val, _ = parts
    teacher = _student(seed=7)
    fit_lm(teacher, train, val, None, epochs=3, lr=1e-2)
    store = label_tokens(teacher, train, top=8, temperatures=(2.0,))

    def distance(model) -> float:  # KL(teacher || student) on the validation blocks, at T = 1
        with torch.no_grad():
            t = teacher(val.tokens[:, :-1]).log_softmax(-1)
            s = model(val.tokens[:, :-1]).log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    for source in (teacher, store):
        student = _student(seed=1)
        before = distance(student)
        fit_lm(student, train, val, source, temperature=2.0, alpha=1.0, epochs=3, lr=1e-2)
        assert distance(student) < before / 2
    with pytest.raises(SoftTargetsError, match="not at 1"):
        fit_lm(_student(), train, val, store, temperature=1.0, epochs=1)
