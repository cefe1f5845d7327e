"""``learning-rate``: do soft targets tolerate a much higher learning rate?

Hinton et al. (2015) note that soft targets give less variance in the gradient between training
cases, so the small model "can often be trained ... using a much higher learning rate". Here:
six learning rates on a log scale, hard labels vs soft targets (T = 4, alpha = 1): the final
(last-epoch) accuracy, which runs diverged, and per seed the largest learning rate whose final
accuracy is within 1 point of that method's best.

A learning rate is only comparable between two losses whose gradients have the same scale, and
the distillation loss's scale is a convention: Hinton et al. multiply it by T^2 (so its gradient,
``T (softmax(z / T) - p)``, is T times a plain cross-entropy's at T), and without the factor it is
``1 / T`` as large. So the study runs three arms:

* **SGD, T^2-scaled loss** (momentum 0.9): softtargets' loss as used everywhere else. The claim's
  verdict is this arm's, as it was decided before the other arms existed.
* **SGD, loss without T^2**: the same runs with the soft members' loss divided by T^2. Under SGD
  that is exactly a learning rate divided by T^2 and a weight decay multiplied by T^2, which is how
  it is run (the hard members are shared with the first arm).
* **Adam**: its update size does not depend on the gradient's scale, so it asks the question the
  variance argument is about without a convention in the way.
"""

from __future__ import annotations

import math
from typing import Any

from softtargets.stats import Estimate, paired_difference, verdict
from softtargets.studies.base import StudyContext, StudyOutput
from softtargets.studies.common import curves, plot_lines, summary_rows
from softtargets.train import Distillation
from softtargets.vectorised import Member

TITLE = "Higher learning rates (learning-rate)"
CLAIM = (
    "With soft targets the largest learning rate that still reaches within 1 point of the best "
    "accuracy is higher than with hard labels (SGD, T^2-scaled loss)."
)
SGD_SCALED, SGD_UNSCALED, ADAM = "SGD, T^2-scaled loss", "SGD, loss without T^2", "Adam"
RATES = {
    SGD_SCALED: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    SGD_UNSCALED: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    ADAM: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
}
QUICK_RATES = {SGD_SCALED: [0.1, 3.0], SGD_UNSCALED: [0.1, 3.0], ADAM: [0.01, 0.3]}


def largest_good_rate(points: dict[float, float], tolerance: float = 0.01) -> float:
    """The largest learning rate whose accuracy is within ``tolerance`` of the best one."""
    best = max(points.values())
    return max(rate for rate, acc in points.items() if acc >= best - tolerance)


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    rates = QUICK_RATES if ctx.quick else RATES
    t = ctx.config.temperature
    soft = Distillation(part.store, t, 1.0)
    decay = ctx.config.student_training.weight_decay
    rows: list[dict[str, Any]] = []
    for optimizer, arms in (("sgd", [SGD_SCALED, SGD_UNSCALED]), ("adam", [ADAM])):
        members, keys = [], []
        for arm in arms:
            for rate in rates[arm]:
                for method in ("hard", "soft"):
                    if arm == SGD_UNSCALED and method == "hard":
                        continue  # the loss scale changes only the soft members: shared runs
                    unscaled = arm == SGD_UNSCALED
                    for seed in ctx.seeds:
                        members.append(
                            Member(
                                seed=seed,
                                targets=None if method == "hard" else soft,
                                lr=rate / (t * t) if unscaled else rate,
                                weight_decay=decay * t * t if unscaled else decay,
                            )
                        )
                        keys.append((arm, rate, method, seed))
        ctx.log(f"learning-rate: {len(members)} students at once ({optimizer})")
        results = ctx.train(part, members, optimizer=optimizer, momentum=0.9)
        classes = part.splits.train.num_classes
        rows += [_row(key, r, classes) for key, r in zip(keys, results, strict=True)]
    rows += [  # the hard-label runs are shared by both SGD arms: listed under each
        {**r, "arm": SGD_UNSCALED} for r in rows if r["arm"] == SGD_SCALED and r["method"] == "hard"
    ]
    arm_order = {arm: i for i, arm in enumerate(RATES)}
    rows.sort(key=lambda r: (arm_order[r["arm"]], r["lr"], r["method"], r["seed"]))

    summary = summary_rows(
        rows, ["arm", "lr", "method"], "final_test_accuracy", "final test accuracy (%)"
    )
    for row in summary:
        row["diverged runs"] = sum(
            r["diverged"]
            for r in rows
            if (r["arm"], r["lr"], r["method"]) == (row["arm"], row["lr"], row["method"])
        )
    gaps = {arm: _largest_rate_gap(rows, arm, ctx.seeds) for arm in rates}
    figures = [
        plot_lines(
            curves([r for r in rows if r["arm"] == arm], "method", "lr", "final_test_accuracy"),
            ctx.path(f"accuracy_vs_learning_rate_{slug}.png"),
            xlabel=f"learning rate ({arm})",
            ylabel="final test accuracy (%)",
            logx=True,
            title=f"Final accuracy vs learning rate, {arm} (diverged = chance)",
        )
        for arm, slug in ((SGD_SCALED, "sgd"), (SGD_UNSCALED, "sgd_unscaled"), (ADAM, "adam"))
    ]
    notes = (
        "Largest learning rate within 1 point of the method's best, soft - hard, in decades "
        "(mean of log10 per seed, 95% CI): "
        + "; ".join(f"{arm}: {gap.format(1, 2)}" for arm, gap in gaps.items())
        + ". Final accuracy is the last epoch's, since a too-high learning rate shows in the end "
        "state; diverged runs count as chance. The two SGD arms share their hard-label runs. The "
        "verdict is the first arm's; the other two show how much of it is the loss's scale "
        "convention (see the module docstring)."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        verdict(CLAIM, gaps[SGD_SCALED], "log10(largest good lr), soft - hard", 1, " decades"),
        notes,
    )


def _row(key: tuple, result: Any, num_classes: int) -> dict[str, Any]:
    arm, rate, method, seed = key
    final = result.history[-1].get("test_accuracy", float("nan"))
    if result.diverged or not math.isfinite(final):
        final = 1.0 / num_classes  # a diverged network predicts nothing useful
    return {
        "arm": arm,
        "lr": rate,
        "method": method,
        "seed": seed,
        "diverged": result.diverged,
        "final_test_accuracy": final,
        "selected_test_accuracy": result.selected.get("test_accuracy", float("nan")),
    }


def _largest_rate_gap(rows: list[dict[str, Any]], arm: str, seeds: list[int]) -> Estimate:
    """Per seed, log10 of the largest good rate, soft minus hard; paired over seeds."""
    largest = {}
    for method in ("hard", "soft"):
        largest[method] = [
            math.log10(
                largest_good_rate(
                    {
                        r["lr"]: r["final_test_accuracy"]
                        for r in rows
                        if (r["arm"], r["method"], r["seed"]) == (arm, method, seed)
                    }
                )
            )
            for seed in seeds
        ]
    return paired_difference(largest["soft"], largest["hard"])
