"""Means with confidence intervals, and verdicts computed from them.

Every figure softtargets reports about soft vs hard targets is a mean over seeds with a two-sided
95% Student-t confidence interval, so a reader sees how much of a difference is noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` runs with the half-width of its confidence interval."""

    mean: float
    half_width: float
    n: int
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``"mean ± half_width"`` (``"mean"`` alone for one run), values multiplied by ``scale``."""
        if self.n < 2 or not math.isfinite(self.half_width):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"

    def describe(self, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        """``"mean ± half_width unit (95% CI low to high)"``, values multiplied by ``scale``."""
        low, high = self.low * scale, self.high * scale
        return (
            f"{self.format(scale, digits)}{unit} (95% CI {low:+.{digits}f} to {high:+.{digits}f})"
        )


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and Student-t confidence half-width of ``values`` (``nan`` half-width for one value)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(data.mean())
    if data.size < 2:
        return Estimate(mean, float("nan"), 1, confidence)
    sem = float(data.std(ddof=1) / math.sqrt(data.size))
    t = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=data.size - 1))
    return Estimate(mean, t * sem, int(data.size), confidence)


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / total`` (one model's accuracy on a test
    set: the interval its finite test set leaves, not seed-to-seed spread)."""
    if total <= 0:
        return (float("nan"), float("nan"))
    z = float(scipy_stats.norm.ppf(0.5 + confidence / 2))
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and confidence interval of ``a - b`` over paired runs (same seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    return mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), confidence)


SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """A claim, the measured evidence for it, and what the 95% interval says."""

    claim: str
    label: str
    evidence: str


def verdict(
    claim: str,
    difference: Estimate,
    what: str,
    scale: float = 1.0,
    unit: str = "",
    digits: int = 2,
) -> Verdict:
    """Judge ``claim`` from ``difference``, an estimate that is positive when the claim holds.

    "supported" when the whole confidence interval is above 0, "not supported" when it is below
    0 (the opposite was measured), "inconclusive" when it contains 0 or there are too few runs.
    """
    if difference.n < 2 or not math.isfinite(difference.half_width):
        label = INCONCLUSIVE
    elif difference.low > 0:
        label = SUPPORTED
    elif difference.high < 0:
        label = NOT_SUPPORTED
    else:
        label = INCONCLUSIVE
    low, high = difference.low * scale, difference.high * scale
    evidence = (
        f"{what} = {difference.format(scale, digits)}{unit} "
        f"(95% CI {low:+.{digits}f} to {high:+.{digits}f}, n = {difference.n})"
    )
    return Verdict(claim, label, evidence)


def all_of(claim: str, parts: Sequence[Verdict]) -> Verdict:
    """A claim that needs every one of ``parts``: "supported" when all are, "not supported" when
    any is, else "inconclusive"; the evidence lists each part's."""
    labels = {p.label for p in parts}
    if labels == {SUPPORTED}:
        label = SUPPORTED
    elif NOT_SUPPORTED in labels:
        label = NOT_SUPPORTED
    else:
        label = INCONCLUSIVE
    return Verdict(claim, label, "; ".join(f"{p.evidence}: {p.label}" for p in parts))


def sign_test(
    claim: str, differences: Sequence[float], what: str, unit: str = "", alpha: float = 0.05
) -> Verdict:
    """Judge ``claim`` from paired ``differences`` that take few distinct values (say grid
    points), where a t-interval misleads (every seed on one grid point: zero width). Exact
    two-sided sign test, ties dropped: "supported" when p < ``alpha`` and more differences are
    positive, "not supported" when p < ``alpha`` and more are negative, else "inconclusive"."""
    above = sum(d > 0 for d in differences)
    below = sum(d < 0 for d in differences)
    ties = len(differences) - above - below
    p = float(scipy_stats.binomtest(above, above + below).pvalue) if above + below else 1.0
    if p < alpha:
        label = SUPPORTED if above > below else NOT_SUPPORTED
    else:
        label = INCONCLUSIVE
    median = float(np.median(differences)) if len(differences) else float("nan")
    evidence = (
        f"{what}: median {median:+.2f}{unit}; positive in {above}, negative in {below}, tied in "
        f"{ties} of {len(differences)} seeds (exact sign test, p = {p:.3g})"
    )
    return Verdict(claim, label, evidence)
