"""``learning-rate``: do soft targets tolerate a much higher learning rate?

Hinton et al. (2015) note that soft targets give less variance in the gradient between training
cases, so the small model "can often be trained ... using a much higher learning rate". Here:
plain SGD with momentum at six learning rates on a log scale, hard labels vs soft targets: the
final (last-epoch) accuracy, which runs diverged, and per seed the largest learning rate whose
final accuracy is within 1 point of that method's best.
"""

from __future__ import annotations

import math

from softtargets.stats import mean_ci, paired_difference, verdict
from softtargets.studies.base import StudyContext, StudyOutput
from softtargets.studies.common import curves, plot_lines, summary_rows
from softtargets.train import Distillation
from softtargets.vectorised import Member

TITLE = "Higher learning rates (learning-rate)"
CLAIM = (
    "With soft targets the largest learning rate that still reaches within 1 point of the best "
    "accuracy is higher than with hard labels."
)
RATES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def largest_good_rate(points: dict[float, float], tolerance: float = 0.01) -> float:
    """The largest learning rate whose accuracy is within ``tolerance`` of the best one."""
    best = max(points.values())
    return max(rate for rate, acc in points.items() if acc >= best - tolerance)


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    rates = [0.1, 3.0] if ctx.quick else RATES
    soft = Distillation(part.store, ctx.config.temperature, 1.0)
    members, keys = [], []
    for rate in rates:
        for method, targets in (("hard", None), ("soft", soft)):
            for seed in ctx.seeds:
                members.append(Member(seed=seed, targets=targets, lr=rate))
                keys.append((rate, method, seed))
    ctx.log(f"learning-rate: {len(members)} students at once (SGD, momentum 0.9)")
    results = ctx.train(part, members, optimizer="sgd", momentum=0.9)
    rows = [
        {
            "lr": rate,
            "method": method,
            "seed": seed,
            "diverged": r.diverged,
            "final_test_accuracy": r.history[-1].get("test_accuracy", float("nan")),
            "selected_test_accuracy": r.selected.get("test_accuracy", float("nan")),
        }
        for (rate, method, seed), r in zip(keys, results, strict=True)
    ]
    for row in rows:  # a diverged network predicts nothing useful
        if row["diverged"] or not math.isfinite(row["final_test_accuracy"]):
            row["final_test_accuracy"] = 1.0 / part.splits.train.num_classes
    summary = summary_rows(rows, ["lr", "method"], "final_test_accuracy", "final test accuracy (%)")
    for row in summary:
        row["diverged runs"] = sum(
            r["diverged"] for r in rows if r["lr"] == row["lr"] and r["method"] == row["method"]
        )

    largest = {}
    for method in ("hard", "soft"):
        per_seed = []
        for seed in ctx.seeds:
            points = {
                r["lr"]: r["final_test_accuracy"]
                for r in rows
                if r["method"] == method and r["seed"] == seed
            }
            per_seed.append(math.log10(largest_good_rate(points)))
        largest[method] = per_seed
    figures = [
        plot_lines(
            curves(rows, "method", "lr", "final_test_accuracy"),
            ctx.out_dir / "accuracy_vs_learning_rate.png",
            xlabel="learning rate (SGD, momentum 0.9)",
            ylabel="final test accuracy (%)",
            logx=True,
            title="Final accuracy vs learning rate (diverged = chance)",
        )
    ]
    diff = paired_difference(largest["soft"], largest["hard"])
    notes = (
        "Largest learning rate within 1 point of the method's best, per seed (mean of log10): "
        + "; ".join(f"{m}: 10^{mean_ci(v).format(1, 2)}" for m, v in largest.items())
        + ". Final accuracy is the last epoch's, since a too-high learning rate shows in the end "
        "state; diverged runs count as chance."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        verdict(CLAIM, diff, "log10(largest good lr), soft - hard", 1, " decades"),
        notes,
    )
