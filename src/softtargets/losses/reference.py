"""Losses for soft targets and distillation.

Shapes: ``N`` rows, ``K`` classes. Every loss takes raw logits (never probabilities) so the
log-softmax is computed stably, and reduces with ``"mean"`` (weighted mean over rows),
``"sum"`` or ``"none"`` (``(N,)`` per row).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.data.targets import check_finite, check_labels, check_temperature, validate
from softtargets.errors import SoftTargetsError
from softtargets.losses.methods import METHODS

Reduction = Literal["mean", "sum", "none"]


def _check_weight(weight: Tensor | None, rows: int) -> None:
    if weight is None:
        return
    if weight.shape != (rows,):
        raise SoftTargetsError(
            f"row weights have shape {tuple(weight.shape)}; give one weight per row ({rows},)"
        )
    check_finite(weight.detach()[:, None], "row weights", "give finite weights")
    if (weight < 0).any():
        row = int((weight < 0).nonzero()[0, 0])
        raise SoftTargetsError(f"row weights: row {row} is negative; weights must be >= 0")


def _reduce(per_row: Tensor, weight: Tensor | None, reduction: Reduction) -> Tensor:
    if weight is not None:
        per_row = per_row * weight
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        # A weighted mean divides by the total weight, so rows that stand for many observations
        # count for more without changing the loss's scale.
        return per_row.sum() / (weight.sum() if weight is not None else per_row.shape[0])
    raise SoftTargetsError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")


def soft_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor | None = None,
    reduction: Reduction = "mean",
    *,
    check: bool = True,
) -> Tensor:
    """Cross-entropy against probability targets: ``-sum_k t_k log softmax(z)_k`` per row.

    Args:
        logits: ``(N, K)`` student logits.
        targets: ``(N, K)`` target probabilities: finite, non-negative, rows summing to 1.
        weight: optional ``(N,)`` non-negative row weights (e.g. the counts behind proportions).
        reduction: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"``.
        check: check ``targets`` and ``weight`` (each check is a host sync); the trainers check
            them once, up front, and pass ``False`` in the training step.
    """
    if logits.shape != targets.shape:
        raise SoftTargetsError(
            f"logits have shape {tuple(logits.shape)} but targets {tuple(targets.shape)}; the "
            "model must output one logit per target class"
        )
    if check:
        validate(targets.detach(), logits.shape[-1], name="targets")
        _check_weight(weight, logits.shape[0])
    per_row = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return _reduce(per_row, weight, reduction)


def soft_cross_entropy_and_grad(
    logits: Tensor, targets: Tensor, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``sum_i w_i H(p_i, softmax(z_i))`` and its gradient ``w_i (softmax(z_i) - p_i)`` with
    respect to the logits, in closed form (for optimisers that take both, such as L-BFGS).

    Args:
        logits: ``(N, K)``; targets: ``(N, K)`` probability rows (not checked here);
        weight: optional ``(N,)`` row weights (default 1).
    """
    log_s, s = log_softmax_and_softmax(logits)
    w = torch.ones(logits.shape[0], dtype=logits.dtype) if weight is None else weight
    value = -(w[:, None] * targets * log_s).sum()
    return value, w[:, None] * (s - targets)


def kl_at_temperature(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: Reduction = "mean",
    *,
    check: bool = True,
) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per row.

    The ``T^2`` factor keeps the gradient's scale independent of ``T`` (Hinton et al. 2015, sec. 2):
    the gradient of one row with respect to student logit ``z_i`` is ``T * (q_i - p_i)``, where
    ``q`` is the student's and ``p`` the teacher's softened distribution.

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``, the same classes in the same order; finite.
        temperature: ``T > 0``.
        check: check that the teacher's logits are finite (a host sync; ``False`` skips it).
    """
    t = check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise SoftTargetsError(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
            f"{tuple(teacher_logits.shape)}; teacher and student must have the same classes"
        )
    if check:
        check_finite(
            teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]),
            "teacher logits",
            "the teacher has diverged; retrain it",
        )
    per_row = _kl_rows(student_logits / t, teacher_logits.to(student_logits.dtype) / t)
    return _reduce(per_row * (t * t), None, reduction)


def _kl_rows(student_scaled: Tensor, teacher_scaled: Tensor) -> Tensor:
    """``KL(softmax(v) || softmax(u))`` per row of already softened logits ``(..., B, K)`` ->
    ``(..., B)``: Hinton's soft term before its ``T^2``, the one autograd form of it."""
    log_q = F.log_softmax(student_scaled, dim=-1)
    log_p = F.log_softmax(teacher_scaled, dim=-1)
    # kl_div with log_target=True computes exp(log_p) * (log_p - log_q) without ever forming
    # log(0), so teacher rows with (numerically) zero mass on a class stay finite.
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
    reduction: Reduction = "mean",
    *,
    check: bool = True,
) -> Tensor:
    """Hinton's distillation loss.

    ``alpha * T^2 * KL(softmax(v / T) || softmax(z / T)) + (1 - alpha) * CE(z, labels)``,
    with student logits ``z`` and teacher logits ``v`` (Hinton, Vinyals, Dean 2015, section 2).

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``.
        labels: ``(N,)`` integer hard labels; may be ``None`` only when ``alpha == 1``.
        temperature: ``T > 0``.
        alpha: weight of the soft term in ``[0, 1]``; ``alpha = 1`` is pure distillation,
            ``alpha = 0`` is plain cross-entropy on the hard labels.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        check: check the teacher's logits (finite) and the labels (integers in ``0..K-1``);
            ``False`` skips these host syncs.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise SoftTargetsError(f"alpha must be in [0, 1], got {alpha!r}")
    soft = kl_at_temperature(
        student_logits, teacher_logits, temperature, reduction="none", check=check
    )
    if alpha == 1.0:
        return _reduce(soft, None, reduction)
    if labels is None:
        raise SoftTargetsError(
            f"alpha={alpha} mixes in the hard-label term, which needs labels; pass labels or set "
            "alpha=1"
        )
    if check:
        check_labels(labels, student_logits.shape[-1], student_logits.shape[0])
    hard = F.cross_entropy(student_logits, labels, reduction="none")
    return _reduce(alpha * soft + (1.0 - alpha) * hard, None, reduction)


def bucket_distillation_loss(
    student_logits: Tensor,
    kept_logits: Tensor,
    kept_classes: Tensor,
    tail: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Hinton's loss against a top-k teacher, over ``k + 1`` buckets: the kept classes and one
    "other" bucket holding the rest of the teacher's mass (batch mean).

    The soft term is ``T^2 KL(p || q)`` over the buckets, where the student's "other" probability
    is the sum of its probabilities of the classes the teacher row did not keep: unlike spreading
    the tail uniformly, it does not ask the student's small probabilities to be equal. The
    teacher's other classes are read as :meth:`~softtargets.store.store.SoftTargetStore.dense` reads
    them (each ``tail - log(K - k)``), so at ``T = 1`` the bucket holds exactly the teacher's
    remaining mass.

    Args:
        student_logits: ``(B, K)``.
        kept_logits: ``(B, k)`` the teacher's kept logits, ``k < K``.
        kept_classes: ``(B, k)`` their classes (integers in ``0..K-1``, distinct per row).
        tail: ``(B,)`` the logsumexp of the teacher's other ``K - k`` logits.
        labels: ``(B,)`` hard labels (needed when ``alpha < 1``).
        temperature, alpha: as :func:`distillation_loss`.
    """
    t = check_temperature(temperature)
    num_classes, kept = student_logits.shape[1], kept_logits.shape[1]
    if not 1 <= kept < num_classes:
        raise SoftTargetsError(
            f"a top-k teacher keeps {kept} of the student's {num_classes} classes; it must keep "
            f"from 1 to {num_classes - 1}"
        )
    classes = kept_classes.long()
    log_q = F.log_softmax(student_logits / t, dim=-1)  # (B, K)
    other_log_q = torch.logsumexp(log_q.scatter(1, classes, float("-inf")), dim=1, keepdim=True)
    student = torch.cat([log_q.gather(1, classes), other_log_q], dim=1)  # (B, k + 1)
    others = math.log(num_classes - kept)
    # at T: the K - k equal logits tail - log(K - k) sum to exp(log(K - k) + (tail - log(K-k)) / T)
    other_teacher = others + (tail.float() - others) / t
    log_p = F.log_softmax(torch.cat([kept_logits.float() / t, other_teacher[:, None]], 1), dim=1)
    soft = (t * t) * (log_p.exp() * (log_p - student)).sum(dim=1)
    if alpha == 1.0:
        return soft.mean()
    if labels is None:
        raise SoftTargetsError(f"alpha={alpha} needs labels; pass labels or set alpha=1")
    hard = F.cross_entropy(student_logits, labels, reduction="none")
    return (alpha * soft + (1.0 - alpha) * hard).mean()


class DistillationLoss(nn.Module):
    """:func:`distillation_loss` as a module with fixed ``temperature`` and ``alpha``."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = float(alpha)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None
    ) -> Tensor:
        return distillation_loss(
            student_logits, teacher_logits, labels, self.temperature, self.alpha
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


def log_softmax_and_softmax(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(log softmax(z), softmax(z))`` over the last axis from one ``exp`` per element (the pair
    from ``F.log_softmax`` and an ``exp`` takes two); for few classes these elementwise passes are
    also several times faster than ``F.log_softmax``'s reduction kernel on the CPU."""
    shifted = z - z.amax(dim=-1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(dim=-1, keepdim=True)
    return shifted.sub_(total.log()), exp.div_(total)


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """``(z - mean) / (std + eps)`` per row, ``std`` with Bessel's correction as in Sun et al.'s
    code: a row's scale and shift no longer matter, only its shape."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (logits.std(dim=-1, keepdim=True) + eps)


def temperatures(temperature: float | Tensor, logits: Tensor) -> tuple[Any, Any]:
    """``(divisor, factor)``: ``temperature`` broadcast against ``(..., B, K)`` logits and against
    the ``(...)`` losses. A float is checked as everywhere; a tensor holds one value per leading
    index (``fit_many``'s members)."""
    if not isinstance(temperature, Tensor):
        t = check_temperature(temperature)
        return t, t
    if temperature.shape != logits.shape[:-2]:
        raise SoftTargetsError(
            f"temperatures of shape {tuple(temperature.shape)} for logits of shape "
            f"{tuple(logits.shape)}; give one per stacked batch"
        )
    t = temperature.to(logits.dtype)
    return t[..., None, None], t


def _softened(logits: Tensor, divisor: Any, standardized: bool) -> Tensor:
    return (standardize(logits) if standardized else logits) / divisor


def check_pair(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The teacher's logits in the student's dtype, refused with one line unless both are
    ``(..., B, K)`` of one shape."""
    if student_logits.shape != teacher_logits.shape or student_logits.ndim < 2:
        raise SoftTargetsError(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
            f"{tuple(teacher_logits.shape)}; give both as (rows, classes) with the same classes"
        )
    return teacher_logits.to(student_logits.dtype)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    """Hinton's soft term, ``T^2 KL(p_T || p_S)`` (batch mean); with ``standardize`` the logits are
    z-scored per row first (logit standardisation)."""
    teacher_logits = check_pair(student_logits, teacher_logits)
    divisor, t = temperatures(temperature, student_logits)
    rows = _kl_rows(
        _softened(student_logits, divisor, standardize),
        _softened(teacher_logits, divisor, standardize),
    )
    return (t * t) * rows.mean(-1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    standardize: bool = False,
) -> Tensor:
    """Decoupled KD (Zhao et al. CVPR 2022): ``T^2`` times the batch mean of
    ``alpha TCKD + beta NCKD``.

    TCKD is the KL divergence of the binary distributions ``[p_y, 1 - p_y]`` (teacher || student)
    at the target class ``y``; NCKD the KL divergence of the distributions over the other classes,
    each renormalised. Defaults are the paper's CIFAR-100 ones (alpha 1, beta 8, T 4). The paper
    warms this term up over its first 20 epochs beside a full cross-entropy; the trainers add the
    cross-entropy with weight ``1 - alpha`` and warm up with the ``warmup`` option.
    """
    teacher_logits = check_pair(student_logits, teacher_logits)
    divisor, t = temperatures(temperature, student_logits)
    labels = labels.long().unsqueeze(-1)  # (..., B, 1)
    # (..., B, K) mask of each row's label (scatter, not one_hot: one_hot reads the labels' max)
    target = torch.zeros_like(student_logits, dtype=torch.bool).scatter(-1, labels, True)

    def parts(logits: Tensor) -> tuple[Tensor, Tensor]:
        """``log [p_y, 1 - p_y]`` (..., B, 2) and log of the renormalised non-target part."""
        log_p = F.log_softmax(_softened(logits, divisor, standardize), dim=-1)
        log_y = log_p.gather(-1, labels)
        log_rest = torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=-1, keepdim=True)
        log_others = log_p.masked_fill(target, float("-inf")) - log_rest
        return torch.cat([log_y, log_rest], dim=-1), log_others

    binary_s, others_s = parts(student_logits)
    binary_t, others_t = parts(teacher_logits)
    tckd = F.kl_div(binary_s, binary_t, reduction="none", log_target=True).sum(-1)
    # The target class is -inf on both sides: kl_div with log targets gives 0 there, not NaN.
    nckd = F.kl_div(
        others_s.masked_fill(target, 0.0),
        others_t.masked_fill(target, 0.0),
        reduction="none",
        log_target=True,
    )
    nckd = nckd.masked_fill(target, 0.0).sum(-1)
    return (t * t) * (alpha * tckd + beta * nckd).mean(-1)


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: ``(..., B, K)`` ->
    ``(..., B)``."""
    a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
    return F.cosine_similarity(a, b, dim=-1, eps=eps)


def check_several_rows(logits: Tensor) -> None:
    """DIST's relations need a batch: refuse fewer than 2 rows with one line."""
    if logits.shape[-2] < 2:
        raise SoftTargetsError("dist_loss compares classes across a batch; give at least 2 rows")


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    """DIST (Huang et al. 2022): ``tau^2 (beta (1 - inter) + gamma (1 - intra))`` with
    ``inter`` the mean Pearson correlation of student and teacher probabilities row by row (over
    classes) and ``intra`` column by column (over the batch's rows), probabilities at
    ``tau = temperature``. A statistic of the batch, not a sum over rows: it needs batches of
    several rows."""
    teacher_logits = check_pair(student_logits, teacher_logits)
    divisor, t = temperatures(temperature, student_logits)
    check_several_rows(student_logits)
    y_s = F.softmax(student_logits / divisor, dim=-1)
    y_t = F.softmax(teacher_logits / divisor, dim=-1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean(-1)
    intra = 1.0 - _pearson_rows(y_s.transpose(-1, -2), y_t.transpose(-1, -2)).mean(-1)
    return (t * t) * (beta * inter + gamma * intra)


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalised Jensen-Shannon divergence (as in GKD): the batch mean of
    ``beta KL(p_T || m) + (1 - beta) KL(p_S || m)`` with ``m = beta p_T + (1 - beta) p_S``.
    ``beta`` in ``(0, 1)``; 0.5 gives the symmetric JSD, bounded by ``log 2``."""
    teacher_logits = check_pair(student_logits, teacher_logits)
    if not 0.0 < beta < 1.0:
        raise SoftTargetsError(f"jsd beta must be in (0, 1), got {beta!r}")
    divisor, _ = temperatures(temperature, student_logits)
    log_s = F.log_softmax(student_logits / divisor, dim=-1)
    log_t = F.log_softmax(teacher_logits / divisor, dim=-1)
    # log m = logsumexp(log beta + log p_T, log (1 - beta) + log p_S): stable where either is tiny
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    to_teacher = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    to_student = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return (beta * to_teacher + (1.0 - beta) * to_student).mean(-1)


def reverse_kl_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``T^2 KL(p_S || p_T)`` (batch mean): mode-seeking, the student may drop classes the teacher
    gives little mass; ``T^2`` as in :func:`kd_loss` keeps the gradient's scale."""
    teacher_logits = check_pair(student_logits, teacher_logits)
    divisor, t = temperatures(temperature, student_logits)
    log_s = F.log_softmax(student_logits / divisor, dim=-1)
    log_t = F.log_softmax(teacher_logits / divisor, dim=-1)
    kl = F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1).mean(-1)
    return (t * t) * kl


def total_variation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``1/2 sum_k |p_T - p_S|`` (batch mean), in ``[0, 1]``; no ``T^2`` (it is bounded)."""
    teacher_logits = check_pair(student_logits, teacher_logits)
    divisor, _ = temperatures(temperature, student_logits)
    p_s = F.softmax(student_logits / divisor, dim=-1)
    p_t = F.softmax(teacher_logits / divisor, dim=-1)
    return 0.5 * (p_t - p_s).abs().sum(-1).mean(-1)


def method_loss(
    name: str,
    options: dict[str, Any],
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float | Tensor,
    weight: float | Tensor,
    ramp: float | Tensor = 1.0,
) -> Tensor:
    """``weight x ramp x method + (1 - weight) x cross-entropy on the labels`` (batch mean): how
    ``fit`` mixes a method's soft term with the hard labels (``Distillation.alpha`` is ``weight``;
    ``ramp`` is a warm-up's factor, :func:`warmup_ramp`). On a stack ``(M, B, K)`` of batches:
    ``(M,)`` means, ``temperature``, ``weight`` and ``ramp`` floats or ``(M,)`` tensors."""
    method = METHODS[name]
    args = (labels,) if method.uses_labels else ()
    soft = method.loss(student_logits, teacher_logits, *args, temperature=temperature, **options)
    if isinstance(ramp, Tensor) or ramp != 1.0:
        soft = ramp * soft
    if not isinstance(weight, Tensor) and weight == 1.0:
        return soft
    if student_logits.ndim == 2:
        hard = F.cross_entropy(student_logits, labels)
    else:  # per stacked batch: the mean of -log softmax at each row's label
        log_s = F.log_softmax(student_logits, dim=-1)
        hard = -log_s.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).mean(-1)
    return weight * soft + (1.0 - weight) * hard
