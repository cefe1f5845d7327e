"""A distillation loss whose memory does not grow with the vocabulary: the student's output
projection and the loss run in chunks of positions inside one autograd function.

A language model's student maps hidden states ``(N, D)`` through its output projection
``(V, D)`` to logits ``(N, V)``; at N = 8,192 positions and V = 128,000 those logits, the
teacher's and their gradients are gigabytes. :func:`chunked_distillation_loss` never holds them
whole: for each chunk of ``chunk`` positions it forms that chunk's logits, asks ``teacher`` for
the chunk's teacher logits (a stored row, or an online teacher's own projection), takes the
method's value and gradient in closed form (:func:`~softtargets.losses.closed.method_value_and_grad`,
the one implementation every trainer uses) and accumulates the gradients of the hidden states and
of the projection. Peak memory is a few ``(chunk, V)`` blocks.

The loss is the methods' ``alpha x method + (1 - alpha) x cross-entropy`` (next-token labels),
averaged over the positions the mask keeps (padding and prompt tokens masked out).

A top-k teacher (:class:`KeptRows`: the kept logits, their tokens and the log-sum-exp of the
rest *at the temperature*) is exact with one observation: a divergence over the ``k`` kept
tokens and one bucket for the rest equals the same divergence over all ``V`` tokens against a
teacher whose bucket mass is spread as the student's own (detached) probabilities spread theirs,
value and gradient alike (:func:`bucket_teacher_logits`). So every method's one closed form
serves full and top-k teachers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from softtargets.errors import SoftTargetsError
from softtargets.losses.closed import method_value_and_grad


@dataclass(frozen=True)
class KeptRows:
    """A top-k teacher's rows: ``values (c, k)`` its kept logits, ``classes (c, k)`` their tokens
    and ``rest (c,)`` the log-sum-exp of the other logits divided by the temperature,
    ``log sum_j exp(v_j / T)`` over the tokens not kept (a store keeps it per temperature)."""

    values: Tensor
    classes: Tensor
    rest: Tensor


#: teacher logits of chunk rows: ``teacher(rows (c,)) -> (c, V)`` logits, or :class:`KeptRows`
TeacherRows = Callable[[Tensor], "Tensor | KeptRows"]


def bucket_teacher_logits(student_logits: Tensor, kept: KeptRows, temperature: float) -> Tensor:
    """``(c, V)`` teacher logits whose softmax at ``temperature`` is the top-k teacher's
    distribution with its bucket spread as the student's own probabilities are (detached): the
    kept tokens' probabilities and the bucket's mass are the teacher's, exactly."""
    t = float(temperature)
    with torch.no_grad():
        scaled = kept.values.float() / t  # (c, k)
        total = torch.logaddexp(torch.logsumexp(scaled, dim=1), kept.rest.float())  # log Z_T
        classes = kept.classes.long()
        log_q = F.log_softmax(student_logits.float() / t, dim=1)
        log_q_rest = torch.logsumexp(log_q.scatter(1, classes, float("-inf")), dim=1)
        out = (kept.rest.float() - total - log_q_rest)[:, None] + log_q  # bucket, as the student
        out.scatter_(1, classes, scaled - total[:, None])  # kept tokens, as the teacher
        return out * t


class _ChunkedProjectionLoss(torch.autograd.Function):
    """Value and gradients computed together in the forward pass, chunk by chunk; the backward
    pass scales them by the incoming gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        rows: Tensor,
        teacher: TeacherRows,
        method: str,
        options: dict[str, Any],
        temperature: float,
        alpha: float,
        chunk: int,
    ) -> Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        kept = len(rows)
        for start in range(0, kept, chunk):
            part = rows[start : start + chunk]
            h = hidden.index_select(0, part)
            logits = (h @ weight.T).float()
            given = teacher(part)
            if isinstance(given, KeptRows):
                given = bucket_teacher_logits(logits, given, temperature)
            value, grad = method_value_and_grad(
                method, options, logits, given.float(), labels.index_select(0, part),
                temperature, alpha,
            )  # fmt: skip
            share = len(part) / kept  # each chunk's mean, weighted to the mean over all rows
            total += value * share
            grad = (grad * share).to(hidden.dtype)
            grad_hidden.index_copy_(0, part, grad @ weight)
            grad_weight.add_(grad.T @ h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output, grad_weight * grad_output, *([None] * 8))


def chunked_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    teacher: TeacherRows,
    *,
    mask: Tensor | None = None,
    method: str = "kd",
    options: dict[str, Any] | None = None,
    temperature: float = 1.0,
    alpha: float = 1.0,
    chunk: int = 1024,
) -> Tensor:
    """The mean over kept positions of ``alpha x method + (1 - alpha) x cross-entropy``.

    Args:
        hidden: ``(N, D)`` the student's final hidden states, one row per position.
        weight: ``(V, D)`` its output projection (logits are ``hidden @ weight.T``).
        labels: ``(N,)`` the next tokens.
        teacher: ``teacher(rows (c,)) -> (c, V)`` the teacher's logits of those positions.
        mask: ``(N,)`` bool, the positions that count (default: all).
        method, options, temperature, alpha: as every trainer takes them (the method registry).
        chunk: positions per chunk (memory: a few ``(chunk, V)`` blocks).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise SoftTargetsError(
            f"hidden states {tuple(hidden.shape)} and projection {tuple(weight.shape)} do not "
            "fit: give (positions, width) and (vocabulary, width)"
        )
    if labels.shape != (hidden.shape[0],):
        raise SoftTargetsError(f"labels {tuple(labels.shape)}: give one per position")
    if mask is None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
    else:
        if mask.shape != (hidden.shape[0],):
            raise SoftTargetsError(f"mask {tuple(mask.shape)}: give one flag per position")
        rows = mask.nonzero().squeeze(1)
    if len(rows) == 0:
        raise SoftTargetsError("the mask hides every position of this batch; nothing to learn")
    if chunk < 1:
        raise SoftTargetsError(f"chunk must be at least 1, got {chunk}")
    return _ChunkedProjectionLoss.apply(
        hidden, weight, labels, rows, teacher, method, dict(options or {}), float(temperature),
        float(alpha), int(chunk),
    )  # fmt: skip
