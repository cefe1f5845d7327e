"""``generalisation``: do soft targets regularise — a smaller train-test gap, better calibration?

Hinton et al. (2015, sec. 6) saw hard targets overfit a small speech training set after an early
peak (train 67.3%, test 44.5% with early stopping) while soft targets did not (65.4% / 57.0%,
without early stopping). Early stopping hides the overfitting the claim is about, so every
student here is read twice: at its last epoch (no early stopping) and at its best validation
epoch. Students: hard labels, label smoothing (eps = 0.1) and the teacher's soft targets (T and
alpha = 1), on a 10% subset of the training rows (where overfitting shows), the config's seeds per teacher; per epoch
the test accuracy, and at the end the train accuracy, the train-test gap and the expected
calibration error (ECE, 15 bins) on the test set.

Protocol (PROTOCOLS.md, version 3): primary statistic, Hinton's "no early stopping needed": what
early stopping buys a student (test accuracy at its validation-selected epoch minus at its last
epoch), hard minus soft, per teacher a mean over seeds, judged over teachers against
``REPORTED`` (no size: the paper gives no last-epoch figure for hard targets). Beside it: the
last-epoch train-test gap, hard minus soft (version 2's primary; Hinton et al.: 14.4 points),
the same with early stopping, ECE hard minus soft, and label smoothing in each comparison.
"""

from __future__ import annotations

import torch

from softtargets.data.dataset import stratified_rows
from softtargets.data.targets import smooth
from softtargets.run.figures import plot_epoch_curves
from softtargets.run.report import StudyOutput, summary_rows
from softtargets.run.stats import Reported, judge, paired_difference
from softtargets.store.label import predict_logits
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member
from softtargets.training.metrics import expected_calibration_error
from softtargets.training.objectives import Distillation

TITLE = "Regularisation and calibration (generalisation)"


CLAIM = (
    "Soft targets need no early stopping: stopping at the best validation epoch buys a "
    "hard-label student more test accuracy than a soft-target one (Hinton et al. 2015, sec. 6)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(
    None, 0.01, "Hinton et al. 2015, sec. 6: hard targets needed early stopping, soft did not"
)


FRACTION = 0.1


SMOOTHING = 0.1


READINGS = ("last epoch", "early stopping")


def _accuracy(model: torch.nn.Module, data) -> tuple[float, float]:
    """Accuracy and ECE of ``model`` on ``data``."""
    logits = predict_logits(model, data.features.reshape(len(data), -1))
    return float((logits.argmax(1) == data.labels).float().mean()), expected_calibration_error(
        logits, data.labels
    )


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    train, test = part.splits.train, part.splits.test
    rows_used = {seed: stratified_rows(train.labels, FRACTION, seed) for seed in ctx.seeds}
    targets = {
        "hard labels": None,
        f"label smoothing {SMOOTHING:g}": smooth(train.labels, train.num_classes, SMOOTHING),
        f"soft targets (T = {ctx.config.temperature:g})": Distillation(
            part.store, ctx.config.temperature, 1.0
        ),
    }
    members, keys = [], []
    for name, target in targets.items():
        for seed in ctx.seeds:
            members.append(Member(seed=seed, targets=target, rows=rows_used[seed]))
            keys.append((name, seed))
    rows, curves = [], []
    for reading, restore in zip(READINGS, (False, True), strict=True):
        ctx.log(f"generalisation ({reading}): {len(members)} students at once")
        results = ctx.train(part, members, restore_best=restore)
        for (name, seed), result in zip(keys, results, strict=True):
            train_accuracy, _ = _accuracy(result.model, train.take(rows_used[seed]))
            test_accuracy, ece = _accuracy(result.model, test)
            rows.append(
                {
                    "reading": reading,
                    "targets": name,
                    "seed": seed,
                    "epoch": result.best_epoch,
                    "train_accuracy": train_accuracy,
                    "test_accuracy": test_accuracy,
                    "gap": train_accuracy - test_accuracy,
                    "ece": ece,
                }
            )
            if not restore:
                curves += [{"curve": name, "seed": seed, **h} for h in result.history]
    keys_ = ["reading", "targets"]
    summary = summary_rows(rows, keys_, "test_accuracy", "test accuracy (%)")
    for column, label, scale in (
        ("train_accuracy", "train accuracy (%)", 100),
        ("gap", "train - test (points)", 100),
        ("ece", "ECE (%)", 100),
    ):
        for row, other in zip(summary, summary_rows(rows, keys_, column, "x", scale), strict=True):
            row[label] = other["x"]

    def of(reading: str, name: str, column: str) -> list[float]:
        return [
            r[column] for r in sorted(rows, key=lambda r: r["seed"])
            if r["reading"] == reading and r["targets"] == name
        ]  # fmt: skip

    hard, smoothed, soft = targets

    def needs_stopping(name: str) -> list[float]:
        """Per seed: what early stopping buys, test accuracy at the validation-selected epoch
        minus at the last epoch."""
        early, last = of(READINGS[1], name, "test_accuracy"), of(READINGS[0], name, "test_accuracy")
        return [e - v for e, v in zip(early, last, strict=True)]

    # Hinton's "no early stopping needed": early stopping buys hard labels more than soft targets
    primary = paired_difference(needs_stopping(hard), needs_stopping(soft))
    gap = paired_difference(of(READINGS[0], hard, "gap"), of(READINGS[0], soft, "gap"))

    def versus(reading: str, column: str, a: str, b: str) -> str:
        d = paired_difference(of(reading, a, column), of(reading, b, column))
        return d.describe(100)

    figures = [
        plot_epoch_curves(
            curves,
            ctx.path("test_accuracy_per_epoch.png"),
            group="curve",
            title=f"Test accuracy per epoch, {FRACTION:.0%} of the training rows (mean, 95% band)",
        )
    ]
    notes = (
        f"Students train on {FRACTION:.0%} of the training rows (stratified, per seed). "
        f"Last-epoch train-test gap, hard minus soft (version 2's primary statistic; Hinton et "
        f"al.: (67.3 - 44.5) - (65.4 - 57.0) = 14.4 points): {gap.describe(100, ' points')}. "
        f"Train-test gap, hard minus soft, with early stopping: "
        f"{versus(READINGS[1], 'gap', hard, soft)} points; label smoothing minus soft, last epoch: "
        f"{versus(READINGS[0], 'gap', smoothed, soft)}. ECE (test), hard minus soft: last epoch "
        f"{versus(READINGS[0], 'ece', hard, soft)}, early stopping "
        f"{versus(READINGS[1], 'ece', hard, soft)} points. Hinton et al. (speech, 3% of the "
        "data): hard 67.3% train / 44.5% test (with early stopping), soft 65.4% / 57.0% (none)."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        judge(
            CLAIM,
            primary,
            REPORTED,
            "what early stopping buys (test at the selected epoch - at the last), hard - soft",
            100,
            " points",
        ),
        notes,
    )
