"""The :class:`Dataset` container, splits, subsets and label noise.

A dataset is a handful of aligned tensors: features ``(N, *feature_shape)``, integer labels
``(N,)`` and stable sample ids ``(N,)``; optionally soft targets ``(N, K)``, row weights ``(N,)``
and, for synthetic data, the true Bayes class probabilities ``(N, K)``. Small data stays in memory
and is batched by index, so every operation here is plain tensor indexing.

Ids never change when rows are selected, shuffled or split: they are how stored teacher outputs
line up with any subset. The ``fingerprint`` identifies the features the ids point to; it is
computed once for a freshly built dataset and inherited by every subset of it, so a store made for
the full data is accepted for its splits and refused for different data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softtargets.data.fingerprint import features_fingerprint
from softtargets.data.targets import validate
from softtargets.errors import SoftTargetsError


@dataclass(frozen=True, eq=False)
class Dataset:
    """Aligned tensors for one classification dataset.

    Attributes:
        features: ``(N, *feature_shape)`` float32 inputs.
        labels: ``(N,)`` int64 class indices in ``0..K-1``.
        ids: ``(N,)`` int64 stable sample ids (unique).
        class_names: ``K`` names, index ``k`` naming class ``k``.
        soft_targets: optional ``(N, K)`` probability rows.
        weights: optional ``(N,)`` non-negative row weights.
        true_probs: optional ``(N, K)`` Bayes class probabilities (synthetic data only).
        name: a short description used in reports.
        fingerprint: identifies the features behind the ids (inherited by subsets).
    """

    features: Tensor
    labels: Tensor
    ids: Tensor
    class_names: tuple[str, ...]
    soft_targets: Tensor | None = None
    weights: Tensor | None = None
    true_probs: Tensor | None = None
    name: str = "data"
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for attr in ("labels", "ids", "weights"):
            value = getattr(self, attr)
            if value is not None and (value.ndim != 1 or value.shape[0] != n):
                raise SoftTargetsError(
                    f"Dataset: {attr} has shape {tuple(value.shape)} but there are {n} rows of "
                    f"features; give one {attr[:-1]} per row"
                )
        for attr in ("soft_targets", "true_probs"):
            value = getattr(self, attr)
            if value is not None and (value.ndim != 2 or value.shape[0] != n):
                raise SoftTargetsError(
                    f"Dataset: {attr} has shape {tuple(value.shape)}; expected ({n}, "
                    f"{len(self.class_names)})"
                )
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", features_fingerprint(self.features, self.ids))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        features: np.ndarray | Tensor,
        labels: np.ndarray | Tensor | Sequence[int],
        *,
        ids: np.ndarray | Tensor | None = None,
        class_names: Sequence[str] | None = None,
        soft_targets: np.ndarray | Tensor | None = None,
        weights: np.ndarray | Tensor | None = None,
        name: str = "data",
    ) -> Dataset:
        """Build a dataset from arrays, checking every input.

        Ids default to ``0..N-1``; class names default to ``"0".."K-1"`` with ``K`` one more
        than the largest label (or the soft targets' width).
        """
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
        if x.ndim < 2:
            raise SoftTargetsError(
                f"features must have one row per sample, got shape {tuple(x.shape)}; reshape to "
                "(N, num_features)"
            )
        if not x.is_floating_point():
            x = x.float()
        x = x.float()
        if not torch.isfinite(x).all():
            row = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()[0, 0])
            raise SoftTargetsError(f"features: row {row} holds NaN or inf; clean or drop the row")
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise SoftTargetsError(
                    "labels must be integer class indices; for probability labels pass "
                    "soft_targets= (and labels=soft_targets.argmax(1))"
                )
        y = y.long()
        n = x.shape[0]
        if y.shape != (n,):
            raise SoftTargetsError(
                f"labels have shape {tuple(y.shape)} but features have {n} rows; give one label "
                "per row"
            )
        if n and y.min() < 0:
            raise SoftTargetsError(f"labels: row {int((y < 0).nonzero()[0, 0])} is negative")
        p = None
        if soft_targets is not None:
            p = validate(torch.as_tensor(soft_targets).float())
        k = max(int(y.max()) + 1 if n else 0, p.shape[1] if p is not None else 0)
        if class_names is None and p is None and n:
            present = torch.unique(y)
            if len(present) != k:
                # [0, 1, 0, 1000000] would otherwise make a million classes, most never seen
                raise SoftTargetsError(
                    f"labels use {len(present)} distinct values up to {k - 1}, so classes are "
                    "missing; pass class_names= (one per class, if they exist) or map the labels "
                    "to 0..K-1 with softtargets.data.dataset.encode_labels"
                )
        if class_names is None:
            class_names = [str(i) for i in range(k)]
        class_names = tuple(str(c) for c in class_names)
        if len(class_names) < k:
            raise SoftTargetsError(
                f"{len(class_names)} class names given but labels go up to {k - 1}; give one name "
                "per class"
            )
        if p is not None and p.shape[1] != len(class_names):
            raise SoftTargetsError(
                f"soft targets have {p.shape[1]} columns but there are {len(class_names)} classes"
            )
        i = torch.arange(n) if ids is None else torch.as_tensor(np.asarray(ids)).long()
        if i.shape != (n,) or torch.unique(i).numel() != n:
            raise SoftTargetsError("ids must be one unique integer per row; drop duplicates")
        w = None if weights is None else torch.as_tensor(np.asarray(weights)).float()
        if w is not None and (w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any()):
            raise SoftTargetsError("weights must be one finite, non-negative number per row")
        return cls(x, y, i, class_names, p, w, None, name)

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    @property
    def num_features(self) -> int:
        return int(np.prod(self.feature_shape))

    def __repr__(self) -> str:
        extras = [
            a for a in ("soft_targets", "weights", "true_probs") if getattr(self, a) is not None
        ]
        return (
            f"Dataset({self.name!r}, n={len(self)}, features={self.feature_shape}, "
            f"classes={self.num_classes}{', ' + ', '.join(extras) if extras else ''})"
        )

    # ------------------------------------------------------------------ selection
    def take(self, rows: Tensor | np.ndarray | Sequence[int]) -> Dataset:
        """The rows at positions ``rows`` (not ids), in that order; ids and fingerprint are kept."""
        index = torch.as_tensor(np.asarray(rows) if not isinstance(rows, Tensor) else rows).long()
        index = index.to(self.features.device)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return replace(
            self,
            features=self.features[index],
            labels=self.labels[index],
            ids=self.ids[index],
            soft_targets=pick(self.soft_targets),
            weights=pick(self.weights),
            true_probs=pick(self.true_probs),
        )

    def subset(
        self,
        fraction: float | None = None,
        *,
        indices: Sequence[int] | Tensor | None = None,
        classes: Sequence[int] | None = None,
        relabel: bool = False,
        seed: int = 0,
        stratify: bool = True,
    ) -> Dataset:
        """A subset by ``fraction`` (seeded, stratified by class), by row ``indices``, or by ``classes``.

        ``classes`` keeps the rows of those classes. With ``relabel=True`` the kept classes are
        renumbered ``0..len(classes)-1`` (soft targets and true probabilities are restricted to
        those columns and renormalised); otherwise labels keep their original numbers, as a
        transfer set with a class left out must.
        """
        given = sum(x is not None for x in (fraction, indices, classes))
        if given != 1:
            raise SoftTargetsError("subset: give exactly one of fraction, indices or classes")
        if indices is not None:
            return self.take(indices)
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise SoftTargetsError(f"subset fraction must be in (0, 1], got {fraction}")
            rows = _stratified_pick(self.labels, fraction, seed, stratify)
            return self.take(rows)
        assert classes is not None
        classes = [int(c) for c in classes]
        unknown = [c for c in classes if not 0 <= c < self.num_classes]
        if unknown:
            raise SoftTargetsError(
                f"subset: classes {unknown} do not exist; this data has classes 0..{self.num_classes - 1}"
            )
        keep = torch.isin(self.labels, torch.tensor(classes, device=self.labels.device))
        part = self.take(keep.nonzero().squeeze(1))
        if not relabel:
            return part
        mapping = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.labels.device)
        mapping[torch.tensor(classes)] = torch.arange(len(classes), device=self.labels.device)

        def restrict(p: Tensor | None) -> Tensor | None:
            if p is None:
                return None
            p = p[:, classes]
            return p / p.sum(1, keepdim=True).clamp_min(1e-30)

        return replace(
            part,
            labels=mapping[part.labels],
            class_names=tuple(self.class_names[c] for c in classes),
            soft_targets=restrict(part.soft_targets),
            true_probs=restrict(part.true_probs),
        )

    def with_label_noise(self, rate: float, seed: int = 0) -> Dataset:
        """Symmetric label noise: each label, with probability ``rate``, is replaced by a class drawn
        uniformly from the *other* ``K - 1`` classes. Features, ids and fingerprint are unchanged."""
        if not 0.0 <= rate <= 1.0:
            raise SoftTargetsError(f"label noise rate must be in [0, 1], got {rate}")
        if self.num_classes < 2:
            raise SoftTargetsError("label noise needs at least 2 classes")
        gen = torch.Generator().manual_seed(seed)
        labels = self.labels.cpu()
        flip = torch.rand(len(self), generator=gen) < rate
        # An offset in 1..K-1 added modulo K picks a uniformly random *different* class.
        offset = torch.randint(1, self.num_classes, (len(self),), generator=gen)
        noisy = torch.where(flip, (labels + offset) % self.num_classes, labels)
        return replace(self, labels=noisy.to(self.labels.device), name=f"{self.name}+noise{rate:g}")

    def with_soft_targets(
        self, soft_targets: Tensor | None, weights: Tensor | None = None
    ) -> Dataset:
        """The same rows with soft targets (validated) and optional row weights attached."""
        p = None if soft_targets is None else validate(soft_targets, self.num_classes)
        return replace(
            self, soft_targets=p, weights=weights if weights is not None else self.weights
        )

    def to(self, device: torch.device | str) -> Dataset:
        """Move every tensor to ``device`` (the fingerprint is unchanged)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            features=move(self.features),
            labels=move(self.labels),
            ids=move(self.ids),
            soft_targets=move(self.soft_targets),
            weights=move(self.weights),
            true_probs=move(self.true_probs),
        )


def encode_labels(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices ``0..K-1`` and class names for raw label values, as a file holds them.

    Integers that are already ``0..K-1``, each present, are kept (names ``"0".."K-1"``); other
    integers (``1..10``, ``[3, 7]``, a stray ``99999999``) are mapped in increasing order and keep
    their values as names; anything else (strings) is sorted by name. An empty label is an error.
    """
    raw = np.asarray(values)
    if raw.ndim != 1:
        raise SoftTargetsError(f"labels must be one value per row, got shape {raw.shape}")
    if raw.dtype.kind in "fc":
        if not np.all(np.isfinite(raw)) or not np.array_equal(raw, np.round(raw)):
            raise SoftTargetsError(
                "labels must be integer class indices or names; got fractional or NaN values"
            )
        raw = raw.astype(np.int64)
    if raw.dtype.kind in "iub":
        ints = raw.astype(np.int64)
        unique = np.unique(ints)
        if len(unique) and unique[0] == 0 and unique[-1] == len(unique) - 1:
            return ints, tuple(str(i) for i in range(len(unique)))
        return np.searchsorted(unique, ints), tuple(str(int(u)) for u in unique)
    text = np.array([str(v).strip() for v in raw.tolist()], dtype=object)
    empty = np.flatnonzero(text == "")
    if len(empty):
        raise SoftTargetsError(f"row {int(empty[0])} has an empty label; fill it or drop the row")
    names = sorted(set(text.tolist()))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[v] for v in text], dtype=np.int64), tuple(names)


def align_classes(data: Dataset, reference: Dataset, source: str = "the test data") -> Dataset:
    """``data`` with its labels renumbered to ``reference``'s classes, matched by name.

    For a separate test file: its classes must be among the training data's, and the features
    must have the same shape.
    """
    if data.feature_shape != reference.feature_shape:
        raise SoftTargetsError(
            f"{source} has features of shape {data.feature_shape} but the training data "
            f"{reference.feature_shape}; both files must hold the same kind of sample"
        )
    index = {name: i for i, name in enumerate(reference.class_names)}
    unknown = [name for name in data.class_names if name not in index]
    if unknown:
        raise SoftTargetsError(
            f"{source} has class {unknown[0]!r}, which the training data does not have "
            f"(classes: {', '.join(reference.class_names[:20])})"
        )
    mapping = torch.tensor([index[name] for name in data.class_names], dtype=torch.long)
    labels = mapping[data.labels.cpu()].to(data.labels.device)
    return replace(data, labels=labels, class_names=reference.class_names, soft_targets=None)


def stratified_rows(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Positions of a seeded, class-stratified ``fraction`` of rows (at least one per class)."""
    if not 0.0 < fraction <= 1.0:
        raise SoftTargetsError(f"fraction must be in (0, 1], got {fraction}")
    return _stratified_pick(labels, fraction, seed, stratify=True)


def _stratified_pick(labels: Tensor, fraction: float, seed: int, stratify: bool) -> Tensor:
    """Row positions of a seeded random ``fraction`` of rows, at least one per present class."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    if not stratify:
        n = max(1, round(fraction * len(labels)))
        return torch.randperm(len(labels), generator=gen)[:n].sort().values
    picked = []
    for rows in _rows_by_class(labels):
        n = max(1, round(fraction * len(rows)))
        picked.append(rows[torch.randperm(len(rows), generator=gen)[:n]])
    return torch.cat(picked).sort().values


@dataclass(frozen=True)
class Splits:
    """Train, validation and test parts of one dataset."""

    train: Dataset
    val: Dataset
    test: Dataset


def _rows_by_class(labels: Tensor) -> list[Tensor]:
    """Each present class's rows, ascending, classes in increasing order: one stable sort, not a
    scan of every row per class (1M rows of 100k classes would take 10^11 comparisons)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    return list(order.split(counts[counts > 0].tolist()))


def split_positions(
    labels: Tensor, val: float = 0.1, test: float = 0.2, seed: int = 0, stratify: bool = True
) -> dict[str, Tensor]:
    """The ascending row positions of the ``train``, ``val`` and ``test`` parts of rows with
    ``labels (N,)``: seeded, class-stratified. :func:`split` takes them from a dataset; a streamed
    dataset's parts are the same positions of its rows."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise SoftTargetsError(
            f"split fractions val={val}, test={test} must be >= 0 and sum to less than 1"
        )
    if len(labels) == 0:
        raise SoftTargetsError("split: the data has no rows")
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    groups = [torch.arange(len(labels))] if not stratify else _rows_by_class(labels)
    for rows in groups:
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_test = round(test * len(rows))
        n_val = round(val * len(rows))
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test : n_test + n_val])
        parts["train"].append(rows[n_test + n_val :])
    positions = {k: torch.cat(v).sort().values for k, v in parts.items()}
    if len(positions["train"]) == 0 or (test > 0 and len(positions["test"]) == 0):
        raise SoftTargetsError(
            f"split: {len(labels)} rows are too few for val={val}, test={test}; give more rows "
            "or smaller fractions"
        )
    return positions


def split(
    data: Dataset,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    stratify: bool = True,
) -> Splits:
    """Seeded, class-stratified split into train / validation / test fractions.

    The same ``seed`` always gives the same rows, so every model in a study sees the same test set.
    ``test=0`` gives an empty test part (when the test rows come from another file).
    """
    positions = split_positions(data.labels, val, test, seed, stratify)
    return Splits(**{k: data.take(v) for k, v in positions.items()})


def holdout(data: Dataset, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Positions ``(kept, held_out)`` for a seeded, class-stratified hold-out of ``fraction``."""
    if not 0.0 < fraction < 1.0:
        raise SoftTargetsError(f"validation fraction must be in (0, 1), got {fraction}")
    held = _stratified_pick(data.labels, fraction, seed, stratify=True)
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[held] = False
    kept = mask.nonzero().squeeze(1)
    if len(kept) == 0 or len(held) == 0:
        raise SoftTargetsError(
            f"holding out {fraction:g} of {len(data)} rows leaves no rows to train or to "
            "validate on; give more rows or pass val=None"
        )
    return kept, held
