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

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from softtargets.config import chunk_rows
from softtargets.data.targets import check_temperature
from softtargets.errors import SoftTargetsError
from softtargets.losses.methods import METHODS
from softtargets.losses.reference import (
    check_pair,
    check_several_rows,
    log_softmax_and_softmax,
    standardize,
    temperatures,
)

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
# index ``(..., B, 1)``, its one-hot ``(..., B, K)`` and its options, and returns the parts its step
# needs, ``(..., B, c)`` each. Its step takes the student's ``log q`` and ``q`` at T, those parts
# and the options, and returns the batch *sum* of the method's row values (before any T^2 or
# other factor) with its gradient in ``u = z / T`` ``(..., B, K)``; the driver divides by ``B``.
# Steps compute only what depends on the student.


def plain_teacher(
    log_p: Tensor, p: Tensor, index: Tensor, one_hot: Tensor, **_: Any
) -> tuple[Tensor, ...]:
    return log_p, p, (p * log_p).sum(-1, keepdim=True)  # ... and sum_k p log p per row


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
    first with ``standardize``) at ``T``: ``(..., B, c)`` tensors, the last the labels' one-hot
    (for the cross-entropy)."""
    v = _wide(teacher_logits)
    if options.get("standardize", False):
        v = standardize(v)
    divisor, _ = temperatures(temperature, v)
    log_p, p = log_softmax_and_softmax(v / divisor)
    index, one_hot = _one_hot(labels, v)
    return *METHODS[name].teacher(log_p, p, index, one_hot, **_settings(options)), one_hot


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
    the labels' one-hot (:func:`teacher_side`), and its gradient in the student's logits,
    ``(..., B, K)``; ``ramp`` is a warm-up's factor
    (:func:`~softtargets.losses.methods.warmup_ramp`)."""
    method = METHODS[name]
    with torch.no_grad():
        z = _wide(student_logits)
        batch = z.shape[-2]
        divisor, t = temperatures(temperature, z)
        standardized = options.get("standardize", False)
        if standardized:
            z_tilde, *standard_parts = _standardized(z)
            u = z_tilde / divisor
        else:
            u = z / divisor
        mixed = isinstance(weight, Tensor) or weight != 1.0
        if mixed:  # the softmax at T and at 1 in one pass over (..., B, 2, K)
            log_both, both = log_softmax_and_softmax(torch.stack([u, z], dim=-2))
            (log_q, log_s), (q, s) = log_both.unbind(-2), both.unbind(-2)
        else:
            log_q, q = log_softmax_and_softmax(u)
        *parts, one_hot = teacher
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
        hard_grad = s - one_hot
        value = value - _dot(one_hot, log_s).sum(-1) * ((1.0 - weight) / batch)
        if isinstance(weight_rows, Tensor):
            return value, grad.addcmul_(hard_grad, (1.0 - weight_rows) / batch)
        return value, grad.add_(hard_grad, alpha=(1.0 - weight_rows) / batch)


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


class StackedLoss:
    """Every member's targets as one table of rows, and the loss over a stacked batch.

    A member's row loss is ``alpha T^2 (c - sum_k p_k log q_k) - (1 - alpha) log s_y`` with
    ``q = softmax(z / T)``, ``s = softmax(z)`` and ``c = sum_k p_k log p_k`` for distillation
    (reported as a KL divergence, as ``fit`` does) or 0; its gradient w.r.t. the logits ``z`` is
    ``alpha T q + (1 - alpha) s - G`` with ``G = alpha T p + (1 - alpha) onehot(y)``. The parts
    that do not depend on ``z`` are precomputed per row, so a step gathers them at once: ``G``,
    and for the value ``alpha T^2 p``, ``(1 - alpha) onehot(y)`` and ``alpha T^2 c``. When every
    member has ``T = 1`` (hard labels, probability targets), ``q = s`` and the value needs only
    ``G`` and the constant. The table holds ``M * N`` rows of ``K + 1`` floats (T = 1), ``2K + 1``
    (every member purely soft) or ``3K + 1``; when every member has hard labels, it holds just
    the ``M * N`` labels.
    """

    def __init__(
        self,
        resolved: Sequence[tuple[Tensor | None, Tensor, float, float, bool]],
        num_classes: int,
    ) -> None:
        self.num_classes = num_classes
        self.unit_temperature = all(t == 1.0 for _, _, t, _, _ in resolved)
        self.any_hard = any(a != 1.0 for _, _, _, a, _ in resolved)
        # Only hard labels: the table is the labels themselves, (M * N,) integers, not a dense
        # (M * N, K + 1) float table (at K = 1,000 that is 4 KB a row).
        self.labels_only = all(probs is None for probs, _, _, _, _ in resolved)
        if self.labels_only:
            self.table = torch.cat([labels for _, labels, _, _, _ in resolved])
        else:
            self.table = torch.cat([self._rows(*member) for member in resolved])  # (M * N, C)
        self.soft_scale = torch.tensor([a * t for _, _, t, a, _ in resolved]).view(-1, 1, 1)
        self.hard_scale = torch.tensor([1 - a for _, _, _, a, _ in resolved]).view(-1, 1, 1)
        self.inverse_temperature = torch.tensor([1 / t for _, _, t, _, _ in resolved])
        self.inverse_temperature = self.inverse_temperature.view(-1, 1, 1)

    def _rows(
        self, probs: Tensor | None, labels: Tensor, t: float, a: float, is_kl: bool
    ) -> Tensor:
        """One member's rows of the dense table (see the class docstring for the columns)."""
        one_hot = F.one_hot(labels, self.num_classes).float()
        if probs is None:
            probs = torch.zeros_like(one_hot)
        const = (probs * probs.clamp_min(1e-30).log()).sum(-1, keepdim=True) * is_kl
        grad_target = a * t * probs + (1 - a) * one_hot
        if self.unit_temperature:
            return torch.cat([grad_target, a * const], 1)
        hard = [(1 - a) * one_hot] if self.any_hard else []
        return torch.cat([grad_target, a * t * t * probs, *hard, a * t * t * const], 1)

    def to(self, device: torch.device) -> StackedLoss:
        for name in ("table", "soft_scale", "hard_scale", "inverse_temperature"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def loss(self, logits: Tensor, table_rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``logits (M, B, K)``, their rows of :attr:`table` ``(M * B,)`` and row weights
        ``(M, B)`` -> each member's weighted loss ``(M,)`` and its gradient ``(M, B, K)``."""
        count, batch, k = logits.shape
        if self.labels_only:  # cross-entropy on the labels: loss -log s_y, gradient s - onehot(y)
            labels = self.table.index_select(0, table_rows).view(count, batch, 1)
            # As _log_softmax_and_softmax, but log s is needed at the label only, so the one
            # (M, B, K) buffer becomes s in place (at K = 1,000 it is 8 MB a step).
            shifted = logits - logits.amax(dim=-1, keepdim=True)
            picked = shifted.gather(-1, labels).squeeze(-1)
            s = shifted.exp_()
            total = s.sum(dim=-1, keepdim=True)
            row_loss = total.log().squeeze(-1) - picked  # -log s_y, to the bit
            grad = s.div_(total).scatter_add_(-1, labels, s.new_full(labels.shape, -1.0))
            return (row_loss * weight).sum(1), grad.mul_(weight[..., None])
        rows = self.table.index_select(0, table_rows).view(count, batch, -1)
        grad_target, const = rows[..., :k], rows[..., -1]
        if self.unit_temperature:
            log_s, s = log_softmax_and_softmax(logits)
            row_loss = const - (grad_target * log_s).sum(-1)
            grad = s.sub_(grad_target)
        else:
            log_q, q = log_softmax_and_softmax(logits * self.inverse_temperature)
            row_loss = const - (rows[..., k : 2 * k] * log_q).sum(-1)
            grad = q.mul_(self.soft_scale).sub_(grad_target)
            if self.any_hard:
                log_s, s = log_softmax_and_softmax(logits)
                row_loss -= (rows[..., 2 * k : 3 * k] * log_s).sum(-1)
                grad.addcmul_(s, self.hard_scale)
        return (row_loss * weight).sum(1), grad.mul_(weight[..., None])
