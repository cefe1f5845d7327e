from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softtargets.data.targets import entropy, from_counts, mix, smooth, soften, validate
from softtargets.errors import SoftTargetsError


def test_soften_matches_the_formula_in_float64() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [-5.0, 0.0, 5.0]], dtype=torch.float64)
    for t in (0.5, 1.0, 4.0, 20.0):
        expected = np.exp(logits.numpy() / t)
        expected /= expected.sum(1, keepdims=True)
        np.testing.assert_allclose(soften(logits, t).numpy(), expected, rtol=1e-12)


@settings(max_examples=50, deadline=None)
@given(scale=st.floats(1e-3, 1e4), t=st.floats(0.05, 100.0), seed=st.integers(0, 1000))
def test_soften_is_a_distribution_for_any_logits(scale: float, t: float, seed: int) -> None:
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(seed)) * scale
    probs = soften(logits, t)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(4), atol=1e-5, rtol=0)


def test_higher_temperature_gives_higher_entropy() -> None:
    logits = torch.tensor([[4.0, 1.0, 0.0, -2.0]])
    entropies = [float(entropy(soften(logits, t))) for t in (1, 2, 4, 8, 20)]
    assert entropies == sorted(entropies)
    assert entropies[-1] < math.log(4) + 1e-9


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_soften_rejects_bad_temperature(t: float) -> None:
    with pytest.raises(SoftTargetsError, match="temperature"):
        soften(torch.zeros(2, 3), t)


def test_soften_rejects_nan_logits() -> None:
    logits = torch.zeros(3, 4)
    logits[1, 2] = float("nan")
    with pytest.raises(SoftTargetsError, match="row 1"):
        soften(logits, 2.0)


def test_from_counts_gives_proportions_and_totals() -> None:
    probs, weights = from_counts(np.array([[412, 188], [1, 3]]))
    torch.testing.assert_close(probs, torch.tensor([[412 / 600, 188 / 600], [0.25, 0.75]]))
    torch.testing.assert_close(weights, torch.tensor([600.0, 4.0]))


def test_from_counts_keeps_float64() -> None:
    probs, _ = from_counts(np.array([[1.0, 2.0]]))
    assert probs.dtype == torch.float64


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([[1, -1]], "negative"),
        ([[0, 0], [1, 2]], "row 0 has no observations"),
        ([[1.0, float("nan")]], "NaN"),
        ([1, 2, 3], "2-D"),
        (np.zeros((0, 3)), "empty"),
    ],
)
def test_from_counts_rejects_bad_counts(counts: object, message: str) -> None:
    with pytest.raises(SoftTargetsError, match=message):
        from_counts(np.asarray(counts))


def test_smooth_puts_uniform_mass_off_target() -> None:
    probs = smooth(torch.tensor([0, 2]), 4, 0.2)
    torch.testing.assert_close(probs[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_smooth_rejects_labels_out_of_range() -> None:
    with pytest.raises(SoftTargetsError, match="outside 0..3"):
        smooth(torch.tensor([0, 4]), 4, 0.1)


def test_mix_is_convex_and_checks_shapes() -> None:
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(mix(p, q, 0.25), torch.tensor([[0.25, 0.75]]))
    with pytest.raises(SoftTargetsError, match="shape"):
        mix(p, torch.tensor([[0.5, 0.5], [0.5, 0.5]]), 0.5)
    with pytest.raises(SoftTargetsError, match="weight"):
        mix(p, q, 1.5)


@pytest.mark.parametrize(
    ("probs", "kwargs", "message"),
    [
        ([[0.5, float("nan")]], {}, "NaN"),
        ([[float("inf"), 0.0]], {}, "NaN or inf"),
        ([[1.2, -0.2]], {}, "row 0, class 1 is negative"),
        ([[0.5, 0.5], [0.6, 0.6]], {}, "row 1 sums to 1.2"),
        ([[0.5, 0.5]], {"num_classes": 3}, "2 columns but the data has 3 classes"),
        (np.zeros((0, 2)), {}, "empty"),
        ([0.5, 0.5], {}, "2-D"),
    ],
)
def test_validate_names_each_problem_in_one_line(probs: object, kwargs: dict, message: str) -> None:
    with pytest.raises(SoftTargetsError, match=message) as info:
        validate(np.asarray(probs, dtype=np.float64), **kwargs)
    assert "\n" not in str(info.value)


def test_validate_accepts_rounded_proportions_within_tolerance() -> None:
    validate(np.array([[0.333, 0.333, 0.333]]))  # sums to 0.999, inside the 1e-3 tolerance
    with pytest.raises(SoftTargetsError, match="tolerance 1e-06"):
        validate(np.array([[0.333, 0.333, 0.333]]), atol=1e-6)
