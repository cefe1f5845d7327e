"""``smoothing-vs-teacher``: is the gain the teacher's information, or softening alone?

Three students on the same rows: one-hot labels; label smoothing whose targets have the same mean
entropy as the teacher's soft targets; and the teacher's soft targets themselves. All three are
plain probability targets trained with soft cross-entropy, so only the targets differ.
"""

from __future__ import annotations

import math

import torch

from softtargets.stats import verdict
from softtargets.studies.base import StudyContext, StudyOutput
from softtargets.studies.common import difference, plot_bars, summary_rows, test_accuracy
from softtargets.targets import entropy, smooth
from softtargets.vectorised import Member

TITLE = "Teacher vs label smoothing (smoothing-vs-teacher)"
CLAIM = (
    "The teacher's soft targets beat label smoothing of the same entropy: the gain comes from "
    "the teacher's information, not from softening alone."
)


def smoothing_entropy(eps: float, k: int) -> float:
    """Entropy in nats of a label-smoothed row: ``1 - eps + eps/K`` on the label, ``eps/K`` elsewhere."""
    on, off = 1 - eps + eps / k, eps / k
    return -(on * math.log(on) if on > 0 else 0.0) - (k - 1) * (
        off * math.log(off) if off > 0 else 0.0
    )


def matching_eps(target: float, k: int) -> float:
    """The smoothing ``eps`` in ``[0, 1]`` whose entropy equals ``target`` (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if smoothing_entropy(mid, k) < target else (low, mid)
    return (low + high) / 2


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    train = part.splits.train
    teacher_probs = part.store.soften(ctx.config.temperature, train)
    target_entropy = float(entropy(teacher_probs).mean())
    eps = matching_eps(target_entropy, train.num_classes)
    smoothed = smooth(train.labels, train.num_classes, eps)
    one_hot = torch.nn.functional.one_hot(train.labels, train.num_classes).float()
    methods = {
        "one-hot": one_hot,
        f"label smoothing (eps = {eps:.3f})": smoothed,
        f"teacher soft targets (T = {ctx.config.temperature:g})": teacher_probs,
    }
    members, keys = [], []
    for name, probs in methods.items():
        for seed in ctx.seeds:
            members.append(Member(seed=seed, targets=probs))
            keys.append((name, seed))
    results = ctx.train(part, members)
    rows = [
        {
            "targets": n,
            "seed": s,
            "test_accuracy": test_accuracy(r),
            "test_nll": r.selected.get("test_nll"),
        }
        for (n, s), r in zip(keys, results, strict=True)
    ]
    summary = summary_rows(rows, ["targets"], "test_accuracy", "test accuracy (%)")
    for row, nll in zip(
        summary, summary_rows(rows, ["targets"], "test_nll", "x", 1, 3), strict=True
    ):
        row["test NLL (nats)"] = nll["x"]
    for row, probs in zip(summary, methods.values(), strict=True):
        row["target entropy (nats)"] = f"{float(entropy(probs).mean()):.3f}"
    names = list(methods)
    diff = difference(rows, ["targets"], "test_accuracy", (names[2],), (names[1],))
    figure = plot_bars(
        {n: [r["test_accuracy"] for r in rows if r["targets"] == n] for n in names},
        ctx.path("targets.png"),
        ylabel="test accuracy (%)",
        title="Same rows, three kinds of target (mean, 95% CI, seeds as dots)",
    )
    return StudyOutput(
        rows,
        summary,
        [figure],
        verdict(CLAIM, diff, "teacher - smoothing test accuracy", 100, " points"),
        notes=(
            f"Label smoothing eps = {eps:.3f} gives mean target entropy "
            f"{smoothing_entropy(eps, train.num_classes):.3f} nats, equal to the "
            f"teacher's {target_entropy:.3f} at T = {ctx.config.temperature:g}."
        ),
    )
