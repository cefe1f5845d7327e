"""``lighter-student``: do soft targets carry a teacher's knowledge into a much lighter network?

Hinton et al. (2015, sec. 3, MNIST): a 1200-1200 teacher made 67 test errors; an 800-800 student
made 146 on hard labels and 74 distilled. Stanton et al. (2021) add that a student can generalise
well without matching its teacher: fidelity (teacher-student agreement) is worth measuring beside
accuracy. Here: MLP students (two hidden layers) with about 1, 3, 10, 30 and 50% of the teacher's
parameters, hard labels vs the teacher's soft targets (T and alpha of the study config, Hinton's
alpha = 0.9 mix by default), the config's seeds per teacher; for each, the share of the teacher's test accuracy kept and
the share of test rows on which the student's prediction agrees with the teacher's.

Protocol version 2 (2026-12-02; PROTOCOLS.md): primary statistic, Hinton's own, the share of the
gap between a hard-label student and the teacher that soft targets close, ``(soft - hard) /
(teacher - hard)``, per seed at the largest student (50%), 95% t-interval; judged against his
91% (``REPORTED``). Beside it: soft minus hard averaged over the five sizes (version 1's primary
statistic), per size, and the fidelity difference (soft minus hard agreement with the teacher).

Version 5 (PROTOCOLS.md) adds, beside the primary statistic: the recovered share at every size,
and the same students distilled from a teacher of their own family (the recipe's MLP, two hidden
layers of 256 with dropout; students sized by *its* parameters), as Hinton's 1200-1200 teacher
was for his 800-800 student. A user's own teacher (``--teacher``) runs without it.
"""

from __future__ import annotations

import math
from typing import Any

from softtargets.config import OTHER_TEACHER, ModelConfig, quick_teacher
from softtargets.errors import SoftTargetsError
from softtargets.run.figures import plot_lines
from softtargets.run.report import StudyOutput, curves, summary_rows, test_accuracy
from softtargets.run.stats import Reported, judge, mean_ci, paired_difference
from softtargets.run.teacher import TeacherRun
from softtargets.store.label import predict_logits
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member
from softtargets.training.metrics import agreement
from softtargets.training.models import count_parameters
from softtargets.training.objectives import Distillation

TITLE = "A lighter student (lighter-student)"


CLAIM = (
    "A lighter student closes most of the gap between hard labels and its teacher with soft "
    "targets (Hinton et al. 2015: 146 -> 74 errors for an 800-800 student, teacher 67: 91%)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(0.911, 0.10, "Hinton et al. 2015, MNIST: (146 - 74) / (146 - 67) errors")

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ("teacher",)
#: it reads the teacher model itself (its parameters), so a store cannot stand in for it
NEEDS_TEACHER_MODEL = True
OWN_MODELS_WHY = "it sizes MLP students as fractions of the teacher's parameters"


SHARES = [0.01, 0.03, 0.1, 0.3, 0.5]


ALPHA = 0.9

KIND_NAMES = {"preset": "preset", "mlp": "MLP"}  # the two teachers, as the report names them


def width_for(parameters: float, inputs: int, classes: int) -> int:
    """The hidden width ``h`` of an MLP ``inputs-h-h-classes`` with about ``parameters``
    weights: ``h^2 + (inputs + classes + 2) h + classes = parameters``, at least 1."""
    b = inputs + classes + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * max(parameters - classes, 0))) / 2))


def _mlp_teacher(ctx: StudyContext) -> TeacherRun:
    """A teacher of the students' own family: the recipe's MLP (two hidden layers, dropout),
    trained on this pass's split like the preset teacher."""
    config = ctx.distill_config()
    name, options = OTHER_TEACHER
    model, training = ModelConfig(name=name, options=dict(options)), config.teacher_training
    if ctx.quick:
        model, training = quick_teacher(model, training)
    return ctx.teacher_for(
        config.model_copy(update={"teacher": model, "teacher_training": training})
    )


def _distil_lighter(
    ctx: StudyContext, part: TeacherRun, shares: list[float], kind: str
) -> list[dict]:
    """Hard-label and distilled students at each share of ``part``'s teacher's parameters (and
    the teacher's argmax labels at the largest), one row each; ``kind`` names the teacher."""
    train, test = part.splits.train, part.splits.test
    teacher_size = count_parameters(part.teacher)
    teacher_logits = predict_logits(part.teacher, test.features)
    widths = {s: width_for(s * teacher_size, train.num_features, train.num_classes) for s in shares}
    soft = Distillation(part.store, ctx.config.temperature, ALPHA)
    members, keys, hidden = [], [], []
    argmax = part.store.logits_for(train).argmax(1)  # the teacher's answers as hard labels
    for share, width in widths.items():
        arms: list[tuple[str, Any]] = [("hard", None), ("soft", soft)]
        if share == shares[-1]:
            arms.append(("argmax", None))
        for method, targets in arms:
            for seed in ctx.seeds:
                labels = argmax if method == "argmax" else None
                members.append(Member(seed=seed, targets=targets, labels=labels))
                keys.append((share, method, seed))
                hidden.append([width, width])
    ctx.log(f"lighter-student, {kind} teacher: {len(members)} students of widths "
            f"{sorted(set(widths.values()))}")  # fmt: skip
    results = ctx.train(part, members, hidden=hidden)
    teacher_accuracy = part.record["test_accuracy"]
    rows = []
    for (share, method, seed), result in zip(keys, results, strict=True):
        student_logits = predict_logits(result.model, test.features.reshape(len(test), -1))
        accuracy = test_accuracy(result)
        rows.append(
            {
                "teacher": kind,
                "teacher_parameters": teacher_size,
                "teacher_accuracy": teacher_accuracy,
                "share": share,
                "width": widths[share],
                "parameters": count_parameters(result.model),
                "method": method,
                "seed": seed,
                "test_accuracy": accuracy,
                "kept": accuracy / teacher_accuracy,
                "agreement": agreement(student_logits, teacher_logits),
            }
        )
    return rows


def recovered_share(rows: list[dict], kind: str, share: float, seeds: list[int]) -> list[float]:
    """Per seed, Hinton's statistic: the share of the gap between the hard-label student and the
    teacher that the distilled student closes, ``(soft - hard) / (teacher - hard)`` (0 when
    there is no gap)."""
    accuracy = {(r["method"], r["seed"]): r["test_accuracy"] for r in rows
                if r["teacher"] == kind and r["share"] == share}  # fmt: skip
    teacher = next(r["teacher_accuracy"] for r in rows if r["teacher"] == kind)
    out = []
    for seed in seeds:
        soft, hard = accuracy[("soft", seed)], accuracy[("hard", seed)]
        out.append((soft - hard) / (teacher - hard) if teacher != hard else 0.0)
    return out


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    if part.teacher is None:
        raise SoftTargetsError(
            "the lighter-student study sizes its students by the teacher's parameters: it needs "
            "--teacher, not --store"
        )
    test = part.splits.test
    teacher_size = count_parameters(part.teacher)
    teacher_accuracy = part.record["test_accuracy"]
    shares = [0.03, 0.3] if ctx.quick else SHARES
    rows = _distil_lighter(ctx, part, shares, "preset")
    # a teacher of the students' own family beside it, unless the teacher is the user's
    mlp = None if ctx.config.teacher is not None else _mlp_teacher(ctx)
    all_rows = rows + (_distil_lighter(ctx, mlp, shares, "mlp") if mlp is not None else [])
    widths = {r["share"]: r["width"] for r in rows}
    train = part.splits.train
    keys_ = ["share", "method"]
    summary = summary_rows(rows, keys_, "test_accuracy", "test accuracy (%)")
    for column, label in (
        ("kept", "teacher accuracy kept (%)"),
        ("agreement", "agrees with teacher (%)"),
    ):
        for row, other in zip(summary, summary_rows(rows, keys_, column, "x"), strict=True):
            row[label] = other["x"]
    size = {r["share"]: r["parameters"] for r in rows}
    for row in summary:
        row["student parameters"] = f"{size[row['share']]:,} (h = {widths[row['share']]})"

    def per_seed(method: str, column: str) -> list[float]:
        return [
            sum(r[column] for r in rows if r["method"] == method and r["seed"] == s) / len(shares)
            for s in ctx.seeds
        ]

    largest = shares[-1]

    def at_largest(method: str) -> list[float]:
        by_seed = {r["seed"]: r["test_accuracy"] for r in rows
                   if r["share"] == largest and r["method"] == method}  # fmt: skip
        return [by_seed[s] for s in ctx.seeds]

    # Hinton's MNIST statistic: the share of the gap between a hard-label student and the
    # teacher that soft targets close, per seed, at the largest student (his was 800-800).
    primary = mean_ci(recovered_share(rows, "preset", largest, ctx.seeds))
    kinds = ["preset"] + (["mlp"] if mlp is not None else [])
    closed = {
        kind: {share: recovered_share(all_rows, kind, share, ctx.seeds) for share in shares}
        for kind in kinds
    }
    for row in summary:  # the same share at every size, on the distilled students' rows
        for kind in kinds:
            row[f"gap closed, {KIND_NAMES[kind]} teacher (%)"] = (
                mean_ci(closed[kind][row["share"]]).format(100) if row["method"] == "soft" else ""
            )
    versus_argmax = paired_difference(at_largest("soft"), at_largest("argmax"))
    averaged = paired_difference(
        per_seed("soft", "test_accuracy"), per_seed("hard", "test_accuracy")
    )
    fidelity = paired_difference(per_seed("soft", "agreement"), per_seed("hard", "agreement"))
    figures = [
        plot_lines(
            curves(rows, "method", "share", "test_accuracy", 100),
            ctx.path("accuracy_vs_size.png"),
            xlabel="student parameters (% of the teacher's)",
            ylabel="test accuracy (%)",
            logx=True,
            title="Lighter students: hard labels vs soft targets",
            reference={"teacher": teacher_accuracy},
        ),
        plot_lines(
            curves(rows, "method", "share", "agreement", 100),
            ctx.path("agreement_vs_size.png"),
            xlabel="student parameters (% of the teacher's)",
            ylabel="test rows where student and teacher agree (%)",
            logx=True,
            title="Fidelity: agreement with the teacher's predictions",
        ),
        plot_lines(
            {f"{KIND_NAMES[kind]} teacher": closed[kind] for kind in kinds},
            ctx.path("gap_closed_vs_size.png"),
            xlabel="student parameters (% of its teacher's)",
            ylabel="share of the teacher - hard gap closed (%)",
            logx=True,
            title="Hinton's statistic at every size",
            reference={"Hinton et al. 2015 (MNIST)": REPORTED.size},
        ),
    ]
    errors = {
        method: mean_ci(
            [
                1 - r["test_accuracy"]
                for r in rows
                if r["share"] == shares[-1] and r["method"] == method
            ]
        ).mean
        * len(test)
        for method in ("hard", "soft")
    }
    notes = (
        f"Teacher: {teacher_size:,} parameters, {teacher_accuracy:.2%} test accuracy "
        f"({round((1 - teacher_accuracy) * len(test))} errors of {len(test):,}). Students "
        f"{train.num_features}-h-h-{train.num_classes}, h = "
        + ", ".join(f"{w} ({s:.0%})" for s, w in widths.items())
        + f"; soft targets at T = {ctx.config.temperature:g}, alpha = {ALPHA:g}. At the largest "
        f"size, soft minus the teacher's argmax labels: {versus_argmax.describe(100, ' points')} "
        "(what the softness adds to a better model's labels). Soft minus hard "
        f"test accuracy averaged over sizes (the primary statistic of protocol version 1): "
        f"{averaged.describe(100, ' points')}. Fidelity, soft "
        f"minus hard agreement with the teacher averaged over sizes: "
        f"{fidelity.describe(100, ' points')}. Hinton et al.'s MNIST "
        "anchor: teacher 67 errors, 800-800 student 146 errors with hard labels, 74 distilled. "
        f"Here the largest students ({shares[-1]:.0%}) make {errors['hard']:.0f} errors with hard "
        f"labels and {errors['soft']:.0f} with soft targets, on average."
    )
    if mlp is not None:
        notes += (
            f" An MLP teacher of the students' own family ({count_parameters(mlp.teacher):,} "
            f"parameters, {mlp.record['test_accuracy']:.2%} test accuracy) closes "
            f"{mean_ci(recovered_share(all_rows, 'mlp', largest, ctx.seeds)).describe(100, '%')} "
            f"of its gap at {largest:.0%} (the column 'gap closed, MLP teacher')."
        )
    return StudyOutput(
        all_rows,
        summary,
        figures,
        judge(
            CLAIM,
            primary,
            REPORTED,
            f"share of the teacher - hard gap closed by soft targets at {largest:.0%}",
            100,
            "%",
        ),
        notes,
    )
