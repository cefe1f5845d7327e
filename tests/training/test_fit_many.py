"""Vectorised training equals training each model alone."""

from __future__ import annotations

import pytest
import torch

from softtargets.data.builtin import gaussians
from softtargets.data.dataset import split
from softtargets.errors import SoftTargetsError
from softtargets.store.label import label
from softtargets.training.fit import fit
from softtargets.training.fit_many import Member, fit_many
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation
from softtargets.training.stacked import StackedMLP


@pytest.fixture(scope="module")
def parts():
    return split(gaussians(num_samples=600, num_classes=3, dim=6, separation=3.0), 0.2, 0.2)


def build(data, seed: int, hidden=(16, 12)):
    return build_model("mlp", data.feature_shape, data.num_classes, seed=seed, hidden=list(hidden))


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_each_member_equals_fit_alone(parts, optimizer: str) -> None:
    train = parts.train
    teacher = fit(build(train, 99, (32,)), train, epochs=3, lr=1e-2).model
    store = label(teacher, train)
    half = torch.arange(0, len(train), 2)
    members = [
        Member(seed=0),
        Member(seed=1, targets=Distillation(store, 4.0, 0.7), lr=3e-2),
        Member(seed=2, targets=store.soften(2.0, train), rows=half, weight_decay=1e-3),
        Member(seed=3, labels=train.with_label_noise(0.3, seed=1).labels),
    ]
    common = dict(epochs=4, batch_size=32, optimizer=optimizer, lr=1e-2, schedule="cosine")
    together = fit_many(
        [build(train, m.seed) for m in members],
        train,
        members,
        val=parts.val,
        test=parts.test,
        **common,
    )
    for member, result in zip(members, together, strict=True):
        rows = train if member.rows is None else train.take(member.rows)
        targets = member.targets
        if isinstance(targets, torch.Tensor) and member.rows is not None:
            targets = targets[member.rows]
        if member.labels is not None:
            rows = train.with_label_noise(0.3, seed=1)
        alone = fit(
            build(train, member.seed),
            rows,
            targets,
            val=parts.val,
            test=parts.test,
            seed=member.seed,
            lr=member.lr or 1e-2,
            weight_decay=member.weight_decay or 0.0,
            **{k: v for k, v in common.items() if k != "lr"},
        )
        torch.testing.assert_close(
            weights(result.model), weights(alone.model), rtol=1e-4, atol=1e-5
        )
        assert result.best_epoch == alone.best_epoch
        for a, b in zip(result.history, alone.history, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])


def test_purely_soft_members_equal_fit_alone(parts) -> None:
    """No member uses hard labels: the target table leaves the hard-label block out."""
    train = parts.train
    store = label(fit(build(train, 99, (32,)), train, epochs=3, lr=1e-2).model, train)
    members = [Member(seed=0, targets=Distillation(store, 4.0, 1.0)), Member(seed=1, targets=store)]
    common = dict(epochs=3, batch_size=32, lr=1e-2)
    together = fit_many([build(train, m.seed) for m in members], train, members, **common)
    for member, result in zip(members, together, strict=True):
        alone = fit(build(train, member.seed), train, member.targets, seed=member.seed, **common)
        torch.testing.assert_close(
            weights(result.model), weights(alone.model), rtol=1e-4, atol=1e-5
        )
        assert result.history[-1]["train_loss"] == pytest.approx(
            alone.history[-1]["train_loss"], rel=1e-4
        )


def test_hard_label_members_keep_integer_labels_and_equal_fit_alone(parts) -> None:
    """Only hard labels: the target table is the (M * N,) labels, not a dense float table."""
    from softtargets.training.fit_many import StackedTargets

    train = parts.train
    noisy = train.with_label_noise(0.3, seed=1)
    members = [Member(seed=0), Member(seed=1, labels=noisy.labels)]
    targets = StackedTargets.for_members(members, train)
    assert targets.table.dtype == torch.int64 and targets.table.shape == (2 * len(train),)
    # the same loss and gradient, to the bit, as the dense table of one-hot rows
    dense = StackedTargets.for_members(members, train)
    dense.labels_only = False
    dense.table = torch.cat(
        [
            torch.nn.functional.one_hot(y, train.num_classes).float()
            for y in (train.labels, noisy.labels)
        ]
    )
    logits = torch.randn(2, 5, train.num_classes, generator=torch.Generator().manual_seed(0))
    rows, weight = torch.tensor([0, 3, 7, 8, 9, 400, 401, 402, 403, 404]), torch.full((2, 5), 0.2)
    for a, b in zip(
        targets.loss(logits.clone(), rows, weight),
        dense.loss(logits.clone(), rows, weight),
        strict=True,
    ):
        assert torch.equal(a, b)
    common = dict(epochs=3, batch_size=32, schedule="cosine")
    together = fit_many(
        [build(train, m.seed) for m in members], train, members, val=parts.val, lr=1e-2, **common
    )
    for member, data, result in zip(members, (train, noisy), together, strict=True):
        alone = fit(
            build(train, member.seed),
            data,
            val=parts.val,
            seed=member.seed,
            lr=member.lr or 1e-2,
            **common,
        )
        torch.testing.assert_close(
            weights(result.model), weights(alone.model), rtol=1e-4, atol=1e-5
        )
        assert result.best_epoch == alone.best_epoch
        assert [r["train_loss"] for r in result.history] == pytest.approx(
            [r["train_loss"] for r in alone.history], rel=1e-4
        )


def test_zero_padding_to_a_wider_member_changes_nothing(parts) -> None:
    train = parts.train
    narrow, wide = build(train, 5, (3, 4)), build(train, 6, (20, 24))
    mixed = fit_many([narrow, wide], train, [Member(seed=5), Member(seed=6)], epochs=3, lr=2e-2)
    alone = fit_many([build(train, 5, (3, 4))], train, [Member(seed=5)], epochs=3, lr=2e-2)
    torch.testing.assert_close(weights(mixed[0].model), weights(alone[0].model), rtol=0, atol=1e-6)
    assert mixed[0].model is narrow  # trained in place, as fit() does
    assert [p.shape for p in narrow.parameters()] == [
        torch.Size(s) for s in ((3, 6), (3,), (4, 3), (4,), (3, 4), (3,))
    ]


def test_padded_units_receive_no_gradient(parts) -> None:
    net = StackedMLP([build(parts.train, 5, (3, 4)), build(parts.train, 6, (20, 24))])
    net.train_forward(torch.randn(2, 9, 6))
    net.train_backward(torch.randn(2, 9, 3))
    first, second, last = (w.grad[0] for w in net.weights)
    assert first[:, 3:].abs().max() == 0 and net.biases[0].grad[0, 0, 3:].abs().max() == 0
    assert second[3:, :].abs().max() == 0 and second[:, 4:].abs().max() == 0
    assert last[4:, :].abs().max() == 0
    assert first[:, :3].abs().max() > 0 and second[:3, :4].abs().max() > 0


def test_hand_written_backward_equals_autograd_with_dropout(parts) -> None:
    models = [build_model("mlp", (6,), 3, seed=i, hidden=[8, 5], dropout=0.3) for i in range(3)]
    net = StackedMLP(models)
    x, grad = torch.randn(3, 7, 6), torch.randn(3, 7, 3)
    logits = net.train_forward(x).clone()
    net.train_backward(grad)
    by_hand = [p.grad.clone() for p in net.parameters()]
    masks = [m.clone() for m in net._masks]
    assert 0 < float((masks[0] == 0).float().mean()) < 1  # dropout did drop some units

    net.zero_grad()
    h = x
    for i, (weight, bias) in enumerate(zip(net.weights, net.biases, strict=True)):
        h = torch.baddbmm(bias, h, weight)
        if i < len(masks):
            h = torch.relu(h) * masks[i]
    torch.testing.assert_close(h, logits)
    h.backward(grad)
    for p, mine in zip(net.parameters(), by_hand, strict=True):
        torch.testing.assert_close(mine, p.grad)


def test_infer_equals_the_autograd_forward(parts) -> None:
    net = StackedMLP([build(parts.train, 5, (3, 4)), build(parts.train, 6, (20, 24))]).eval()
    x = parts.val.features[:50]
    torch.testing.assert_close(net.infer(x), net(x))


def test_early_stopping_and_divergence_are_per_member(parts) -> None:
    train = parts.train
    results = fit_many(
        [build(train, 0), build(train, 1)],
        train,
        [Member(seed=0, lr=1e6), Member(seed=1)],
        optimizer="sgd",
        lr=0.05,
        epochs=30,
        val=parts.val,
        patience=3,
    )
    assert results[0].diverged and not results[1].diverged
    assert results[1].stopped_early or len(results[1].history) == 30
    assert torch.isfinite(weights(results[1].model)).all()


def test_bad_epochs_or_batch_size_is_a_clear_error(parts) -> None:
    with pytest.raises(SoftTargetsError, match="batch_size must be >= 1"):
        fit_many([build(parts.train, 0)], parts.train, batch_size=0)


def test_a_model_that_cannot_be_stacked_trains_alone_beside_a_stack(parts) -> None:
    cnn = build_model("cnn1d", (6,), 3, seed=0)
    mlp = build(parts.train, 0)
    results = fit_many([cnn, mlp], parts.train, epochs=2)
    assert [r.model for r in results] == [cnn, mlp]  # in their order, each trained
    assert all(len(r.history) == 2 for r in results)
    with pytest.raises(SoftTargetsError, match="vectorised training takes"):
        StackedMLP([cnn])  # the stack itself still takes only MLPs


def test_training_buffers_follow_the_module_to_a_new_dtype(parts) -> None:
    net = StackedMLP([build(parts.train, 0), build(parts.train, 1)])
    net.train_forward(torch.randn(2, 5, 6))
    net.train_backward(torch.randn(2, 5, 3))
    net = net.to(torch.float64)
    logits = net.train_forward(torch.randn(2, 5, 6, dtype=torch.float64))
    net.train_backward(torch.randn(2, 5, 3, dtype=torch.float64))
    assert logits.dtype == net.weights[0].grad.dtype == torch.float64


def test_stack_groups_split_a_width_sweep_and_keep_small_models_together() -> None:
    from softtargets.training.stacked import stack_groups

    sweep = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    models = [build_model("mlp", (40,), 2, seed=s, hidden=[w]) for w in sweep for s in range(10)]
    groups = stack_groups(models)
    assert sorted(i for g in groups for i in g) == list(range(len(models)))
    widest = [max(models[i][1].out_features for i in g) for g in groups]
    assert len(groups) > 1 and min(widest) < 256  # narrow models are not padded to 256
    tiny = [build_model("mlp", (6,), 3, hidden=h) for h in ([3, 4], [20, 24], [5, 5])]
    assert stack_groups(tiny) == [[0, 1, 2]]  # padding costs less than another stack's step


def test_models_of_different_depths_train_in_one_call(parts) -> None:
    train = parts.train
    shallow, deep = build(train, 0, (8,)), build(train, 1, (8, 8))
    results = fit_many([shallow, deep], train, epochs=2, lr=1e-2)
    alone = fit_many([build(train, 0, (8,))], train, [Member(seed=0)], epochs=2, lr=1e-2)
    assert results[0].model is shallow and results[1].model is deep
    torch.testing.assert_close(weights(shallow), weights(alone[0].model), rtol=0, atol=1e-6)
