"""``temperature``: how soft should the targets be, for a wide and for a narrow student?

Hinton et al. (2015, section 3, MNIST): with 300 or more units per hidden layer all temperatures
above 8 gave similar results; with 30 units per layer, temperatures of 2.5 to 4 worked
significantly better than higher or lower ones. Here: the soft targets' entropy vs T, and the test
accuracy of a wide (300-300) and a narrow (30-30) student trained at T in {1, 2, 2.5, 3, 4, 8, 20},
with at least 7 seeds per teacher (21 over three teachers) for the narrow student (differences of a point need them) and the config's
seeds (5) for the wide one (Hinton: flat above T = 8; it is the secondary comparison, and 300-300
students cost 30 times as much).

Protocol (PROTOCOLS.md, version 3): the inverted U, both sides: for the narrow student, the mean
test accuracy over T in {2.5, 3, 4} minus that over T in {8, 20}, and minus that over T in
{1, 2}, each per teacher a mean over seeds, judged over teachers against ``REPORTED``; the
verdict is the weaker of the two (:func:`~softtargets.run.stats.all_of`). Beside it: the same difference for the wide student (Hinton: about 0) and the
interaction (narrow minus wide), which says whether the best temperature depends on size.
"""

from __future__ import annotations

import math

from softtargets.data.targets import entropy
from softtargets.run.figures import plot_lines
from softtargets.run.report import StudyOutput, curves, summary_rows, test_accuracy
from softtargets.run.stats import Reported, all_of, judge, mean_ci, paired_difference
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member
from softtargets.training.objectives import Distillation

TITLE = "Temperature (temperature)"


CLAIM = (
    "A narrow student (30 units per layer) does better at T = 2.5 to 4 than at T = 8 to 20 and "
    "than at T = 1 to 2: an inverted U (Hinton et al. 2015, sec. 3: 2.5 to 4 best for 30 units)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(None, 0.01, "Hinton et al. 2015: T 2.5-4 best for 30 units; no size")

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ("teacher",)
OWN_MODELS_WHY = "its students are MLPs of one chosen width"


TEMPERATURES = [1.0, 2.0, 2.5, 3.0, 4.0, 8.0, 20.0]


MIDDLE, HIGH = (2.5, 3.0, 4.0), (8.0, 20.0)
LOW = (1.0, 2.0)


SEEDS = 7  # per teacher (21 over three): this study's differences are a point or two


def band_difference(rows: list[dict], student: str, middle, high) -> list[float]:
    """Per seed (seed order): mean test accuracy over ``middle`` temperatures minus over ``high``
    ones, for ``student``."""
    by_seed: dict[int, dict[float, float]] = {}
    for row in rows:
        if row["student"] == student:
            by_seed.setdefault(row["seed"], {})[row["T"]] = row["test_accuracy"]
    return [
        sum(acc[t] for t in middle) / len(middle) - sum(acc[t] for t in high) / len(high)
        for _, acc in sorted(by_seed.items())
    ]


ALPHA = 0.9  # Hinton's weighted average of the soft and (lightly weighted) hard objectives


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    temperatures = [1.0, 4.0, 20.0] if ctx.quick else TEMPERATURES
    seeds = ctx.seeds if ctx.quick else list(range(max(SEEDS, len(ctx.seeds))))
    widths = {"wide (300-300)": [300, 300], "narrow (30-30)": [30, 30]}
    if ctx.quick:
        widths = {"wide (16)": [16], "narrow (4)": [4]}
    rows = []
    for width_name, hidden in widths.items():
        members, keys = [], []
        for t in temperatures:
            for seed in seeds if width_name != list(widths)[0] else ctx.seeds:
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
    wide, narrow = list(widths)
    middle, high = ((4.0,), (20.0,)) if ctx.quick else (MIDDLE, HIGH)
    low = (1.0,) if ctx.quick else LOW
    narrow_gain = band_difference(rows, narrow, middle, high)
    above_low = mean_ci(band_difference(rows, narrow, middle, low))
    wide_gain = band_difference(rows, wide, middle, high)
    primary, wide_estimate = mean_ci(narrow_gain), mean_ci(wide_gain)
    interaction = paired_difference(narrow_gain[: len(wide_gain)], wide_gain)  # common seeds

    def band(temperatures) -> str:
        return "{" + ", ".join(f"{t:g}" for t in temperatures) + "}"

    bands = f"T in {band(middle)} minus T in {band(high)}"
    notes = (
        "Mean entropy of the soft targets on the training rows: "
        + ", ".join(f"T = {t:g}: {h:.3f} nats" for t, h in entropies.items())
        + f" (uniform: {math.log(part.splits.train.num_classes):.3f}). "
        f"{len(seeds)} seeds. {bands}: narrow {primary.describe(100, ' points')}; wide "
        f"{wide_estimate.describe(100)}; narrow minus wide {interaction.describe(100)}. "
        "Literature: wide students flat for T > 8; 30-unit students best at T = 2.5 to 4."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        all_of(
            CLAIM,
            [
                judge(CLAIM, primary, REPORTED, f"narrow student, {bands}", 100, " points"),
                judge(
                    CLAIM,
                    above_low,
                    REPORTED,
                    f"narrow student, T in {band(middle)} minus T in {band(low)}",
                    100,
                    " points",
                ),
            ],
        ),
        notes,
        seeds=seeds,
    )
