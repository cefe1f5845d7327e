"""``label-noise``: do a teacher's soft targets soften label noise?

Symmetric noise on the training (and validation) labels, from 0 to 50%; the teacher is trained on
the noisy labels too. Students: the noisy hard labels, the teacher's soft targets, and an even
mix of both; accuracy on the clean test labels.
"""

from __future__ import annotations

from softtargets.stats import verdict
from softtargets.studies.base import StudyContext, StudyOutput
from softtargets.studies.common import curves, difference, plot_lines, summary_rows, test_accuracy
from softtargets.train import Distillation
from softtargets.vectorised import Member

TITLE = "Label noise (label-noise)"
CLAIM = (
    "With 30% of the training labels flipped, a student learns more from the (noisily "
    "trained) teacher's soft targets than from the noisy labels."
)
RATES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
KEY_RATE = 0.3


def run(ctx: StudyContext) -> StudyOutput:
    rates = [0.0, KEY_RATE] if ctx.quick else RATES
    rows, teachers = [], {}
    for rate in rates:
        part = ctx.teacher(label_noise=rate)
        teachers[rate] = part.record["test_accuracy"]
        t = ctx.config.temperature
        methods = {
            "noisy hard labels": None,
            "teacher soft targets": Distillation(part.store, t, 1.0),
            "mix (alpha = 0.5)": Distillation(part.store, t, 0.5),
        }
        members, keys = [], []
        for name, targets in methods.items():
            for seed in ctx.seeds:
                members.append(Member(seed=seed, targets=targets))
                keys.append((name, seed))
        ctx.log(f"label-noise {rate:.0%}: {len(members)} students at once")
        results = ctx.train(part, members)
        rows += [
            {"noise": rate, "targets": name, "seed": seed, "clean_test_accuracy": test_accuracy(r)}
            for (name, seed), r in zip(keys, results, strict=True)
        ]
    summary = summary_rows(
        rows, ["noise", "targets"], "clean_test_accuracy", "clean test accuracy (%)"
    )
    lines = curves(rows, "targets", "noise", "clean_test_accuracy", 100)
    lines["teacher (one run)"] = {r * 100: [a] for r, a in teachers.items()}
    figures = [
        plot_lines(
            lines,
            ctx.path("accuracy_vs_noise.png"),
            xlabel="training labels flipped (%)",
            ylabel="clean test accuracy (%)",
            title="Students under symmetric label noise",
        )
    ]
    diff = difference(
        rows,
        ["noise", "targets"],
        "clean_test_accuracy",
        (KEY_RATE, "teacher soft targets"),
        (KEY_RATE, "noisy hard labels"),
    )
    notes = (
        "Teacher test accuracy (clean labels) per noise rate: "
        + ", ".join(f"{r:.0%}: {a:.1%}" for r, a in teachers.items())
        + ". Validation labels are as noisy as the training labels, as they would be in practice."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        verdict(CLAIM, diff, "soft - noisy hard at 30% noise", 100, " points"),
        notes,
    )
