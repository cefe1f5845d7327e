"""Hinton's loss for ``M`` stacked models at once, with its gradient in closed form.

:func:`softtargets.vectorised.fit_many` trains ``M`` MLPs together; this is their loss over a
stacked batch ``(M, B, K)``: each member its own targets (hard labels, a probability matrix, or a
teacher's probabilities at its own temperature and alpha), read from one table of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from softtargets.losses import log_softmax_and_softmax


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
