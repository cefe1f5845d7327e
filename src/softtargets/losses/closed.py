"""The distillation methods' values with their gradients in closed form: what the trainers use.

:mod:`softtargets.losses.reference` writes each method as a loss that autograd differentiates (the
reference); here each is split in two, so that a trainer pays only for the student's side:

* the **teacher's side** (:func:`teacher_side`): what a method needs of the teacher's softmax at
  ``T``, packed in one ``(..., B, C)`` table. It does not depend on the student, so ``fit``
  computes it once for every row (:class:`MethodTable`) and a step gathers its rows;
* the **step** (:func:`method_step`): the student's softmax at ``T`` (and at 1 for the
  cross-entropy, in the same pass), the method's value and its gradient in ``u = z / T``, then
  the gradient in the logits ``z`` (``/ T``, the ``T^2`` factor, the z-score's Jacobian for logit
  standardisation) and the ``1 - alpha`` cross-entropy mixed in.

Shapes: a ``(B, K)`` batch with a float temperature, or a stack ``(M, B, K)`` with a float or
``(M,)`` temperatures and weights (``fit_many``'s members of one method); values are batch means
``()`` or ``(M,)``. Everything runs under ``no_grad`` in float32 at least (half-precision logits
under autocast are widened). ``tests/test_methods.py`` holds every value and gradient to autograd
through the reference losses, in float64.

On this CPU a small op costs ~5 us whatever its size, several times its arithmetic for the
``(128, 10)`` batches of the studies, so the steps count ops: ``F.log_softmax`` (a reduction kernel,
~40 us a call here) is replaced by elementwise passes, and the two softmaxes share one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from softtargets.config import chunk_rows
from softtargets.errors import SoftTargetsError
from softtargets.losses.methods import METHODS
from softtargets.losses.reference import (
    check_pair,
    check_several_rows,
    log_softmax_and_softmax,
    standardize,
    temperatures,
)


def _wide(logits: Tensor) -> Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_k a_k b_k`` over the last axis, one op (a multiply and a sum are two)."""
    return torch.linalg.vecdot(a, b)


def _softmax_backward(probs: Tensor, grad_probs: Tensor) -> Tensor:
    """The gradient in ``u`` from the gradient in ``probs = softmax(u)``: ``p (g - sum_k p_k g_k)``."""
    return probs * (grad_probs - _dot(probs, grad_probs).unsqueeze_(-1))


def _standardized(logits: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~softtargets.losses.reference.standardize` ``(z)`` with what its backward needs:
    ``(z~, d, s, std)``, ``d = z - mean``, ``s = std + eps`` (Bessel's std over ``K``)."""
    std, mean = torch.std_mean(logits, dim=-1, keepdim=True)
    d, s = logits - mean, std + eps
    return d / s, d, s, std


def _standardize_backward(grad: Tensor, d: Tensor, s: Tensor, std: Tensor) -> Tensor:
    """The gradient in ``z`` from the gradient in ``z~`` (:func:`_standardized`'s parts):
    ``(g - mean g) / s - (g . d) d / (s^2 (K - 1) std)``."""
    along = (grad * d).sum(-1, keepdim=True).div_(s * s * (d.shape[-1] - 1) * std)
    return (grad - grad.mean(dim=-1, keepdim=True)).div_(s).sub_(along * d)


def _off_target(
    log_probs: Tensor, target: Tensor, index: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From log-probabilities ``(..., B, K)``, the ``target`` mask and the labels' ``index``
    ``(..., B, 1)``: ``log p_y``, ``log (1 - p_y)`` ``(..., B, 1)``, and the log-softmax and
    softmax over the other classes (``-inf`` and 0 at the target). ``1 - p_y`` is read as
    ``p_k / p^_k`` at one other class ``k``, not subtracted from 1 (which loses every digit when
    ``p_y`` is near 1)."""
    log_others, others = log_softmax_and_softmax(log_probs.masked_fill(target, float("-inf")))
    other = (index + 1) % log_probs.shape[-1]  # any class but the label
    log_rest = log_probs.gather(-1, other) - log_others.gather(-1, other)
    return log_probs.gather(-1, index), log_rest, log_others, others


# ---------------------------------------------------------------- each method, in two sides
# A method's teacher side takes the teacher's ``log p`` and ``p`` at T ``(..., B, K)``, the labels'
# index ``(..., B, 1)``, its one-hot ``(..., B, K)`` (None unless the method reads the labels) and its options, and returns the parts its step
# needs, ``(..., B, c)`` each. Its step takes the student's ``log q`` and ``q`` at T, those parts
# and the options, and returns the batch *sum* of the method's row values (before any T^2 or
# other factor) with its gradient in ``u = z / T`` ``(..., B, K)``; the driver divides by ``B``.
# Steps compute only what depends on the student.


def plain_teacher(
    log_p: Tensor, p: Tensor, index: Tensor, one_hot: Tensor, **_: Any
) -> tuple[Tensor, ...]:
    return log_p, p, _dot(p, log_p)[..., None]  # ... and sum_k p log p per row


def kd_step(log_q: Tensor, q: Tensor, teacher: Sequence[Tensor], **_: Any) -> tuple[Tensor, Tensor]:
    """``KL(p || q) = sum p log p - sum p log q``; gradient ``q - p``."""
    _, p, entropy = teacher
    return (entropy.squeeze(-1) - _dot(p, log_q)).sum(-1), q - p


def dkd_teacher(
    log_p: Tensor,
    p: Tensor,
    index: Tensor,
    one_hot: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    **_: Any,
) -> tuple[Tensor, ...]:
    """DKD's row value is ``const - W . log q + c log r`` with ``r = 1 - q_y`` the student's
    non-target mass, ``W = alpha p_y e_y + beta p^``, ``c = beta - alpha (1 - p_y)`` and
    ``const = alpha (p_y log p_y + p_r log p_r) + beta sum p^ log p^`` (``p^`` the teacher's
    renormalised non-target probabilities, ``p_r = 1 - p_y``): all the teacher's."""
    log_py, log_pr, log_others, others = _off_target(log_p, one_hot.bool(), index)
    py, pr = log_py.exp(), log_pr.exp()
    weights = one_hot * (alpha * py) + beta * others
    # 0 x -inf at the target is NaN: the clamp makes it 0 x -1e30
    entropy = _dot(others, log_others.clamp_min(-1e30)).unsqueeze_(-1)
    const = alpha * (py * log_py + pr * log_pr) + beta * entropy
    return weights, beta - alpha * pr, const, 1.0 - one_hot


def dkd_step(
    log_q: Tensor, q: Tensor, teacher: Sequence[Tensor], alpha: float = 1.0, **_: Any
) -> tuple[Tensor, Tensor]:
    """``alpha TCKD + beta NCKD`` as ``const - W . log q + c log r`` (see :func:`_dkd_teacher`).
    Its gradient, ``alpha (q - p_y e_y - p_r q^) + beta (q^ - p^)`` with ``q^ = q / r`` off the
    target (TCKD's and NCKD's), is ``alpha q - W + c q^``."""
    weights, c, const, off = teacher
    q_off = q * off
    # r is a sum of the non-target probabilities, exact to rounding; it underflows only when every
    # one of them does (a logit gap above ~100 T), and the clamp keeps that case finite
    r = q_off.sum(-1, keepdim=True).clamp_min_(1e-30)
    value = (const - _dot(weights, log_q).unsqueeze_(-1)).addcmul_(c, r.log()).sum((-2, -1))
    grad = torch.add(q_off.mul_(c / r), q, alpha=alpha).sub_(weights)
    return value, grad


def _pearson_and_grad(
    a: Tensor, b_hat: Tensor, mean: float | None = None, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Pearson correlation of each row of ``a`` with a centred, unit-norm row ``b_hat``
    ``(..., n)``, and its gradient in ``a``: ``(b^ - r a^) / |a - mean a|`` with ``a^`` the
    centred row over its norm (centred already, so it passes the centring unchanged). ``mean``:
    the rows' mean when it is known (``1 / K`` for probability rows), saving its reduction."""
    a = a - (a.mean(dim=-1, keepdim=True) if mean is None else mean)
    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min_(eps)
    a_hat = a.div_(norm_a)
    r = _dot(a_hat, b_hat).unsqueeze_(-1)
    return r.squeeze(-1), torch.addcmul(b_hat, r, a_hat, value=-1.0).div_(norm_a)


def _unit_centred(a: Tensor, mean: float | None = None, eps: float = 1e-8) -> Tensor:
    """Each row of ``a`` minus its mean, over its norm."""
    a = a - (a.mean(dim=-1, keepdim=True) if mean is None else mean)
    return a.div_(torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min_(eps))


def dist_teacher(
    log_p: Tensor, p: Tensor, index: Tensor, one_hot: Tensor, **_: Any
) -> tuple[Tensor, ...]:
    """Each teacher row centred and of unit norm (the inter-class relation's side), and ``p``
    (the intra-class relation centres columns over the batch, so it is a step's work)."""
    return _unit_centred(p, 1.0 / p.shape[-1]), p


def dist_step(
    log_q: Tensor,
    q: Tensor,
    teacher: Sequence[Tensor],
    beta: float = 1.0,
    gamma: float = 1.0,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """``B (beta (1 - inter) + gamma (1 - intra))``; in the student's probabilities the
    gradient is ``-(beta R + gamma B C / K)``, ``R`` and ``C`` the row-wise and column-wise
    Pearson gradients, then back through the softmax."""
    check_several_rows(q)
    rows_hat, p = teacher
    batch, k = q.shape[-2:]
    inter, grad_rows = _pearson_and_grad(q, rows_hat, 1.0 / k)  # a probability row's mean
    columns_hat = _unit_centred(p.transpose(-1, -2))
    intra, grad_cols = _pearson_and_grad(q.transpose(-1, -2), columns_hat)
    # B (beta (1 - mean inter) + gamma (1 - mean intra)), as sums
    value = torch.add(inter.sum(-1).mul_(-beta), intra.sum(-1), alpha=-gamma * batch / k)
    value = value.add_((beta + gamma) * batch)
    grad_q = grad_rows.mul_(-beta).add_(grad_cols.transpose(-1, -2), alpha=-gamma * batch / k)
    return value, _softmax_backward(q, grad_q)


def jsd_teacher(
    log_p: Tensor, p: Tensor, index: Tensor, one_hot: Tensor, beta: float = 0.5, **_: Any
) -> tuple[Tensor, ...]:
    if not 0.0 < beta < 1.0:
        raise SoftTargetsError(f"jsd beta must be in (0, 1), got {beta!r}")
    return beta * p, beta * (p * log_p).sum(-1, keepdim=True)


def jsd_step(
    log_q: Tensor, q: Tensor, teacher: Sequence[Tensor], beta: float = 0.5, **_: Any
) -> tuple[Tensor, Tensor]:
    """``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``, which is
    ``beta sum p log p + (1 - beta) sum q log q - sum m log m``; its derivative in ``q`` is
    ``(1 - beta) log(q / m)`` (the other terms cancel as ``m`` mixes ``p`` and ``q``)."""
    beta_p, beta_entropy = teacher
    m = torch.add(beta_p, q, alpha=1.0 - beta)
    # m is below 1e-38 only where p and q both are, and each term is weighted by p, q or m there
    log_m = m.clamp_min(1e-38).log_()
    rows = torch.add(beta_entropy.squeeze(-1), _dot(q, log_q), alpha=1.0 - beta)
    value = rows.sub_(_dot(m, log_m)).sum(-1)
    return value, _softmax_backward(q, log_q.sub(log_m).mul_(1.0 - beta))


def rkl_step(
    log_q: Tensor, q: Tensor, teacher: Sequence[Tensor], **_: Any
) -> tuple[Tensor, Tensor]:
    """``KL(q || p)``; gradient ``q (log q - log p - KL)`` (the ``+1`` of ``d(q log q)`` cancels
    as ``sum q = 1``)."""
    log_p = teacher[0]
    gap = log_q - log_p
    kl = _dot(q, gap).unsqueeze_(-1)  # (..., B, 1)
    return kl.sum((-2, -1)), gap.sub_(kl).mul_(q)


def tv_teacher(
    log_p: Tensor, p: Tensor, index: Tensor, one_hot: Tensor, **_: Any
) -> tuple[Tensor, ...]:
    return (p,)


def tv_step(log_q: Tensor, q: Tensor, teacher: Sequence[Tensor], **_: Any) -> tuple[Tensor, Tensor]:
    """``sum_k |q - p|`` (the factor 1/2 is the driver's); gradient ``q (s - sum_k s_k q_k)`` with
    ``s = sign(q - p)`` (``sign(0) = 0``, the subgradient autograd takes too)."""
    gap = q - teacher[0]
    return gap.abs().sum((-2, -1)), _softmax_backward(q, gap.sign_())


def _one_hot(labels: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(index (..., B, 1), one-hot (..., B, K))`` of the labels, for logits ``like``."""
    index = labels.long().unsqueeze(-1)
    return index, torch.zeros_like(like).scatter_(-1, index, 1.0)


def teacher_side(
    name: str,
    options: dict[str, Any],
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float | Tensor,
) -> tuple[Tensor, ...]:
    """What method ``name``'s step needs of the teacher, from its logits ``(..., B, K)`` (z-scored
    first with ``standardize``) at ``T``: ``(..., B, c)`` tensors, the last the labels as a
    column ``(..., B, 1)`` (for the cross-entropy; exact in float up to 2^24 classes). The
    labels' one-hot is made only for a method that reads the labels (DKD)."""
    v = _wide(teacher_logits)
    if options.get("standardize", False):
        v = standardize(v)
    divisor, _ = temperatures(temperature, v)
    log_p, p = log_softmax_and_softmax(v / divisor)
    method = METHODS[name]
    index, one_hot = _one_hot(labels, v) if method.uses_labels else (labels.long()[..., None], None)
    parts = method.teacher(log_p, p, index, one_hot, **_settings(options))
    return *parts, index.to(v.dtype)


def _settings(options: dict[str, Any]) -> dict[str, Any]:
    """A method's own options, without ``standardize`` (which the driver applies)."""
    return {k: v for k, v in options.items() if k != "standardize"}


def method_step(
    name: str,
    options: dict[str, Any],
    student_logits: Tensor,
    teacher: tuple[Tensor, ...],
    temperature: float | Tensor,
    weight: float | Tensor,
    ramp: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """``weight x ramp x method + (1 - weight) x cross-entropy`` against the teacher's parts and
    the labels' column (:func:`teacher_side`), and its gradient in the student's logits,
    ``(..., B, K)``; ``ramp`` is a warm-up's factor
    (:func:`~softtargets.losses.methods.warmup_ramp`)."""
    method = METHODS[name]
    with torch.no_grad():
        z = _wide(student_logits)
        batch = z.shape[-2]
        divisor, t = temperatures(temperature, z)
        standardized = options.get("standardize", False)
        mixed = isinstance(weight, Tensor) or weight != 1.0
        powers = mixed and not standardized and _whole(temperature) and z.shape[-1] > TABLE_CLASSES
        if standardized:
            z_tilde, *standard_parts = _standardized(z)
            u = z_tilde / divisor
        elif not powers:
            u = z / divisor
        if powers:  # many classes: softmax(z) from softmax(z / T)'s exponentials, no second exp
            (log_q, q), (log_s, s) = _softmaxes_at_t_and_1(z, int(temperature))
        elif mixed:  # the softmax at T and at 1 in one pass over (..., B, 2, K)
            log_both, both = log_softmax_and_softmax(torch.stack([u, z], dim=-2))
            (log_q, log_s), (q, s) = log_both.unbind(-2), both.unbind(-2)
        else:
            log_q, q = log_softmax_and_softmax(u)
        *parts, label_column = teacher
        value, grad = method.step(log_q, q, parts, **_settings(options))
        # the loss is factor x value / B; d/dz = d/du / T, and T^2 d/du / T = T d/du. A weight
        # per stacked batch scales its values (M,) and its gradients' rows (M, 1, 1).
        weight, weight_rows = _per_batch(weight, z.dtype)
        soft, soft_rows = _per_batch(weight * ramp, z.dtype)
        per_row = method.factor / batch
        if method.squared:
            value_scale, grad_scale = soft * per_row * t * t, soft_rows * per_row * divisor
        else:
            value_scale, grad_scale = soft * per_row, soft_rows * per_row / divisor
        grad = grad.mul_(grad_scale)
        if standardized:
            grad = _standardize_backward(grad, *standard_parts)
        value = value * value_scale
        if not mixed:
            return value, grad
        # cross-entropy: value -log s_y, gradient (softmax(z) - onehot(y)) / B
        index = label_column.long()
        value = value - log_s.gather(-1, index).squeeze(-1).sum(-1) * ((1.0 - weight) / batch)
        hard_grad = s.scatter_add_(-1, index, s.new_full(index.shape, -1.0))  # s - onehot(y)
        if isinstance(weight_rows, Tensor):
            return value, grad.addcmul_(hard_grad, (1.0 - weight_rows) / batch)
        return value, grad.add_(hard_grad, alpha=(1.0 - weight_rows) / batch)


def _whole(temperature: float | Tensor) -> bool:
    """A float temperature that is a whole number from 1 to 64 (``q^T`` by repeated squaring)."""
    return (
        not isinstance(temperature, Tensor)
        and float(temperature).is_integer()
        and 1 <= temperature <= 64
    )


def _softmaxes_at_t_and_1(z: Tensor, t: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(log softmax(z / t), softmax(z / t)), (log softmax(z), softmax(z))`` over the last axis
    for a whole ``t``, from one ``exp`` per element: with ``e = exp((z - max) / t)``,
    ``exp(z - max) = e^t`` by repeated squaring (a multiply costs a sixth of an ``exp`` on this
    CPU; over ``(B, K)`` at K = 1,000 the second ``exp`` is a fifth of the step)."""
    shifted = z - z.amax(dim=-1, keepdim=True)
    scaled = shifted / t
    e_q = scaled.exp()
    e_s, square, n = None, e_q, t
    while n:  # e_q^t by repeated squaring
        if n & 1:
            e_s = square if e_s is None else e_s * square
        n >>= 1
        if n:
            square = square * square
    e_s = e_s.clone() if e_s is e_q else e_s  # t = 1: s and q must not share a buffer
    total_q, total_s = e_q.sum(-1, keepdim=True), e_s.sum(-1, keepdim=True)
    log_q = scaled.sub_(total_q.log())
    log_s = shifted.sub_(total_s.log())
    return (log_q, e_q.div_(total_q)), (log_s, e_s.div_(total_s))


def _per_batch(weight: float | Tensor, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(weight for the values, weight for the gradients' rows)``: a float twice, or ``(M,)``
    and ``(M, 1, 1)`` for one weight per stacked batch."""
    if not isinstance(weight, Tensor):
        return weight, weight
    weight = weight.to(dtype)
    return weight, weight[:, None, None]


def method_value_and_grad(
    name: str,
    options: dict[str, Any],
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float | Tensor,
    weight: float | Tensor,
    ramp: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """:func:`~softtargets.losses.reference.method_loss` and its gradient w.r.t. the student's
    logits in closed form, without autograd: of a ``(B, K)`` batch, or of a stack ``(M, B, K)``
    (``(M,)`` values; ``temperature`` and ``weight`` floats or ``(M,)`` tensors)."""
    teacher_logits = check_pair(student_logits, teacher_logits)
    with torch.no_grad():
        teacher = teacher_side(name, options, teacher_logits, labels, temperature)
    return method_step(name, options, student_logits, teacher, temperature, weight, ramp)


# Up to this many classes a fit keeps the teacher's side of every row (a few K floats a row);
# with more, it computes it from each batch's logits, so memory stays at the store's size.
TABLE_CLASSES = 64


class MethodTable:
    """A method's teacher side for every row of the data, computed once: a step gathers its rows
    (one ``index_select``) instead of recomputing the teacher's softmax.

    Args:
        name, options, temperature: the method, as :func:`teacher_side` takes them.
        gather: ``gather(rows (B,)) -> (B, K)`` teacher logits of data rows.
        labels: the data's ``(N,)`` labels (DKD's parts need them).
        num_classes: ``K``.
    """

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        gather: Callable[[Tensor], Tensor],
        labels: Tensor,
        temperature: float,
        num_classes: int,
    ) -> None:
        chunks: list[Tensor] = []
        chunk = chunk_rows(2 * num_classes)
        for start in range(0, len(labels), chunk):
            rows = torch.arange(start, min(len(labels), start + chunk), device=labels.device)
            parts = teacher_side(name, options, gather(rows), labels[rows], temperature)
            self.widths = [part.shape[-1] for part in parts]
            chunks.append(torch.cat(parts, dim=-1))
        self.table = torch.cat(chunks)  # (N, C)

    def rows(self, rows: Tensor) -> tuple[Tensor, ...]:
        """The teacher's parts of data ``rows`` ``(B,)``: views of one gathered ``(B, C)``."""
        return self.table.index_select(0, rows).split(self.widths, dim=-1)


class StackedCrossEntropy:
    """Cross-entropy of ``M`` stacked models against each one's targets, with its gradient in
    closed form: hard labels, or probability rows (a member's ``probs``), one table of rows.

    A member's row loss is ``-sum_k g_k log s_k`` with ``s = softmax(z)`` and ``g`` its
    probability row or its label's one-hot; the gradient in the logits is ``s - g``. When every
    member has hard labels the table is the ``M * N`` labels themselves, not a dense
    ``(M * N, K)`` float table (at K = 1,000 that is 4 KB a row). Distillation members are
    computed apart (``fit_many``: the methods' closed forms); they hold hard-label rows here.

    Args:
        members: per member ``(probs (N, K) or None, labels (N,))``.
        num_classes: ``K``.
    """

    def __init__(self, members: Sequence[tuple[Tensor | None, Tensor]], num_classes: int) -> None:
        self.num_classes = num_classes
        self.labels_only = all(probs is None for probs, _ in members)
        if self.labels_only:
            self.table = torch.cat([labels for _, labels in members])  # (M * N,)
        else:
            self.table = torch.cat(
                [
                    F.one_hot(labels, num_classes).float() if probs is None else probs.float()
                    for probs, labels in members
                ]
            )  # (M * N, K)

    def to(self, device: torch.device) -> StackedCrossEntropy:
        self.table = self.table.to(device)
        return self

    @torch.no_grad()
    def loss(self, logits: Tensor, table_rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``logits (M, B, K)``, their rows of :attr:`table` ``(M * B,)`` and row weights
        ``(M, B)`` -> each member's weighted loss ``(M,)`` and its gradient ``(M, B, K)``."""
        count, batch, _ = logits.shape
        if self.labels_only:
            labels = self.table.index_select(0, table_rows).view(count, batch, 1)
            # log s is needed at the label only, so the one (M, B, K) buffer becomes s in place
            # (at K = 1,000 it is 8 MB a step)
            shifted = logits - logits.amax(dim=-1, keepdim=True)
            picked = shifted.gather(-1, labels).squeeze(-1)
            s = shifted.exp_()
            total = s.sum(dim=-1, keepdim=True)
            row_loss = total.log().squeeze(-1) - picked  # -log s_y, to the bit
            grad = s.div_(total).scatter_add_(-1, labels, s.new_full(labels.shape, -1.0))
            return (row_loss * weight).sum(1), grad.mul_(weight[..., None])
        target = self.table.index_select(0, table_rows).view(count, batch, -1)
        log_s, s = log_softmax_and_softmax(logits)
        row_loss = -(target * log_s).sum(-1)
        return (row_loss * weight).sum(1), s.sub_(target).mul_(weight[..., None])
