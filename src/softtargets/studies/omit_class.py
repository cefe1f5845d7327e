"""``omit-class``: dark knowledge about a class the student never sees.

Hinton et al. (2015, sec. 3): a student distilled on a transfer set with every 3 removed got
98.6% of the test 3s right once the bias of class 3 was raised (by 3.5), and a student whose
transfer set held only 7s and 8s went from 47.3% to 13.2% test error once the biases of 7 and 8
were lowered (by 7.6). Here the same two experiments, with the bias shift chosen on validation
data, never on the test set.
"""

from __future__ import annotations

import numpy as np
import torch

from softtargets.metrics import predict_logits
from softtargets.stats import mean_ci, verdict
from softtargets.studies.base import StudyContext, StudyOutput
from softtargets.studies.common import plot_bars
from softtargets.train import Distillation
from softtargets.vectorised import Member

TITLE = "Dark knowledge about an unseen class (omit-class)"
CLAIM = (
    "A student distilled without ever seeing class 3 gets most test 3s right (more than half) "
    "once its bias for class 3 is shifted (Hinton et al. 2015: 98.6%)."
)
TEMPERATURE = 20.0  # Hinton's MNIST distillation temperature
SHIFTS = np.linspace(0.0, 15.0, 61)


def best_shift(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[int], sign: float
) -> float:
    """The bias shift (added with ``sign`` to ``classes``) that maximises accuracy on these rows."""
    scores = []
    for shift in SHIFTS:
        shifted = logits.clone()
        shifted[:, classes] += sign * shift
        scores.append(float((shifted.argmax(1) == labels).float().mean()))
    return float(SHIFTS[int(np.argmax(scores))])


def evaluate_shift(
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: list[int],
    sign: float,
    shift: float,
    focus: int | None,
) -> float:
    shifted = logits.clone()
    shifted[:, classes] += sign * shift
    rows = labels == focus if focus is not None else torch.ones_like(labels, dtype=torch.bool)
    return float((shifted.argmax(1)[rows] == labels[rows]).float().mean())


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    train, val, test = part.splits.train, part.splits.val, part.splits.test
    k = train.num_classes
    omitted = 3 if k > 3 else 0
    pair = [7, 8] if k > 8 else [k - 2, k - 1]
    variants = {
        f"no class {train.class_names[omitted]}": (
            (train.labels != omitted).nonzero().squeeze(1),
            [omitted],
            +1.0,
            omitted,
        ),
        f"only classes {train.class_names[pair[0]]} and {train.class_names[pair[1]]}": (
            torch.isin(train.labels, torch.tensor(pair)).nonzero().squeeze(1),
            pair,
            -1.0,
            None,
        ),
    }
    soft = Distillation(part.store, TEMPERATURE, 1.0)
    members, keys = [], []
    for name, (rows, *_rest) in variants.items():
        for seed in ctx.seeds:
            members.append(Member(seed=seed, targets=soft, rows=rows))
            keys.append((name, seed))
    results = ctx.train(part, members)
    table = []
    for (name, seed), result in zip(keys, results, strict=True):
        _, classes, sign, focus = variants[name]
        val_logits = predict_logits(result.model, val.features.reshape(len(val), -1))
        test_logits = predict_logits(result.model, test.features.reshape(len(test), -1))
        shift = best_shift(val_logits, val.labels, classes, sign)
        row = {
            "transfer set": name,
            "seed": seed,
            "bias shift (val)": shift,
            "test accuracy before": evaluate_shift(
                test_logits, test.labels, classes, sign, 0.0, None
            ),
            "test accuracy after": evaluate_shift(
                test_logits, test.labels, classes, sign, shift, None
            ),
        }
        if focus is not None:
            row["omitted class accuracy before"] = evaluate_shift(
                test_logits, test.labels, classes, sign, 0.0, focus
            )
            row["omitted class accuracy after"] = evaluate_shift(
                test_logits, test.labels, classes, sign, shift, focus
            )
        table.append(row)
    summary = []
    for name in variants:
        part_rows = [r for r in table if r["transfer set"] == name]
        entry = {
            "transfer set": name,
            "runs": len(part_rows),
            "bias shift": mean_ci([r["bias shift (val)"] for r in part_rows]).format(1, 2),
        }
        for column in (
            "test accuracy before",
            "test accuracy after",
            "omitted class accuracy before",
            "omitted class accuracy after",
        ):
            if column in part_rows[0]:
                entry[f"{column} (%)"] = mean_ci([r[column] for r in part_rows]).format(100)
        summary.append(entry)
    first = list(variants)[0]
    groups = {}
    for column in ("omitted class accuracy before", "omitted class accuracy after"):
        groups[column.replace("omitted class accuracy", f"class {train.class_names[omitted]},")] = [
            r[column] for r in table if r["transfer set"] == first
        ]
    second = list(variants)[1]
    for column in ("test accuracy before", "test accuracy after"):
        groups[f"{pair[0]}&{pair[1]} only, all classes, {column.split()[-1]}"] = [
            r[column] for r in table if r["transfer set"] == second
        ]
    figures = [
        plot_bars(
            groups,
            ctx.path("bias_shift.png"),
            ylabel="test accuracy (%)",
            title="Students that never saw some classes, before/after a bias shift",
        )
    ]
    after = mean_ci(
        [r["omitted class accuracy after"] for r in table if r["transfer set"] == first]
    )
    margin = type(after)(after.mean - 0.5, after.half_width, after.n)
    return StudyOutput(
        table,
        summary,
        figures,
        verdict(CLAIM, margin, "omitted-class accuracy after the shift minus 50%", 100, " points"),
        notes=(
            f"Soft targets at T = {TEMPERATURE:g} only (alpha = 1). The shift is "
            f"searched on {SHIFTS[0]:g}..{SHIFTS[-1]:g} to maximise validation "
            "accuracy over all classes."
        ),
    )
