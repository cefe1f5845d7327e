"""Metrics on logits: accuracy, error count, NLL, calibration, agreement.

All take ``logits (N, K)`` and ``labels (N,)`` tensors and return Python floats or ints, so they
can go straight into a JSON line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from softtargets.data import streams
from softtargets.data.dataset import Dataset
from softtargets.errors import SoftTargetsError
from softtargets.store.label import predict_logits
from softtargets.store.store import SoftTargetStore
from softtargets.training.common import _classes_of, check_not_empty, resolve_device
from softtargets.training.objectives import check_output_width


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


def evaluate(
    model: nn.Module,
    data: Dataset | TorchDataset,
    reference: nn.Module | SoftTargetStore | Tensor | None = None,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Accuracy, error count, NLL, ECE and (with a ``reference``) agreement on ``data``.

    ``data`` is in memory or streamed (``(x, label, id)`` items). ``reference`` is another model,
    a store (looked up by id) or ``(N, K)`` logits aligned with ``data``; agreement is the
    fraction of rows where both predict the same class.
    """
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    check_not_empty(data, "evaluation data")
    if streams.is_stream(data):
        if reference is not None and not isinstance(reference, nn.Module | SoftTargetStore):
            raise SoftTargetsError("for streamed data the reference is a model or a store")
        reference_model = reference if isinstance(reference, nn.Module) else None
        logits, labels, ids, ref = streams.predict(
            model, data, batch_size, device, reference_model, num_workers
        )
        num_classes = _classes_of(data) or logits.shape[1]
        check_output_width(logits, num_classes)
        if isinstance(reference, SoftTargetStore):
            ref = reference.logits_for(ids).to(device)
        if ref is not None:
            check_output_width(ref, num_classes)
        return classification_report(logits, labels, ref)
    logits = predict_logits(model, data.features, batch_size, device)
    check_output_width(logits, data.num_classes)
    ref = None
    if isinstance(reference, nn.Module):
        ref = predict_logits(
            reference, data.features, batch_size, next(reference.parameters()).device
        ).to(device)
    elif isinstance(reference, SoftTargetStore):
        ref = reference.logits_for(data).to(device)
    elif reference is not None:
        ref = torch.as_tensor(reference).to(device)
        if ref.shape != logits.shape:
            raise SoftTargetsError(
                f"reference logits have shape {tuple(ref.shape)}, the model's {tuple(logits.shape)};"
                " give one row per sample of the data, one column per class"
            )
    if ref is not None:
        check_output_width(ref, data.num_classes)
    return classification_report(logits, data.labels.to(device), ref)
