"""``width``: do soft labels need far fewer neurons, the more so the smaller the margin?

Mandal, Lin and Srikant (arXiv 2412.09579, L4DC 2025) prove that a two-layer ReLU network trained
on a teacher's soft labels needs O(1 / (gamma^2 eps)) neurons to reach loss eps, against
O(gamma^-4 ln(1 / eps)) with hard labels, where gamma is the task's separation margin: the gap
grows as the margin shrinks. Their difficulty is a small margin on a *realizable* task, not label
noise (adding Bayes noise makes every width fail alike).

Here: :func:`~softtargets.data.builtin.margin_task` tasks — labels from a fixed random ReLU network,
noise-free, points closer to its boundary than ``margin`` (in units of the score's spread)
rejected — at margins 1, 0.3 and 0 (the hardest). For each, an MLP teacher (256-256) is
trained on the hard labels and one-hidden-layer ReLU students of widths 1 to 64 learn from the
hard labels or from the teacher's probabilities at the study's T (4; at T = 1 a teacher that is
99% right on noise-free labels gives nearly one-hot targets), the config's seeds per teacher.

Protocol (PROTOCOLS.md): primary statistic, the *interaction*: the soft-minus-hard test accuracy averaged
over the small widths (1 to 8), at the smallest margin minus at the largest, paired by seed, 95%
t-interval; judged against ``REPORTED`` by :func:`~softtargets.run.stats.judge` (the gap grows as the margin shrinks). Beside it: the gap at
each margin, and the smallest width whose *validation* accuracy reaches the widest hard-label
student's validation accuracy minus 1 point (a width that never does is shown as "> 64", never
averaged). Teacher-to-teacher variation: the primary statistic again with 3 independently trained
teachers per margin (each teacher's mean over seeds, then a t-interval over teachers).
"""

from __future__ import annotations

from collections import defaultdict

from softtargets.config import StudyConfig
from softtargets.run.figures import plot_lines
from softtargets.run.report import StudyOutput, grouped, test_accuracy
from softtargets.run.stats import Reported, judge, mean_ci, paired_difference
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member
from softtargets.training.objectives import Distillation

TITLE = "Fewer neurons (width)"


CLAIM = (
    "Soft labels help small networks more as the task's margin shrinks: the soft-minus-hard "
    "accuracy gap of narrow students is larger at a small margin than at a large one (Mandal, "
    "Lin, Srikant 2024)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(
    None, 0.01, "Mandal, Lin and Srikant 2024 bound neuron counts, not accuracy gaps"
)

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ()
OWN_MODELS_WHY = "it measures the neurons needed on a task whose difficulty it controls (margin_task), with MLP students of many widths"


WIDTHS = [1, 2, 4, 8, 16, 32, 64]


SMALL = (1, 2, 4, 8)  # the widths the primary statistic averages over


MARGINS = [1.0, 0.3, 0.0]  # from easy to hard


TEACHERS = 3  # independently trained teachers per margin, for the teacher-to-teacher check


TOLERANCE = 0.01  # the width target: the widest hard student's validation accuracy minus this


#: The teacher, trained to ~99% on noise-free labels, is confident: at T = 1 its probabilities are
#: near one-hot except at the boundary, so the soft labels are read at the study's T (4).


def _task_options(ctx: StudyContext, margin: float) -> dict:
    return {"num_samples": 600 if ctx.quick else 4000, "dim": 10, "margin": margin}


def _train_task(
    ctx: StudyContext, margin: float | str, teacher_seed: int, widths, seeds
) -> list[dict]:
    """Hard and soft students of every width for one margin and one teacher; ``margin`` a name
    instead of a number: the study's own ``--data`` (no margin to control, no interaction)."""
    if isinstance(margin, str):
        part = ctx.teacher(None, seed=teacher_seed)
    else:
        part = ctx.teacher("margin_task", options=_task_options(ctx, margin), seed=teacher_seed)
    soft = Distillation(part.store, ctx.config.temperature, 1.0)
    members, keys = [], []
    for width in widths:
        for method, targets in (("hard", None), ("soft", soft)):
            for seed in seeds:
                members.append(Member(seed=seed, targets=targets))
                keys.append((width, method, seed))
    ctx.log(f"width, {_label(margin)}, teacher {teacher_seed}: {len(members)} students")
    results = ctx.train(part, members, hidden=[[w] for w, _, _ in keys])
    return [
        {
            "margin": margin,
            "teacher": teacher_seed,
            "teacher_test_accuracy": part.record["test_accuracy"],
            "width": w,
            "method": m,
            "seed": s,
            "val_accuracy": float(r.selected.get("val_accuracy", float("nan"))),
            "test_accuracy": test_accuracy(r),
        }
        for (w, m, s), r in zip(keys, results, strict=True)
    ]


def _label(margin: float | str) -> str:
    return f"margin {margin:g}" if isinstance(margin, float) else f"your data ({margin})"


def small_width_gap(rows: list[dict], margin: float | str, teacher: int, small) -> dict[int, float]:
    """Per seed: soft minus hard test accuracy averaged over the ``small`` widths."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    acc = {
        (r["width"], r["method"], r["seed"]): r["test_accuracy"]
        for r in rows
        if r["margin"] == margin and r["teacher"] == teacher
    }
    for (width, method, seed), value in acc.items():
        if method == "soft" and width in small:
            by_seed[seed].append(value - acc[(width, "hard", seed)])
    return {seed: sum(v) / len(v) for seed, v in sorted(by_seed.items())}


def smallest_width(rows: list[dict], margin: float | str, method: str, widths) -> str:
    """The smallest width whose mean validation accuracy (teacher 0) reaches the widest hard
    student's minus :data:`TOLERANCE`; ``"> max"`` if none does."""
    val = grouped(
        [r for r in rows if r["margin"] == margin and r["teacher"] == 0],
        ["width", "method"],
        "val_accuracy",
    )
    target = sum(val[(max(widths), "hard")]) / len(val[(max(widths), "hard")]) - TOLERANCE
    for width in widths:
        values = val[(width, method)]
        if sum(values) / len(values) >= target:
            return str(width)
    return f"> {max(widths)}"


def run(ctx: StudyContext) -> StudyOutput:
    widths = [1, 4, 16] if ctx.quick else WIDTHS
    small = tuple(w for w in widths if w <= 8)
    margins = [0.5, 0.0] if ctx.quick else MARGINS
    # with teachers as the unit (study passes), each pass trains one teacher per margin
    teachers = 1 if ctx.replicates > 1 else (2 if ctx.quick else TEACHERS)
    rows = []
    for margin in margins:
        for teacher in range(teachers):
            # the per-seed statistics use teacher 0; the other teachers need fewer seeds
            seeds = ctx.seeds if teacher == 0 else ctx.seeds[:3]
            rows += _train_task(ctx, margin, teacher, widths, seeds)
    # A user's --data has no margin to control: its widths are trained and reported beside the
    # margin tasks (the gap and smallest widths), outside the pre-registered interaction.
    own = ctx.config.data if ctx.config.data != StudyConfig().data else None
    if own is not None:
        rows += _train_task(ctx, own, 0, widths, ctx.seeds)

    easy, hard = margins[0], margins[-1]
    shown = [*margins, *([own] if own is not None else [])]
    gaps = {m: small_width_gap(rows, m, 0, small) for m in shown}
    primary = paired_difference(list(gaps[hard].values()), list(gaps[easy].values()))
    summary = []
    for margin in shown:
        gap = mean_ci(list(gaps[margin].values()))
        teacher_accuracy = [
            r["teacher_test_accuracy"] for r in rows if r["margin"] == margin and r["width"] == 1
        ]
        summary.append(
            {
                "margin": margin,
                "teacher test accuracy (%)": mean_ci(sorted(set(teacher_accuracy))).format(100),
                f"soft - hard, widths {small[0]}-{small[-1]} (points)": gap.format(100),
                "smallest width, hard (val)": smallest_width(rows, margin, "hard", widths),
                "smallest width, soft (val)": smallest_width(rows, margin, "soft", widths),
            }
        )
    # the same interaction over independently trained teachers: one mean over seeds each
    per_teacher = [
        _mean(small_width_gap(rows, hard, t, small).values())
        - _mean(small_width_gap(rows, easy, t, small).values())
        for t in range(teachers)
    ]
    over_teachers = mean_ci(per_teacher)
    figures = []
    for i, margin in enumerate(shown):
        curves: dict[str, dict[float, list[float]]] = {}
        for (w, m), values in grouped(
            [r for r in rows if r["margin"] == margin and r["teacher"] == 0],
            ["width", "method"],
            "test_accuracy",
        ).items():
            curves.setdefault(m, {})[w] = values
        figures.append(
            plot_lines(
                curves,
                ctx.path(f"accuracy_vs_width_{i}.png"),
                xlabel="hidden units (one ReLU layer)",
                ylabel="test accuracy (%)",
                logx=True,
                title=f"{_label(margin)}: accuracy vs width (teacher 0, mean, 95% CI)",
            )
        )
    notes = (
        (
            f"Interaction over {teachers} independently trained teachers per margin (each a "
            f"mean over {len(ctx.seeds[:3])}+ seeds): {over_teachers.describe(100, ' points')}. "
            if teachers > 1
            else ""
        )
        + f"Soft labels are the teacher's probabilities at T = {ctx.config.temperature:g} (alpha = 1). "
        "Smallest widths are "
        f"read on validation accuracy against the widest hard student's minus "
        f"{TOLERANCE * 100:g} point; the test set chooses nothing."
        + (
            f" The row '{own}' is your --data, trained at the same widths: it has no margin "
            "to control, so it stands beside the margin tasks, outside the verdict."
            if own is not None
            else ""
        )
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        judge(
            CLAIM,
            primary,
            REPORTED,
            f"soft - hard at widths {small[0]}-{small[-1]}, margin {hard:g} minus margin {easy:g}",
            100,
            " points",
        ),
        notes,
    )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
