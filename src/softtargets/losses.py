"""Losses for soft targets and distillation.

Shapes: ``N`` rows, ``K`` classes. Every loss takes raw logits (never probabilities) so the
log-softmax is computed stably, and reduces with ``"mean"`` (weighted mean over rows),
``"sum"`` or ``"none"`` (``(N,)`` per row).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.errors import SoftTargetsError
from softtargets.targets import check_temperature

Reduction = Literal["mean", "sum", "none"]


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
) -> Tensor:
    """Cross-entropy against probability targets: ``-sum_k t_k log softmax(z)_k`` per row.

    Args:
        logits: ``(N, K)`` student logits.
        targets: ``(N, K)`` target probabilities (rows sum to 1; not checked here, for speed:
            check them once with :func:`softtargets.targets.validate`).
        weight: optional ``(N,)`` non-negative row weights (e.g. the counts behind proportions).
        reduction: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"``.
    """
    if logits.shape != targets.shape:
        raise SoftTargetsError(
            f"logits have shape {tuple(logits.shape)} but targets {tuple(targets.shape)}; the "
            "model must output one logit per target class"
        )
    per_row = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return _reduce(per_row, weight, reduction)


def kl_at_temperature(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: Reduction = "mean",
) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per row.

    The ``T^2`` factor keeps the gradient's scale independent of ``T`` (Hinton et al. 2015, sec. 2):
    the gradient of one row with respect to student logit ``z_i`` is ``T * (q_i - p_i)``, where
    ``q`` is the student's and ``p`` the teacher's softened distribution.

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``, the same classes in the same order.
        temperature: ``T > 0``.
    """
    t = check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise SoftTargetsError(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
            f"{tuple(teacher_logits.shape)}; teacher and student must have the same classes"
        )
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(student_logits.dtype) / t, dim=-1)
    # kl_div with log_target=True computes exp(log_p) * (log_p - log_q) without ever forming
    # log(0), so teacher rows with (numerically) zero mass on a class stay finite.
    per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
    return _reduce(per_row * (t * t), None, reduction)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
    reduction: Reduction = "mean",
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
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise SoftTargetsError(f"alpha must be in [0, 1], got {alpha!r}")
    soft = kl_at_temperature(student_logits, teacher_logits, temperature, reduction="none")
    if alpha == 1.0:
        return _reduce(soft, None, reduction)
    if labels is None:
        raise SoftTargetsError(
            f"alpha={alpha} mixes in the hard-label term, which needs labels; pass labels or set "
            "alpha=1"
        )
    hard = F.cross_entropy(student_logits, labels, reduction="none")
    return _reduce(alpha * soft + (1.0 - alpha) * hard, None, reduction)


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
