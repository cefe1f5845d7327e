"""Feature distillation: the paired features move towards the teacher's, through adapters learned
with the student, for MLPs, 1-D and 2-D CNNs and any module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softtargets.data.dataset import Dataset
from softtargets.data.streams import TensorRows
from softtargets.errors import SoftTargetsError
from softtargets.training.features import FeatureDistillation, FeaturePair, pair_loss
from softtargets.training.fit import fit
from softtargets.training.models import build_model


def data_of(shape: tuple[int, ...], rows: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, *shape, generator=g)
    return Dataset.from_arrays(x, (x.flatten(1).sum(1) > 0).long())


def feature_gap(student, teacher, pair: FeaturePair, x, adapter) -> float:
    """The pair's loss on ``x`` with the student's and teacher's features as they are now."""
    seen = {}
    hooks = [
        student.get_submodule(pair.student).register_forward_hook(
            lambda m, i, o: seen.__setitem__("s", o)
        ),
        teacher.get_submodule(pair.teacher).register_forward_hook(
            lambda m, i, o: seen.__setitem__("t", o)
        ),
    ]
    with torch.no_grad():
        student(x), teacher(x)
        s = seen["s"] if pair.loss == "attention" else adapter(seen["s"])
        value = float(pair_loss(pair.loss, s, seen["t"]))
    for h in hooks:
        h.remove()
    return value


CASES = {
    # (student, teacher, pair): the student's layer is narrower than the teacher's -> an adapter
    "mlp linear": (
        ("mlp", (6,), {"hidden": [4]}),
        ("mlp", (6,), {"hidden": [12]}),
        FeaturePair("2", "2", "mse"),
    ),  # fmt: skip
    "cnn1d conv 1x1": (
        ("cnn1d", (1, 16), {"channels": [3]}),
        ("cnn1d", (1, 16), {"channels": [6]}),
        FeaturePair("2", "2", "cosine"),
    ),  # fmt: skip
    "cnn2d attention": (
        ("cnn2d", (1, 8, 8), {"channels": [2, 3]}),
        ("cnn2d", (1, 8, 8), {"channels": [4, 6]}),
        FeaturePair("5", "5", "attention"),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_paired_features_move_towards_the_teachers(case) -> None:
    (s_name, shape, s_opts), (t_name, _, t_opts), pair = CASES[case]
    data = data_of(shape)
    teacher = build_model(t_name, shape, 2, seed=1, **t_opts)
    spec = FeatureDistillation(teacher, [pair], weight=10.0, alpha=0.5)
    # the same student, trained with and without the feature term
    plain = fit(build_model(s_name, shape, 2, seed=0, **s_opts), data, epochs=6, lr=1e-2)
    distilled = fit(build_model(s_name, shape, 2, seed=0, **s_opts), data, spec, epochs=6, lr=1e-2)
    assert len(distilled.history) == 6 and all(
        torch.isfinite(torch.tensor(r["train_loss"])) for r in distilled.history
    )
    if pair.loss == "attention":
        identity = nn.Identity()
        before = feature_gap(plain.model, teacher, pair, data.features, identity)
        after = feature_gap(distilled.model, teacher, pair, data.features, identity)
        assert after < before  # the attention maps moved towards the teacher's
    weights_before = [p.clone() for p in teacher.parameters()]
    fit(build_model(s_name, shape, 2, seed=0, **s_opts), data, spec, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(weights_before, teacher.parameters(), strict=True))


def test_feature_loss_of_an_mse_pair_falls_as_the_adapter_and_student_learn() -> None:
    data = data_of((6,))
    teacher = build_model("mlp", (6,), 2, seed=1, hidden=[12])
    pair = FeaturePair("2", "2", "mse")
    losses = []
    spec = FeatureDistillation(teacher, [pair], weight=1.0, alpha=0.0)  # features + hard labels
    result = fit(build_model("mlp", (6,), 2, seed=0, hidden=[4]), data, spec, epochs=15, lr=1e-2, schedule="none",
                 on_epoch_end=lambda r: losses.append(r["train_loss"]))  # fmt: skip
    assert losses[-1] < 0.8 * losses[0]
    assert result.model[1].out_features == 4  # the caller's student, trained


def test_any_module_and_streamed_data_and_a_tuple_pair() -> None:
    class Net(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, width), nn.Tanh())
            self.head = nn.Linear(width, 2)

        def forward(self, x):
            return self.head(self.body(x))

    data = data_of((6,))
    spec = FeatureDistillation(Net(10), [("body", "body")], alpha=0.5)
    torch.manual_seed(0)
    memory = fit(Net(5), data, spec, epochs=2, batch_size=16)
    torch.manual_seed(0)
    streamed = fit(Net(5), TensorRows(data), spec, epochs=2, batch_size=16)
    assert memory.history[0]["train_loss"] == pytest.approx(streamed.history[0]["train_loss"])


def test_bad_pairs_are_one_line_errors(tmp_path) -> None:
    data = data_of((6,))
    teacher = build_model("mlp", (6,), 2, seed=1, hidden=[12])

    def student() -> nn.Module:
        return build_model("mlp", (6,), 2, seed=0, hidden=[4])

    with pytest.raises(SoftTargetsError, match="the student has no module 'fc9'"):
        fit(student(), data, FeatureDistillation(teacher, [("fc9", "2")]), epochs=1)
    with pytest.raises(SoftTargetsError, match="unknown feature loss 'l1'"):
        fit(student(), data, FeatureDistillation(teacher, [FeaturePair("2", "2", "l1")]), epochs=1)
    signal = data_of((1, 16))
    short = build_model("cnn1d", (1, 16), 2, seed=1, channels=[6, 6])  # layer 4: length 4
    with pytest.raises(SoftTargetsError, match="differ beyond their channels"):
        fit(build_model("cnn1d", (1, 16), 2, seed=0, channels=[3]), signal,
            FeatureDistillation(short, [("2", "4")]), epochs=1)  # length 8 vs 4  # fmt: skip


def test_a_feature_fit_resumes_exactly_adapters_included(tmp_path) -> None:
    """The checkpoint holds the adapters (learned with the student) beside the model."""
    data = data_of((6,))
    teacher = build_model("mlp", (6,), 2, seed=1, hidden=[12])
    targets = FeatureDistillation(teacher, [FeaturePair("2", "2", "mse")], weight=2.0)

    def student() -> nn.Module:
        return build_model("mlp", (6,), 2, seed=0, hidden=[4], dropout=0.2)

    def stop_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    common = dict(epochs=5, lr=1e-2, batch_size=16, seed=3)
    whole = fit(student(), data, targets, **common)
    path = tmp_path / "f.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(student(), data, targets, checkpoint=path, on_epoch_end=stop_after_two, **common)
    resumed = fit(student(), data, targets, checkpoint=path, **common)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    # another pair is another fit: its checkpoint is refused, not silently reused
    other = FeatureDistillation(teacher, [FeaturePair("2", "2", "cosine")], weight=2.0)
    with pytest.raises(SoftTargetsError, match="checkpoint"):
        fit(student(), data, other, checkpoint=path, **common)


def test_hooks_leave_the_models_even_when_training_fails() -> None:
    data = data_of((6,))
    teacher = build_model("mlp", (6,), 2, seed=1, hidden=[12])
    student = build_model("mlp", (6,), 2, seed=0, hidden=[4])

    def fail(record) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(student, data, FeatureDistillation(teacher, [("2", "2")]), epochs=2, on_epoch_end=fail)
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_a_warmup_ramps_the_logit_loss_of_a_feature_fit(tmp_path) -> None:
    """``options={"warmup": N}``: the logit loss's soft term at ``alpha x min(epoch / N, 1)``,
    the feature losses at full weight. A 1-epoch warm-up is none, to the bit; a fit stopped
    mid-warm-up resumes exactly; in memory and streamed agree."""
    data = data_of((6,))
    teacher = build_model("mlp", (6,), 2, seed=1, hidden=[12])

    def targets(**options) -> FeatureDistillation:
        return FeatureDistillation(teacher, [FeaturePair("2", "2", "mse")], 2.0, options=options)

    def student() -> nn.Module:
        return build_model("mlp", (6,), 2, seed=0, hidden=[4])

    common = dict(epochs=4, lr=1e-2, batch_size=16, seed=3)
    plain = fit(student(), data, targets(), **common)
    one = fit(student(), data, targets(warmup=1), **common)
    warmed = fit(student(), data, targets(warmup=4), **common)
    weights = [torch.cat([p.flatten() for p in r.model.parameters()]) for r in (plain, one, warmed)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.allclose(weights[0], weights[2])
    assert warmed.history[0]["train_loss"] < plain.history[0]["train_loss"]
    streamed = fit(student(), TensorRows(data), targets(warmup=4), **common)
    assert streamed.history[0]["train_loss"] == pytest.approx(warmed.history[0]["train_loss"])

    def stop_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    path = tmp_path / "f.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(student(), data, targets(warmup=4), checkpoint=path, on_epoch_end=stop_after_two,
            **common)  # fmt: skip
    resumed = fit(student(), data, targets(warmup=4), checkpoint=path, **common)
    for a, b in zip(resumed.model.parameters(), warmed.model.parameters(), strict=True):
        assert torch.equal(a, b)
