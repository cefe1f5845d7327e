from __future__ import annotations

import json

import pytest
import torch

from softtargets.data.builtin import gaussians
from softtargets.data.dataset import Dataset, split
from softtargets.data.targets import soften
from softtargets.errors import SoftTargetsError
from softtargets.store.label import label
from softtargets.training.fit import fit
from softtargets.training.metrics import evaluate
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation
from softtargets.training.selection import lr_factor


@pytest.fixture(scope="module")
def parts():
    data = gaussians(num_samples=1200, num_classes=4, dim=8, separation=4.0, seed=0)
    return split(data, 0.15, 0.25, seed=0)


def mlp(data: Dataset, seed: int = 0, dropout: float = 0.0):
    return build_model(
        "mlp", data.feature_shape, data.num_classes, seed=seed, hidden=[32], dropout=dropout
    )


def test_fit_learns_and_records_history(parts, tmp_path) -> None:
    log = tmp_path / "h.jsonl"
    result = fit(
        mlp(parts.train),
        parts.train,
        val=parts.val,
        test=parts.test,
        epochs=15,
        lr=1e-2,
        log_path=log,
        log_extra={"method": "hard"},
    )
    assert len(result.history) == 15
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert evaluate(result.model, parts.test)["accuracy"] > 0.85
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 16)) and lines[0]["method"] == "hard"
    assert {"val_accuracy", "test_accuracy", "train_loss", "lr"} <= set(lines[0])


def test_same_seed_same_result_different_seed_different(parts) -> None:
    runs = [
        fit(mlp(parts.train, dropout=0.2), parts.train, epochs=3, seed=s, val=parts.val)
        for s in (7, 7, 8)
    ]
    assert runs[0].history == [
        {**r, "seconds": runs[0].history[i]["seconds"]} for i, r in enumerate(runs[1].history)
    ]
    weights = [torch.cat([p.flatten() for p in r.model.parameters()]) for r in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_selection_uses_validation_never_test(parts) -> None:
    result = fit(mlp(parts.train), parts.train, val=parts.val, test=parts.test, epochs=12, lr=0.05)
    val_scores = [(r["val_accuracy"], -r["val_nll"]) for r in result.history]
    assert result.best_epoch == 1 + max(range(12), key=lambda i: val_scores[i])
    # the returned weights are those of the selected epoch
    assert evaluate(result.model, parts.val)["accuracy"] == pytest.approx(
        result.selected["val_accuracy"]
    )


def test_early_stopping_stops_after_patience(parts) -> None:
    result = fit(mlp(parts.train), parts.train, val=parts.val, epochs=200, lr=0.05, patience=3)
    assert result.stopped_early and len(result.history) == result.best_epoch + 3


def test_val_fraction_is_held_out_from_training(parts) -> None:
    result = fit(mlp(parts.train), parts.train, val=0.2, epochs=2)
    assert "val_accuracy" in result.history[0]


def test_soft_targets_equal_one_hot_targets_reproduce_hard_training(parts) -> None:
    one_hot = torch.nn.functional.one_hot(parts.train.labels, 4).float()
    a = fit(mlp(parts.train), parts.train, None, epochs=2, seed=1)
    b = fit(mlp(parts.train), parts.train, one_hot, epochs=2, seed=1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_distillation_from_store_uses_ids_not_positions(parts) -> None:
    teacher = fit(mlp(parts.train, seed=3), parts.train, epochs=5, lr=1e-2).model
    full = Dataset.from_arrays(
        torch.cat([parts.train.features, parts.test.features]),
        torch.cat([parts.train.labels, parts.test.labels]),
    )
    store = label(teacher, parts.train)
    shuffled = parts.train.take(torch.randperm(len(parts.train)))
    logits = store.logits_for(shuffled)
    torch.testing.assert_close(logits, teacher(shuffled.features).detach())
    a = fit(mlp(parts.train), parts.train, Distillation(store, 2.0, 1.0), epochs=1, seed=0)
    b = fit(
        mlp(parts.train),
        parts.train,
        Distillation(teacher(parts.train.features).detach(), 2.0, 1.0),
        epochs=1,
        seed=0,
    )
    torch.testing.assert_close(a.history[0]["train_loss"], b.history[0]["train_loss"])
    with pytest.raises(SoftTargetsError, match="made for data"):
        fit(mlp(full), full, Distillation(store, 2.0, 1.0), epochs=1)
    assert soften(store.logits_for(shuffled), 3.0).shape == (len(shuffled), 4)


def test_bad_targets_are_clear(parts) -> None:
    with pytest.raises(SoftTargetsError, match="sums to"):
        fit(mlp(parts.train), parts.train, torch.full((len(parts.train), 4), 0.3), epochs=1)
    with pytest.raises(SoftTargetsError, match="columns but the data has 4"):
        fit(mlp(parts.train), parts.train, torch.full((len(parts.train), 5), 0.2), epochs=1)
    with pytest.raises(SoftTargetsError, match="teacher logits have shape"):
        fit(mlp(parts.train), parts.train, Distillation(torch.zeros(3, 4)), epochs=1)
    with pytest.raises(SoftTargetsError, match="unknown optimizer"):
        fit(mlp(parts.train), parts.train, epochs=1, optimizer="lbfgs")


def test_divergence_is_reported_not_hidden(parts) -> None:
    result = fit(mlp(parts.train), parts.train, optimizer="sgd", lr=1e6, epochs=20)
    assert result.diverged and len(result.history) < 20


def test_schedules() -> None:
    assert lr_factor("none", 5, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 10, 10) == pytest.approx(0)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert [lr_factor("step", s, 100) for s in (0, 49, 50, 75)] == [
        1.0,
        1.0,
        0.1,
        pytest.approx(0.01),
    ]


def test_evaluate_reports_agreement_and_calibration(parts) -> None:
    model = fit(mlp(parts.train), parts.train, epochs=5, lr=1e-2).model
    report = evaluate(model, parts.test, reference=model)
    assert report["agreement"] == 1.0
    assert report["errors"] == round((1 - report["accuracy"]) * len(parts.test))
    assert 0.0 <= report["ece"] <= 1.0 and report["nll"] > 0
