"""The student of Mandal, Lin and Srikant's theorem: two-layer ReLU networks, many widths at once.

``f(x) = m^(-1/2) sum_r a_r relu(w_r . x)`` with the output weights ``a_r = +-1`` fixed (half of
each sign) and only the first layer ``W`` trained, by full-batch gradient descent at a constant
rate, on the binary cross-entropy to a target probability: the logistic loss for hard labels
(target 0 or 1), the KL divergence to a soft label otherwise (the cross-entropy less the target's
entropy, so both losses reach 0 at a perfect fit). This is the setting their neuron counts are
proved in (arXiv 2412.09579, after Ji and Telgarsky 2020), minus the projection step.

Every width of ``widths`` and every target row of a batch trains in one tensor: the widths' hidden
units sit side by side in one first layer, each width's output summing only its own units
(:func:`_segment_matrix`); they share no parameter, so one gradient step on the sum of their losses
is a step for each. The gradient is written out (no autograd): on a CPU the step is a few
matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from softtargets.errors import SoftTargetsError


@dataclass(frozen=True)
class TwoLayerResult:
    """What one stacked run of :func:`train_two_layer` measured.

    ``mean_train_loss``: (batch, widths), the training loss averaged over all steps (the theorem's
    quantity); ``final_train_loss``: (batch, widths), at the last step; ``val_accuracy``:
    (batch, widths), the sign of ``f`` against ``val_labels`` after the last step.
    """

    widths: tuple[int, ...]
    mean_train_loss: torch.Tensor
    final_train_loss: torch.Tensor
    val_accuracy: torch.Tensor


def _segment_matrix(widths: Sequence[int]) -> torch.Tensor:
    """(sum(widths), len(widths)): column k holds ``a_r / sqrt(m_k)`` for width k's units, else 0."""
    total = sum(widths)
    matrix = torch.zeros(total, len(widths))
    start = 0
    for k, width in enumerate(widths):
        signs = torch.tensor([1.0, -1.0]).repeat(width // 2)
        matrix[start : start + width, k] = signs / math.sqrt(width)
        start += width
    return matrix


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """The entropy of Bernoulli(p), elementwise (0 at p in {0, 1})."""
    q = 1 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q))


def train_two_layer(
    features: torch.Tensor,
    targets: torch.Tensor,
    init_seeds: Sequence[int],
    widths: Sequence[int],
    *,
    steps: int,
    lr: float,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
) -> TwoLayerResult:
    """Train ``len(targets)`` stacks of two-layer networks of every width by gradient descent.

    ``features``: (n, d), rows of unit norm as in the theorem (not enforced); ``targets``:
    (batch, n), each row a target probability of the positive class per training row (0/1 for
    hard labels); ``init_seeds``: (batch,), the seed of each row's initial weights ``W ~ N(0, I)``
    (two rows with one seed start alike: paired arms); ``widths``: even numbers of hidden units;
    ``val_features``: (n_val, d), ``val_labels``: (n_val,) in {0, 1}.
    """
    if any(w < 2 or w % 2 for w in widths):
        raise SoftTargetsError("two-layer widths must be even numbers >= 2 (half +1, half -1)")
    if targets.dim() != 2 or targets.shape[1] != len(features) or len(init_seeds) != len(targets):
        raise SoftTargetsError(
            "train_two_layer needs targets of shape (batch, n) and one seed per target row"
        )
    # Chunks of the batch small enough for the step's (rows, n, units) tensors to stay in the
    # CPU's cache: the step is memory-bound (measured on a 2-core machine at n = 2,000 and 1,022
    # units: 6 rows 113 ms a step, 2 rows 25 ms, 1.5x less per row).
    chunk = max(1, CACHE_ELEMENTS // (len(features) * sum(widths)))
    parts = [
        _train_chunk(
            features, targets[i : i + chunk], init_seeds[i : i + chunk], widths,
            steps=steps, lr=lr, val_features=val_features, val_labels=val_labels,
        )
        for i in range(0, len(targets), chunk)
    ]  # fmt: skip
    return TwoLayerResult(
        tuple(widths),
        *(torch.cat([getattr(p, name) for p in parts]) for name in _MEASURED),
    )


#: the step's tensors hold rows x n x units elements; chunks keep them about this size
CACHE_ELEMENTS = 2_000_000

_MEASURED = ("mean_train_loss", "final_train_loss", "val_accuracy")


def _train_chunk(
    features: torch.Tensor,
    targets: torch.Tensor,
    init_seeds: Sequence[int],
    widths: Sequence[int],
    *,
    steps: int,
    lr: float,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
) -> TwoLayerResult:
    """:func:`train_two_layer` on one chunk of its batch."""
    n, dim = features.shape
    outputs = _segment_matrix(widths)  # (units, widths)
    outputs_t = outputs.T.contiguous()
    weights = torch.stack(
        [
            torch.randn(dim, outputs.shape[0], generator=torch.Generator().manual_seed(int(s)))
            for s in init_seeds
        ]
    )  # (batch, d, units)
    entropy = _binary_entropy(targets).mean(dim=1, keepdim=True)  # (batch, 1)
    target = targets.unsqueeze(-1)  # (batch, n, 1)
    features_t = features.T.contiguous()

    def loss_of(logits: torch.Tensor) -> torch.Tensor:  # (batch, n, widths) -> (batch, widths)
        # the cross-entropy to the target less its entropy: the logistic loss, or the KL
        return (torch.nn.functional.softplus(logits) - target * logits).mean(dim=1) - entropy

    loss_sum = torch.zeros(len(targets), len(widths))
    for _ in range(steps):
        hidden = features @ weights  # (batch, n, units)
        active = hidden > 0
        hidden.relu_()
        logits = hidden @ outputs  # (batch, n, widths)
        loss_sum += loss_of(logits)
        dlogits = (torch.sigmoid(logits) - target) / n
        dhidden = (dlogits @ outputs_t).mul_(active)  # (batch, n, units)
        weights.sub_(lr * (features_t @ dhidden))
    final = torch.relu(features @ weights) @ outputs
    val = torch.relu(val_features @ weights) @ outputs  # (batch, n_val, widths)
    correct = (val > 0) == val_labels.bool().view(1, -1, 1)
    return TwoLayerResult(
        tuple(widths), loss_sum / max(steps, 1), loss_of(final), correct.float().mean(dim=1)
    )


def smallest_width(accuracy: Sequence[float], widths: Sequence[int], target: float) -> float:
    """The width at which ``accuracy`` (one value per width, widths increasing) first reaches
    ``target``, log-interpolated between the two widths around it; the smallest width if the
    first already does, ``inf`` if none does (censored: more than the widest)."""
    for i, value in enumerate(accuracy):
        if value >= target:
            if i == 0:
                return float(widths[0])
            before = accuracy[i - 1]
            share = (target - before) / (value - before)
            low, high = math.log(widths[i - 1]), math.log(widths[i])
            return math.exp(low + share * (high - low))
    return math.inf
