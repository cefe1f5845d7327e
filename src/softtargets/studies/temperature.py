"""``temperature``: how soft should the targets be, for a wide and for a narrow student?

Hinton et al. (2015, section 3, MNIST): with 300 or more units per hidden layer all temperatures
above 8 gave similar results; with 30 units per layer, temperatures of 2.5 to 4 worked
significantly better than higher or lower ones. Here: the soft targets' entropy vs T, and the test
accuracy of a wide and a narrow student trained at T in {1, 2, 4, 8, 20}.
"""

from __future__ import annotations

from softtargets.stats import verdict
from softtargets.studies.base import StudyContext, StudyOutput
from softtargets.studies.common import curves, difference, plot_lines, summary_rows, test_accuracy
from softtargets.targets import entropy
from softtargets.train import Distillation
from softtargets.vectorised import Member

TITLE = "Temperature (temperature)"
CLAIM = (
    "A narrow student (30 units per layer) does better at T = 4 than at T = 20 "
    "(Hinton et al. 2015, sec. 3: 2.5 to 4 best for 30 units)."
)
TEMPERATURES = [1.0, 2.0, 4.0, 8.0, 20.0]
ALPHA = 0.9  # Hinton's weighted average of the soft and (lightly weighted) hard objectives


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    temperatures = [1.0, 4.0, 20.0] if ctx.quick else TEMPERATURES
    widths = {"wide (300-300)": [300, 300], "narrow (30-30)": [30, 30]}
    if ctx.quick:
        widths = {"wide (16)": [16], "narrow (4)": [4]}
    rows = []
    for width_name, hidden in widths.items():
        members, keys = [], []
        for t in temperatures:
            for seed in ctx.seeds:
                members.append(Member(seed=seed, targets=Distillation(part.store, t, ALPHA)))
                keys.append((t, seed))
        ctx.log(f"temperature: {len(members)} {width_name} students at once")
        results = ctx.train(part, members, hidden=[hidden] * len(members))
        rows += [
            {"student": width_name, "T": t, "seed": s, "test_accuracy": test_accuracy(r)}
            for (t, s), r in zip(keys, results, strict=True)
        ]
    summary = summary_rows(rows, ["student", "T"], "test_accuracy", "test accuracy (%)")
    entropies = {
        t: float(entropy(part.store.soften(t, part.splits.train)).mean()) for t in temperatures
    }
    for row in summary:
        row["soft-target entropy (nats)"] = f"{entropies[row['T']]:.3f}"

    figures = [
        plot_lines(
            curves(rows, "student", "T", "test_accuracy"),
            ctx.path("accuracy_vs_temperature.png"),
            xlabel="temperature T",
            ylabel="test accuracy (%)",
            logx=True,
            title=f"Student accuracy vs temperature (alpha = {ALPHA})",
            reference={"teacher": part.record["test_accuracy"]},
        )
    ]
    narrow = list(widths)[1]
    diff = difference(rows, ["student", "T"], "test_accuracy", (narrow, 4.0), (narrow, 20.0))
    notes = (
        "Mean entropy of the soft targets on the training rows: "
        + ", ".join(f"T = {t:g}: {h:.3f} nats" for t, h in entropies.items())
        + f" (uniform: {__import__('math').log(part.splits.train.num_classes):.3f}). "
        "Literature: wide students flat for T > 8; 30-unit students best at T = 2.5 to 4."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        verdict(CLAIM, diff, "narrow student, T = 4 minus T = 20", 100, " points"),
        notes,
    )
