"""Rows that aggregate many observations: counts become class proportions (the soft targets) and
the number of observations becomes the row's weight, as R's ``glm(cbind(successes, failures))``
takes them; ``aggregate`` and ``expand`` go between raw observations and counted rows."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.validation import column_or_1d

from softtargets.errors import SoftTargetsError


@dataclass(frozen=True)
class Aggregated:
    """Per-observation rows grouped into aggregated rows.

    Attributes:
        features: ``(G, len(by))`` the distinct values of the ``by`` columns, one row per group.
        counts: ``(G, K)`` how many observations of each group fell in each class.
        classes: ``(K,)`` the label values, in column order.
        feature_names: the ``by`` column names.
    """

    features: np.ndarray
    counts: np.ndarray
    classes: np.ndarray
    feature_names: tuple[str, ...]


def _column(frame: Any, name: str) -> np.ndarray:
    columns = list(frame.keys())
    if name not in columns:
        raise SoftTargetsError(
            f"no column named {name!r}; columns are {', '.join(map(str, columns))}"
        )
    return np.asarray(frame[name])


def aggregate(frame: Any, by: Sequence[str], label: str) -> Aggregated:
    """Group per-observation rows by the ``by`` columns and count each ``label`` value per group.

    ``frame`` is anything indexable by column name with ``keys()``: a pandas ``DataFrame`` or a
    dict of arrays. The result fits :class:`~softtargets.training.sklearn.SoftLabelClassifier` directly:
    ``fit(result.features, result.counts)``; :func:`expand` is the inverse.
    """
    if not by:
        raise SoftTargetsError("aggregate needs at least one column in by=[...]")
    keys = np.stack([_column(frame, name) for name in by], axis=1)
    labels = _column(frame, label)
    try:
        keys = keys.astype(np.float64)
    except ValueError:
        raise SoftTargetsError(f"the by columns {list(by)} must be numeric") from None
    if not np.isfinite(keys).all():
        row = int(np.flatnonzero(~np.isfinite(keys).all(1))[0])
        raise SoftTargetsError(f"row {row}: a by column is NaN or inf; fill or drop the row")
    groups, group_of = np.unique(keys, axis=0, return_inverse=True)
    classes, class_of = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(groups), len(classes)), dtype=np.int64)
    np.add.at(counts, (group_of.reshape(-1), class_of.reshape(-1)), 1)
    return Aggregated(groups, counts, classes, tuple(by))


def expand(features: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`aggregate`: one row per observation.

    ``features (G, d)`` and integer ``counts (G, K)`` -> ``(X (N, d), y (N,))`` with ``y`` the
    class index and ``N = counts.sum()``.
    """
    features, counts = np.asarray(features), np.asarray(counts)
    if counts.ndim != 2 or len(features) != len(counts):
        raise SoftTargetsError(
            f"expand needs features (G, d) and counts (G, K) for the same G rows, got "
            f"{features.shape} and {counts.shape}"
        )
    if (counts < 0).any() or not np.allclose(counts, np.round(counts)):
        row = int(np.flatnonzero(((counts < 0) | (counts != np.round(counts))).any(1))[0])
        raise SoftTargetsError(f"counts: row {row} holds a negative or fractional count")
    counts = np.round(counts).astype(np.int64)
    group = np.repeat(np.arange(len(counts)).repeat(counts.shape[1]), counts.reshape(-1))
    label = np.repeat(np.tile(np.arange(counts.shape[1]), len(counts)), counts.reshape(-1))
    return features[group], label


def soft_label_targets(
    Y: Any, sample_weight: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(targets (n, K), weights (n,), labels or None)`` from labels, probabilities or counts.

    ``labels`` is the 1-D label array when ``Y`` held labels (the caller finds the classes).
    Raises :class:`SoftTargetsError` naming the first bad row.
    """
    Y = np.asarray(Y)
    if Y.ndim == 2 and Y.shape[1] == 1:
        Y = column_or_1d(Y, warn=True)
    if Y.ndim == 1:
        return np.empty((len(Y), 0)), _weights(sample_weight, len(Y)), Y
    if Y.ndim != 2 or Y.shape[1] < 2:
        raise SoftTargetsError(f"Y must be labels (n,) or a matrix (n, K>=2), got shape {Y.shape}")
    if not np.issubdtype(Y.dtype, np.number):
        raise SoftTargetsError("a 2-D Y must hold numbers (probabilities or counts)")
    Y = Y.astype(np.float64)
    bad = ~np.isfinite(Y)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise SoftTargetsError(f"Y: row {row}, column {col} is NaN or inf; fill or drop the row")
    if (Y < 0).any():
        row, col = np.argwhere(Y < 0)[0]
        raise SoftTargetsError(
            f"Y: row {row}, column {col} is negative ({Y[row, col]:g}); counts "
            "and probabilities must be >= 0"
        )
    totals = Y.sum(1)
    weights = _weights(sample_weight, len(Y))
    if np.allclose(Y, np.round(Y)) and not np.allclose(totals, 1.0, atol=1e-3):
        empty = np.flatnonzero(totals == 0)
        if len(empty):
            raise SoftTargetsError(
                f"Y: row {empty[0]} has no observations (all counts are 0); drop it"
            )
        return Y / totals[:, None], weights * totals, None
    off = np.flatnonzero(np.abs(totals - 1.0) > 1e-3)
    if len(off):
        raise SoftTargetsError(
            f"Y: row {off[0]} sums to {totals[off[0]]:.6g}, not 1; give probabilities that sum to "
            "1, or integer counts"
        )
    return Y / totals[:, None], weights, None


def _weights(sample_weight: Any, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if w.shape != (n,):
        raise SoftTargetsError(f"sample_weight has {w.size} values for {n} rows; give one per row")
    if not np.isfinite(w).all() or (w < 0).any():
        raise SoftTargetsError("sample_weight must be finite and >= 0")
    return w


def read_columns(path: str | Path, names: list[str]) -> np.ndarray:
    """The named numeric columns of a CSV with a header -> ``(rows, len(names))`` float64."""
    path = Path(path)
    if not path.exists():
        raise SoftTargetsError(f"no such file: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise SoftTargetsError(
            f"{path} is not UTF-8 text (a Latin-1 export?); save it as UTF-8 CSV"
        ) from None
    except csv.Error as err:
        raise SoftTargetsError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise SoftTargetsError(f"{path} is empty; it needs a header row")
    header = [h.strip() for h in rows[0]]
    missing = [n for n in names if n not in header]
    if missing:
        raise SoftTargetsError(
            f"{path}: no column named {missing[0]!r}; columns are {', '.join(header[:20])}{' ...' if len(header) > 20 else ''}"
        )
    at = [header.index(n) for n in names]
    values = np.empty((len(rows) - 1, len(names)))
    for r, row in enumerate(rows[1:]):
        for j, i in enumerate(at):
            try:
                values[r, j] = float(row[i])
            except (ValueError, IndexError):
                raise SoftTargetsError(
                    f"{path}: line {r + 2}, column {names[j]!r} is not a number "
                    f"({row[i] if i < len(row) else ''!r})"
                ) from None
    bad = ~np.isfinite(values)
    if bad.any():
        r, j = np.argwhere(bad)[0]
        raise SoftTargetsError(f"{path}: line {r + 2}, column {names[j]!r} is NaN or inf")
    return values
