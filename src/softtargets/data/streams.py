"""Streamed data: a ``torch.utils.data.Dataset`` of ``(x, label, id)`` items, batched by a
``DataLoader``, for data that should not (or cannot) sit in memory as one tensor: images read from
disk with random augmentation, memory-mapped arrays larger than RAM.

:func:`~softtargets.training.fit.fit`, :func:`~softtargets.training.metrics.evaluate` and
:func:`~softtargets.store.label.label` take such a dataset wherever they take an in-memory
:class:`~softtargets.data.dataset.Dataset`; the in-memory path (index batching, no ``DataLoader``) stays
the fast default for tensors. Any dataset whose items are ``(x, label, id)`` works; those here add
``num_classes`` and ``class_names`` (which let ``fit`` check the model's outputs):

| class | reads |
| --- | --- |
| :class:`TensorRows` | an in-memory ``Dataset`` (a CIFAR batch, say), with an optional transform |
| :class:`ArrayRows` | features from a memory-mapped ``.npy`` file, a row at a time |
| :class:`ImageFolderRows` | ``root/<class>/<image>``, each image opened when it is needed |

Soft targets for streamed data come from a store (looked up by the items' ids) or from a teacher
run on each batch (``Distillation(teacher_module, T, alpha)``): stored logits belong to the
un-augmented input, so with random augmentation only the online teacher sees what the student
sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from softtargets.config import MAX_IMAGE_PIXELS
from softtargets.data.dataset import Dataset, encode_labels
from softtargets.errors import SoftTargetsError
from softtargets.files import RUN_MANIFEST

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


Transform = Callable[[Tensor], Tensor]


class Batch(tuple):
    """``(x (B, ...), labels (B,), ids (B,))`` built by a dataset's ``__getitems__``: the loader
    passes it through as it is (:func:`collate`)."""

    def __new__(cls, x: Tensor, labels: Tensor, ids: Tensor) -> Batch:
        return super().__new__(cls, (x, labels.long(), ids.long()))

    def __getnewargs__(self) -> tuple[Tensor, Tensor, Tensor]:  # pickled from worker processes
        return tuple(self)  # type: ignore[return-value]


def collate(items: Any) -> Any:
    """``DataLoader``'s ``collate_fn``: a :class:`Batch` as it is, a list of items as usual."""
    from torch.utils.data import default_collate

    return items if isinstance(items, Batch) else default_collate(items)


def is_stream(data: Any) -> bool:
    """Whether ``data`` is a streamed (``torch.utils.data.Dataset``) dataset."""
    return isinstance(data, TorchDataset)


class TensorRows(TorchDataset):
    """An in-memory :class:`Dataset` as items ``(transform(x), label, id)``."""

    def __init__(self, data: Dataset, transform: Transform | None = None) -> None:
        self.data, self.transform = data, transform
        self.num_classes, self.class_names = data.num_classes, data.class_names

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x = self.data.features[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.data.labels[i]), int(self.data.ids[i])

    def __getitems__(self, rows: list[int]) -> Batch:
        """A whole batch at once (the ``DataLoader`` asks for it so): one gather per tensor
        instead of a Python call and a collate per item."""
        index = torch.as_tensor(rows)
        if self.transform is not None:  # augmentation is drawn per sample
            x = torch.stack([self.transform(self.data.features[i]) for i in rows])
        else:
            x = self.data.features.index_select(0, index)
        return Batch(
            x, self.data.labels.index_select(0, index), self.data.ids.index_select(0, index)
        )


class ArrayRows(TorchDataset):
    """Rows of a memory-mapped ``.npy`` file of features ``(N, ...)``, with labels ``(N,)``.

    Only the rows a batch needs are read from disk, so the file may be larger than memory.
    ``labels`` is an array, a ``.npy`` path, or the number of the features file's own label
    column (its first or last: the rest stay a mapped view, never copied); ids default to
    ``0..N-1``. Labels that are not
    ``0..K-1`` become class indices as the in-memory loaders make them. Besides the mapped file it
    keeps 4 bytes a row (the labels; 12 with ids of your own).
    """

    def __init__(
        self,
        features: str | Path,
        labels: str | Path | np.ndarray | int,
        ids: np.ndarray | None = None,
        transform: Transform | None = None,
    ) -> None:
        try:
            self.features = np.load(features, mmap_mode="r", allow_pickle=False)
            if isinstance(labels, int) and not isinstance(labels, bool):
                raw = self._split_label_column(features, labels)
            elif isinstance(labels, str | Path):
                raw = np.load(labels, allow_pickle=False)
            else:
                raw = labels
        except (OSError, ValueError) as err:
            raise SoftTargetsError(f"{features}: not a readable .npy file ({err})") from None
        labels, self.class_names = encode_labels(np.asarray(raw).reshape(-1))
        self.num_classes = len(self.class_names)
        # int32 labels and implicit ids: 4 bytes of bookkeeping a row, whatever the features
        self.labels = labels.astype(np.int32 if self.num_classes < 2**31 else np.int64)
        n = len(self.features)
        if self.features.ndim < 2 or len(self.labels) != n:
            raise SoftTargetsError(
                f"{features}: features {self.features.shape} and {len(self.labels)} labels; "
                "give (N, ...) features and one label per row"
            )
        self.ids = None if ids is None else np.asarray(ids, dtype=np.int64)
        if self.ids is not None and (self.ids.shape != (n,) or len(np.unique(self.ids)) != n):
            raise SoftTargetsError("ids must be one unique integer per row")
        self.transform = transform

    def _split_label_column(self, path: str | Path, column: int) -> np.ndarray:
        """The labels held in column ``column`` (first or last) of the mapped features, which
        become the other columns' view."""
        if self.features.ndim != 2 or self.features.shape[1] < 2:
            raise SoftTargetsError(f"{path}: a label column needs a 2-D array of 2+ columns")
        last = self.features.shape[1] - 1
        if column not in (0, -1, last):
            raise SoftTargetsError(
                f"{path}: a streamed .npy keeps its labels in its first or last column (0 or -1), "
                f"not {column}"
            )
        raw = np.asarray(self.features[:, column])
        self.features = self.features[:, 1:] if column == 0 else self.features[:, :last]
        if np.issubdtype(raw.dtype, np.floating) and not np.all(raw == np.round(raw)):
            raise SoftTargetsError(f"{path}: the label column holds numbers that are not whole")
        return raw.astype(np.int64) if np.issubdtype(raw.dtype, np.floating) else raw

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x = torch.from_numpy(np.array(self.features[i], dtype=np.float32))  # copies one row
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i]), i if self.ids is None else int(self.ids[i])

    def __getitems__(self, rows: list[int]) -> Batch:
        """A whole batch at once: one read of the batch's rows from the mapped file."""
        if self.transform is not None:
            items = [self[i] for i in rows]
            return Batch(
                torch.stack([x for x, _, _ in items]),
                torch.tensor([y for _, y, _ in items]),
                torch.tensor([i for _, _, i in items]),
            )
        index = np.asarray(rows)
        x = torch.from_numpy(np.asarray(self.features[index], dtype=np.float32))
        ids = index if self.ids is None else self.ids[index]
        return Batch(x, torch.from_numpy(self.labels[index]), torch.from_numpy(ids))


class ImageFolderRows(TorchDataset):
    """``root/<class>/<image>`` as items ``(transform(image (3, H, W) in [0, 1]), class, id)``.

    Classes are the sorted folder names, ids the images' positions in sorted order (as
    :func:`softtargets.data.files.load_image_folder` gives them). Images are opened when an item is
    read, so the folder may be larger than memory; ``size=(H, W)`` resizes them.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.root, self.transform, self.size = Path(root), transform, size
        if not self.root.is_dir():
            raise SoftTargetsError(f"{root}: not a folder of class folders")
        # a softtargets run folder inside the data (an --out of old) is not a class
        classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not (p / RUN_MANIFEST).exists()
        )
        self.files: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            files = sorted(
                f for f in (self.root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
            )
            special = next((f for f in files if not f.is_file()), None)
            if special is not None:  # a FIFO named .png would block the loader for ever
                raise SoftTargetsError(
                    f"{special} is not a regular file; remove it from the image folder"
                )
            if not files:
                # an empty class would still take a class index and an output of every model
                raise SoftTargetsError(
                    f"{root}: class folder {name!r} holds no images; add images or remove the "
                    "folder"
                )
            self.files += [(f, label) for f in files]
        if not self.files:
            raise SoftTargetsError(f"{root}: an image folder needs one sub-folder per class")
        self.class_names, self.num_classes = tuple(classes), len(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        from PIL import Image

        path, label = self.files[i]
        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:  # known before decoding
                    raise SoftTargetsError(
                        f"{path} is {image.width} x {image.height} pixels, over "
                        f"{MAX_IMAGE_PIXELS:,}; resize it first"
                    )
                image = image.convert("RGB")
                if self.size is not None:
                    image = image.resize((self.size[1], self.size[0]))
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # PIL's
            # UnidentifiedImageError is an OSError; a bomb far over its limit fails in open
            raise SoftTargetsError(
                f"{path}: not a readable image ({str(err).splitlines()[0]}); remove or replace it"
            ) from None
        x = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            x = self.transform(x)
        return x, label, i


class _Shuffled(Sampler[int]):
    """Each epoch one ``torch.randperm(n, generator)``: exactly the draws of the in-memory path
    (``RandomSampler`` draws one permutation more per epoch, for its remainder)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=self.generator)
        for chunk in order.split(65536):  # Python ints cost 36 bytes each: a chunk at a time
            yield from chunk.tolist()


class _ShuffledShare(Sampler[list[int]]):
    """One process's batches of :class:`_Shuffled`'s order under several processes: each global
    batch of ``batch_size`` rows is dealt out row by row (process ``r`` of ``N`` takes rows
    ``r, r + N, ...``), as :func:`~softtargets.training.fit.fit` deals in-memory batches; a process left
    without a row takes the batch's first (``fit`` gives it weight 0), since every process must
    take every step."""

    def __init__(
        self, n: int, generator: torch.Generator, batch_size: int, rank: int, world: int
    ) -> None:
        self.n, self.generator, self.batch_size = n, generator, batch_size
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator)
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            mine = batch[self.rank :: self.world]
            yield (mine if len(mine) else batch[:1]).tolist()


def share_weight(n: int, batch_size: int, index: int, rank: int, world: int) -> tuple[int, float]:
    """Rows and weight of process ``rank``'s part of global batch ``index``: ``(b, b N / B)``,
    or ``(0, 0.0)`` for a process given a filler row."""
    size = min(batch_size, n - index * batch_size)
    count = len(range(rank, size, world))
    return count, count * world / size


def loader(
    dataset: TorchDataset,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A ``DataLoader`` over ``(x, label, id)`` items: seeded shuffling, pinned memory on CUDA,
    persistent workers when there are workers.

    The order of each epoch is ``torch.randperm(N, generator)`` from a generator seeded with
    ``seed``, as :func:`~softtargets.training.fit.fit` draws it for in-memory data, so the same data gives
    the same batches either way; with ``world > 1`` process ``rank`` gets its share of each
    (:class:`_ShuffledShare`). The workers' base seed comes from a generator of its own (the
    loader would otherwise draw it from the order's generator, or from the global stream).
    """
    order = torch.Generator().manual_seed(seed)
    if shuffle and world > 1:  # this process's share of every global batch
        sharing = _ShuffledShare(len(dataset), order, batch_size, rank, world)
        batching: dict[str, Any] = {"batch_sampler": sharing}
    else:
        batching = {
            "batch_size": batch_size,
            "sampler": _Shuffled(len(dataset), order) if shuffle else None,
        }
    return DataLoader(
        dataset,
        **batching,
        generator=torch.Generator().manual_seed(seed + 1),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def batches(
    dataset: TorchDataset, batch_size: int, device: torch.device, **options: Any
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x (B, ...), labels (B,), ids (B,))`` batches of ``dataset`` on ``device``."""
    return batches_of(loader(dataset, batch_size, device, **options), device)


def batches_of(items: DataLoader, device: torch.device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """A loader's batches as ``(x, labels, ids)`` on ``device`` (ids stay on the CPU, where stores
    look them up), checked as they come."""
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise SoftTargetsError(
                "a streamed dataset's items must be (x, label, id); this one gives "
                f"{type(item).__name__} of {len(item) if hasattr(item, '__len__') else '?'}"
            )
        x, labels, ids = item
        yield (
            x.to(device, non_blocking=True).float(),
            torch.as_tensor(labels).to(device, non_blocking=True).long(),
            torch.as_tensor(ids).long(),
        )


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: TorchDataset,
    batch_size: int,
    device: torch.device,
    reference: nn.Module | None = None,
    num_workers: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Eval-mode logits ``(N, K)``, labels ``(N,)`` and ids ``(N,)`` of a streamed dataset, in its
    order, and the ``reference`` model's logits on the same inputs."""
    modules = [m for m in (model, reference) if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    outputs: list[list[Tensor]] = [[], [], [], []]
    try:
        for x, labels, ids in batches(dataset, batch_size, device, num_workers=num_workers):
            outputs[0].append(model(x).float())
            outputs[1].append(labels)
            outputs[2].append(ids)
            if reference is not None:
                outputs[3].append(reference(x.to(_device_of(reference))).float().to(device))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    if not outputs[0]:
        raise SoftTargetsError("the streamed dataset has no rows; nothing to evaluate")
    logits, labels, ids = (torch.cat(part) for part in outputs[:3])
    return logits, labels, ids, torch.cat(outputs[3]) if reference is not None else None


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
