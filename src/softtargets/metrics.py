"""Metrics on logits: accuracy, error count, NLL, calibration, agreement.

All take ``logits (N, K)`` and ``labels (N,)`` tensors and return Python floats or ints, so they
can go straight into a JSON line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(dim=1) == labels).float().mean())


def error_count(logits: Tensor, labels: Tensor) -> int:
    """Number of misclassified rows (the figure Hinton et al. report for MNIST)."""
    return int((logits.argmax(dim=1) != labels).sum())


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels, in nats."""
    return float(F.cross_entropy(logits.double(), labels))


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins: ``sum_b |B|/N * |acc(B) - conf(B)|``."""
    probs = torch.softmax(logits.double(), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=logits.device)
    # bucketize puts confidence 1.0 in the last bin and keeps bins right-closed, as in Guo et al.
    which = torch.bucketize(confidence, edges[1:-1], right=False)
    # sum_b |B|/N * |acc(B) - conf(B)| = sum_b |sum_{i in B} (conf_i - correct_i)| / N
    gap = torch.zeros(bins, dtype=torch.float64, device=logits.device)
    gap.index_add_(0, which, confidence - correct)
    return float(gap.abs().sum() / max(len(labels), 1))


def agreement(logits: Tensor, reference_logits: Tensor) -> float:
    """Fraction of rows on which two models predict the same class (e.g. student vs teacher)."""
    return float((logits.argmax(dim=1) == reference_logits.argmax(dim=1)).float().mean())


@torch.no_grad()
def predict_logits(
    model: nn.Module, features: Tensor, batch_size: int = 4096, device: torch.device | None = None
) -> Tensor:
    """Run ``model`` in eval mode over ``features (N, ...)`` in batches -> ``(N, K)`` float32 logits
    on ``device`` (default: the model's device). The model's train/eval mode is restored after."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model(features[i : i + batch_size].to(device)).float()
            for i in range(0, len(features), batch_size)
        ]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, 0, device=device)
    return torch.cat(chunks)


def classification_report(
    logits: Tensor, labels: Tensor, reference_logits: Tensor | None = None
) -> dict[str, float]:
    """accuracy, errors, nll, ece and (with a reference) agreement, as one dict."""
    report: dict[str, float] = {
        "accuracy": accuracy(logits, labels),
        "errors": error_count(logits, labels),
        "nll": nll(logits, labels),
        "ece": expected_calibration_error(logits, labels),
    }
    if reference_logits is not None:
        report["agreement"] = agreement(logits, reference_logits)
    return report
