"""``gradient-variance``: do soft targets give less variance in the gradient between cases?

Hinton et al. (2015): "when the soft targets have high entropy, they provide much more information
per training case than hard targets and much less variance in the gradient between training
cases". Here a student is trained on hard labels, and another on the teacher's soft targets
(T = 4), and the parameters of each are frozen at several points of training (both trajectories,
so neither loss is judged only where the other has been minimised); at each, the per-example
gradients of the loss on a fixed sample of training rows are
computed for hard labels and for the teacher's soft targets at T in {1, 2, 4, 8} (Hinton's loss,
T^2-scaled). Reported: the variance across training cases (trace of the covariance), the variance
of the mean gradient across mini-batches of 32, the squared norm of the mean gradient, and their
ratio, the relative variance. The verdict uses the relative variance: the two losses put the
gradient on different scales (the T^2 factor equalises them only in the high-T limit, and a
student trained on hard labels is already fitting them), so the raw variances are not comparable
while the noise-to-signal ratio is.

On ``gaussians``, whose Bayes class probabilities are known, the same for the sampled one-hot
labels vs the Bayes probabilities themselves: their expected gradient is the same (a label is a
draw from p(y | x)), so any difference is variance alone.

Protocol (PROTOCOLS.md): two parts, each judged against ``REPORTED`` (no size reported; smallest
effect of interest 0.1 in log) by :func:`~softtargets.run.stats.judge`, the verdict the weaker of
the two (:func:`~softtargets.run.stats.all_of`): (1) the log relative variance, hard minus soft
(T = 4), averaged per seed over the trained snapshots of both trajectories; (2) on
``gaussians``, the log between-case variance of the sampled labels minus that of the Bayes
probabilities.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad, vmap

from softtargets.data.builtin import gaussians
from softtargets.losses.reference import distillation_loss, soft_cross_entropy
from softtargets.run.figures import PALETTE, new_figure, plot_bars, save_figure
from softtargets.run.report import StudyOutput, summary_rows
from softtargets.run.stats import Reported, all_of, judge, mean_ci, paired_difference
from softtargets.studies.base import TEACHER_SEED_STEP, StudyContext
from softtargets.training.fit import fit
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation

TITLE = "Gradient variance (gradient-variance)"


CLAIM = (
    "Soft targets (T = 4) give less variance in the gradient between training cases than hard "
    "labels, relative to the mean gradient, at the same points of training."
)

#: the literature's size of the primary statistic and the smallest effect of interest, declared
#: before results (studies/PROTOCOLS.md, version 2)
REPORTED = Reported(None, 0.1, "Hinton et al. 2015: 'much less variance'; no size")

#: the user's models this study can test its claim with (``softtargets study --teacher/--student``)
OWN_MODELS: tuple[str, ...] = ("teacher",)
OWN_MODELS_WHY = "it measures gradients of MLP students it builds itself"


TEMPERATURES = [1.0, 2.0, 4.0, 8.0]


BATCH = 32


def gradient_statistics(
    model: torch.nn.Module,
    features: torch.Tensor,
    loss_of,
    targets,
    batches: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Per-example gradients of ``loss_of(logits (1, K), target)`` -> variance statistics."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, target):  # noqa: ANN001, ANN202
        logits = functional_call(model, p, (x[None],))
        return loss_of(logits, target)

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, features, targets)
    flat = torch.cat([g.reshape(len(features), -1) for g in per_example.values()], dim=1).double()
    mean = flat.mean(0)
    between_cases = float(((flat - mean) ** 2).sum(1).mean())
    gen = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(len(flat), generator=gen)[:BATCH] for _ in range(batches)])
    # every batch mean at once: a (batches, N) matrix of 1/BATCH at the picked rows, times flat
    choose = torch.zeros(batches, len(flat), dtype=flat.dtype).scatter_(1, picks, 1.0 / BATCH)
    batch_means = choose @ flat
    between_batches = float(((batch_means - mean) ** 2).sum(1).mean())
    return {
        "variance_between_cases": between_cases,
        "variance_between_batches": between_batches,
        "mean_gradient_sq_norm": float((mean**2).sum()),
        "relative_variance": between_cases / float((mean**2).sum()),
    }


def snapshots(
    model: torch.nn.Module,
    train,
    epochs: int,
    at: list[int],
    seed: int,
    settings: dict,
    targets=None,  # noqa: ANN001 - fit's targets
) -> dict[int, dict[str, torch.Tensor]]:
    """Train ``model`` on ``targets`` (default: hard labels); its weights at the epochs in ``at``
    (0 = initial)."""
    saved = {0: {k: v.clone() for k, v in model.state_dict().items()}} if 0 in at else {}

    def keep(record: dict) -> None:
        if record["epoch"] in at:
            saved[record["epoch"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    fit(
        model,
        train,
        targets,
        seed=seed,
        on_epoch_end=keep,
        device="cpu",
        **{**settings, "epochs": epochs},
    )
    return saved


def run(ctx: StudyContext) -> StudyOutput:
    part = ctx.teacher()
    train = part.splits.train
    settings = ctx.config.student_training.fit_options()
    epochs = settings["epochs"]
    at = sorted({0, max(1, epochs // 10), max(1, epochs // 2), epochs})
    sample = 64 if ctx.quick else 512
    temperatures = [1.0, 4.0] if ctx.quick else TEMPERATURES
    gen = torch.Generator().manual_seed(0)
    rows_idx = torch.randperm(len(train), generator=gen)[:sample]
    x = train.features[rows_idx]
    labels = train.labels[rows_idx]
    teacher_logits = part.store.logits_for(train.take(rows_idx))
    rows = []
    trajectories = {"hard": None, "soft T=4": Distillation(part.store, 4.0, 1.0)}
    for seed in ctx.seeds:
        for trained_on, targets in trajectories.items():
            model = build_model(
                "mlp",
                train.feature_shape,
                train.num_classes,
                seed=seed,
                hidden=ctx.config.student_hidden,
            )
            states = snapshots(model, train, epochs, at, seed, settings, targets)
            for epoch, state in states.items():
                if epoch == 0 and trained_on != "hard":
                    continue  # the same initial weights: measured once
                model.load_state_dict(state)
                where = {"data": ctx.config.data, "trained on": trained_on, "epoch": epoch}
                stats = gradient_statistics(
                    model,
                    x,
                    lambda z, y: torch.nn.functional.cross_entropy(z, y[None]),
                    labels,
                    seed=seed,
                )
                rows.append({**where, "targets": "hard", "seed": seed, **stats})
                for t in temperatures:
                    stats = gradient_statistics(
                        model,
                        x,
                        lambda z, v, t=t: distillation_loss(z, v[None], None, t, 1.0, check=False),
                        teacher_logits,
                        seed=seed,
                    )
                    rows.append({**where, "targets": f"soft T={t:g}", "seed": seed, **stats})
    rows += _bayes_rows(ctx, settings, sample)

    keys = ["data", "trained on", "epoch", "targets"]
    summary = summary_rows(rows, keys, "relative_variance", "relative variance", 1, 1)
    for column, label, digits in (
        ("variance_between_cases", "variance between cases", 4),
        ("variance_between_batches", f"variance between batches of {BATCH}", 5),
        ("mean_gradient_sq_norm", "squared norm of the mean gradient", 5),
    ):
        for row, other in zip(
            summary, summary_rows(rows, keys, column, "x", 1, digits), strict=True
        ):
            row[label] = other["x"]
    figures = [
        _variance_figure(rows, ctx),
        plot_bars(
            {
                name: [
                    r["variance_between_cases"]
                    for r in rows
                    if r["data"] == "gaussians" and r["targets"] == name
                ]
                for name in ("sampled one-hot labels", "Bayes probabilities")
            },
            ctx.path("bayes_vs_sampled.png"),
            ylabel="variance between cases",
            scale=1.0,
            title="gaussians: same expected gradient, different variance (final epoch)",
        ),
    ]
    # verdict (1): log relative variance, hard minus soft (T=4), per seed, over the trained
    # snapshots of both trajectories
    trained = [e for e in at if e > 0]

    def mean_log(name: str, seed: int, column: str, data: str, epochs) -> float:
        values = [
            math.log(r[column])
            for r in rows
            if r["data"] == data and r["targets"] == name and r["seed"] == seed
            and r["epoch"] in epochs
        ]  # fmt: skip
        return sum(values) / len(values)

    per_seed = {
        name: [mean_log(name, s, "relative_variance", ctx.config.data, trained) for s in ctx.seeds]
        for name in ("hard", "soft T=4")
    }
    diff = paired_difference(per_seed["hard"], per_seed["soft T=4"])
    ratio = math.exp(diff.mean)
    # verdict (2): gaussians, the same expected gradient: log raw variance, sampled - Bayes
    exact = paired_difference(
        *(
            [mean_log(name, s, "variance_between_cases", "gaussians", ["end"]) for s in ctx.seeds]
            for name in ("sampled one-hot labels", "Bayes probabilities")
        )
    )
    notes = (
        f"Gradients on {sample} fixed training rows; mini-batch variance from 200 random "
        f"batches of {BATCH}. Averaged over the trained snapshots (epochs {trained}) of students "
        f"trained on hard labels and on soft targets, hard labels have {ratio:.1f} times the "
        "relative between-case variance of soft targets at T = 4. On gaussians the raw "
        "variances are comparable: one-hot labels and the Bayes probabilities have the same "
        f"expected gradient; sampled labels have {math.exp(exact.mean):.1f} times the variance."
    )
    return StudyOutput(
        rows,
        summary,
        figures,
        all_of(
            CLAIM,
            [
                judge(CLAIM, diff, REPORTED, "log relative variance, hard - soft (T = 4)", 1, ""),
                judge(CLAIM, exact, REPORTED, "gaussians: log variance, sampled - Bayes", 1, ""),
            ],
        ),
        notes,
    )


def _bayes_rows(ctx: StudyContext, settings: dict, sample: int) -> list[dict]:
    """gaussians: sampled one-hot labels vs Bayes probabilities, at the end of hard-label training."""
    # each pass (teacher) draws its own task, so the interval over passes is one over tasks
    data = gaussians(
        num_samples=600 if ctx.quick else 4000, num_classes=4, dim=10, separation=2.0,
        seed=ctx.replicate,
    )  # fmt: skip
    rows_idx = torch.arange(sample)
    x, labels, bayes = data.features[rows_idx], data.labels[rows_idx], data.true_probs[rows_idx]
    out = []
    for seed in ctx.seeds:
        model = build_model(
            "mlp", data.feature_shape, data.num_classes,
            seed=seed + TEACHER_SEED_STEP * ctx.replicate, hidden=ctx.config.student_hidden,
        )  # fmt: skip
        fit(
            model,
            data,
            None,
            seed=seed,
            device="cpu",
            **{**settings, "epochs": max(1, settings["epochs"] // 4)},
        )
        for name, targets, loss in (
            (
                "sampled one-hot labels",
                labels,
                lambda z, y: torch.nn.functional.cross_entropy(z, y[None]),
            ),
            (
                "Bayes probabilities",
                bayes,
                lambda z, p: soft_cross_entropy(z, p[None], check=False),
            ),
        ):
            out.append(
                {
                    "data": "gaussians",
                    "trained on": "hard",
                    "epoch": "end",
                    "targets": name,
                    "seed": seed,
                    **gradient_statistics(model, x, loss, targets, seed=seed),
                }
            )
    return out


def _variance_figure(rows: list[dict], ctx: StudyContext):
    figure, axes = new_figure()
    names = ["hard"] + [f"soft T={t:g}" for t in (TEMPERATURES if not ctx.quick else [1.0, 4.0])]
    for colour, name in zip(PALETTE, names, strict=False):
        epochs = sorted({r["epoch"] for r in rows if r["data"] == ctx.config.data})
        means, halves = [], []
        for e in epochs:
            values = [
                r["relative_variance"]
                for r in rows
                if r["data"] == ctx.config.data and r["targets"] == name and r["epoch"] == e
                and r["trained on"] == "hard"
            ]  # fmt: skip
            est = mean_ci(values)
            means.append(est.mean)
            halves.append(0.0 if est.n < 2 else est.half_width)
        axes.errorbar(epochs, means, yerr=halves, marker="o", capsize=3, color=colour, label=name)
    axes.set_yscale("log")
    axes.set_xlabel("epoch at which the parameters are frozen")
    axes.set_ylabel("variance between cases / |mean gradient|^2 (log)")
    axes.set_title(f"{ctx.config.data}: relative gradient variance, hard-label training")
    axes.legend(frameon=False)
    return save_figure(figure, ctx.path("gradient_variance.png"))
