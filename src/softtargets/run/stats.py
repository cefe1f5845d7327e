"""Means with confidence intervals, and verdicts computed from them.

Every figure softtargets reports about soft vs hard targets is a mean over seeds with a two-sided
95% Student-t confidence interval, so a reader sees how much of a difference is noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` runs with the half-width of its confidence interval."""

    mean: float
    half_width: float
    n: int
    confidence: float = 0.95
    #: the values it was computed from (per seed, or per teacher), when known
    values: tuple[float, ...] = ()

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
    kept = tuple(float(v) for v in data)
    if data.size < 2:
        return Estimate(mean, float("nan"), 1, confidence, kept)
    sem = float(data.std(ddof=1) / math.sqrt(data.size))
    t = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=data.size - 1))
    return Estimate(mean, t * sem, int(data.size), confidence, kept)


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


REPRODUCED = "reproduced"
WEAKER = "weaker than reported"
PRESENT = "present"
ABSENT = "absent"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
#: every verdict, from the strongest agreement with the literature to none
LABELS = (REPRODUCED, PRESENT, WEAKER, ABSENT, CONTRADICTED, INCONCLUSIVE)


@dataclass(frozen=True)
class Reported:
    """What the literature reports for a study's primary statistic, declared before results.

    ``size``: the paper's effect as the same statistic, in its units (``None`` when no paper
    states one: the claim is then about the sign); ``smallest``: the smallest effect of interest
    (> 0), below which an effect is as good as absent; ``source``: where the number comes from.
    """

    size: float | None
    smallest: float
    source: str


@dataclass(frozen=True)
class Verdict:
    """A claim, the measured evidence for it, and what the 95% interval says of the paper's
    size (``label``: one of :data:`LABELS`).

    The other fields keep how it was reached, so :func:`over_teachers` can judge the same
    statistic again with teachers as the unit: the effect, the declared size and how the
    statistic is named (a :func:`judge`), its parts (an :func:`all_of`), or the paired
    differences (a :func:`sign_test`). Only ``claim``, ``label`` and ``evidence`` are written out.
    """

    claim: str
    label: str
    evidence: str
    effect: Estimate | None = None
    reported: Reported | None = None
    wording: tuple[str, float, str, int] = ("", 1.0, "", 2)  # what, scale, unit, digits
    parts: tuple[Verdict, ...] = ()
    differences: tuple[float, ...] | None = None

    def public(self) -> dict[str, str]:
        """What a results file records of it."""
        return {"claim": self.claim, "label": self.label, "evidence": self.evidence}


def equivalence_p(estimate: Estimate, margin: float) -> float:
    """Two one-sided t-tests (TOST) that the effect lies within ``±margin``: the larger of the
    two one-sided p-values, from the estimate's mean, its standard error (the 95% half-width over
    the t quantile) and ``n - 1`` degrees of freedom. Below 0.05 exactly when the 90% interval
    lies within ``±margin``."""
    if estimate.n < 2 or not math.isfinite(estimate.half_width):
        return 1.0
    df = estimate.n - 1
    se = estimate.half_width / float(scipy_stats.t.ppf(0.5 + estimate.confidence / 2, df))
    if se == 0:
        return 0.0 if abs(estimate.mean) < margin else 1.0
    above_lower = float(scipy_stats.t.sf((estimate.mean + margin) / se, df))
    below_upper = float(scipy_stats.t.cdf((estimate.mean - margin) / se, df))
    return max(above_lower, below_upper)


def judge(
    claim: str,
    effect: Estimate,
    reported: Reported,
    what: str,
    scale: float = 1.0,
    unit: str = "",
    digits: int = 2,
) -> Verdict:
    """Judge ``claim`` from ``effect`` (positive when the claim holds) against ``reported``.

    In order: **contradicted** when the 95% interval lies below 0; **absent** when the effect is
    equivalent to 0 within the smallest effect of interest (TOST, 5%); **reproduced** when the
    interval lies above 0 and reaches the paper's size (includes it, or lies above it);
    **weaker than reported** when it lies above 0 but below the paper's size; **present** when
    it lies above 0 and no paper states a size; else **inconclusive**.
    """
    usable = effect.n >= 2 and math.isfinite(effect.half_width)
    if not usable:
        label = INCONCLUSIVE
    elif effect.high < 0:
        label = CONTRADICTED
    elif equivalence_p(effect, reported.smallest) < 0.05:
        label = ABSENT
    elif effect.low > 0 and reported.size is None:
        label = PRESENT
    elif effect.low > 0:
        label = REPRODUCED if effect.high >= reported.size else WEAKER  # type: ignore[operator]
    else:
        label = INCONCLUSIVE
    low, high = effect.low * scale, effect.high * scale
    paper = (
        f"paper {reported.size * scale:+.{digits}f}{unit} ({reported.source})"
        if reported.size is not None
        else f"no size reported ({reported.source})"
    )
    excluded = (
        "; the interval excludes the paper's size"
        if usable and reported.size is not None and effect.high < reported.size
        else ""
    )
    evidence = (
        f"{what} = {effect.format(scale, digits)}{unit} (95% CI {low:+.{digits}f} to "
        f"{high:+.{digits}f}, n = {effect.n}); {paper}{excluded}; smallest effect of interest "
        f"±{reported.smallest * scale:.{digits}f}{unit}"
    )
    return Verdict(claim, label, evidence, effect, reported, (what, scale, unit, digits))


def all_of(claim: str, parts: Sequence[Verdict]) -> Verdict:
    """A claim that needs every one of ``parts``: its label is the weakest of theirs
    (contradicted, then absent, inconclusive, weaker than reported, present, reproduced); the
    evidence lists each part's."""
    order = (CONTRADICTED, ABSENT, INCONCLUSIVE, WEAKER, PRESENT, REPRODUCED)
    label = min((p.label for p in parts), key=order.index)
    evidence = "; ".join(f"{p.evidence}: {p.label}" for p in parts)
    return Verdict(claim, label, evidence, parts=tuple(parts))


def over_teachers(verdicts: Sequence[Verdict]) -> Verdict:
    """One study's verdicts, one per independently trained teacher (each on its own split, with
    its student seeds), judged again with teachers as the unit: the statistic's mean per
    teacher, then a t-interval over teachers (which so holds the spread of teachers, splits and
    test sets), against the same declared size; a sign test pools every teacher's seeds."""
    first = verdicts[0]
    if len(verdicts) == 1:
        return first
    if first.parts:
        return all_of(
            first.claim,
            [over_teachers([v.parts[i] for v in verdicts]) for i in range(len(first.parts))],
        )
    what, scale, unit, digits = first.wording
    if first.differences is not None:
        pooled = [d for v in verdicts for d in (v.differences or ())]
        return sign_test(first.claim, pooled, f"{what} ({len(verdicts)} teachers pooled)", unit)
    if first.effect is None or first.reported is None:
        return first
    per_teacher = mean_ci([v.effect.mean for v in verdicts if v.effect is not None])
    return judge(
        first.claim,
        per_teacher,
        first.reported,
        f"{what}, mean per teacher, over {len(verdicts)} teachers",
        scale,
        unit,
        digits,
    )


def sign_test(
    claim: str, differences: Sequence[float], what: str, unit: str = "", alpha: float = 0.05
) -> Verdict:
    """Judge ``claim`` from paired ``differences`` that take few distinct values (say grid
    points), where a t-interval misleads (every seed on one grid point: zero width). Exact
    two-sided sign test, ties dropped: "present" when p < ``alpha`` and more differences are
    positive, "contradicted" when p < ``alpha`` and more are negative, else "inconclusive"
    (a sign test states no size)."""
    above = sum(d > 0 for d in differences)
    below = sum(d < 0 for d in differences)
    ties = len(differences) - above - below
    p = float(scipy_stats.binomtest(above, above + below).pvalue) if above + below else 1.0
    if p < alpha:
        label = PRESENT if above > below else CONTRADICTED
    else:
        label = INCONCLUSIVE
    median = float(np.median(differences)) if len(differences) else float("nan")
    evidence = (
        f"{what}: median {median:+.2f}{unit}; positive in {above}, negative in {below}, tied in "
        f"{ties} of {len(differences)} seeds (exact sign test, p = {p:.3g})"
    )
    return Verdict(
        claim, label, evidence, wording=(what, 1.0, unit, 2), differences=tuple(differences)
    )


# ---------------------------------------------------------------- the report's words on them
def protocol_line(results: Iterable[dict[str, Any]]) -> str:
    """Which protocol versions (studies/PROTOCOLS.md) the gathered runs followed."""
    versions = sorted({r.get("protocol") for r in results}, key=lambda v: (v is None, v or 0))
    named = ", ".join("not recorded (before version 5)" if v is None else str(v) for v in versions)
    plural = "s" if len(versions) > 1 else ""
    return f"Protocol version{plural} of these runs: {named} (`softtargets/studies/PROTOCOLS.md`)."


def paper_size(reported: Any) -> str:
    """A study's declared literature size, as the report's table shows it."""
    if not isinstance(reported, dict) or "source" not in reported:
        return "-"
    size = reported.get("size")
    scale, unit = reported.get("scale", 1.0), reported.get("unit", "")
    shown = "no size" if size is None else f"{size * scale:+.2f}{unit}"
    return f"{shown} ({reported['source']})"


def multiple_comparisons(tests: int, decided: int) -> str:
    """The report's note on reading several 95% verdicts together."""
    return (
        f"**Reading {tests} verdicts together.** Each verdict is a separate two-sided test at "
        f"the 5% level, so even if soft targets did nothing, about {0.05 * tests:.1f} of "
        f"{tests} would be expected to come out decided by chance ({decided} came out other "
        "than inconclusive here). Each study's primary statistic is fixed in its "
        "module docstring, and a change made after results is an amendment in PROTOCOLS.md; "
        f"the other comparisons in a section are secondary. To hold the chance of any false verdict at 5%, read each interval at "
        f"{100 - 5 / max(tests, 1):.2f}% (Bonferroni): a verdict whose interval barely "
        "excludes 0 may not survive that."
    )
