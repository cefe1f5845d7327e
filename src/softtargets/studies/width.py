"""``width``: do soft labels need far fewer neurons, the more so the smaller the margin?

Mandal, Lin and Srikant (arXiv 2412.09579, L4DC 2025) prove that a two-layer ReLU network
trained by gradient descent on soft labels reaches a training loss averaged over its steps below
eps with O(1 / (gamma^2 eps)) neurons, against O(gamma^-4 ln(1 / eps)) with hard labels, where
gamma is the margin of the limiting kernel: the hard-label need grows faster as the margin
shrinks. Their difficulty is a small margin on a *realizable* task, not label noise.

The setting is theirs (protocol version 5, PROTOCOLS.md):

- the task: :func:`~softtargets.data.builtin.margin_points` on the unit sphere in 10 dimensions,
  labelled by the sign of a fixed random ReLU score ``s(x)`` (in units of its spread), the points
  with ``|s| < gamma`` rejected, at gamma 0.4, 0.2, 0.1, 0.05 and 0; 1,000 training and 2,000
  validation points per gamma;
- soft labels from the score itself, ``sigmoid(s(x) / tau)`` with tau = 0.25 (the teacher is the
  score: no trained teacher stands between);
- the student is the theorem's: ``f(x) = m^(-1/2) sum_r a_r relu(w_r . x)``, ``a_r = +-1`` fixed,
  ``W ~ N(0, I)`` trained by full-batch gradient descent (rate 16, 1,000 steps) on the logistic
  loss (hard) or the KL divergence to the soft label (:mod:`softtargets.training.two_layer`);
  widths m = 2, 4, ..., 512 trained side by side, the hard and soft students of a seed from the
  same initial weights.

Outcomes: the training loss averaged over the steps (the theorem's quantity) and validation
accuracy. **Primary statistic**, per seed: for each arm the smallest width whose validation
accuracy reaches :data:`TARGET` (95%, declared before results; log-interpolated between widths; a
width that never does counts as twice the widest, 1,024, which understates the slope of the arm
that misses), then the least-squares slope of log m* against log(1 / gamma) over the positive
gammas, **hard minus soft** (positive: hard labels' need grows faster). Each pass of the study
draws its own score (the teacher, as the unit of replication: :func:`run_study`), the seeds nested
inside. gamma = 0 has no log and stands beside the slope.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from softtargets.data.builtin import margin_points
from softtargets.run.figures import plot_lines
from softtargets.run.report import StudyOutput, curves
from softtargets.run.stats import Reported, judge, mean_ci
from softtargets.studies.base import TEACHER_SEED_STEP, StudyContext
from softtargets.training.two_layer import smallest_width, train_two_layer

TITLE = "Fewer neurons (width)"


CLAIM = (
    "The neurons a two-layer ReLU network needs grow faster as the margin shrinks when it learns "
    "from hard labels than from soft ones (Mandal, Lin, Srikant 2024)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 5)
REPORTED = Reported(
    None,
    0.25,
    "the theorem's bounds grow as (1/gamma)^4 with hard labels and (1/gamma)^2 with soft "
    "ones, a difference of 2 in this slope, but they are upper bounds in the kernel's margin, "
    "not a predicted size",
)

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ()
OWN_MODELS_WHY = (
    "it trains the theorem's two-layer students on a task whose margin it controls, labelled "
    "by a score of its own"
)
#: the task is the study's own, so a user's ``--data`` has no place in it
TAKES_DATA = False


WIDTHS = [2, 4, 8, 16, 32, 64, 128, 256, 512]
GAMMAS = [0.4, 0.2, 0.1, 0.05, 0.0]  # from easy to hard; 0 stands beside the slope
TARGET = 0.95  # validation accuracy that defines the neurons needed, m*
TAU = 0.25  # soft labels: sigmoid(score / TAU), the score in units of its spread
DIM, TRAIN_ROWS, VAL_ROWS = 10, 1000, 2000
STEPS, RATE = 1000, 16.0
SCORE_UNITS = 64  # hidden units of the fixed random score network


def _settings(ctx: StudyContext) -> dict:
    if ctx.quick:
        return {"widths": [2, 8, 32, 128], "gammas": [0.4, 0.1, 0.0], "train": 300, "steps": 300}
    return {"widths": WIDTHS, "gammas": GAMMAS, "train": TRAIN_ROWS, "steps": STEPS}


def _train_gamma(ctx: StudyContext, gamma: float, settings: dict) -> list[dict]:
    """Hard and soft students of every width and seed at one margin, on this pass's score."""
    points, score = margin_points(
        settings["train"] + VAL_ROWS, DIM, gamma, SCORE_UNITS, seed=ctx.replicate, sphere=True
    )
    points, score = points.float(), score.float()
    train, val = slice(0, settings["train"]), slice(settings["train"], None)
    hard = (score[train] > 0).float()
    soft = torch.sigmoid(score[train] / TAU)
    seeds = [s + TEACHER_SEED_STEP * ctx.replicate for s in ctx.seeds]
    ctx.log(f"width, gamma {gamma:g}: {2 * len(seeds)} stacks of {len(settings['widths'])} widths")
    result = train_two_layer(
        points[train],
        torch.stack([hard] * len(seeds) + [soft] * len(seeds)),
        seeds * 2,
        settings["widths"],
        steps=settings["steps"],
        lr=RATE,
        val_features=points[val],
        val_labels=(score[val] > 0).long(),
    )
    rows = []
    for b, (method, seed) in enumerate(
        [("hard", s) for s in ctx.seeds] + [("soft", s) for s in ctx.seeds]
    ):
        for k, width in enumerate(settings["widths"]):
            rows.append(
                {
                    "gamma": gamma,
                    "method": method,
                    "seed": seed,
                    "width": width,
                    "val_accuracy": float(result.val_accuracy[b, k]),
                    "mean_train_loss": float(result.mean_train_loss[b, k]),
                    "final_train_loss": float(result.final_train_loss[b, k]),
                }
            )
    return rows


def neurons_needed(rows: list[dict], widths: list[int]) -> dict[tuple, float]:
    """m* per (gamma, method, seed): the smallest width reaching :data:`TARGET` validation
    accuracy, log-interpolated; ``inf`` when the widest does not reach it."""
    curves: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        curves[(r["gamma"], r["method"], r["seed"])][r["width"]] = r["val_accuracy"]
    return {
        key: smallest_width([curve[w] for w in widths], widths, TARGET)
        for key, curve in curves.items()
    }


def slope(gammas: list[float], needed: list[float], widest: int) -> float:
    """Least-squares slope of log m* on log(1 / gamma); an m* beyond the widest counts as
    twice the widest."""
    xs = [math.log(1 / g) for g in gammas]
    ys = [math.log(m if math.isfinite(m) else 2 * widest) for m in needed]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - x_mean) ** 2 for x in xs
    )


def _shown(value: float, widest: int) -> str:
    return f"{value:.1f}" if math.isfinite(value) else f"> {widest}"


def run(ctx: StudyContext) -> StudyOutput:
    settings = _settings(ctx)
    widths, gammas = settings["widths"], settings["gammas"]
    widest = widths[-1]
    rows = [row for gamma in gammas for row in _train_gamma(ctx, gamma, settings)]
    needed = neurons_needed(rows, widths)
    positive = [g for g in gammas if g > 0]
    slopes = {
        (method, seed): slope(positive, [needed[(g, method, seed)] for g in positive], widest)
        for method in ("hard", "soft")
        for seed in ctx.seeds
    }
    primary = mean_ci([slopes[("hard", s)] - slopes[("soft", s)] for s in ctx.seeds])
    summary = []
    for gamma in gammas:
        line: dict = {"gamma": gamma}
        for method in ("hard", "soft"):
            values = sorted(needed[(gamma, method, s)] for s in ctx.seeds)
            median = values[len(values) // 2]
            line[f"m*, {method} (median over seeds)"] = _shown(median, widest)
            line[f"beyond {widest}, {method}"] = sum(not math.isfinite(v) for v in values)
            best = [
                r["val_accuracy"]
                for r in rows
                if r["gamma"] == gamma and r["method"] == method and r["width"] == widest
            ]
            line[f"val accuracy at {widest}, {method} (%)"] = mean_ci(best).format(100)
        summary.append(line)
    arm_slopes = {
        method: mean_ci([slopes[(method, s)] for s in ctx.seeds]) for method in ("hard", "soft")
    }
    figures = [
        plot_lines(
            _curves(rows, gamma, "val_accuracy"),
            ctx.path(f"accuracy_vs_width_gamma{gamma:g}.png"),
            xlabel="hidden units m (two-layer ReLU, output weights fixed)",
            ylabel="validation accuracy (%)",
            logx=True,
            reference={f"target ({TARGET:.0%})": TARGET},
            title=f"gamma {gamma:g}: validation accuracy vs width (mean, 95% CI over seeds)",
        )
        for gamma in (positive[-1], 0.0)
        if gamma in gammas
    ]
    figures.append(
        plot_lines(
            _curves(rows, positive[-1], "mean_train_loss"),
            ctx.path("train_loss_vs_width.png"),
            xlabel="hidden units m",
            ylabel="training loss averaged over steps",
            scale=1.0,
            logx=True,
            logy=True,
            title=f"gamma {positive[-1]:g}: the theorem's quantity (hard: logistic, soft: KL)",
        )
    )
    # the primary statistic's picture: m* against 1 / gamma on log-log axes, a slope per arm
    figures.insert(
        0,
        plot_lines(
            {
                f"{method} labels": {
                    1 / g: [min(needed[(g, method, s)], 2 * widest) for s in ctx.seeds]
                    for g in positive
                }
                for method in ("hard", "soft")
            },
            ctx.path("neurons_needed.png"),
            xlabel="1 / gamma (a smaller margin to the right)",
            ylabel=f"m*: hidden units for {TARGET:.0%} validation accuracy",
            scale=1.0,
            logx=True,
            logy=True,
            title="Neurons needed as the margin shrinks (slope: the primary statistic)",
        ),
    )
    notes = (
        f"Slope of log m* on log(1/gamma): hard {arm_slopes['hard'].describe()}, soft "
        f"{arm_slopes['soft'].describe()}. "
        f"m* is the smallest width whose validation accuracy reaches {TARGET:.0%} "
        f"(log-interpolated; beyond {widest} counts as {2 * widest}); the slope is fitted over "
        f"gamma = {', '.join(f'{g:g}' for g in positive)}. Soft labels: sigmoid(score / {TAU:g}). "
        f"Students: the theorem's two-layer ReLU networks, output weights +-1 fixed, full-batch "
        f"gradient descent at rate {RATE:g} for {settings['steps']} steps on "
        f"{settings['train']} points; no test set is used. The theorem's bounds differ by 2 in "
        "this slope (hard 4, soft 2), as upper bounds in the kernel's margin."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        judge(
            CLAIM,
            primary,
            REPORTED,
            "slope of log m* on log(1/gamma), hard - soft",
            1.0,
            "",
        ),
        notes,
    )


def _curves(rows: list[dict], gamma: float, column: str) -> dict[str, dict[float, list[float]]]:
    """``column`` against width per arm at one ``gamma`` (the input of :func:`plot_lines`)."""
    at_gamma = [r for r in rows if r["gamma"] == gamma]
    return {
        f"{arm} labels": line for arm, line in curves(at_gamma, "method", "width", column).items()
    }
