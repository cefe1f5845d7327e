"""Losses for soft targets and distillation.

Shapes: ``N`` rows, ``K`` classes. Every loss takes raw logits (never probabilities) so the
log-softmax is computed stably, and reduces with ``"mean"`` (weighted mean over rows),
``"sum"`` or ``"none"`` (``(N,)`` per row).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.errors import SoftTargetsError
from softtargets.limits import chunk_rows
from softtargets.targets import check_finite, check_labels, check_temperature, validate

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
    teacher's other classes are read as :meth:`~softtargets.teacher.SoftTargetStore.dense` reads
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


# Up to this many classes, StoredDistillation precomputes per-row tables and builds [z / T, z] and
# mixes [q, s] with one small matmul each (fewer ops); the matmuls cost O(K^2) per row and the
# tables 4K + 1 floats a row, so many classes compute the teacher's side per batch instead.
_FEW_CLASSES = 64


class StoredDistillation:
    """Hinton's loss against a whole dataset's teacher logits, with a closed-form gradient.

    For the training hot path. The gradient with respect to the student logits ``z`` is known in
    closed form (Hinton et al. 2015, eq. 2, times the ``T^2`` factor, plus the hard term):
    ``(alpha T softmax(z / T) + (1 - alpha) softmax(z) - G) / B`` with
    ``G = alpha T p + (1 - alpha) onehot(y)`` and ``p = softmax(v / T)``. Handing it straight to
    ``logits.backward`` skips recording a dozen tiny autograd ops per step.

    Two ways to get the teacher's side, chosen by the number of classes ``K``:

    * few classes (``K <= 64``): ``G`` and the value's weights are computed once per row; a step
      gathers its rows and builds ``[z / T, z]`` with one matmul and the gradient with one
      ``addmm`` (on the small models of this field each op costs a few microseconds of dispatch,
      several times its arithmetic, and ``bench/epoch_cost.py``'s stored / hard ratio counts them);
    * many classes: nothing per row is kept beyond the teacher's logits themselves (a store's own
      tensor, float32 or float16, read through ``teacher_rows``); a step gathers its rows' logits
      and computes ``p`` then, so memory stays at the store's size and there is no setup.

    ``value_and_grad(z (B, K), rows (B,))`` returns the batch-mean loss, equal to
    ``distillation_loss(z, v[rows], y[rows], T, alpha)``, and its gradient ``(B, K)`` (with many
    classes, a buffer that the next call overwrites: use it before calling again).

    Args:
        teacher_logits: ``(M, K)`` teacher logits.
        labels: ``(N,)`` hard labels of the data's rows.
        temperature, alpha: as :func:`distillation_loss`.
        teacher_rows: ``(N,)`` the row of ``teacher_logits`` of each data row (default: the same).
    """

    def __init__(
        self,
        teacher_logits: Tensor,
        labels: Tensor,
        temperature: float,
        alpha: float,
        teacher_rows: Tensor | None = None,
    ) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise SoftTargetsError(f"alpha must be in [0, 1], got {alpha!r}")
        t = self.temperature = check_temperature(temperature)
        a = self.alpha = float(alpha)
        # teacher_logits may also be a top-k store: anything with .dense(rows) -> (B, K) float32
        if hasattr(teacher_logits, "dense"):
            self._gather, k = teacher_logits.dense, teacher_logits.num_classes
        else:
            self._gather, k = functools.partial(_rows_of, teacher_logits), teacher_logits.shape[1]
        self.num_classes = k
        self._scales = self._mix = None
        if k > _FEW_CLASSES:
            self._teacher_rows, self._labels = teacher_rows, labels
            # (M, 2): [-logsumexp(v / T), sum p log p] per teacher row, gathered together
            self._teacher_constants = _teacher_row_constants(
                self._gather, len(teacher_logits), k, t
            )
            self._buffers: dict[tuple, tuple[Tensor, ...]] = {}
            # float32 logits are gathered straight into a buffer (no fresh (B, K) tensor a step)
            plain = isinstance(teacher_logits, Tensor) and teacher_logits.dtype == torch.float32
            self._float32_logits = teacher_logits if plain else None
            self._weights_device: torch.device | None = None
            return
        if teacher_rows is None:
            teacher_rows = torch.arange(len(labels), device=labels.device)
        log_p = F.log_softmax(self._gather(teacher_rows).float() / t, dim=-1)  # (N, K)
        p = log_p.exp()
        one_hot = F.one_hot(labels, k).to(p.dtype)
        self._neg_offset = -(a * t * p + (1.0 - a) * one_hot)  # (N, K)
        # value per row: alpha T^2 (sum p log p - sum p log q) - (1 - alpha) log s_y
        #   = [log q, log s, 1] . [-alpha T^2 p, -(1 - alpha) onehot, alpha T^2 sum p log p]
        const = a * t * t * torch.linalg.vecdot(p, log_p)[:, None]
        self._value_weights = torch.cat([-a * t * t * p, -(1.0 - a) * one_hot, const], dim=1)
        eye = torch.eye(k, device=p.device)
        self._scales = torch.cat([eye / t, eye], dim=1)  # z @ scales = [z / T, z]
        self._mix = torch.cat([a * t * eye, (1.0 - a) * eye], dim=0)  # [q, s] @ mix

    def value_and_grad(self, logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``logits`` must not require grad (pass ``logits.detach()``)."""
        if self._scales is None:
            return self._many_classes(logits, rows)
        b, k = logits.shape
        both = (logits @ self._scales).view(b, 2, k)
        log_probs = torch.log_softmax(both, dim=-1).view(b, 2 * k)  # [log q, log s]
        offset = self._neg_offset.index_select(0, rows)
        # (alpha T q + (1 - alpha) s - G) / B
        grad = torch.addmm(offset, log_probs.exp(), self._mix, beta=1.0 / b, alpha=1.0 / b)
        weights = self._value_weights.index_select(0, rows).view(-1)
        value = torch.dot(weights, F.pad(log_probs, (0, 1), value=1.0).view(-1))
        return value / b, grad

    def _value_weights_for(self, device: torch.device) -> Tensor:
        """Weights of the per-row pieces ``[sum p log p, p . z, m, log sum q, log sum s, z_y]``
        summed over the batch: the value is their dot product (the last two only if alpha < 1)."""
        if self._weights_device != device:
            a, t = self.alpha, self.temperature
            att = a * t * t
            weights = [att, -att / t, att / t + (1.0 - a), att, 1.0 - a, -(1.0 - a)]
            self._weights = torch.tensor(weights[: 4 if a == 1.0 else 6], device=device)
            self._weights_device = device
        return self._weights

    def _many_classes(self, logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The step with the teacher's side computed from this batch's logits (``K > 64``).

        Per element: one ``exp`` for ``p`` (its log-normaliser and ``sum p log p`` are kept per
        teacher row, 8 bytes a row) and one for ``q``; ``s`` is ``q^T`` by repeated squaring when
        ``T`` is a whole number (a multiply costs a sixth of an ``exp`` on this CPU), else a third
        ``exp``. About a dozen cheap passes over ``(B, K)`` in all
        (``bench/run_all.py``'s ``stored_vs_hard_epoch_k1000``).
        """
        b, t, a = logits.shape[0], self.temperature, self.alpha
        # Four (B, K) buffers, reused step after step: fresh ones of this size come from mmap
        # and cost page faults on every step (measured: 1.7 ms a step with them, 1.0 without).
        key = (b, logits.device)
        if key not in self._buffers:
            self._buffers = {key: tuple(torch.empty_like(logits) for _ in range(4))}
        p, q, s, scratch = self._buffers[key]
        where = rows if self._teacher_rows is None else self._teacher_rows.index_select(0, rows)
        constants = self._teacher_constants.index_select(0, where)  # (B, 2)
        if self._float32_logits is not None:
            v = torch.index_select(self._float32_logits, 0, where, out=p)
        else:
            v = self._gather(where)  # (B, K); float16 stores widen in the add
        torch.add(constants[:, :1], v, alpha=1.0 / t, out=p).exp_()  # p = exp(v / T - lse)
        # The student's side from its row maxima m, unnormalised: q = exp((z - m) / T) and
        # s = exp(z - m). No log-softmax tensor: the value needs log q only under sum_k p_k
        # (sum p = 1), so sum_k p_k log q_k = (p . z - m) / T - log sum_k q_k, and log s only at
        # the label.
        top = logits.amax(dim=-1, keepdim=True)  # (B, 1)
        torch.add(top.mul(-1.0 / t), logits, alpha=1.0 / t, out=q).exp_()
        total_q = q.sum(dim=-1, keepdim=True)
        # The value, per row: alpha T^2 (sum p log p - sum p log q) - (1 - alpha) log s_y, from
        # per-row pieces summed in one reduction (each small op costs ~10 us of dispatch here).
        pieces = [constants[:, 1:], torch.linalg.vecdot(p, logits)[:, None], top, total_q.log()]
        if a < 1.0:
            if float(t).is_integer() and 1 <= t <= 64:
                s = _whole_power(q, int(t), s, scratch)
            else:
                torch.sub(logits, top, out=s).exp_()
            labels = self._labels.index_select(0, rows)[:, None]  # (B, 1)
            total_s = s.sum(dim=-1, keepdim=True)
            pieces += [total_s.log(), logits.gather(1, labels)]
        value = torch.cat(pieces, dim=1).sum(dim=0) @ self._value_weights_for(logits.device)
        # grad = (alpha T (q / sum q - p) + (1 - alpha) (s / sum s - onehot)) / B
        c = a * t / b
        grad = q.mul_(c / total_q)
        if a < 1.0:
            grad.addcmul_(s, total_s.reciprocal_().mul_((1.0 - a) / b)).scatter_add_(
                1, labels, grad.new_full(labels.shape, -(1.0 - a) / b)
            )
        grad.sub_(p, alpha=c)
        return value / b, grad


def _whole_power(base: Tensor, n: int, out: Tensor, scratch: Tensor) -> Tensor:
    """``base ** n`` for a whole ``n >= 1`` by repeated squaring, without changing ``base``; the
    result is in ``out`` or ``scratch`` (buffers shaped like ``base``), never ``base`` itself."""
    if n == 1:
        return out.copy_(base)
    result: Tensor | None = None
    square = base
    while True:
        if n & 1:
            result = square if result is None else torch.mul(result, square, out=out)
        n >>= 1
        if n == 0:
            assert result is not None
            return result
        if result is scratch:  # the next squaring overwrites scratch: keep the result aside
            result = out.copy_(scratch)
        square = torch.mul(base, base, out=scratch) if square is base else square.mul_(square)


def _rows_of(logits: Tensor, rows: Tensor) -> Tensor:
    return logits.index_select(0, rows.to(logits.device))


def log_softmax_and_softmax(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(log softmax(z), softmax(z))`` over the last axis from one ``exp`` per element (the pair
    from ``F.log_softmax`` and an ``exp`` takes two); for few classes these elementwise passes are
    also several times faster than ``F.log_softmax``'s reduction kernel on the CPU."""
    shifted = z - z.amax(dim=-1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(dim=-1, keepdim=True)
    return shifted.sub_(total.log()), exp.div_(total)


def _teacher_row_constants(
    gather: Callable[[Tensor], Tensor], rows: int, k: int, temperature: float
) -> Tensor:
    """``(M, 2)``: per teacher row (``gather(positions) -> (B, K)`` logits), ``-logsumexp(v / T)``
    and ``sum_k p_k log p_k`` with ``p = softmax(v / T)``, a chunk of rows at a time.

    Every chunk works in the same two buffers and writes into the one output: a loop that made
    fresh temporaries left +500 MB resident after a 381 MB store in one run out of three (glibc
    keeps freed blocks per arena; with another thread running, the main thread changes arena).
    """
    out = torch.empty(rows, 2)
    chunk = chunk_rows(k)
    scaled, work = torch.empty(chunk, k), torch.empty(chunk, k)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        v, w = scaled[:n], work[:n]
        torch.div(gather(torch.arange(start, start + n)), temperature, out=v)
        # logsumexp directly: recovering it as v_0 - log p_0 loses digits when v_0 is far below
        # the row's maximum
        top = v.amax(dim=1, keepdim=True)
        row_lse = torch.sub(v, top, out=w).exp_().sum(dim=1, keepdim=True).log_().add_(top)
        log_p = v.sub_(row_lse)
        out[start : start + n, 0] = row_lse[:, 0].neg_()
        out[start : start + n, 1] = torch.exp(log_p, out=w).mul_(log_p).sum(dim=1)
    return out
