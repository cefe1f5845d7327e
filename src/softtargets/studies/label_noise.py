"""``label-noise``: do a teacher's soft targets soften label noise?

Symmetric noise on the training (and validation) labels, from 0 to 50%; the teacher is trained on
the noisy labels too. Students: the noisy hard labels, the teacher's soft targets, and an even
mix of both; accuracy on the clean test labels.

Two controls, at 30% noise, separate "soft targets" from "a better model's predictions":
self-distillation (the
teacher is the student's own architecture, an MLP of the student's widths trained on the same
noisy labels, so it knows nothing the student could not learn) and a regularised hard-label
baseline (the noisy labels smoothed with eps = 0.1, the common remedy for noise).

Protocol (PROTOCOLS.md, version 3): primary statistic, at 30% noise, the (CNN) teacher's soft
targets minus the same teacher's argmax labels (its answers as hard labels: the control that
separates "soft" from "a better model's labels"), clean test accuracy, per teacher a mean over
seeds, judged over teachers against ``REPORTED`` by :func:`~softtargets.run.stats.judge`.
Beside it at 30%: soft minus the noisy labels (version 2's primary), argmax minus noisy,
self-distillation minus noisy labels, and teacher minus smoothed labels.
"""

from __future__ import annotations

from softtargets.config import ModelConfig
from softtargets.data.targets import smooth
from softtargets.run.figures import plot_lines
from softtargets.run.report import StudyOutput, curves, difference, summary_rows, test_accuracy
from softtargets.run.stats import Reported, judge
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member
from softtargets.training.objectives import Distillation

TITLE = "Label noise (label-noise)"


CLAIM = (
    "With 30% of the training labels flipped, a student learns more from the (noisily "
    "trained) teacher's soft targets than from the same teacher's answers as hard labels: the "
    "softness, not only a better model's labels, softens the noise."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(None, 0.01, "no single size in the literature for this comparison")

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ("student",)
OWN_MODELS_WHY = "it trains its own teachers on labels with known noise"


RATES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


KEY_RATE = 0.3


ARGMAX = "teacher's argmax labels"


def run(ctx: StudyContext) -> StudyOutput:
    rates = [0.0, KEY_RATE] if ctx.quick else RATES
    rows, teachers = [], {}
    for rate in rates:
        part = ctx.teacher(label_noise=rate)
        teachers[rate] = part.record["test_accuracy"]
        t = ctx.config.temperature
        train = part.splits.train
        methods = {
            "noisy hard labels": None,
            "teacher soft targets": Distillation(part.store, t, 1.0),
            "mix (alpha = 0.5)": Distillation(part.store, t, 0.5),
        }
        if rate == KEY_RATE:  # the controls, where the verdict is read
            argmax = part.store.logits_for(train).argmax(1)  # the teacher's answers, as labels
            methods[ARGMAX] = argmax
            own = _own_architecture_teacher(ctx, rate)
            methods["self-distillation"] = Distillation(own.store, t, 1.0)
            methods["smoothed noisy labels (eps 0.1)"] = smooth(
                train.labels, train.num_classes, 0.1
            )
        members, keys = [], []
        for name, targets in methods.items():
            for seed in ctx.seeds:
                if name == ARGMAX:  # hard labels: the teacher's, not the data's
                    members.append(Member(seed=seed, labels=targets))
                else:
                    members.append(Member(seed=seed, targets=targets))
                keys.append((name, seed))
        ctx.log(f"label-noise {rate:.0%}: {len(members)} students at once")
        results = ctx.train(part, members)
        rows += [
            {"noise": rate, "targets": name, "seed": seed, "clean_test_accuracy": test_accuracy(r)}
            for (name, seed), r in zip(keys, results, strict=True)
        ]
    summary = summary_rows(
        rows, ["noise", "targets"], "clean_test_accuracy", "clean test accuracy (%)"
    )
    lines = curves(rows, "targets", "noise", "clean_test_accuracy", 100)
    lines["teacher (one run)"] = {r * 100: [a] for r, a in teachers.items()}
    figures = [
        plot_lines(
            lines,
            ctx.path("accuracy_vs_noise.png"),
            xlabel="training labels flipped (%)",
            ylabel="clean test accuracy (%)",
            title="Students under symmetric label noise",
        )
    ]
    keys = ["noise", "targets"]

    def versus(better: str, worse: str) -> str:
        d = difference(rows, keys, "clean_test_accuracy", (KEY_RATE, better), (KEY_RATE, worse))
        return d.describe(100)

    diff = difference(
        rows, keys, "clean_test_accuracy",
        (KEY_RATE, "teacher soft targets"), (KEY_RATE, "teacher's argmax labels"),
    )  # fmt: skip
    notes = (
        f"At {KEY_RATE:.0%} noise, soft minus the noisy hard labels (version 2's primary "
        f"statistic): {versus('teacher soft targets', 'noisy hard labels')} points; the "
        "teacher's argmax labels minus the noisy labels (what a better model's answers give "
        f"without their softness): {versus(ARGMAX, 'noisy hard labels')}. "
        "Teacher test accuracy (clean labels) per noise rate: "
        + ", ".join(f"{r:.0%}: {a:.1%}" for r, a in teachers.items())
        + ". Validation labels are as noisy as the training labels, as they would be in practice. "
        f"At {KEY_RATE:.0%} noise: self-distillation minus noisy labels "
        f"{versus('self-distillation', 'noisy hard labels')} points; teacher minus smoothed "
        f"noisy labels {versus('teacher soft targets', 'smoothed noisy labels (eps 0.1)')}; "
        "teacher minus self-distillation "
        f"{versus('teacher soft targets', 'self-distillation')}."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        judge(
            CLAIM, diff, REPORTED, "soft - the teacher's argmax labels at 30% noise", 100, " points"
        ),
        notes,
    )


def _own_architecture_teacher(ctx: StudyContext, rate: float):  # noqa: ANN202 - a TeacherRun
    """A teacher of the student's own architecture, trained on the same noisy labels."""
    config = ctx.distill_config(label_noise=rate)
    config.teacher = ModelConfig(name="mlp", options={"hidden": list(ctx.config.student_hidden)})
    config.teacher_training = ctx.config.student_training.model_copy()
    return ctx.teacher_for(config)
