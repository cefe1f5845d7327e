"""Distillation losses beyond Hinton's: each a plain function of student and teacher logits.

Shapes: ``B`` rows, ``K`` classes; ``student_logits`` and ``teacher_logits`` are ``(B, K)``,
``labels`` ``(B,)``. Every function returns the batch mean (a scalar) and is differentiable by
autograd in the student's logits. Each also takes a stack of ``M`` such batches, ``(M, B, K)``
logits and ``(M, B)`` labels, with ``temperature`` (and ``method_loss``'s ``weight``) a float or
an ``(M,)`` tensor, and returns the ``(M,)`` batch means: how ``fit_many`` computes its members of
one method in one call; none adds the hard-label cross-entropy (the trainer mixes it in
with ``1 - alpha``, see :class:`~softtargets.train.Distillation`). ``tests/test_methods.py``
checks each against a float64 formula written out independently and by finite differences.

=============  ==========================================================  ====================
method         per row                                                     reference
=============  ==========================================================  ====================
``kd``         ``T^2 KL(p_T || p_S)``                                      Hinton et al. 2015
``dkd``        ``T^2 (alpha TCKD + beta NCKD)``                            Zhao et al. CVPR 2022
``dist``       ``tau^2 (beta inter + gamma intra)`` (a batch statistic)    Huang et al. 2022
``jsd``        ``beta KL(p_T || m) + (1 - beta) KL(p_S || m)``             Agarwal et al. (GKD)
``rkl``        ``T^2 KL(p_S || p_T)``                                      reverse KL
``tv``         ``1/2 sum_k |p_T - p_S|``                                   total variation
=============  ==========================================================  ====================

``p_T`` and ``p_S`` are the teacher's and the student's softmax at temperature ``T``. With
``standardize=True`` (Sun et al. CVPR 2024, logit standardisation) both sides' logits are z-scored
per row before the temperature; it is an option of ``kd`` and ``dkd``.

These are the reference formulas, differentiated by autograd; ``fit`` and ``fit_many`` train
with the same losses' closed-form gradients (:mod:`softtargets.losses.closed`), which the tests
hold to autograd through these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from softtargets.errors import SoftTargetsError
from softtargets.limits import METHOD_OPTIONS, check_method_name, check_warmup
from softtargets.targets import check_temperature


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
    log_q = F.log_softmax(_softened(student_logits, divisor, standardize), dim=-1)
    log_p = F.log_softmax(_softened(teacher_logits, divisor, standardize), dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean(-1)
    return (t * t) * kl


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


@dataclass(frozen=True)
class Method:
    """A distillation method: its loss (the reference, differentiable by autograd), the options it
    takes and whether it reads the labels. Its closed-form gradient, which the trainers use, is
    :mod:`softtargets.losses.closed`'s."""

    loss: Callable[..., Tensor]
    options: tuple[str, ...]
    uses_labels: bool = False


METHODS: dict[str, Method] = {
    name: Method(loss, METHOD_OPTIONS[name], uses_labels=name == "dkd")
    for name, loss in (
        ("kd", kd_loss),
        ("dkd", dkd_loss),
        ("dist", dist_loss),
        ("jsd", jsd_loss),
        ("rkl", reverse_kl_loss),
        ("tv", total_variation_loss),
    )
}


def check_method(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options of method ``name``, refused with one line if the method or an option is
    unknown; returns them as a plain dict."""
    return check_method_name(name, options)


def split_warmup(options: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``(the loss's options, warm-up epochs)``: ``warmup`` is the trainers' option (a whole
    number of epochs >= 0), refused with one line otherwise."""
    options = dict(options)
    return options, check_warmup(options.pop("warmup", 0))


def warmup_ramp(epoch: int, warmup: int) -> float:
    """The soft term's factor at ``epoch`` (from 1) with a linear warm-up over ``warmup`` epochs:
    ``min(epoch / warmup, 1)``, as Zhao et al.'s DKD code (the cross-entropy's weight is fixed);
    1 without one."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


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
