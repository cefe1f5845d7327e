"""Streamed data from the command line (``--stream``): a data file or folder opened lazily, split
by row into parts that keep their classes, and augmentation as tensor operations.

:func:`open_stream` reads an image folder (:class:`~softtargets.data.streams.ImageFolderRows`) or a
``.npy`` file (:class:`~softtargets.data.streams.ArrayRows`, memory-mapped, its label column first
or last). :func:`stream_splits` splits it as :func:`~softtargets.data.dataset.split` splits data in
memory (the same positions for the same labels and seed) into :class:`StreamPart` s, the
training part augmented when asked (:func:`crop_and_flip`, applied per image as it is read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from softtargets.data import streams
from softtargets.data.dataset import split_positions
from softtargets.data.fingerprint import Fingerprinter
from softtargets.errors import SoftTargetsError


class StreamPart(TorchDataset):
    """Rows ``rows`` of a streamed dataset, with its classes, optionally transformed.

    Items are ``(x, label, id)`` with the base dataset's ids, so stored logits line up with any
    part. ``transform`` (an augmentation) applies per row, after the base dataset's reading.
    """

    def __init__(
        self, base: TorchDataset, rows: Tensor, transform: streams.Transform | None = None
    ):
        self.base, self.rows, self.transform = base, rows.long(), transform
        self.class_names = tuple(base.class_names)  # type: ignore[attr-defined]
        self.num_classes = len(self.class_names)
        self.labels = stream_labels(base)[self.rows]
        self.ids = stream_ids(base)[self.rows]  # (rows,) the ids its items carry

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x, label, row_id = self.base[int(self.rows[i])]
        return (self.transform(x) if self.transform else x), label, row_id

    def __getitems__(self, positions: list[int]) -> streams.Batch:
        rows = [int(self.rows[i]) for i in positions]
        if hasattr(self.base, "__getitems__"):
            x, labels, ids = self.base.__getitems__(rows)  # type: ignore[attr-defined]
        else:
            items = [self.base[r] for r in rows]
            x = torch.stack([item[0] for item in items])
            labels = torch.tensor([item[1] for item in items])
            ids = torch.tensor([item[2] for item in items])
        if self.transform is not None:
            x = torch.stack([self.transform(row) for row in x])
        return streams.Batch(x, torch.as_tensor(labels), torch.as_tensor(ids))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self[0][0].shape) if len(self) else ()


def stream_labels(data: TorchDataset) -> Tensor:
    """The labels ``(N,)`` of a streamed dataset, without reading its features."""
    if isinstance(data, StreamPart):
        return data.labels
    if isinstance(data, streams.ArrayRows):
        return torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    if isinstance(data, streams.ImageFolderRows):
        return torch.tensor([label for _, label in data.files], dtype=torch.long)
    if isinstance(data, streams.TensorRows):
        return data.data.labels
    raise SoftTargetsError(f"cannot read the labels of a {type(data).__name__} without its rows")


def stream_ids(data: TorchDataset) -> Tensor:
    """The ids ``(N,)`` a streamed dataset's items carry, without reading its features."""
    if isinstance(data, StreamPart):
        return data.ids
    if isinstance(data, streams.ArrayRows) and data.ids is not None:
        return torch.from_numpy(np.asarray(data.ids, dtype=np.int64))
    if isinstance(data, streams.ArrayRows | streams.ImageFolderRows):
        return torch.arange(len(data))  # their items' ids are their positions
    if isinstance(data, streams.TensorRows):
        return data.data.ids
    raise SoftTargetsError(f"cannot read the ids of a {type(data).__name__} without its rows")


def open_stream(path: str | Path, label_column: str | int | None = None) -> TorchDataset:
    """A data file or folder read lazily: an image folder, or a ``.npy`` file (memory-mapped;
    its labels in column ``label_column``, the last by default)."""
    path = Path(path)
    if path.is_dir():
        return streams.ImageFolderRows(path)
    if path.suffix.lower() == ".npy":
        column = -1 if label_column is None else label_column
        if not isinstance(column, int) and not str(column).lstrip("-").isdigit():
            raise SoftTargetsError(f"{path}: the label column of an .npy is a number, got {column}")
        return streams.ArrayRows(path, int(column))
    raise SoftTargetsError(
        f"--stream reads image folders and .npy files; {path.name} is read into memory without it"
    )


@dataclass
class StreamedData:
    """A streamed dataset's whole (its rows in order, not augmented) with what a run keys and
    reports: the features' fingerprint (one pass over the rows), ids ``(N,)`` and labels
    ``(N,)`` (8 bytes a row each), classes and row shape. Stores check it as they check an
    in-memory dataset."""

    rows: StreamPart
    fingerprint: str
    ids: Tensor
    labels: Tensor
    name: str

    @property
    def num_classes(self) -> int:
        return self.rows.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.rows.class_names

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.rows.feature_shape

    def __len__(self) -> int:
        return len(self.rows)


def describe_stream(base: TorchDataset, name: str, batch_size: int = 512) -> StreamedData:
    """Read every row once for the fingerprints: the same ones a store labelled from these rows
    records (and a bad image is found now, not mid-training)."""
    whole = StreamPart(base, torch.arange(len(base)))  # type: ignore[arg-type]
    hasher: Fingerprinter | None = None
    ids, labels = [], []
    for x, y, i in streams.batches(whole, batch_size, torch.device("cpu")):
        hasher = hasher or Fingerprinter(tuple(x.shape[1:]))
        hasher.update(x, i)
        ids.append(i)
        labels.append(y)
    if hasher is None:
        raise SoftTargetsError(f"{name} has no rows")
    return StreamedData(whole, hasher.hexdigest(), torch.cat(ids), torch.cat(labels), name)


def stream_splits(
    whole: StreamedData,
    val: float,
    test: float,
    seed: int,
    augment: streams.Transform | None = None,
) -> tuple[StreamPart, StreamPart, StreamPart]:
    """``(train, val, test)`` parts, the positions :func:`split` would take; ``augment`` applies
    to the training part only."""
    positions = split_positions(whole.rows.labels, val, test, seed)
    base = whole.rows.base
    return (
        StreamPart(base, positions["train"], augment),
        StreamPart(base, positions["val"]),
        StreamPart(base, positions["test"]),
    )


class CropAndFlip:
    """Random crop with zero padding and a horizontal flip with probability 1/2, for one image
    ``(C, H, W)``: torch operations only, drawn from torch's random stream (each loader worker
    seeds its own). A class, not a closure, so loader workers can be spawned with it."""

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def __call__(self, image: Tensor) -> Tensor:
        pad, (_, height, width) = self.padding, image.shape
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        out = padded[:, top : top + height, left : left + width]
        return out.flip(-1) if bool(torch.rand(()) < 0.5) else out


def crop_and_flip(shape: tuple[int, ...], padding: int | None = None) -> CropAndFlip:
    """:class:`CropAndFlip` for images of ``shape`` ``(C, H, W)``: ``padding`` pixels a side, an
    eighth of the image's shorter side by default (4 for 32x32)."""
    if len(shape) != 3:
        raise SoftTargetsError(
            f"--augment crops and flips images (C, H, W); these rows have shape {shape}"
        )
    return CropAndFlip(max(1, math.ceil(min(shape[1:]) / 8)) if padding is None else padding)


def first_rows(data: Any, count: int) -> Tensor:
    """The features ``(count, ...)`` of a dataset's first rows (in memory or streamed)."""
    if hasattr(data, "features"):
        return data.features[:count]
    batch = data.__getitems__(list(range(min(count, len(data)))))
    return batch[0].float()
