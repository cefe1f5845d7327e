"""``width``: do soft labels need far fewer neurons, the more so the harder the data?

Mandal, Lin and Srikant (2024) show that a two-layer network trained on soft labels needs far
fewer neurons than one trained on hard labels, and that the gap grows with the difficulty of the
data. Here: one-hidden-layer ReLU students of widths 1 to 256 on binary tasks of increasing
difficulty, hard labels vs the task teacher's soft targets; per task and seed, the smallest width
whose test accuracy reaches a common target: the best mean accuracy any width reached with either
kind of target, minus 2 points.

Tasks: ``gaussians`` (2 classes, 6 clusters each in 4 dimensions, so the boundary is curved and
width matters) with a shrinking separation, and pairs of the study's dataset classes from the
least to the most confused by its teacher.
"""

from __future__ import annotations

import math

import torch

from softtargets.stats import mean_ci, paired_difference, verdict
from softtargets.studies.base import StudyContext, StudyOutput
from softtargets.studies.common import grouped, plot_lines, test_accuracy
from softtargets.train import Distillation
from softtargets.vectorised import Member

TITLE = "Fewer neurons (width)"
CLAIM = (
    "On the hardest task, a student trained on soft targets reaches the target accuracy with "
    "fewer hidden neurons than one trained on hard labels (Mandal, Lin, Srikant 2024)."
)
WIDTHS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SEPARATIONS = [3.0, 2.0, 1.5]
MARGIN = 0.02  # target accuracy: the best mean accuracy on the task minus 2 points
NEVER = 512  # recorded as the "smallest width" when no width reaches the target (censored)


def pair_tasks(ctx: StudyContext) -> list[tuple[str, list[int]]]:
    """Class pairs of the study's data from least to most confused by its teacher (3 of them)."""
    part = ctx.teacher()
    probs = part.store.soften(ctx.config.temperature, part.splits.train)
    labels = part.splits.train.labels
    k = probs.shape[1]
    means = torch.stack([probs[labels == c].mean(0) for c in range(k)])
    pairs = sorted(
        (float(means[a, b] + means[b, a]), a, b) for a in range(k) for b in range(a + 1, k)
    )
    picks = [pairs[0], pairs[len(pairs) // 2], pairs[-1]]
    names = part.splits.train.class_names
    return [(f"{ctx.config.data} {names[a]} vs {names[b]}", [a, b]) for _, a, b in picks]


def run(ctx: StudyContext) -> StudyOutput:
    widths = [1, 4, 16] if ctx.quick else WIDTHS
    gauss = {
        "num_samples": 400 if ctx.quick else 3000,
        "num_classes": 2,
        "dim": 10,
        "clusters_per_class": 3,
    }
    tasks = [
        (f"gaussians separation {s:g}", "gaussians", {**gauss, "separation": s}, None)
        for s in ([2.0] if ctx.quick else SEPARATIONS)
    ]
    if not ctx.quick:
        tasks += [(name, ctx.config.data, None, classes) for name, classes in pair_tasks(ctx)]
    rows, teachers = [], {}
    for task, data_name, options, classes in tasks:
        part = ctx.teacher(data_name, options=options, classes=classes)
        teachers[task] = part.record["test_accuracy"]
        members, keys = [], []
        for width in widths:
            for method, targets in (
                ("hard", None),
                ("soft", Distillation(part.store, ctx.config.temperature, 1.0)),
            ):
                for seed in ctx.seeds:
                    members.append(Member(seed=seed, targets=targets))
                    keys.append((width, method, seed))
        ctx.log(f"width, {task}: {len(members)} students, stacked by similar width")
        results = ctx.train(part, members, hidden=[[w] for w, _, _ in keys])
        rows += [
            {"task": task, "width": w, "method": m, "seed": s, "test_accuracy": test_accuracy(r)}
            for (w, m, s), r in zip(keys, results, strict=True)
        ]

    smallest: dict[tuple[str, str], list[float]] = {}
    targets = {
        task: max(
            mean_ci(v).mean
            for (t, _w, _m), v in grouped(
                rows, ["task", "width", "method"], "test_accuracy"
            ).items()
            if t == task
        )
        - MARGIN
        for task in teachers
    }
    for task in teachers:
        target = targets[task]
        for method in ("hard", "soft"):
            per_seed = []
            for seed in ctx.seeds:
                reached = [
                    r["width"]
                    for r in rows
                    if r["task"] == task
                    and r["method"] == method
                    and r["seed"] == seed
                    and r["test_accuracy"] >= target
                ]
                per_seed.append(min(reached) if reached else NEVER)
            smallest[(task, method)] = per_seed
    summary = []
    for task in teachers:
        hard, soft = smallest[(task, "hard")], smallest[(task, "soft")]
        gap = paired_difference([math.log2(w) for w in hard], [math.log2(w) for w in soft])
        summary.append(
            {
                "task": task,
                "teacher accuracy (%)": f"{teachers[task] * 100:.2f}",
                "target (%)": f"{targets[task] * 100:.2f}",
                "smallest width, hard (geometric mean)": f"{2 ** mean_ci([math.log2(w) for w in hard]).mean:.1f}",
                "smallest width, soft (geometric mean)": f"{2 ** mean_ci([math.log2(w) for w in soft]).mean:.1f}",
                "log2 gap, hard - soft": gap.format(1, 2),
            }
        )
    figures = []
    for i, task in enumerate(teachers):
        curves: dict[str, dict[float, list[float]]] = {}
        for (t, w, m), values in grouped(
            rows, ["task", "width", "method"], "test_accuracy"
        ).items():
            if t == task:
                curves.setdefault(m, {})[w] = values
        figures.append(
            plot_lines(
                curves,
                ctx.path(f"accuracy_vs_width_{i}.png"),
                xlabel="hidden units (one ReLU layer)",
                ylabel="test accuracy (%)",
                logx=True,
                title=f"{task}: accuracy vs width",
                reference={"target": targets[task], "teacher": teachers[task]},
            )
        )
    hardest = f"gaussians separation {min(SEPARATIONS) if not ctx.quick else 2.0:g}"
    diff = paired_difference(
        [math.log2(w) for w in smallest[(hardest, "hard")]],
        [math.log2(w) for w in smallest[(hardest, "soft")]],
    )
    notes = (
        f"A width that never reaches the target counts as {NEVER} (censored). Tasks are listed "
        "from easy to hard within each family; compare the log2 gap down the table to see "
        "whether it grows with difficulty."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        verdict(CLAIM, diff, f"{hardest}: log2 smallest width, hard - soft", 1, ""),
        notes,
    )
