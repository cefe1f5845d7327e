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


class _Favours(torch.nn.Module):
    """A teacher that, after any context, puts nearly all its mass on one token."""

    def __init__(self, token: int, vocab: int = 258) -> None:
        super().__init__()
        self.token, self.vocab = token, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a device to run on

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., self.token] = 12.0
        return logits


def test_sampled_continuations_keep_the_prompt_and_follow_the_model() -> None:
    from softtargets.training.lm import sample_continuations

    tokens = torch.randint(0, 256, (3, 9))
    sampled = sample_continuations(_Favours(7), tokens, 4, torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 9) and torch.equal(sampled[:, :4], tokens[:, :4])
    assert (sampled[:, 4:] == 7).float().mean() > 0.95  # e^12 / (e^12 + 257): about 0.9999


def test_on_policy_distillation_learns_the_teachers_distribution_on_its_own_samples(parts):
    from softtargets.training.lm import sample_continuations

    train, val, _ = parts
    # one epoch of single-block steps: the weights kept are the last (validation chooses among
    # epochs, and a teacher of a byte the text never has would lose every later one)
    student = fit_lm(_student(), train, val, _Favours(65), method="kd", temperature=1.0,
                     alpha=0.5, epochs=1, batch_blocks=1, lr=1e-2, on_policy=1.0).model  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    sampled = sample_continuations(student, val.tokens[:4], 8, generator)
    # the teacher's favourite byte ('A'), never in the text, is what the student now writes
    assert (sampled[:, 8:] == 65).float().mean() > 0.5
    plain = fit_lm(_student(), train, val, None, epochs=1, batch_blocks=1, lr=1e-2).model
    sampled = sample_continuations(plain, val.tokens[:4], 8, torch.Generator().manual_seed(1))
    assert (sampled[:, 8:] == 65).float().mean() < 0.05


def test_on_policy_needs_the_teacher_model_and_a_fraction(parts) -> None:
    train, val, _ = parts
    teacher = _student(1)
    store = label_tokens(teacher, train, top=4, temperatures=(1.0,))
    with pytest.raises(SoftTargetsError, match="needs the teacher model, not a store"):
        fit_lm(_student(), train, val, store, on_policy=0.5, epochs=1)
    with pytest.raises(SoftTargetsError, match="fraction of steps from 0 to 1"):
        fit_lm(_student(), train, val, teacher, on_policy=1.5, epochs=1)


class _Stop(Exception):
    """Raised from the progress bar: a fit stopped at a chosen step, as a kill would stop it."""


class _StopAt:
    """A stand-in for rich's Progress that stops the fit after ``steps`` training steps."""

    def __init__(self, steps: int) -> None:
        self.steps, self.taken = steps, 0

    def add_task(self, description: str, total: int) -> int:
        return 0

    def update(self, task: int, advance: int) -> None:
        self.taken += advance
        if self.taken >= self.steps:
            raise _Stop

    def remove_task(self, task: int) -> None:
        pass


@pytest.mark.parametrize("on_policy", [0.0, 0.5])
def test_a_fit_stopped_mid_epoch_continues_from_its_checkpoint_to_the_same_weights(
    parts, tmp_path, on_policy
) -> None:
    train, val, _ = parts
    teacher = _student(seed=7)
    settings = dict(temperature=2.0, alpha=0.5, epochs=3, batch_blocks=2, lr=1e-2, seed=3,
                    on_policy=on_policy)  # fmt: skip
    whole = fit_lm(_student(seed=1), train, val, teacher, **settings)
    steps = -(-len(train) // 2)  # per epoch
    checkpoint = tmp_path / "fit.ckpt"
    with pytest.raises(_Stop):  # in the second epoch, after the first one's checkpoint
        fit_lm(_student(seed=1), train, val, teacher, **settings, checkpoint=checkpoint,
               progress=_StopAt(steps + 1))  # fmt: skip
    resumed = fit_lm(_student(seed=1), train, val, teacher, **settings, checkpoint=checkpoint)
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    with pytest.raises(SoftTargetsError, match="checkpoint of another fit"):
        fit_lm(_student(seed=2), train, val, teacher, **settings, checkpoint=checkpoint)
