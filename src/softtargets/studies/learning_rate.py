"""``learning-rate``: do soft targets tolerate a much higher learning rate?

Hinton et al. (2015) note that soft targets give less variance in the gradient between training
cases, so the small model "can often be trained ... using a much higher learning rate". Here:
hard labels vs soft targets (T = 4, alpha = 1), the final (last-epoch, of 60) accuracy over a grid
of learning rates, which runs diverged, and per seed the largest learning rate whose final accuracy
is within 1 point of that method's best.

A learning rate is only comparable between two losses whose gradients have the same scale, and
the distillation loss's scale is a convention (Hinton et al.'s T^2 factor makes its gradient T
times a cross-entropy's). So the pre-registered primary arm is scale-free:

* **SGD, normalised** (primary; momentum 0.9, 4 seeds per teacher): each student's learning rate is a
  normalised rate divided by the norm of its own loss's gradient at its initial weights (on the
  whole training set), so the first step has the same length whatever the loss's scale; the grid
  of normalised rates grows by sqrt(2) from 0.02 to 0.23. Primary statistic: per seed, log10 of the
  largest good normalised rate, soft minus hard. The outcome is a grid point, so the verdict is
  an exact sign test over seeds (ties dropped): "present" when soft is higher in significantly
  more seeds (two-sided p < 0.05), "contradicted" when lower (a sign test states no size).

Visible beside it, for what they are:

* **SGD, T^2-scaled loss**: the raw learning rate with softtargets' loss; a comparison of loss-scale
  conventions (this was the study's first design).
* **SGD, loss without T^2**: the same with the soft loss divided by T^2 (under SGD exactly a
  learning rate divided by T^2 and a weight decay multiplied by T^2, which is how it is run).
* **Adam**: its update size does not depend on the gradient's scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from softtargets.run.figures import plot_lines
from softtargets.run.report import StudyOutput, curves, summary_rows
from softtargets.run.stats import Reported, paired_difference, sign_test
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation, make_objective

TITLE = "Higher learning rates (learning-rate)"


CLAIM = (
    "With soft targets the largest learning rate that still reaches within 1 point of the best "
    "accuracy is higher than with hard labels, at equal first-step length (SGD, learning rates "
    "normalised by each loss's initial gradient norm)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(None, 0.0, "Hinton et al. 2015: 'a much higher learning rate'; no size")

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ("teacher",)
OWN_MODELS_WHY = "it trains MLP students it builds itself over a grid of learning rates"


NORMALISED = "SGD, normalised by the initial gradient norm"


SGD_SCALED, SGD_UNSCALED, ADAM = "SGD, T^2-scaled loss", "SGD, loss without T^2", "Adam"


RATES = {
    # factors of sqrt(2) where hard and soft students go from training well to collapsing (a
    # first run with doubling steps: both fine at 0.08, both at chance from 0.32)
    NORMALISED: [round(0.02 * 2 ** (k / 2), 4) for k in range(8)],
    SGD_SCALED: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    SGD_UNSCALED: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    ADAM: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
}


QUICK_RATES = {
    NORMALISED: [0.04, 2.56],
    SGD_SCALED: [0.1, 3.0],
    SGD_UNSCALED: [0.1, 3.0],
    ADAM: [0.01, 0.3],
}


PRIMARY_SEEDS = 4  # per teacher; the sign test pools the teachers' seeds (12 over three)


EPOCHS = 60


def initial_gradient_norm(model: torch.nn.Module, data, targets) -> float:
    """The L2 norm of the gradient of ``fit``'s loss (``targets`` on ``data``, all rows at once)
    with respect to ``model``'s parameters, at its current weights."""
    objective = make_objective(targets, data, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    logits = model(data.features.reshape(len(data), -1))
    value, logits_grad = objective(logits, torch.arange(len(data)))
    if logits_grad is None:
        value.backward()
    else:
        logits.backward(logits_grad)
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    model.zero_grad(set_to_none=True)
    return norm


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
    train = part.splits.train
    # 60 epochs, not the config's 100: the study trains 310 students and the full run of every
    # study must stay under 30 minutes; stability at a learning rate is read at the last epoch
    epochs = min(EPOCHS, ctx.config.student_training.epochs)
    primary_seeds = ctx.seeds if ctx.quick else list(range(max(PRIMARY_SEEDS, len(ctx.seeds))))
    norms = {
        (method, seed): initial_gradient_norm(
            build_model(
                "mlp",
                train.feature_shape,
                train.num_classes,
                seed=seed,
                hidden=list(ctx.config.student_hidden),
            ),
            train,
            None if method == "hard" else soft,
        )  # fmt: skip
        for method in ("hard", "soft")
        for seed in primary_seeds
    }
    rows: list[dict[str, Any]] = []
    for optimizer, arms in (("sgd", [NORMALISED, SGD_SCALED, SGD_UNSCALED]), ("adam", [ADAM])):
        members, keys = [], []
        for arm in arms:
            for rate in rates[arm]:
                for method in ("hard", "soft"):
                    if arm == SGD_UNSCALED and method == "hard":
                        continue  # the loss scale changes only the soft members: shared runs
                    unscaled = arm == SGD_UNSCALED
                    for seed in primary_seeds if arm == NORMALISED else ctx.seeds:
                        lr = rate / (t * t) if unscaled else rate
                        if arm == NORMALISED:
                            lr = rate / norms[(method, seed)]
                        members.append(
                            Member(
                                seed=seed,
                                targets=None if method == "hard" else soft,
                                lr=lr,
                                weight_decay=decay * t * t if unscaled else decay,
                            )
                        )
                        keys.append((arm, rate, method, seed))
        ctx.log(f"learning-rate: {len(members)} students at once ({optimizer})")
        results = ctx.train(part, members, optimizer=optimizer, momentum=0.9, epochs=epochs)
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
    seeds_of = {arm: primary_seeds if arm == NORMALISED else ctx.seeds for arm in rates}
    per_seed = {arm: _largest_rate_gaps(rows, arm, seeds_of[arm]) for arm in rates}
    gaps = {arm: paired_difference(values, [0.0] * len(values)) for arm, values in per_seed.items()}
    slugs = {NORMALISED: "normalised", SGD_SCALED: "sgd", SGD_UNSCALED: "sgd_unscaled",
             ADAM: "adam"}  # fmt: skip
    figures = [
        plot_lines(
            curves([r for r in rows if r["arm"] == arm], "method", "lr", "final_test_accuracy"),
            ctx.path(f"accuracy_vs_learning_rate_{slug}.png"),
            xlabel=f"learning rate ({arm})",
            ylabel="final test accuracy (%)",
            logx=True,
            title=f"Final accuracy vs learning rate, {arm} (diverged = chance)",
        )
        for arm, slug in slugs.items()
    ]
    hard_norm = [norms[("hard", s)] for s in primary_seeds]
    soft_norm = [norms[("soft", s)] for s in primary_seeds]
    notes = (
        "Largest learning rate within 1 point of the method's best, soft - hard, in decades "
        "(mean of log10 per seed, 95% t-interval, shown for every arm; the verdict uses the sign "
        "test): "
        + "; ".join(f"{arm}: {gap.format(1, 2)}" for arm, gap in gaps.items())
        + f". Initial gradient norms (mean over seeds): hard {sum(hard_norm) / len(hard_norm):.3f}, "
        f"soft (T = {t:g}, T^2-scaled) {sum(soft_norm) / len(soft_norm):.3f}. Final accuracy is "
        "the last epoch's, since a too-high learning rate shows in the end state; diverged runs "
        "count as chance. The two raw SGD arms share their hard-label runs."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        sign_test(
            CLAIM,
            per_seed[NORMALISED],
            "log10(largest good normalised lr), soft - hard",
            " decades",
        ),  # fmt: skip
        notes,
        seeds=primary_seeds,
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


def _largest_rate_gaps(rows: list[dict[str, Any]], arm: str, seeds: list[int]) -> list[float]:
    """Per seed, log10 of the largest good rate, soft minus hard."""
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
    return [s - h for s, h in zip(largest["soft"], largest["hard"], strict=True)]
