from __future__ import annotations

import numpy as np
import pytest
import torch

from softtargets.run.stats import mean_ci, paired_difference
from softtargets.training.metrics import (
    accuracy,
    agreement,
    error_count,
    expected_calibration_error,
    nll,
)


def test_ece_against_a_loop_written_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g) * 2
    labels = torch.randint(0, 4, (500,), generator=g)
    probs = torch.softmax(logits.double(), 1).numpy()
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(
                (pred[inside] == labels.numpy()[inside]).mean() - conf[inside].mean()
            )
    assert expected_calibration_error(logits, labels) == pytest.approx(ece, abs=1e-9)


def test_simple_metrics() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    assert accuracy(logits, labels) == pytest.approx(2 / 3) and error_count(logits, labels) == 1
    assert nll(logits, labels) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits.double(), labels))
    )
    assert agreement(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])) == pytest.approx(
        2 / 3
    )


def test_mean_ci_against_scipy_and_paired_difference() -> None:
    from scipy import stats

    values = [0.61, 0.64, 0.59, 0.66, 0.62]
    low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    estimate = mean_ci(values)
    assert estimate.low == pytest.approx(low) and estimate.high == pytest.approx(high)
    assert mean_ci([0.5]).format(100) == "50.00"
    diff = paired_difference([0.7, 0.71, 0.69], [0.6, 0.62, 0.58])
    assert diff.mean == pytest.approx(0.1) and diff.low > 0
