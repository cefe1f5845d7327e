"""``similarity``: do soft targets carry the similarity structure between classes, and is that
structure what a student learns from?

The teacher's mean soft target per true class at T = 1, 4 and 20 (heatmaps), the most similar
class pairs, a few test inputs with their soft targets, and the contrast with label smoothing,
whose off-target mass is uniform by construction.

Protocol (PROTOCOLS.md, version 3): the primary statistic is the control that ties the gain to
the structure. Five students per seed learn the same training rows from probability targets
(soft cross-entropy): one-hot labels; the teacher's soft targets at T = 4; **row-matched
smoothing**, each row's own label probability kept and the rest spread evenly (the same
confidence per row, no structure at all: the primary control); the **class-mean** soft target,
each row given its true class's mean soft target (class-level structure, no per-example
structure); and the soft targets with each row's off-target mass **shuffled** (version 2's
control: a fresh permutation per row, which puts mass on random classes, so it mixes "no
structure" with label noise). Primary: soft minus row-matched smoothing test accuracy, per
teacher a mean over seeds, judged over teachers against ``REPORTED`` by
:func:`~softtargets.run.stats.judge`. Beside it: soft minus class-mean (what per-example
structure adds), soft minus shuffled, and the own-class margin (does a held-out row's
off-target part follow its own class's pattern better than another class's; its interval is
over test rows of one teacher, not seeds).
"""

from __future__ import annotations

import numpy as np
import torch

from softtargets.data.targets import (
    entropy,
    row_matched_smoothing,
    shuffle_off_target,
    smooth,
    soften,
)
from softtargets.run.figures import new_figure, plot_bars, save_figure
from softtargets.run.report import (
    StudyOutput,
    difference,
    markdown_table,
    summary_rows,
    test_accuracy,
)
from softtargets.run.stats import Estimate, Reported, judge, mean_ci
from softtargets.store.label import predict_logits
from softtargets.studies.base import StudyContext
from softtargets.training.fit_many import Member

TITLE = "Similarity structure (similarity)"


CLAIM = (
    "Soft targets carry class-specific similarity structure, and it is what the student learns "
    "from: the teacher's soft targets beat row-matched smoothing (each row's own label "
    "probability kept, the rest spread evenly: the same confidence, no structure)."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(None, 0.01, "Hinton et al. 2015 state the mechanism, not a size")


TEMPERATURES = [1.0, 4.0, 20.0]


def off_target(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` -> ``(N, K - 1)`` off-target probabilities, renormalised to sum to 1."""
    k = probs.shape[1]
    keep = torch.ones_like(probs, dtype=torch.bool)
    keep[torch.arange(len(labels)), labels] = False
    rest = probs[keep].view(-1, k - 1)
    return rest / rest.sum(1, keepdim=True).clamp_min(1e-30)


def specificity(probs: torch.Tensor, labels: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Per row: correlation of its probabilities with its own class's mean pattern minus that with
    another class's pattern, averaged over the other classes ``(N,)``. Both correlations use the
    same ``K - 2`` coordinates (the row's class and the other class left out), so the large mass
    on either class cannot decide the comparison."""
    n, k = probs.shape
    margins = torch.zeros(n)
    for other in range(k):
        rows = (labels != other).nonzero().squeeze(1)
        keep = torch.ones(len(rows), k, dtype=torch.bool)
        keep[torch.arange(len(rows)), labels[rows]] = False
        keep[:, other] = False
        row = probs[rows][keep].view(len(rows), k - 2)
        own = pattern[labels[rows]][keep].view(len(rows), k - 2)
        alien = pattern[other].expand(len(rows), k)[keep].view(len(rows), k - 2)
        centred = row - row.mean(1, keepdim=True)
        corr_own = torch.nn.functional.cosine_similarity(
            centred, own - own.mean(1, keepdim=True), 1
        )
        corr_alien = torch.nn.functional.cosine_similarity(
            centred, alien - alien.mean(1, keepdim=True), 1
        )
        margins[rows] += (corr_own - corr_alien).nan_to_num(0.0)
    return margins / (k - 1)


def class_means(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(K, K)``: row c is the mean soft target of the rows of true class c."""
    return torch.stack([probs[labels == c].mean(0) for c in range(k)])


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    train, test, store = part.splits.train, part.splits.test, part.store
    k, names = train.num_classes, list(train.class_names)
    rows, summary, margins_at_4 = [], [], []
    # The teacher on the test rows themselves: a separate test file is not in the store.
    test_logits = predict_logits(part.teacher, test.features)
    means_at = {}
    for t in TEMPERATURES:
        train_p, test_p = store.soften(t, train), soften(test_logits, t)
        means_at[t] = class_means(test_p, test.labels, k)
        # the class patterns from training rows, compared with each held-out row
        margin = specificity(test_p, test.labels, class_means(train_p, train.labels, k))
        rest = off_target(test_p, test.labels)
        cv = rest.std(1) / rest.mean(1)
        smooth_rest = off_target(smooth(test.labels, k, 0.1), test.labels)
        summary.append(
            {
                "T": t,
                "mean entropy (nats)": f"{float(entropy(test_p).mean()):.3f}",
                "off-target spread, teacher (CV)": mean_ci(cv.tolist()).format(1, 3),
                "off-target spread, label smoothing (CV)": f"{float((smooth_rest.std(1) / smooth_rest.mean(1)).mean()):.3f}",
                "own-class margin": mean_ci(margin.tolist()).format(1, 3),
            }
        )
        for c in range(k):
            for j in range(k):
                rows.append(
                    {
                        "T": t,
                        "true_class": names[c],
                        "class": names[j],
                        "mean_probability": float(means_at[t][c, j]),
                    }
                )
        if t == 4.0:
            margins_at_4 = margin.tolist()

    m = means_at[4.0].clone()
    m.fill_diagonal_(0)
    sym = (m + m.T) / 2
    pairs = sorted(
        ((float(sym[i, j]), names[i], names[j]) for i in range(k) for j in range(i + 1, k)),
        reverse=True,
    )[:5]
    figures = [
        _heatmaps(means_at, names, ctx.path("class_similarity.png")),
        _examples(test, soften(test_logits, 4.0), names, ctx.path("examples.png")),
    ]
    control = _controls(ctx, part)
    figures.append(control.figure)
    margin = mean_ci(margins_at_4)
    notes = (
        f"Controls (probability targets at T = {CONTROL_T:g}, soft cross-entropy, "
        f"{len(ctx.seeds)} seeds): soft - class-mean soft target "
        f"{control.per_example.describe(100, ' points')} (what per-example structure adds to "
        f"class-level structure); soft - shuffled {control.shuffled.describe(100, ' points')}; "
        f"{control.retained:.0%} of the soft-target gain over one-hot labels survives row-matched "
        "smoothing. "
        f"Own-class margin at T = 4: {margin.format(1, 3)} (95% CI over test rows).\n\n"
        + markdown_table(list(control.summary[0]), [list(r.values()) for r in control.summary])
        + "\n\n"
    ) + (
        "Most similar class pairs at T = 4 (mean soft-target mass one puts on the other, "
        "symmetrised): " + ", ".join(f"{a}-{b} ({p:.3f})" for p, a, b in pairs) + ". "
        "Label smoothing gives every wrong class the same mass (spread 0); the teacher's "
        "spread is its similarity structure. The own-class margin is the correlation of a row's "
        "off-target probabilities with its own class's mean pattern minus that with another "
        "class's pattern (same coordinates); its interval is over the "
        f"{len(test)} test rows, one teacher (trained once per dataset)."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        judge(
            CLAIM,
            control.difference,
            REPORTED,
            "soft - row-matched smoothing test accuracy",
            100,
            " points",
        ),
        notes,
    )


CONTROL_T = 4.0


class _Control:
    """What the controls measured (see the module docstring)."""

    def __init__(self, summary, figure, difference, per_example, shuffled, retained) -> None:
        self.summary, self.figure = summary, figure
        self.difference, self.per_example, self.shuffled = difference, per_example, shuffled
        self.retained = retained


def _controls(ctx: StudyContext, part) -> _Control:
    """One-hot, soft, row-matched smoothing, class-mean and shuffled students per seed."""
    train = part.splits.train
    soft = part.store.soften(CONTROL_T, train)
    one_hot = torch.nn.functional.one_hot(train.labels, train.num_classes).float()
    class_mean = class_means(soft, train.labels, train.num_classes)[train.labels]
    names = (
        "one-hot",
        "teacher soft targets",
        "row-matched smoothing",
        "class-mean soft target",
        "soft targets, off-target shuffled",
    )
    members, keys = [], []
    for seed in ctx.seeds:
        arms = (
            one_hot,
            soft,
            row_matched_smoothing(soft, train.labels),
            class_mean,
            shuffle_off_target(soft, train.labels, 1000 + seed),
        )
        for name, probs in zip(names, arms, strict=True):
            members.append(Member(seed=seed, targets=probs))
            keys.append((name, seed))
    results = ctx.train(part, members)
    rows = [
        {"targets": n, "seed": s, "test_accuracy": test_accuracy(r)}
        for (n, s), r in zip(keys, results, strict=True)
    ]
    summary = summary_rows(rows, ["targets"], "test_accuracy", "student test accuracy (%)")
    figure = plot_bars(
        {n: [r["test_accuracy"] for r in rows if r["targets"] == n] for n in names},
        ctx.path("shuffle_control.png"),
        ylabel="test accuracy (%)",
        title="Soft targets with and without their similarity structure (mean, 95% CI)",
    )
    mean = {n: np.mean([r["test_accuracy"] for r in rows if r["targets"] == n]) for n in names}
    gain = mean[names[1]] - mean[names[0]]
    retained = (mean[names[2]] - mean[names[0]]) / gain if gain else float("nan")

    def minus(other: str) -> Estimate:
        return difference(rows, ["targets"], "test_accuracy", (names[1],), (other,))

    return _Control(summary, figure, minus(names[2]), minus(names[3]), minus(names[4]), retained)


def _heatmaps(means_at: dict[float, torch.Tensor], names: list[str], path):
    figure, _ = new_figure(4.2 * len(means_at), 4.0)
    figure.clear()
    axes = figure.subplots(1, len(means_at))
    for ax, (t, means) in zip(axes, means_at.items(), strict=True):
        image = ax.imshow(means.numpy(), cmap="viridis", vmin=0, vmax=1 if t == 1 else None)
        ax.set_title(f"T = {t:g}")
        ax.set_xlabel("class of the soft target")
        ax.set_ylabel("true class")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        figure.colorbar(image, ax=ax, shrink=0.8, label="mean probability")
    figure.suptitle("Teacher's mean soft target per true class (test rows)")
    return save_figure(figure, path)


def _examples(test, probs: torch.Tensor, names: list[str], path, count: int = 4):
    figure, _ = new_figure(3.2 * count, 4.6)
    figure.clear()
    axes = figure.subplots(2, count)
    picks = [int((test.labels == c).nonzero()[0, 0]) for c in range(min(count, len(names)))]
    for col, row in enumerate(picks):
        x = test.features[row]
        top = axes[0, col]
        if x.ndim == 1:
            top.plot(x.numpy(), color="#0072B2")
            top.set_xlabel("position")
        else:
            top.imshow(x.reshape(-1, *x.shape[-2:])[0].numpy(), cmap="gray_r")
            top.axis("off")
        top.set_title(f"test row, true class {names[int(test.labels[row])]}")
        bottom = axes[1, col]
        bottom.bar(np.arange(len(names)), probs[row].numpy(), color="#D55E00")
        bottom.set_xticks(range(len(names)), names)
        bottom.set_yscale("log")
        bottom.set_ylim(1e-4, 1.0)
        bottom.set_xlabel("class")
        bottom.set_ylabel("soft target, T = 4 (log)")
    figure.suptitle("Test inputs and the teacher's soft targets")
    return save_figure(figure, path)
