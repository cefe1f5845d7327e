"""Training many small MLPs at once: one batched matrix multiply per layer for all of them.

The studies train hundreds of small models (seeds x widths x data fractions x learning rates).
One at a time, each step of a small MLP is mostly Python and dispatch overhead and leaves the
machine idle; stacked, ``M`` models cost one ``baddbmm`` per layer. Each model (a
:class:`Member`) keeps its own seed, batch order, training rows, targets, learning rate, weight
decay and optimizer state, so a member's result equals :func:`softtargets.train.fit` on that model
alone, to float tolerance (``tests/test_vectorised.py`` checks it).

MLPs of similar hidden widths and equal depth share a stack, zero-padded to the widest; very
different widths (or depths) go to separate stacks (:func:`stack_groups` weighs padding's wasted
arithmetic against another stack's fixed cost per step). The padding is exact: a padded unit has
zero incoming and outgoing weights, so its pre-activation is 0, ReLU'(0) is 0 in PyTorch, and
every gradient it receives or sends is 0; Adam, AdamW and SGD then leave it at exactly 0. (The
tests train padded and unpadded models side by side.)

Training runs forward and backward by hand, without autograd, into buffers allocated once
(:class:`StackedMLP`), and the loss's gradient in closed form (:class:`StackedTargets`): on the
CPU, a step of small models is bound by per-op overhead and by page faults on fresh tensors, not
by arithmetic (``bench/where_time_goes.py`` shows the split).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.data import Dataset
from softtargets.errors import SoftTargetsError
from softtargets.files import append_jsonl
from softtargets.targets import check_labels, soften
from softtargets.train import (
    FitResult,
    Targets,
    check_lengths,
    lr_factor,
    resolve_device,
    resolve_targets,
)


@dataclass
class Member:
    """One model of a vectorised run.

    Attributes:
        seed: batch order and dropout seed (as ``fit``'s ``seed``).
        targets: as ``fit``'s ``targets``: ``None`` (hard labels), an ``(N, K)`` probability
            matrix, a store, or a :class:`~softtargets.train.Distillation`.
        rows: positions of ``data``'s rows this member trains on (default: all).
        labels: ``(N,)`` labels replacing ``data.labels`` for this member (e.g. noisy ones).
        lr, weight_decay: override the run's values for this member.
        log: extra fields for this member's JSON lines and history.
    """

    seed: int = 0
    targets: Targets = None
    rows: Tensor | None = None
    labels: Tensor | None = None
    lr: float | None = None
    weight_decay: float | None = None
    log: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- the stacked model
# ReLU's backward, written into its gradient argument (looked up once: torch.ops is slow to walk)
_relu_backward = torch.ops.aten.threshold_backward.grad_input


def mlp_layers(model: nn.Module) -> tuple[list[nn.Linear], float]:
    """The Linear layers and dropout rate of an :func:`softtargets.models.mlp`-shaped model."""
    if not isinstance(model, nn.Sequential):
        raise SoftTargetsError(
            "vectorised training takes MLPs built by softtargets.models.mlp (Flatten, then Linear "
            "and ReLU layers); train other models with fit()"
        )
    linears, dropout = [], 0.0
    for layer in model:
        if isinstance(layer, nn.Linear):
            linears.append(layer)
        elif isinstance(layer, nn.Dropout):
            dropout = layer.p
        elif not isinstance(layer, (nn.Flatten, nn.ReLU)):
            raise SoftTargetsError(
                f"vectorised training takes plain MLPs; this model has a {type(layer).__name__}"
            )
    return linears, dropout


class StackedMLP(nn.Module):
    """``M`` MLPs of equal depth evaluated together: ``(M, B, in) -> (M, B, K)``.

    Parameters are ``weights[l]`` of shape ``(M, in_l, out_l)`` and ``biases[l]`` of shape
    ``(M, 1, out_l)``; hidden widths are padded with zeros to the largest member's.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        layers = [mlp_layers(m) for m in models]
        depths = {len(linears) for linears, _ in layers}
        if len(depths) != 1:
            raise SoftTargetsError("vectorised MLPs must all have the same number of layers")
        self.dropout = layers[0][1]
        if any(d != self.dropout for _, d in layers):
            raise SoftTargetsError("vectorised MLPs must share their dropout rate")
        depth = depths.pop()
        self.widths = [[lin.out_features for lin in linears[:-1]] for linears, _ in layers]
        self.in_features = layers[0][0][0].in_features
        self.out_features = layers[0][0][-1].out_features
        sizes = [self.in_features] + [max(w[i] for w in self.widths) for i in range(depth - 1)]
        sizes.append(self.out_features)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i in range(depth):
            weight = torch.zeros(len(models), sizes[i], sizes[i + 1])
            bias = torch.zeros(len(models), 1, sizes[i + 1])
            for m, (linears, _) in enumerate(layers):
                lin = linears[i]
                weight[m, : lin.in_features, : lin.out_features] = lin.weight.detach().T
                bias[m, 0, : lin.out_features] = lin.bias.detach()
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))
        self._workspace: dict[tuple, list[Tensor]] = {}
        self._layer_list: list[tuple[Tensor, Tensor]] | None = None
        self._train_shape: torch.Size | None = None
        self._masks: list[Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x (M, B, in)`` or ``(B, in)`` shared by all members -> logits ``(M, B, K)``.

        The autograd path, for evaluation; training uses :meth:`train_forward` and
        :meth:`train_backward`.
        """
        h = x if x.ndim == 3 else x.expand(len(self.weights[0]), *x.shape)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(bias, h, weight)
            if i < last:
                h = torch.relu_(h)  # in place: the matmul's output is not needed for backward
                if self.dropout > 0:
                    h = F.dropout(h, self.dropout, self.training)
        return h

    # Training and evaluation run by hand, without autograd, into buffers allocated once per
    # batch shape. Why: every autograd step would allocate fresh (M, B, width) tensors of a
    # megabyte or so, which glibc serves with mmap, and the page faults of touching them cost as
    # much as the arithmetic (measured: ~260 faults, ~0.5 ms of a ~3 ms step for 16 x 128-128).
    @torch.no_grad()
    def infer(self, x: Tensor) -> Tensor:
        """Evaluation forward (no dropout, no autograd) of ``x (B, in)``, shared by all members,
        or ``(M, B, in)`` -> logits ``(M, B, K)`` in a buffer that the next call overwrites."""
        x = x if x.ndim == 3 else x.expand(len(self.weights[0]), *x.shape)
        return self._forward_into(x, self._outputs_for(x), masks=None)

    @torch.no_grad()
    def train_forward(self, x: Tensor) -> Tensor:
        """Training forward of ``x (M, B, in)`` -> logits ``(M, B, K)``, keeping each layer's input
        for :meth:`train_backward`. The logits live in a buffer the next call overwrites."""
        outputs = self._outputs_for(x)
        if self._train_shape != outputs[0].shape:
            self._grads = [torch.empty_like(t) for t in outputs[:-1]]
            self._masks = [torch.empty_like(t) for t in outputs[:-1]] if self.dropout else None
            for p in self.parameters():
                p.grad = torch.zeros_like(p)
            self._train_shape = outputs[0].shape
        self._layer_inputs = [x, *outputs[:-1]]
        return self._forward_into(x, outputs, self._masks)

    @torch.no_grad()
    def train_backward(self, grad: Tensor) -> None:
        """Set every parameter's ``.grad`` from ``grad``, the loss gradient w.r.t. the logits of
        the last :meth:`train_forward` ``(M, B, K)``; exactly what autograd computes."""
        layers = self._layers()
        for i in range(len(layers) - 1, -1, -1):
            (weight, bias), h = layers[i], self._layer_inputs[i]
            torch.bmm(h.transpose(1, 2), grad, out=weight.grad)
            torch.sum(grad, dim=1, keepdim=True, out=bias.grad)
            if i == 0:
                break  # the data needs no gradient
            below = self._grads[i - 1]
            torch.bmm(grad, weight.transpose(1, 2), out=below)
            if self._masks is not None:
                below.mul_(self._masks[i - 1])
            # ReLU's backward: zero where the (dropped-out) activation is 0
            _relu_backward(below, h, 0.0, grad_input=below)
            grad = below

    def _forward_into(self, x: Tensor, outputs: list[Tensor], masks: list[Tensor] | None) -> Tensor:
        layers = self._layers()
        last = len(layers) - 1
        for i, ((weight, bias), out) in enumerate(zip(layers, outputs, strict=True)):
            torch.baddbmm(bias, x, weight, out=out)
            if i < last:
                out.relu_()
                if masks is not None:
                    # each mask holds 0 or 1 / (1 - p), the scaling of F.dropout
                    masks[i].bernoulli_(1 - self.dropout).div_(1 - self.dropout)
                    out.mul_(masks[i])
            x = out
        return outputs[last]

    def _layers(self) -> list[tuple[Tensor, Tensor]]:
        """``(weight, bias)`` per layer, as a plain list: indexing a ParameterList costs
        microseconds, and the training step would do it a dozen times."""
        if self._layer_list is None:
            self._layer_list = list(zip(self.weights, self.biases, strict=True))
        return self._layer_list

    def _apply(self, fn: Any, recurse: bool = True) -> StackedMLP:
        # .to(device) may replace the Parameter objects, and the buffers stay where they were
        self._layer_list, self._train_shape, self._workspace = None, None, {}
        return super()._apply(fn, recurse)

    def _outputs_for(self, x: Tensor) -> list[Tensor]:
        """Each layer's output buffer ``(M, B, out_l)`` for inputs shaped like ``x (M, B, in)``."""
        key = (x.shape[1], x.device, x.dtype)
        if key not in self._workspace:
            self._workspace[key] = [x.new_empty(*x.shape[:2], w.shape[2]) for w in self.weights]
        return self._workspace[key]

    def load_member(self, m: int, model: nn.Module) -> nn.Module:
        """Copy member ``m``'s weights, padding removed, into ``model`` (an MLP of its widths)."""
        with torch.no_grad():
            for lin, weight, bias in zip(
                mlp_layers(model)[0], self.weights, self.biases, strict=True
            ):
                lin.weight.copy_(weight[m, : lin.in_features, : lin.out_features].T)
                lin.bias.copy_(bias[m, 0, : lin.out_features])
        return model


# ---------------------------------------------------------------------------- the optimizer
class StackedOptimizer:
    """Adam, AdamW or SGD (momentum) over stacked parameters ``(M, ...)``: one optimizer state per
    member, a learning rate and weight decay per member, and updates only for active members.

    Members next to each other that share learning rate, weight decay and step count form a run,
    and each run's slice of the stacked tensors goes to PyTorch's own functional optimizer
    (``torch.optim.adam.adam``, ``torch.optim.sgd.sgd``) in one call, with the fused kernels: the
    arithmetic is exactly that of ``torch.optim.Adam(fused=True)``, which ``fit`` uses. In the
    common case (same settings, same data size) one call updates every member.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        name: str,
        weight_decay: Sequence[float],
        momentum: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if name not in ("sgd", "adam", "adamw"):
            raise SoftTargetsError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")
        self.params, self.name, self.momentum = list(params), name, momentum
        self.betas, self.eps, self.weight_decay = betas, eps, list(weight_decay)
        self.first = [torch.zeros_like(p) for p in self.params]  # Adam's m, or SGD's momentum
        self.second = [torch.zeros_like(p) for p in self.params]  # Adam's v
        self.steps = [0] * len(self.weight_decay)
        self.fused = self.params[0].device.type in ("cpu", "cuda")
        self._cached_slices: dict[tuple[int, int], tuple[list[Tensor], ...]] = {}
        self._grads_seen: list[Tensor | None] = [None] * len(self.params)
        self._cached_steps: dict[tuple[int, int], tuple[int, list[Tensor]]] = {}

    def runs(self, lr: Sequence[float], active: Sequence[bool]) -> list[tuple[int, int]]:
        """Maximal ranges ``[a, b)`` of active members with equal (lr, weight decay, steps)."""
        found: list[tuple[int, int]] = []
        for m, on in enumerate(active):
            key = (lr[m], self.weight_decay[m], self.steps[m])
            if not on:
                continue
            a = found[-1][0] if found else -1
            if found and found[-1][1] == m and (lr[a], self.weight_decay[a], self.steps[a]) == key:
                found[-1] = (a, m + 1)
            else:
                found.append((m, m + 1))
        return found

    def _slices(self, a: int, b: int) -> tuple[list[Tensor], ...]:
        """Members ``[a, b)`` of the parameters, gradients and both states (cached: a training
        run asks for the same ranges step after step)."""
        if (a, b) not in self._cached_slices:
            tensors = self.params, [p.grad for p in self.params], self.first, self.second
            self._cached_slices[a, b] = tuple([t[a:b] for t in group] for group in tensors)
        return self._cached_slices[a, b]

    def _step_counts(self, a: int, b: int) -> list[Tensor]:
        """Adam's step count for members ``[a, b)``, one tensor per parameter on the parameters'
        device (where the fused kernels read it); ``adam()`` adds 1 to each in place, so the
        tensors are kept for the next step of the same run."""
        count = self.steps[a]
        cached = self._cached_steps.get((a, b))
        if cached is None or cached[0] != count:
            device = self.params[0].device
            cached = (count, [torch.tensor(float(count), device=device) for _ in self.params])
        self._cached_steps[a, b] = (count + 1, cached[1])
        return cached[1]

    @torch.no_grad()
    def step(self, lr: Sequence[float], active: Sequence[bool]) -> None:
        """Update the members where ``active[m]``, member ``m`` with learning rate ``lr[m]``."""
        from torch.optim.adam import adam
        from torch.optim.sgd import sgd

        current = [p.grad for p in self.params]
        if any(g is not seen for g, seen in zip(current, self._grads_seen, strict=True)):
            self._cached_slices.clear()  # new gradient tensors: the cached views are stale
            self._grads_seen = current
        for a, b in self.runs(lr, active):
            params, grads, first, second = self._slices(a, b)
            if self.name == "sgd":
                # Zero-initialised buffers give exactly torch's first step (buffer = grad).
                sgd(
                    params,
                    grads,
                    first,
                    fused=self.fused,
                    weight_decay=self.weight_decay[a],
                    momentum=self.momentum,
                    lr=lr[a],
                    dampening=0.0,
                    nesterov=False,
                    maximize=False,
                )
            else:
                adam(
                    params,
                    grads,
                    first,
                    second,
                    [],
                    self._step_counts(a, b),
                    fused=self.fused,
                    decoupled_weight_decay=self.name == "adamw",
                    amsgrad=False,
                    beta1=self.betas[0],
                    beta2=self.betas[1],
                    lr=lr[a],
                    weight_decay=self.weight_decay[a],
                    eps=self.eps,
                    maximize=False,
                )
            for m in range(a, b):
                self.steps[m] += 1


# ---------------------------------------------------------------------------- targets
def _member_targets(member: Member, data: Dataset) -> tuple[Tensor, Tensor, float, float, bool]:
    """``(probs (N, K), labels (N,), temperature, alpha, is_distillation)`` for one member.

    The per-row loss is ``alpha T^2 H(probs, softmax(z / T)) + (1 - alpha) CE(z, label)``:
    hard labels are ``alpha = 0``; a probability matrix is ``T = 1, alpha = 1``. As in ``fit``,
    distillation reports the soft term as a KL divergence (cross-entropy minus the teacher's
    entropy) and a probability matrix as the cross-entropy itself.
    """
    labels = data.labels
    if member.labels is not None:
        labels = check_labels(member.labels, data.num_classes, len(data)).long()
    resolved = resolve_targets(member.targets, data)
    if resolved.kind == "hard":
        return torch.zeros(len(data), data.num_classes), labels, 1.0, 0.0, False
    if resolved.kind == "probs":
        return resolved.probs, labels, 1.0, 1.0, False
    probs = soften(resolved.teacher_logits, resolved.temperature)
    return probs, labels, resolved.temperature, resolved.alpha, True


def _padded_orders(
    rows_per_member: Sequence[Tensor], generators: Sequence[torch.Generator], length: int
) -> tuple[Tensor, Tensor]:
    """One epoch's batch order per member, as ``fit`` draws it, padded: ``(M, length)`` row
    positions and a ``(M, length)`` mask of the real ones."""
    order = torch.zeros(len(rows_per_member), length, dtype=torch.long)
    valid = torch.zeros(len(rows_per_member), length, dtype=torch.bool)
    for m, (rows, gen) in enumerate(zip(rows_per_member, generators, strict=True)):
        order[m, : len(rows)] = rows[torch.randperm(len(rows), generator=gen)]
        valid[m, : len(rows)] = True
    return order, valid


def _rows_by_step(order: Tensor, steps: int, offset: int = 0) -> Tensor:
    """``order (M, S * B)`` -> ``(S, M * B)``: step ``s``'s rows of every member, contiguous, so a
    step gathers all members' rows with one ``index_select``. Member ``m``'s rows get
    ``m * offset`` added (to address a table stacked as ``(M * N, ...)``)."""
    count = order.shape[0]
    shifted = order + torch.arange(count, device=order.device)[:, None] * offset
    return shifted.view(count, steps, -1).transpose(0, 1).reshape(steps, -1)


class StackedTargets:
    """Every member's targets as one table of rows, and the loss over a stacked batch.

    A member's row loss is ``alpha T^2 (c - sum_k p_k log q_k) - (1 - alpha) log s_y`` with
    ``q = softmax(z / T)``, ``s = softmax(z)`` and ``c = sum_k p_k log p_k`` for distillation
    (reported as a KL divergence, as ``fit`` does) or 0; its gradient w.r.t. the logits ``z`` is
    ``alpha T q + (1 - alpha) s - G`` with ``G = alpha T p + (1 - alpha) onehot(y)``. The parts
    that do not depend on ``z`` are precomputed per row, so a step gathers them at once: ``G``,
    and for the value ``alpha T^2 p``, ``(1 - alpha) onehot(y)`` and ``alpha T^2 c``. When every
    member has ``T = 1`` (hard labels, probability targets), ``q = s`` and the value needs only
    ``G`` and the constant. The table holds ``M * N`` rows of ``K + 1`` floats (T = 1), ``2K + 1``
    (every member purely soft) or ``3K + 1``.
    """

    def __init__(self, resolved: Sequence[tuple[Tensor, Tensor, float, float, bool]]) -> None:
        self.num_classes = resolved[0][0].shape[1]
        self.unit_temperature = all(t == 1.0 for _, _, t, _, _ in resolved)
        self.any_hard = any(a != 1.0 for _, _, _, a, _ in resolved)
        tables = []
        for probs, labels, t, a, is_kl in resolved:
            one_hot = F.one_hot(labels, self.num_classes).to(probs.dtype)
            const = (probs * probs.clamp_min(1e-30).log()).sum(-1, keepdim=True) * is_kl
            grad_target = a * t * probs + (1 - a) * one_hot
            if self.unit_temperature:
                tables.append(torch.cat([grad_target, a * const], 1))
            else:
                hard = [(1 - a) * one_hot] if self.any_hard else []
                tables.append(
                    torch.cat([grad_target, a * t * t * probs, *hard, a * t * t * const], 1)
                )
        self.table = torch.cat(tables)  # (M * N, C)
        self.soft_scale = torch.tensor([a * t for _, _, t, a, _ in resolved]).view(-1, 1, 1)
        self.hard_scale = torch.tensor([1 - a for _, _, _, a, _ in resolved]).view(-1, 1, 1)
        self.inverse_temperature = torch.tensor([1 / t for _, _, t, _, _ in resolved])
        self.inverse_temperature = self.inverse_temperature.view(-1, 1, 1)

    @classmethod
    def for_members(cls, members: Sequence[Member], data: Dataset) -> StackedTargets:
        """Resolve and check each member's targets against ``data``."""
        return cls([_member_targets(m, data) for m in members])

    def to(self, device: torch.device) -> StackedTargets:
        for name in ("table", "soft_scale", "hard_scale", "inverse_temperature"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def loss(self, logits: Tensor, table_rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``logits (M, B, K)``, their rows of :attr:`table` ``(M * B,)`` and row weights
        ``(M, B)`` -> each member's weighted loss ``(M,)`` and its gradient ``(M, B, K)``."""
        count, batch, k = logits.shape
        rows = self.table.index_select(0, table_rows).view(count, batch, -1)
        grad_target, const = rows[..., :k], rows[..., -1]
        if self.unit_temperature:
            log_s, s = _log_softmax_and_softmax(logits)
            row_loss = const - (grad_target * log_s).sum(-1)
            grad = s.sub_(grad_target)
        else:
            log_q, q = _log_softmax_and_softmax(logits * self.inverse_temperature)
            row_loss = const - (rows[..., k : 2 * k] * log_q).sum(-1)
            grad = q.mul_(self.soft_scale).sub_(grad_target)
            if self.any_hard:
                log_s, s = _log_softmax_and_softmax(logits)
                row_loss -= (rows[..., 2 * k : 3 * k] * log_s).sum(-1)
                grad.addcmul_(s, self.hard_scale)
        return (row_loss * weight).sum(1), grad.mul_(weight[..., None])


def _log_softmax_and_softmax(z: Tensor) -> tuple[Tensor, Tensor]:
    """Stable log-softmax and softmax over the last axis. For the few classes of this field these
    elementwise passes are several times faster than ``F.log_softmax``'s reduction kernel."""
    shifted = z - z.amax(dim=-1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(dim=-1, keepdim=True)
    return shifted.sub_(total.log()), exp.div_(total)


# ---------------------------------------------------------------------------- fit_many
def fit_many(
    models: Sequence[nn.Module],
    data: Dataset,
    members: Sequence[Member] | None = None,
    *,
    val: Dataset | None = None,
    test: Dataset | None = None,
    epochs: int = 30,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str = "none",
    device: torch.device | str | None = None,
    patience: int | None = None,
    restore_best: bool = True,
    log_path: str | Path | None = None,
    progress: Any = None,
) -> list[FitResult]:
    """Train ``models[m]`` as ``members[m]`` describes, all at once; one :class:`FitResult` each.

    The arguments mean what they mean in :func:`softtargets.train.fit`; ``members`` adds what
    differs between models. Each result's ``model`` is ``models[m]`` itself, trained in place as
    ``fit`` trains its model, holding that member's weights (of its best validation epoch with
    ``val`` and ``restore_best``).

    Models are trained in stacks (:func:`stack_groups`): MLPs of one depth whose widths are close
    share one stack, zero-padded to its widest member; very different widths, depths or dropout
    rates go to separate stacks, trained one after another.
    """
    members = list(members) if members is not None else [Member(seed=i) for i in range(len(models))]
    if len(members) != len(models) or not models:
        raise SoftTargetsError("fit_many needs one Member per model (and at least one model)")
    if data.weights is not None:
        raise SoftTargetsError("fit_many does not take row weights; use fit() for weighted rows")
    check_lengths(epochs, batch_size)
    settings = dict(
        val=val,
        test=test,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        schedule=schedule,
        device=device,
        patience=patience,
        restore_best=restore_best,
        log_path=log_path,
        progress=progress,
    )
    results: list[FitResult | None] = [None] * len(models)
    for group in stack_groups(models, batch_size):
        stacked = _fit_stack(
            [models[i] for i in group], data, [members[i] for i in group], **settings
        )
        for i, result in zip(group, stacked, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def stack_groups(
    models: Sequence[nn.Module], batch_size: int = 128, step_overhead: float = 1.2e8
) -> list[list[int]]:
    """Which models to train in one stack: lists of positions in ``models``, each in order.

    Padding a narrow MLP to a wide one wastes its arithmetic; a separate stack costs a step's
    fixed work again (the loss, the optimizer, Python: about 0.6 ms here, the time of
    ``step_overhead`` = 1.2e8 FLOPs of matmul at 200 GFLOP/s). Models of one depth, input, output
    and dropout rate are sorted by size and cut into the runs that minimise the estimated cost,
    ``sum over stacks (step_overhead + members x padded FLOPs per step)`` (dynamic programming over
    the distinct width lists). A width sweep of 1 to 256 (10 models each) becomes two stacks,
    1-32 and 64-256: 1.7x faster than one padded stack (measured on MNIST-1D-sized data).
    """
    kinds: dict[tuple, dict[tuple[int, ...], list[int]]] = {}
    for i, model in enumerate(models):
        linears, dropout = mlp_layers(model)
        sizes = (linears[0].in_features, *(lin.out_features for lin in linears))
        kind = (len(sizes), sizes[0], sizes[-1], dropout)
        kinds.setdefault(kind, {}).setdefault(sizes, []).append(i)

    def step_flops(sizes: Sequence[int]) -> float:  # forward and backward, one member
        return 6.0 * batch_size * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    groups = []
    for by_sizes in kinds.values():
        shapes = sorted(by_sizes, key=step_flops)
        # best[j]: least cost of stacking shapes[:j]; start[j]: where its last stack begins
        best, start = [0.0] + [math.inf] * len(shapes), [0] * (len(shapes) + 1)
        for j in range(1, len(shapes) + 1):
            for i in range(j):
                padded = [max(column) for column in zip(*shapes[i:j], strict=True)]
                count = sum(len(by_sizes[shape]) for shape in shapes[i:j])
                cost = best[i] + step_overhead + count * step_flops(padded)
                if cost < best[j]:
                    best[j], start[j] = cost, i
        j = len(shapes)
        while j > 0:
            groups.append(sorted(i for shape in shapes[start[j] : j] for i in by_sizes[shape]))
            j = start[j]
    return sorted(groups)


def _fit_stack(
    models: Sequence[nn.Module],
    data: Dataset,
    members: Sequence[Member],
    *,
    val: Dataset | None,
    test: Dataset | None,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    schedule: str,
    device: torch.device | str | None,
    patience: int | None,
    restore_best: bool,
    log_path: str | Path | None,
    progress: Any,
) -> list[FitResult]:
    """:func:`fit_many` for models that form one :class:`StackedMLP`."""
    started = time.perf_counter()
    device = resolve_device(device)
    net = StackedMLP(models).to(device)
    if net.in_features != data.num_features or net.out_features != data.num_classes:
        raise SoftTargetsError(
            f"the models map {net.in_features} features to {net.out_features} classes; the data "
            f"has {data.num_features} features and {data.num_classes} classes"
        )
    targets = StackedTargets.for_members(members, data).to(device)
    batches = _Batches(members, data, batch_size, device)
    rates = _LearningRates(
        [m.lr if m.lr is not None else lr for m in members],
        schedule,
        [epochs * steps for steps in batches.steps_per_member],
    )
    decay = [m.weight_decay if m.weight_decay is not None else weight_decay for m in members]
    opt = StackedOptimizer(list(net.parameters()), optimizer, decay, momentum)
    tracker = _Selection(models, members, patience, log_path)
    best = [p.detach().clone() for p in net.parameters()]  # each member's best weights so far
    val_dev = None if val is None else val.to(device)
    test_dev = None if test is None else test.to(device)
    task = (
        progress.add_task(f"training {len(models)} models at once", total=epochs)
        if progress
        else None
    )

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(members[0].seed)
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            net.train()
            train_loss = _train_epoch(net, opt, targets, batches, rates, tracker.running)
            scores = _scores(net, val_dev), _scores(net, test_dev)
            seconds = time.perf_counter() - epoch_start  # of the whole stack: the members share it
            improved = tracker.end_epoch(epoch, train_loss, scores, seconds, rates)
            if improved and restore_best:
                with torch.no_grad():
                    rows = torch.tensor(improved, device=device)
                    for b, p in zip(best, net.parameters(), strict=True):
                        b.index_copy_(0, rows, p.index_select(0, rows))
            if task is not None:
                progress.update(task, advance=1)
            if not any(tracker.running):
                break

    with torch.no_grad():
        for m, result in enumerate(tracker.results):
            if val is not None and restore_best and not result.diverged and result.best_epoch:
                for b, p in zip(best, net.parameters(), strict=True):
                    p[m] = b[m]
            else:
                result.best_epoch = len(result.history)
    share = (time.perf_counter() - started) / len(models)  # one clock reading: equal shares
    for m, result in enumerate(tracker.results):
        result.model = net.load_member(m, models[m])  # trained in place, as fit() does
        result.seconds = share
    if task is not None:
        progress.remove_task(task)
    return tracker.results


class _Batches:
    """Each member's shuffled batches of one epoch, laid out for the stacked step.

    Members draw their own batch order from their own generator, exactly as ``fit`` does, and are
    padded to the longest member's number of steps (padding rows get weight 0).
    """

    def __init__(
        self, members: Sequence[Member], data: Dataset, batch_size: int, device: torch.device
    ) -> None:
        self.rows_per_member = [
            torch.arange(len(data)) if m.rows is None else torch.as_tensor(m.rows).long()
            for m in members
        ]
        if min(len(r) for r in self.rows_per_member) == 0:
            raise SoftTargetsError("every member needs at least one training row")
        self.steps_per_member = [math.ceil(len(r) / batch_size) for r in self.rows_per_member]
        self.steps = max(self.steps_per_member)
        self.batch_size, self.num_rows, self.device = batch_size, len(data), device
        self.generators = [torch.Generator().manual_seed(m.seed) for m in members]
        self.features = data.features.reshape(len(data), -1).to(device)
        self.batch_features = self.features.new_empty(
            len(members) * batch_size, self.features.shape[1]
        )
        self.rows_seen = torch.tensor([len(r) for r in self.rows_per_member], device=device)

    def draw(self) -> None:
        """Shuffle for a new epoch: per step, every member's data rows and target-table rows
        ``(S, M * B)``, row weights ``(M, S, B)`` (a batch mean per member) and row counts."""
        count, steps, size = len(self.generators), self.steps, self.batch_size
        order, valid = _padded_orders(self.rows_per_member, self.generators, steps * size)
        order, valid = order.to(self.device), valid.to(self.device).float()
        self.data_rows = _rows_by_step(order, steps)
        self.table_rows = _rows_by_step(order, steps, offset=self.num_rows)
        self.counts = valid.view(count, steps, size).sum(2)  # (M, S); 0 once a member is done
        self.weights = valid.view(count, steps, size) / self.counts.clamp_min(1)[..., None]
        self.counts_by_step = self.counts.T.tolist()  # (S, M), on the host

    def features_of(self, step: int) -> Tensor:
        """The stacked input batch of ``step``: ``(M, B, features)``."""
        torch.index_select(self.features, 0, self.data_rows[step], out=self.batch_features)
        return self.batch_features.view(len(self.generators), self.batch_size, -1)


class _LearningRates:
    """Each member's learning rate step by step, as ``fit``'s schedule gives it."""

    def __init__(self, base: list[float], schedule: str, total_steps: list[int]) -> None:
        self.base, self.schedule, self.total_steps = base, schedule, total_steps
        self.taken = [0] * len(base)  # optimizer steps each member has taken

    def for_step(self, active: list[bool]) -> list[float]:
        """The rates of this step; members that are ``active`` move on by one step."""
        rates = [
            base * lr_factor(self.schedule, taken, total)
            for base, taken, total in zip(self.base, self.taken, self.total_steps, strict=True)
        ]
        self.taken = [taken + on for taken, on in zip(self.taken, active, strict=True)]
        return rates

    def last(self, m: int) -> float:
        """Member ``m``'s rate at its last step (what ``fit`` records for an epoch)."""
        return self.base[m] * lr_factor(self.schedule, self.taken[m] - 1, self.total_steps[m])


def _train_epoch(
    net: StackedMLP,
    opt: StackedOptimizer,
    targets: StackedTargets,
    batches: _Batches,
    rates: _LearningRates,
    running: list[bool],
) -> list[float]:
    """One epoch of every running member; each member's mean training loss."""
    batches.draw()
    loss_sum = torch.zeros(len(running), device=batches.device)
    for s in range(batches.steps):
        active = [c > 0 and r for c, r in zip(batches.counts_by_step[s], running, strict=True)]
        step_rates = rates.for_step(active)
        logits = net.train_forward(batches.features_of(s))
        value, grad = targets.loss(logits, batches.table_rows[s], batches.weights[:, s])
        net.train_backward(grad)
        opt.step(step_rates, active)
        loss_sum.addcmul_(value, batches.counts[:, s])
    return (loss_sum / batches.rows_seen).tolist()


class _Selection:
    """Per member: the epoch records, divergence, early stopping and the best validation epoch,
    with ``fit``'s rules (best = highest validation accuracy, ties broken by validation NLL)."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        members: Sequence[Member],
        patience: int | None,
        log_path: str | Path | None,
    ) -> None:
        self.results = [FitResult(model=model) for model in models]
        self.members, self.patience, self.log_path = members, patience, log_path
        self.running = [True] * len(models)  # neither stopped early nor diverged
        self.best_score = [(-math.inf, -math.inf)] * len(models)
        self.stale = [0] * len(models)

    def end_epoch(
        self,
        epoch: int,
        train_loss: list[float],
        scores: tuple[Any, Any],
        seconds: float,
        rates: _LearningRates,
    ) -> list[int]:
        """Record the epoch for every running member; the members whose validation score is
        their best so far (their weights should be kept)."""
        (val, test), improved = scores, []
        for m, result in enumerate(self.results):
            if not self.running[m]:
                continue
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": train_loss[m],
                "lr": float(rates.last(m)),
            }
            if val is not None:
                record["val_accuracy"], record["val_nll"] = val[0][m], val[1][m]
            if test is not None:
                record["test_accuracy"], record["test_nll"] = test[0][m], test[1][m]
            record["seconds"] = seconds
            result.history.append(record)
            if self.log_path is not None:
                append_jsonl(self.log_path, {**(self.members[m].log or {}), **record})
            if not math.isfinite(train_loss[m]):
                result.diverged, self.running[m] = True, False
            elif val is not None:
                score = (record["val_accuracy"], -record["val_nll"])
                if score > self.best_score[m]:
                    self.best_score[m], result.best_epoch, self.stale[m] = score, epoch, 0
                    improved.append(m)
                else:
                    self.stale[m] += 1
                    if self.patience is not None and self.stale[m] >= self.patience:
                        result.stopped_early, self.running[m] = True, False
        return improved


@torch.no_grad()
def _scores(net: StackedMLP, data: Dataset | None) -> tuple[list[float], list[float]] | None:
    """Per member accuracy and NLL on ``data`` (all members see the same rows)."""
    if data is None:
        return None
    net.eval()
    correct = torch.zeros(len(net.weights[0]), device=data.features.device)
    nll = torch.zeros_like(correct)
    chunk = 512  # the evaluation buffers hold M x chunk x width floats per layer
    for start in range(0, len(data), chunk):
        x = data.features[start : start + chunk]
        logits = net.infer(x.reshape(len(x), -1))
        labels = data.labels[start : start + chunk].expand(logits.shape[0], -1)
        correct += (logits.argmax(-1) == labels).sum(1)
        nll += F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)
    return (correct / len(data)).tolist(), (nll / len(data)).tolist()
