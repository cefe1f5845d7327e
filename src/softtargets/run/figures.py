"""Figures of runs and studies: epoch curves, lines and bars over seeds, each a mean with its 95%
confidence band or interval.

Drawn with matplotlib's object API (no pyplot global state, no display needed) and written
atomically. :mod:`softtargets.run.report` writes the tables and text they sit in.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from softtargets import distributed
from softtargets.files import atomic_write_bytes
from softtargets.run.stats import mean_ci

#: A colour-blind-safe palette (Okabe & Ito), so hard/soft stay distinguishable for everyone.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]


#: Dashed reference lines (teacher, target): greys, so they never look like a measured curve.
REFERENCE_COLOURS = ["#000000", "#777777", "#AAAAAA"]


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    axes.grid(True, alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    return figure, axes


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG, atomically (under torchrun, rank 0 alone writes)."""

    if distributed.is_main():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def band(values_per_seed: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position mean and 95% CI bounds over seeds (curves may differ in length: early stopping
    or divergence; each position uses the seeds that reached it)."""
    length = max(len(v) for v in values_per_seed)
    means, lows, highs = np.full(length, np.nan), np.full(length, np.nan), np.full(length, np.nan)
    for i in range(length):
        column = [v[i] for v in values_per_seed if i < len(v) and np.isfinite(v[i])]
        if not column:
            continue
        estimate = mean_ci(column)
        means[i] = estimate.mean
        half = 0.0 if estimate.n < 2 else estimate.half_width
        lows[i], highs[i] = estimate.mean - half, estimate.mean + half
    return means, lows, highs


def plot_epoch_curves(
    records: Iterable[dict[str, Any]],
    path: str | Path,
    *,
    metric: str = "test_accuracy",
    group: str = "method",
    title: str = "",
    ylabel: str = "test accuracy (%)",
    scale: float = 100.0,
    reference: dict[str, float] | None = None,
) -> Path:
    """Mean +- 95% CI of ``metric`` per epoch, one line per value of ``group`` (seeds pooled).

    ``records`` are per-epoch history lines carrying ``group``, ``seed``, ``epoch`` and ``metric``.
    ``reference`` adds labelled horizontal lines (e.g. the teacher's accuracy).
    """
    curves: dict[str, dict[Any, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if metric in r and group in r:
            curves[str(r[group])][r.get("seed", 0)][int(r["epoch"])] = float(r[metric])
    figure, axes = new_figure()
    for colour, (name, by_seed) in zip(PALETTE, sorted(curves.items()), strict=False):
        per_seed = [[epochs[e] for e in sorted(epochs)] for epochs in by_seed.values()]
        mean, low, high = band(per_seed)
        x = np.arange(1, len(mean) + 1)
        axes.plot(x, mean * scale, color=colour, label=f"{name} (n={len(per_seed)} seeds)")
        axes.fill_between(x, low * scale, high * scale, color=colour, alpha=0.2, linewidth=0)
    for (name, value), colour in zip((reference or {}).items(), REFERENCE_COLOURS, strict=False):
        axes.axhline(value * scale, color=colour, linestyle="--", linewidth=1, label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.set_title(title or f"{metric.replace('_', ' ')} per epoch (mean, 95% CI band)")
    axes.legend(frameon=False)
    return save_figure(figure, path)


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
