"""Stacked MLPs: ``M`` small MLPs evaluated and trained as one, and the optimizer over them.

:class:`StackedMLP` holds the ``M`` models' layers as ``(M, in, out)`` tensors, so a layer of all
of them is one ``baddbmm``; it runs forward and backward by hand, without autograd, into buffers
allocated once (on the CPU, a step of small models is bound by per-op overhead and by page faults
on fresh tensors, not by arithmetic; ``bench/where_time_goes.py`` shows the split).
:class:`StackedOptimizer` updates each member with its own learning rate, weight decay and
state. :func:`stack_groups` decides which models share a stack. The training loop that uses them
is :func:`softtargets.training.fit_many.fit_many`.

MLPs of similar hidden widths and equal depth share a stack, zero-padded to the widest. The
padding is exact: a padded unit has zero incoming and outgoing weights, so its pre-activation is
0, ReLU'(0) is 0 in PyTorch, and every gradient it receives or sends is 0; Adam, AdamW and SGD
then leave it at exactly 0. (The tests train padded and unpadded models side by side.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.errors import SoftTargetsError

# ---------------------------------------------------------------------------- the stacked model
# ReLU's backward, written into its gradient argument (looked up once: torch.ops is slow to walk)
_relu_backward = torch.ops.aten.threshold_backward.grad_input


def mlp_layers(model: nn.Module) -> tuple[list[nn.Linear], float]:
    """The Linear layers and dropout rate of an :func:`softtargets.training.models.mlp`-shaped model."""
    if not isinstance(model, nn.Sequential):
        raise SoftTargetsError(
            "vectorised training takes MLPs built by softtargets.training.models.mlp (Flatten, then Linear "
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


def stackable(model: nn.Module) -> bool:
    """Whether ``model`` is a plain MLP that :class:`StackedMLP` can train with others."""
    try:
        linears, _ = mlp_layers(model)
    except SoftTargetsError:
        return False
    return bool(linears)


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


# ---------------------------------------------------------------------------- grouping
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
