"""Helpers the studies share: summaries with confidence intervals and figures with error bars."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softtargets.report import PALETTE, REFERENCE_COLOURS, new_figure, save_figure
from softtargets.stats import Estimate, mean_ci, paired_difference
from softtargets.train import FitResult


def test_accuracy(result: FitResult) -> float:
    """Test accuracy of the validation-selected epoch."""
    return float(result.selected.get("test_accuracy", float("nan")))


def grouped(
    rows: Iterable[dict[str, Any]], keys: Sequence[str], value: str
) -> dict[tuple, list[float]]:
    """``value`` of each row, grouped by the tuple of ``keys`` (in order of first appearance),
    each group sorted by seed so that groups can be paired."""
    groups: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append((row.get("seed", 0), float(row[value])))
    return {k: [v for _, v in sorted(pairs)] for k, pairs in groups.items()}


def curves(
    rows: Iterable[dict[str, Any]], line: str, x: str, value: str, x_scale: float = 1.0
) -> dict[str, dict[float, list[float]]]:
    """``{line value: {x value * x_scale: [value per seed]}}``, the input of :func:`plot_lines`."""
    out: dict[str, dict[float, list[float]]] = {}
    for (x_value, name), values in grouped(rows, [x, line], value).items():
        out.setdefault(str(name), {})[x_value * x_scale] = values
    return out


def summary_rows(
    rows: list[dict[str, Any]],
    keys: Sequence[str],
    value: str,
    label: str,
    scale: float = 100.0,
    digits: int = 2,
) -> list[dict[str, Any]]:
    """One row per group: the keys, the number of runs and ``mean ± 95% CI`` of ``value``."""
    out = []
    for key, values in grouped(rows, keys, value).items():
        out.append(
            {
                **dict(zip(keys, key, strict=True)),
                "runs": len(values),
                label: mean_ci(values).format(scale, digits),
            }
        )
    return out


def difference(
    rows: list[dict[str, Any]], keys: Sequence[str], value: str, better: tuple, worse: tuple
) -> Estimate:
    """Paired (by seed) difference ``better - worse`` of ``value`` between two groups."""
    groups = grouped(rows, keys, value)
    return paired_difference(groups[better], groups[worse])


def plot_lines(
    curves: dict[str, dict[float, list[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    scale: float = 100.0,
    logx: bool = False,
    logy: bool = False,
    reference: dict[str, float] | None = None,
) -> Path:
    """One line per curve: mean over seeds with 95% CI error bars at each x."""
    figure, axes = new_figure()
    for colour, (name, points) in zip(PALETTE, curves.items(), strict=False):
        xs = sorted(points)
        estimates = [mean_ci(points[x]) for x in xs]
        means = np.array([e.mean for e in estimates]) * scale
        halves = np.array([0.0 if e.n < 2 else e.half_width for e in estimates]) * scale
        axes.errorbar(xs, means, yerr=halves, color=colour, marker="o", capsize=3, label=name)
    for (name, value), colour in zip((reference or {}).items(), REFERENCE_COLOURS, strict=False):
        axes.axhline(value * scale, color=colour, linestyle="--", linewidth=1, label=name)
    if logx:
        axes.set_xscale("log")
    if logy:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(frameon=False)
    return save_figure(figure, path)


def plot_bars(
    groups: dict[str, list[float]], path: Path, *, ylabel: str, title: str, scale: float = 100.0
) -> Path:
    """One bar per group: mean over seeds with its 95% CI, and the seeds as dots."""
    figure, axes = new_figure(max(6.4, 2.2 * len(groups)), 4.0)
    for i, (colour, values) in enumerate(zip(PALETTE, groups.values(), strict=False)):
        estimate = mean_ci(values)
        half = 0.0 if estimate.n < 2 else estimate.half_width
        axes.bar(i, estimate.mean * scale, yerr=half * scale, color=colour, alpha=0.8, capsize=4)
        axes.scatter([i] * len(values), np.asarray(values) * scale, color="black", s=10, zorder=3)
    axes.set_xticks(range(len(groups)), list(groups), rotation=10)
    lows = [min(v) for v in groups.values()]
    axes.set_ylim(bottom=max(0.0, min(lows) * scale - 5))
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    return save_figure(figure, path)
