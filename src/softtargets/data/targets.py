"""Making and checking soft targets.

A soft target is a row of class probabilities, shape ``(N, K)``. They come from a teacher's logits
(:func:`soften`), from counts of aggregated observations (:func:`from_counts`), from label smoothing
(:func:`smooth`) or from mixing two sources (:func:`mix`). :func:`validate` checks any of them and
raises :class:`~softtargets.errors.SoftTargetsError` with a one-line message naming the problem.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from softtargets.config import TEMPERATURE_RANGE, chunk_rows
from softtargets.errors import SoftTargetsError

#: Rows of a probability matrix must sum to 1 within this absolute tolerance. Loose enough for
#: proportions rounded to three decimals in a CSV file, tight enough to catch unnormalised scores.
SUM_TOLERANCE = 1e-3


def _as_tensor(values: Tensor | np.ndarray | list, name: str) -> Tensor:
    """Convert array-likes to a floating tensor, keeping float64 if given."""
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise SoftTargetsError(f"{name} must be numbers (got {type(values).__name__})") from None
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise SoftTargetsError(f"{name} must be real numbers, got {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float if it is in :data:`TEMPERATURE_RANGE`, else raise."""
    try:
        t = math.nan if isinstance(temperature, bool) else float(temperature)
    except (TypeError, ValueError):
        t = math.nan
    low, high = TEMPERATURE_RANGE
    if not math.isfinite(t) or not low <= t <= high:
        raise SoftTargetsError(
            f"temperature must be a number from {low:g} to {high:g}, got {temperature!r}; use T=1 "
            "for the plain softmax and T>1 to soften it"
        )
    return t


def check_finite(tensor: Tensor, name: str, fix: str) -> None:
    """Raise, naming the first bad row, if ``tensor`` (rows first) holds NaN or inf.

    A chunk of rows is checked at a time (``limits.CHUNK_NUMBERS``), so the check's mask stays
    small for a large store (100k rows x 1,000 classes would otherwise take a 100 MB mask).
    """
    per_row = max(1, tensor[:1].numel())
    chunk = chunk_rows(per_row)
    for start in range(0, max(len(tensor), 1), chunk):
        bad = ~torch.isfinite(tensor[start : start + chunk])
        if bad.any():
            row = start + int(bad.nonzero()[0, 0])
            raise SoftTargetsError(f"{name}: row {row} holds NaN or inf; {fix}")


def _check_matrix(tensor: Tensor, name: str, num_classes: int | None) -> None:
    if tensor.ndim != 2:
        raise SoftTargetsError(
            f"{name} must be a 2-D matrix (rows x classes), got shape {tuple(tensor.shape)}; "
            "reshape to (N, K)"
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise SoftTargetsError(
            f"{name} is empty (shape {tuple(tensor.shape)}); pass at least one row and one class"
        )
    if num_classes is not None and tensor.shape[1] != num_classes:
        raise SoftTargetsError(
            f"{name} has {tensor.shape[1]} columns but the data has {num_classes} classes; "
            "give one column per class, in the data's class order"
        )


def soften(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Temperature softmax ``q_i = exp(z_i / T) / sum_j exp(z_j / T)``.

    Args:
        logits: ``(N, K)`` (or any ``(..., K)``) finite logits.
        temperature: ``T > 0``; higher ``T`` gives softer targets.

    Returns:
        ``(N, K)`` probabilities in float32 (or the logits' dtype if float64). Stable for any
        finite logits: the softmax subtracts each row's maximum before exponentiating.
    """
    t = check_temperature(temperature)
    logits = _as_tensor(logits, "logits")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise SoftTargetsError(
            f"logits must have a class dimension, got shape {tuple(logits.shape)}; pass (N, K)"
        )
    check_finite(
        logits.reshape(-1, logits.shape[-1]),
        "logits",
        "check the teacher's outputs (a diverged teacher gives NaN logits)",
    )
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    # Shift by the row maximum *before* dividing by T: (z - max) / T is <= 0 for any T > 0, so a
    # tiny T gives -inf (probability 0) and 0 (the maximum), never inf - inf = NaN.
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return torch.softmax(shifted / t, dim=-1)


def validate(
    probs: Tensor | np.ndarray,
    num_classes: int | None = None,
    *,
    atol: float = SUM_TOLERANCE,
    name: str = "soft targets",
) -> Tensor:
    """Check that ``probs`` is an ``(N, K)`` matrix of probability rows and return it as a tensor.

    Raises :class:`SoftTargetsError` for: not 2-D, empty, a column count other than
    ``num_classes``, NaN or inf, a negative entry, or a row whose sum differs from 1 by more than
    ``atol``.
    """
    tensor = _as_tensor(probs, name)
    _check_matrix(tensor, name, num_classes)
    check_finite(tensor, name, "remove or fill the missing values")
    negative = tensor < 0
    if negative.any():
        row, col = (int(i) for i in negative.nonzero()[0])
        raise SoftTargetsError(
            f"{name}: row {row}, class {col} is negative ({float(tensor[row, col]):.4g}); "
            "probabilities must be >= 0 (use from_counts() for counts, soften() for logits)"
        )
    sums = tensor.sum(dim=1, dtype=torch.float64)
    off = (sums - 1).abs() > atol
    if off.any():
        row = int(off.nonzero()[0, 0])
        raise SoftTargetsError(
            f"{name}: row {row} sums to {float(sums[row]):.6g}, not 1 (tolerance {atol:g}); "
            "normalise each row (P / P.sum(1, keepdims=True)) or pass counts to from_counts()"
        )
    return tensor


def from_counts(
    counts: Tensor | np.ndarray, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Turn per-row class counts into proportions and row weights.

    A row that aggregates ``n`` observations, ``c_k`` of them in class ``k``, has the soft target
    ``c_k / n`` and the weight ``n``: fitting soft cross-entropy with these weights is the maximum
    likelihood fit of a multinomial model to the original observations.

    Args:
        counts: ``(N, K)`` non-negative counts (integers or floats).
        num_classes: if given, the required number of columns.

    Returns:
        ``(proportions (N, K), weights (N,))``.
    """
    tensor = _as_tensor(counts, "counts")
    _check_matrix(tensor, "counts", num_classes)
    check_finite(tensor, "counts", "remove the row or replace the missing count")
    negative = tensor < 0
    if negative.any():
        row, col = (int(i) for i in negative.nonzero()[0])
        raise SoftTargetsError(
            f"counts: row {row}, class {col} is negative ({float(tensor[row, col]):.4g}); "
            "counts must be >= 0"
        )
    totals = tensor.sum(dim=1)
    empty = totals <= 0
    if empty.any():
        row = int(empty.nonzero()[0, 0])
        raise SoftTargetsError(
            f"counts: row {row} has no observations (all counts are 0); drop the row, since it "
            "carries no information"
        )
    return tensor / totals[:, None], totals


def check_labels(labels: Tensor, num_classes: int, rows: int | None = None) -> Tensor:
    """Return ``labels`` if they are ``(N,)`` integer class indices in ``0..num_classes-1``
    (and ``N == rows`` when given); else raise, naming the first bad row."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or (rows is not None and labels.shape[0] != rows):
        want = f"({rows},)" if rows is not None else "(N,)"
        raise SoftTargetsError(
            f"labels must be a vector of class indices of shape {want}, got shape "
            f"{tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise SoftTargetsError(
            f"labels must be integers (class indices), got dtype {labels.dtype}; "
            "convert with labels.long()"
        )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise SoftTargetsError(
            f"labels: row {row} has class {int(labels[row])}, outside 0..{num_classes - 1}; "
            "check num_classes or remap the labels"
        )
    return labels


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(N,)`` integer labels -> ``(N, K)`` float one-hot rows, with a clear error if out of range."""
    labels = check_labels(labels, num_classes)
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.get_default_dtype())


def smooth(labels: Tensor, num_classes: int, eps: float) -> Tensor:
    """Label smoothing: ``(1 - eps) * one_hot + eps / K``.

    Every wrong class gets the same mass ``eps / K``; a teacher's soft targets, by contrast, put
    more mass on the classes that resemble the true one.

    Args:
        labels: ``(N,)`` integer class indices.
        num_classes: ``K``.
        eps: smoothing mass in ``[0, 1]``.

    Returns:
        ``(N, K)`` probabilities.
    """
    if not 0.0 <= float(eps) <= 1.0:
        raise SoftTargetsError(f"smoothing eps must be in [0, 1], got {eps!r}")
    hard = one_hot(labels, num_classes)
    return (1.0 - eps) * hard + eps / num_classes


def mix(p: Tensor, q: Tensor, weight: float) -> Tensor:
    """Convex combination ``weight * p + (1 - weight) * q`` of two ``(N, K)`` probability matrices."""
    if not 0.0 <= float(weight) <= 1.0:
        raise SoftTargetsError(f"mix weight must be in [0, 1], got {weight!r}")
    p = validate(p, name="mix: p")
    q = validate(q, name="mix: q")
    if p.shape != q.shape:
        raise SoftTargetsError(
            f"mix: p has shape {tuple(p.shape)} but q has {tuple(q.shape)}; both must be (N, K) "
            "for the same rows and classes"
        )
    return weight * p + (1.0 - weight) * q


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats of each row of ``(N, K)`` probabilities -> ``(N,)``."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)


def row_matched_smoothing(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` smoothed labels with each row's label probability equal to ``probs``' (at least
    ``1 / K``) and the rest spread evenly over the other classes."""
    n, k = probs.shape
    on = probs[torch.arange(n), labels].clamp_min(1.0 / k)  # (N,)
    out = ((1 - on) / (k - 1))[:, None].expand(n, k).clone()
    out[torch.arange(n), labels] = on
    return out


def shuffle_off_target(probs: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """``(N, K)`` rows with each row's off-target probabilities permuted at random among its
    off-target classes: the label's probability, the entropy and each row's sum stay; which
    wrong classes get the mass does not."""
    n, k = probs.shape
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(n, k, dtype=torch.bool)
    keep[torch.arange(n), labels] = False
    rest = probs[keep].view(n, k - 1)
    order = torch.rand(n, k - 1, generator=g).argsort(1)
    out = probs.clone()
    out[keep] = rest.gather(1, order).flatten()
    return out
