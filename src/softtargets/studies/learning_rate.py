"""``learning-rate``: do soft targets tolerate a much higher learning rate?

Hinton et al. (2015) note that soft targets give much less variance in the gradient between
training cases, so the small model "can often be trained ... using a much higher learning rate".
Their mechanism is gradient noise, so the study measures where gradient noise sets the limit:

* **The same loss for both arms.** Cross-entropy at the student's T = 1 against a probability
  vector: one-hot labels, or the teacher's probabilities at T = 4. The loss, its scale and the
  logit Hessian are of one kind, so a learning rate means the same step for both.
* **Plain SGD, no momentum, a constant rate, batches of 16**: small batches make the gradient's
  between-case variance matter; momentum and schedules would average it away.
* A grid of rates in steps of 2^(1/4) over three decades (0.01 to 10; ``--quick``: a few),
  students trained stacked; for each seed and arm, the *validation* accuracy at the last epoch
  per rate, and the rate at which it falls 1 point below that arm's best, log-interpolated
  between the grid points around it (censored at the grid's end if it never falls).

Protocol (PROTOCOLS.md, version 4): primary statistic, per seed log10 of that rate, soft minus
hard, per teacher a mean over seeds, judged over teachers against ``REPORTED`` (no size stated)
by :func:`~softtargets.run.stats.judge`. Beside it: a **positive control** where the mechanism
must show (``gaussians``: labels sampled from the Bayes probabilities vs the probabilities
themselves, the same expected gradient and less variance), and the **mechanism check**: the same
comparison at batches of 256, where the benefit should shrink if it comes from gradient noise.
The test set is only reported.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch

from softtargets.data.builtin import gaussians
from softtargets.data.dataset import split
from softtargets.run.figures import plot_lines
from softtargets.run.report import StudyOutput, curves, summary_rows
from softtargets.run.stats import Reported, judge, mean_ci
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member

TITLE = "Higher learning rates (learning-rate)"


CLAIM = (
    "With the teacher's probabilities as targets, plain SGD with small batches tolerates a "
    "higher learning rate than with one-hot labels, under the same loss (Hinton et al. 2015)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 4): a factor of 1.26 in the rate
REPORTED = Reported(None, 0.1, "Hinton et al. 2015: 'a much higher learning rate'; no size")

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ("teacher",)
OWN_MODELS_WHY = "it trains MLP students it builds itself over a grid of learning rates"


#: rates 0.01 to 10 in steps of 2^(1/4): three decades
RATES = [0.01 * 2 ** (k / 4) for k in range(41)]
QUICK_RATES = [0.05, 0.4, 3.2]
BATCH, CHECK_BATCH = 16, 256
EPOCHS, QUICK_EPOCHS = 15, 2
TOLERANCE = 0.01  # one point of validation accuracy
TEMPERATURE = 4.0  # of the teacher's probabilities


def collapse_rate(points: dict[float, float], tolerance: float = TOLERANCE) -> float:
    """The learning rate at which accuracy first falls ``tolerance`` below its best, above the
    best rate, log-interpolated between the two grid rates around it; the largest grid rate when
    it never falls (censored)."""
    rates = sorted(points)
    best_at = max(range(len(rates)), key=lambda i: points[rates[i]])
    floor = points[rates[best_at]] - tolerance
    for i in range(best_at + 1, len(rates)):
        if points[rates[i]] < floor:
            good, bad = rates[i - 1], rates[i]
            fraction = (points[good] - floor) / (points[good] - points[bad])
            return 10 ** (math.log10(good) + fraction * (math.log10(bad) - math.log10(good)))
    return rates[-1]


def _sweep(
    ctx: StudyContext,
    part: Any,
    arms: dict[str, torch.Tensor],
    rates: list[float],
    batch_size: int,
    epochs: int,
    label: str,
) -> list[dict[str, Any]]:
    """Train one student per (arm, rate, seed), all stacked; a row per student with its last
    epoch's validation and test accuracy (a diverged run counts as chance)."""
    members, keys = [], []
    for arm, targets in arms.items():
        for rate in rates:
            for seed in ctx.seeds:
                members.append(Member(seed=seed, targets=targets, lr=rate))
                keys.append((arm, rate, seed))
    ctx.log(f"learning-rate, {label}: {len(members)} students at once, batch {batch_size}")
    results = ctx.train(
        part,
        members,
        optimizer="sgd",
        momentum=0.0,
        schedule="none",
        weight_decay=0.0,
        batch_size=batch_size,
        epochs=epochs,
        patience=None,
        restore_best=False,
    )
    chance = 1.0 / part.splits.train.num_classes
    rows = []
    for (arm, rate, seed), result in zip(keys, results, strict=True):
        last = result.history[-1]
        val, test = last.get("val_accuracy", math.nan), last.get("test_accuracy", math.nan)
        if result.diverged or not math.isfinite(val):
            val = test = chance
        rows.append(
            {"setting": label, "arm": arm, "lr": rate, "seed": seed, "diverged": result.diverged,
             "val_accuracy": val, "test_accuracy": test}
        )  # fmt: skip
    return rows


def log_ratios(rows: list[dict[str, Any]], better: str, base: str, seeds: list[int]) -> list[float]:
    """Per seed, log10 of the collapse rate of arm ``better`` minus that of arm ``base``."""

    def rate(arm: str, seed: int) -> float:
        points = {r["lr"]: r["val_accuracy"] for r in rows
                  if r["arm"] == arm and r["seed"] == seed}  # fmt: skip
        return math.log10(collapse_rate(points))

    return [rate(better, s) - rate(base, s) for s in seeds]


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    train = part.splits.train
    rates = QUICK_RATES if ctx.quick else RATES
    epochs = QUICK_EPOCHS if ctx.quick else EPOCHS
    one_hot = torch.nn.functional.one_hot(train.labels, train.num_classes).float()
    arms = {"one-hot": one_hot, "teacher's probabilities": part.store.soften(TEMPERATURE, train)}
    rows = _sweep(ctx, part, arms, rates, BATCH, epochs, f"batch {BATCH}")
    rows += _sweep(ctx, part, arms, rates, CHECK_BATCH, epochs, f"batch {CHECK_BATCH}")
    control = _positive_control(ctx, rates, epochs, part.device)
    rows += control
    seeds = ctx.seeds

    def of(setting: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["setting"] == setting]

    primary = mean_ci(log_ratios(of(f"batch {BATCH}"), "teacher's probabilities", "one-hot", seeds))
    large = mean_ci(
        log_ratios(of(f"batch {CHECK_BATCH}"), "teacher's probabilities", "one-hot", seeds)
    )
    positive = mean_ci(log_ratios(of("gaussians"), "Bayes probabilities", "sampled labels", seeds))
    summary = summary_rows(
        rows, ["setting", "arm", "lr"], "val_accuracy", "last-epoch validation accuracy (%)"
    )
    figures = [
        plot_lines(
            curves(of(setting), "arm", "lr", "val_accuracy", 100),
            ctx.path(f"accuracy_vs_learning_rate_{slug}.png"),
            xlabel="learning rate (plain SGD, constant)",
            ylabel="last-epoch validation accuracy (%)",
            logx=True,
            title=f"Validation accuracy vs learning rate, {setting} (diverged = chance)",
        )
        for setting, slug in (
            (f"batch {BATCH}", "batch16"),
            (f"batch {CHECK_BATCH}", "batch256"),
            ("gaussians", "gaussians"),
        )  # fmt: skip
    ]
    censored = sum(
        collapse_rate({r["lr"]: r["val_accuracy"] for r in of(f"batch {BATCH}")
                       if r["arm"] == arm and r["seed"] == s}) == rates[-1]
        for arm in arms for s in seeds
    )  # fmt: skip
    notes = (
        f"Both arms: cross-entropy at T = 1 against probability vectors (the teacher's at "
        f"T = {TEMPERATURE:g}), plain SGD, constant rate, {epochs} epochs, {len(rates)} rates "
        f"from {rates[0]:.3g} to {rates[-1]:.3g}. Collapse rate: where the last epoch's "
        f"validation accuracy falls {TOLERANCE * 100:g} point below the arm's best "
        f"({censored} of {2 * len(seeds)} seed-arms at batch {BATCH} never fell: censored at "
        f"the grid's end). log10 collapse rate, probabilities - one-hot: batch {BATCH} "
        f"{primary.describe(1, ' decades')}; batch {CHECK_BATCH} "
        f"{large.describe(1, ' decades')} (the mechanism check: gradient noise matters less "
        f"with large batches). Positive control, gaussians (Bayes probabilities - sampled "
        f"labels, batch {BATCH}): {positive.describe(1, ' decades')}."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        judge(
            CLAIM,
            primary,
            REPORTED,
            f"log10 collapse rate, teacher's probabilities - one-hot (batch {BATCH})",
            1,
            " decades",
        ),
        notes,
    )


def _positive_control(
    ctx: StudyContext, rates: list[float], epochs: int, device: torch.device
) -> list[dict]:
    """Gaussians: labels sampled from the Bayes probabilities vs the probabilities themselves
    (the same expected gradient, less variance), on the pass's own split."""
    data = gaussians(num_samples=800 if ctx.quick else 4000, seed=ctx.replicate)
    parts = split(data, 0.1, 0.2, seed=ctx.replicate)
    train = parts.train
    assert train.true_probs is not None
    one_hot = torch.nn.functional.one_hot(train.labels, train.num_classes).float()
    arms = {"sampled labels": one_hot, "Bayes probabilities": train.true_probs.float()}
    part = SimpleNamespace(splits=parts, device=device)  # what ctx.train reads of a teacher run
    return _sweep(ctx, part, arms, rates, BATCH, epochs, "gaussians")
