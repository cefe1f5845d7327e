"""``smoothing-vs-teacher``: is the gain the teacher's information, or softening alone?

Students on the same rows: one-hot labels; label smoothing whose targets have the same mean
entropy as the teacher's soft targets; label smoothing matched row by row (each row's label gets
the teacher's probability of it, the rest spread evenly: the same confidence per row, no
similarity structure); and the teacher's soft targets themselves. All are plain probability
targets trained with soft cross-entropy, so only the targets differ.

Müller, Kornblith and Hinton (2019) claim more: a teacher *trained with* label smoothing is a
worse teacher (smoothing erases the similarity information distillation transfers). The same
student is distilled from the plain teacher and from one trained with labels smoothed by 0.1.

Protocol (PROTOCOLS.md): primary statistic teacher minus entropy-matched smoothing, test accuracy, paired
by seed, 95% t-interval; judged against ``REPORTED`` by :func:`~softtargets.run.stats.judge`. Beside it: teacher minus row-matched
smoothing, and students of the plain minus the smoothed-trained teacher (Müller et al.: > 0),
at the shared T and with each teacher at its own T chosen on validation from {1, 2, 4, 8}
(version 3).
"""

from __future__ import annotations

import math

import torch

from softtargets.data.targets import entropy, row_matched_smoothing, smooth
from softtargets.run.figures import plot_bars
from softtargets.run.report import StudyOutput, difference, summary_rows, test_accuracy
from softtargets.run.stats import Reported, judge
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member

TITLE = "Teacher vs label smoothing (smoothing-vs-teacher)"


CLAIM = (
    "The teacher's soft targets beat label smoothing of the same entropy: the gain comes from "
    "the teacher's information, not from softening alone."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(None, 0.01, "Mueller et al. 2019 show the direction, not this size")

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ("student",)
OWN_MODELS_WHY = "it compares its own teacher with a smoothed one of the same recipe"


def smoothing_entropy(eps: float, k: int) -> float:
    """Entropy in nats of a label-smoothed row: ``1 - eps + eps/K`` on the label, ``eps/K`` elsewhere."""
    on, off = 1 - eps + eps / k, eps / k
    return -(on * math.log(on) if on > 0 else 0.0) - (k - 1) * (
        off * math.log(off) if off > 0 else 0.0
    )


def matching_eps(target: float, k: int) -> float:
    """The smoothing ``eps`` in ``[0, 1]`` whose entropy equals ``target`` (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if smoothing_entropy(mid, k) < target else (low, mid)
    return (low + high) / 2


SMOOTHED_TEACHER_EPS = 0.1
#: the temperatures each teacher's own best is chosen from, on validation
CANDIDATE_T = (1.0, 2.0, 4.0, 8.0)


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    train = part.splits.train
    teacher_probs = part.store.soften(ctx.config.temperature, train)
    target_entropy = float(entropy(teacher_probs).mean())
    eps = matching_eps(target_entropy, train.num_classes)
    smoothed = smooth(train.labels, train.num_classes, eps)
    one_hot = torch.nn.functional.one_hot(train.labels, train.num_classes).float()
    config = ctx.distill_config()
    config.teacher_training.label_smoothing = SMOOTHED_TEACHER_EPS
    smoothed_teacher = ctx.teacher_for(config)
    t = ctx.config.temperature
    methods = {
        "one-hot": one_hot,
        f"label smoothing (eps = {eps:.3f})": smoothed,
        "label smoothing matched per row": row_matched_smoothing(teacher_probs, train.labels),
        f"teacher soft targets (T = {t:g})": teacher_probs,
        f"teacher trained with smoothing {SMOOTHED_TEACHER_EPS:g} (T = {t:g})": (
            smoothed_teacher.store.soften(t, train)
        ),
    }
    # Müller et al.'s comparison with each teacher at its own best T, chosen on validation: a
    # smoothed teacher's logits are flatter, so one shared T would favour one of them.
    candidates = {
        (who, tt): store.soften(tt, train)
        for who, store in (("plain", part.store), ("smoothed", smoothed_teacher.store))
        for tt in CANDIDATE_T
    }
    members, keys = [], []
    for name, probs in methods.items():
        for seed in ctx.seeds:
            members.append(Member(seed=seed, targets=probs))
            keys.append((name, seed))
    for (who, tt), probs in candidates.items():
        for seed in ctx.seeds:
            members.append(Member(seed=seed, targets=probs))
            keys.append((f"{who} teacher at T = {tt:g}", seed))
    results = ctx.train(part, members)
    chosen_rows = [
        {"targets": n, "seed": s, "val_accuracy": r.selected.get("val_accuracy", 0.0),
         "test_accuracy": test_accuracy(r)}
        for (n, s), r in zip(keys, results, strict=True)
        if n.endswith(tuple(f"T = {tt:g}" for tt in CANDIDATE_T)) and "teacher at" in n
    ]  # fmt: skip
    main = len(methods) * len(ctx.seeds)  # the five kinds of target first, the T search after
    keys, results = keys[:main], results[:main]
    rows = [
        {
            "targets": n,
            "seed": s,
            "test_accuracy": test_accuracy(r),
            "test_nll": r.selected.get("test_nll"),
        }
        for (n, s), r in zip(keys, results, strict=True)
    ]
    summary = summary_rows(rows, ["targets"], "test_accuracy", "test accuracy (%)")
    for row, nll in zip(
        summary, summary_rows(rows, ["targets"], "test_nll", "x", 1, 3), strict=True
    ):
        row["test NLL (nats)"] = nll["x"]
    for row, probs in zip(summary, methods.values(), strict=True):
        row["target entropy (nats)"] = f"{float(entropy(probs).mean()):.3f}"
    names = list(methods)
    diff = difference(rows, ["targets"], "test_accuracy", (names[3],), (names[1],))

    def versus(better: str, worse: str) -> str:
        d = difference(rows, ["targets"], "test_accuracy", (better,), (worse,))
        return d.describe(100, " points")

    def best_t(who: str) -> float:
        def mean_val(tt: float) -> float:
            values = [r["val_accuracy"] for r in chosen_rows
                      if r["targets"] == f"{who} teacher at T = {tt:g}"]  # fmt: skip
            return sum(values) / len(values)

        return max(CANDIDATE_T, key=mean_val)

    plain_t, smoothed_t = best_t("plain"), best_t("smoothed")
    at_best = difference(
        chosen_rows, ["targets"], "test_accuracy", (f"plain teacher at T = {plain_t:g}",),
        (f"smoothed teacher at T = {smoothed_t:g}",),
    )  # fmt: skip

    figure = plot_bars(
        {n: [r["test_accuracy"] for r in rows if r["targets"] == n] for n in names},
        ctx.path("targets.png"),
        ylabel="test accuracy (%)",
        title="Same rows, five kinds of target (mean, 95% CI, seeds as dots)",
    )
    return StudyOutput(
        rows,
        summary,
        [figure],
        judge(CLAIM, diff, REPORTED, "teacher - smoothing test accuracy", 100, " points"),
        notes=(
            f"Label smoothing eps = {eps:.3f} gives mean target entropy "
            f"{smoothing_entropy(eps, train.num_classes):.3f} nats, equal to the "
            f"teacher's {target_entropy:.3f} at T = {ctx.config.temperature:g}. Teacher minus "
            f"row-matched smoothing: {versus(names[3], names[2])}. Students of the plain teacher "
            f"({part.record['test_accuracy']:.1%} test) minus those of the teacher trained with "
            f"smoothing {SMOOTHED_TEACHER_EPS:g} ({smoothed_teacher.record['test_accuracy']:.1%}): "
            f"{versus(names[3], names[4])} at the shared T; with each teacher at its own T chosen on "
            f"validation from {{{', '.join(f'{tt:g}' for tt in CANDIDATE_T)}}} (plain: "
            f"{plain_t:g}, smoothed: {smoothed_t:g}): {at_best.describe(100, ' points')} "
            "(Müller et al. 2019: a smoothed teacher distils worse)."
        ),
    )
