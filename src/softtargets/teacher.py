"""The soft-target store: a teacher's logits, computed once, for every sample id.

:func:`label` runs a teacher over a dataset in inference mode and returns a
:class:`SoftTargetStore`. The store keeps *logits*, not probabilities, so one teacher pass serves
every temperature (:meth:`SoftTargetStore.soften`). It keeps the sample ids, so any subset, shuffle
or split of the data finds its rows, and two fingerprints (the teacher's weights, the data's
features) so that a store is never silently used with another teacher or other data.

On disk a store is one safetensors file: tensors ``logits (N, K)`` and ``ids (N,)`` plus a small
JSON header (format version, fingerprints, class names), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset

from softtargets import streams
from softtargets.data import Dataset, labels_fingerprint
from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_open, atomic_write_bytes, atomic_write_text
from softtargets.limits import chunk_rows
from softtargets.metrics import predict_logits
from softtargets.targets import check_finite
from softtargets.targets import soften as soften_logits

FORMAT = "softtargets.store"
FORMAT_VERSION = 2  # 2: the data fingerprint hashes rows in blocks (data.FINGERPRINT_BLOCK)


def fingerprint_module(module: nn.Module) -> str:
    """A short hash of a module's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class SoftTargetStore:
    """A teacher's logits for a set of sample ids.

    Attributes:
        logits: ``(N, K)`` float32 (or float16) teacher logits.
        ids: ``(N,)`` int64 sample ids, one per row of ``logits``.
        teacher_fingerprint: :func:`fingerprint_module` of the teacher.
        data_fingerprint: the labelled dataset's ``fingerprint``.
        class_names: the ``K`` class names, in column order.
        info: free-form description (teacher name, accuracy, ...), saved in the header.
        labels_fingerprint: :func:`~softtargets.data.labels_fingerprint` of the labelled data
            (``""`` when unknown, as for a store streamed by :func:`label_to_file`): a store
            whose data has the same features but other labels is refused on loading.
        top_indices: for a top-k store, ``(N, k)`` the classes of the kept logits (``logits`` is
            then ``(N, k)``); ``None`` for a full store.
        tail: for a top-k store, ``(N,)`` the logsumexp of each row's other ``K - k`` logits.

    A top-k store keeps each row's ``k`` largest logits exactly and the rest as their logsumexp,
    a form that does not depend on the temperature. Read back (:meth:`dense`), the other classes
    share that mass equally: each gets the logit ``tail - log(K - k)``, so at ``T = 1`` the
    teacher's probabilities of the kept classes and the total of the rest are exact, and at any
    ``T`` the tail is spread uniformly.
    """

    logits: Tensor
    ids: Tensor
    teacher_fingerprint: str
    data_fingerprint: str
    class_names: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)
    labels_fingerprint: str = ""
    top_indices: Tensor | None = None
    tail: Tensor | None = None

    def __post_init__(self) -> None:
        order = torch.argsort(self.ids)
        self._sorted_ids = self.ids[order]
        self._order = order

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1]) if self.top_indices is None else len(self.class_names)

    @property
    def kept(self) -> int:
        """How many logits a row keeps: ``K`` for a full store, ``k`` for a top-k store."""
        return int(self.logits.shape[1])

    def dense(self, rows: Tensor) -> Tensor:
        """The logits ``(B, K)`` float32 of store rows ``rows (B,)`` (positions, not ids); for a
        top-k store the other classes get ``tail - log(K - k)`` each."""
        kept = self.logits.index_select(0, rows).float()
        if self.top_indices is None:
            return kept
        spread = self.tail.index_select(0, rows) - math.log(self.num_classes - self.kept)
        out = spread[:, None].expand(len(rows), self.num_classes).clone()
        return out.scatter_(1, self.top_indices.index_select(0, rows).long(), kept)

    def kept_rows(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A top-k store's rows ``rows (B,)`` as they are kept: logits ``(B, k)`` float32, their
        classes ``(B, k)`` int64 and the tail's logsumexp ``(B,)``."""
        if self.top_indices is None or self.tail is None:
            raise SoftTargetsError("this store keeps every class; kept_rows is for top-k stores")
        return (
            self.logits.index_select(0, rows).float(),
            self.top_indices.index_select(0, rows).long(),
            self.tail.index_select(0, rows).float(),
        )

    def top_k(self, k: int) -> SoftTargetStore:
        """This store keeping each row's ``k`` largest logits (see the class docstring)."""
        k = int(k)
        if not 1 <= k < self.num_classes:
            raise SoftTargetsError(
                f"top_k must be from 1 to {self.num_classes - 1} (the store has "
                f"{self.num_classes} classes), got {k}"
            )
        if self.top_indices is not None and k > self.kept:
            raise SoftTargetsError(f"this store keeps {self.kept} logits a row; k={k} is more")
        chunk = chunk_rows(self.num_classes)
        values, indices, tails = [], [], []
        for start in range(0, len(self), chunk):
            full = self.dense(torch.arange(start, min(start + chunk, len(self))))
            top = full.topk(k, dim=1)
            rest = full.scatter(1, top.indices, float("-inf"))
            values.append(top.values.to(self.logits.dtype))
            indices.append(top.indices.to(torch.int16 if self.num_classes < 2**15 else torch.int32))
            tails.append(torch.logsumexp(rest, dim=1))
        return replace(
            self,
            logits=torch.cat(values),
            top_indices=torch.cat(indices),
            tail=torch.cat(tails),
            info={**self.info, "top_k": k},
        )

    def __repr__(self) -> str:
        return (
            f"SoftTargetStore(n={len(self)}, classes={self.num_classes}, dtype={self.logits.dtype}, "
            f"teacher={self.teacher_fingerprint}, data={self.data_fingerprint})"
        )

    # ------------------------------------------------------------------ checks
    def check(
        self,
        data: Dataset | None = None,
        teacher: nn.Module | None = None,
        labels: bool = False,
    ) -> None:
        """Raise if ``data`` or ``teacher`` is not the one this store was made from.

        ``labels``: also require ``data``'s labels to be those the store was made with (when the
        store knows them). Off for lookups, where a split with noisy labels is legitimate.
        """
        if teacher is not None:
            found = fingerprint_module(teacher)
            if found != self.teacher_fingerprint:
                raise SoftTargetsError(
                    f"this store was made by teacher {self.teacher_fingerprint} but the given "
                    f"teacher is {found}; re-run label() (softtargets teacher) with this teacher"
                )
        if data is not None:
            if data.fingerprint != self.data_fingerprint:
                raise SoftTargetsError(
                    f"this store was made for data {self.data_fingerprint} but the given data is "
                    f"{data.fingerprint} (different features or ids); label this data with the "
                    "teacher again"
                )
            if data.num_classes != self.num_classes:
                raise SoftTargetsError(
                    f"the teacher has {self.num_classes} classes but the data has "
                    f"{data.num_classes}; teacher and data must share their classes"
                )
            if (
                labels
                and self.labels_fingerprint
                and (labels_fingerprint(data) != self.labels_fingerprint)
            ):
                raise SoftTargetsError(
                    "this store was made for data with the same features but other labels; "
                    "label this data with a teacher trained on these labels"
                )

    # ------------------------------------------------------------------ lookup
    def check_finite(self) -> None:
        """Refuse, with one line naming the row, a store whose logits (or top-k tail) hold NaN or
        inf. A store checked before and not changed since (by the tensors' version counters) is
        not read again: ``fit_many`` resolves the same store once per member."""
        tail = self.tail
        state = (id(self.logits), self.logits._version, id(tail), getattr(tail, "_version", None))
        if getattr(self, "_finite_state", None) == state:
            return
        check_finite(self.logits, "teacher logits", "the teacher has diverged; retrain it")
        if tail is not None:
            check_finite(tail[:, None], "teacher tail", "label the data again")
        self._finite_state = state

    def rows_for(self, ids: Tensor) -> Tensor:
        """Row positions of ``ids (M,)`` in this store -> ``(M,)``; raises on unknown ids."""
        ids = ids.to(self._sorted_ids.device).long()
        pos = torch.searchsorted(self._sorted_ids, ids).clamp_max(len(self) - 1)
        found = self._sorted_ids[pos] == ids
        if not bool(found.all()):
            missing = ids[~found]
            raise SoftTargetsError(
                f"{len(missing)} sample ids are not in this store (first: {int(missing[0])}); "
                "label the data that holds them, or use the store made for it"
            )
        return self._order[pos]

    def logits_for(self, data: Dataset | Tensor) -> Tensor:
        """Teacher logits ``(M, K)`` float32 for a dataset (checked) or for ids ``(M,)``, in that order."""
        if isinstance(data, Dataset):
            self.check(data)
            ids = data.ids
        else:
            ids = data
        return self.dense(self.rows_for(ids.cpu()))

    def soften(self, temperature: float = 1.0, data: Dataset | Tensor | None = None) -> Tensor:
        """Soft targets ``(M, K)`` at ``temperature``, for ``data``'s rows (default: every row)."""
        logits = self.dense(torch.arange(len(self))) if data is None else self.logits_for(data)
        return soften_logits(logits, temperature)

    # ------------------------------------------------------------------ files
    def header(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "teacher_fingerprint": self.teacher_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "class_names": json.dumps(list(self.class_names)),
            "info": json.dumps(self.info, sort_keys=True),
            "labels_fingerprint": self.labels_fingerprint,
            "top_k": "" if self.top_indices is None else str(self.kept),
        }

    def save(self, path: str | Path) -> Path:
        """Write the store as safetensors, atomically; returns the path."""
        from safetensors.torch import save

        tensors = {"logits": self.logits.contiguous().cpu(), "ids": self.ids.contiguous().cpu()}
        if self.top_indices is not None:
            tensors["top_indices"] = self.top_indices.contiguous().cpu()
            tensors["tail"] = self.tail.contiguous().cpu()
        blob = save(tensors, metadata=self.header())
        atomic_write_bytes(path, blob)
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        data: Dataset | None = None,
        teacher: nn.Module | None = None,
        mmap: bool = False,
    ) -> SoftTargetStore:
        """Read a store; with ``data`` or ``teacher`` given, refuse one that was made for others.

        ``mmap=True`` maps the logits from the file instead of reading them: rows are read when a
        batch needs them, so a store larger than memory trains (the pages are the page cache's,
        which the system reclaims). The ids are read whole (8 bytes a row).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise SoftTargetsError(
                f"no store at {path}; create one with label() or softtargets teacher"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                names = list(handle.keys())  # noqa: SIM118
                tensors = {k: handle.get_tensor(k) for k in names if not mmap or k != "logits"}
            if mmap and "logits" in names:
                tensors["logits"] = _map_tensor(path, "logits")
        except (SafetensorError, OSError, ValueError) as err:
            raise SoftTargetsError(
                f"{path} is not a readable store ({str(err).splitlines()[0]}); delete it and label "
                "the data again"
            ) from None
        if meta.get("format") != FORMAT or "logits" not in tensors or "ids" not in tensors:
            raise SoftTargetsError(f"{path} is a safetensors file but not a softtargets store")
        if meta.get("version") != str(FORMAT_VERSION):
            raise SoftTargetsError(
                f"{path} is store format version {meta.get('version')}, this softtargets reads "
                f"version {FORMAT_VERSION}; label the data again"
            )
        corrupt = f"{path}: the store is corrupt or was not written by softtargets"
        logits, ids = tensors["logits"], tensors["ids"]
        if logits.dtype not in (torch.float32, torch.float16) or ids.dtype != torch.int64:
            raise SoftTargetsError(
                f"{corrupt} (logits are {logits.dtype}, ids {ids.dtype}; a store holds float32 "
                "or float16 logits and int64 ids); label the data again"
            )
        if logits.ndim != 2 or ids.shape != (logits.shape[0],):
            raise SoftTargetsError(f"{corrupt} (logits and ids do not line up); label again")
        try:
            names = json.loads(meta["class_names"])
            info = json.loads(meta.get("info", "{}"))
            fingerprints = (meta["teacher_fingerprint"], meta["data_fingerprint"])
        except (KeyError, json.JSONDecodeError) as err:
            raise SoftTargetsError(f"{corrupt} (its header lacks {err}); label again") from None
        top_indices, tail = tensors.get("top_indices"), tensors.get("tail")
        if (top_indices is None) != (tail is None) or (
            top_indices is not None
            and (
                top_indices.shape != logits.shape
                or tail.shape != ids.shape
                or top_indices.dtype not in (torch.int16, torch.int32)
                or not 0 <= int(top_indices.min()) <= int(top_indices.max()) < len(names)
            )
        ):
            raise SoftTargetsError(
                f"{corrupt} (its top-k indices or tail are damaged); label again"
            )
        columns = len(names) if top_indices is not None else logits.shape[1]
        if not isinstance(names, list) or len(names) != columns:
            raise SoftTargetsError(
                f"{corrupt} (class names do not match its {logits.shape[1]} columns); label again"
            )
        if torch.unique(ids).numel() != len(ids):
            raise SoftTargetsError(f"{corrupt} (an id appears twice); label the data again")
        check_finite(logits, f"{path}: logits", "the teacher had diverged; label again")
        store = cls(
            logits=logits,
            ids=ids,
            teacher_fingerprint=fingerprints[0],
            data_fingerprint=fingerprints[1],
            class_names=tuple(str(n) for n in names),
            info=info if isinstance(info, dict) else {},
            labels_fingerprint=str(meta.get("labels_fingerprint", "")),
            top_indices=top_indices,
            tail=tail,
        )
        if tail is not None:
            check_finite(tail[:, None], f"{path}: tail", "the teacher had diverged; label again")
        store.check(data, teacher, labels=True)
        return store


@torch.no_grad()
def label(
    teacher: nn.Module,
    data: Dataset | TorchDataset,
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    info: dict[str, Any] | None = None,
    top_k: int | None = None,
) -> SoftTargetStore:
    """Run ``teacher`` once over ``data`` in inference mode and store its logits.

    Args:
        teacher: any module mapping ``(B, *feature_shape)`` to ``(B, K)`` logits.
        data: the rows to label (their ids are kept): an in-memory :class:`Dataset`, or a streamed
            dataset of ``(x, label, id)`` items (:mod:`softtargets.streams`; label it without
            augmentation: stored logits belong to the plain input). The same rows give the same
            store, fingerprints included, either way.
        batch_size: rows per forward pass (large: no gradients are kept).
        dtype: ``torch.float32`` or ``torch.float16`` for the stored logits (float16 halves the
            file; logits are rounded to about 3 significant digits).
        device: where to run the teacher (default: where its parameters are).
        info: extra description saved in the store's header.
        top_k: keep only each row's ``k`` largest logits and the logsumexp of the rest
            (:meth:`SoftTargetStore.top_k`): at ``K = 1,000`` and ``k = 32``, 3.3% of the file.
    """
    if dtype not in (torch.float32, torch.float16):
        raise SoftTargetsError(f"store dtype must be float32 or float16, got {dtype}")
    where = None if device is None else torch.device(device)
    if streams.is_stream(data):
        logits, ids, data_fingerprint, labels_fp = _label_stream(teacher, data, batch_size, where)
        num_classes = getattr(data, "num_classes", logits.shape[1])
        names = getattr(data, "class_names", None) or [str(k) for k in range(num_classes)]
    else:
        logits = predict_logits(teacher, data.features, batch_size, where).cpu()
        ids, data_fingerprint = data.ids.cpu().clone(), data.fingerprint
        num_classes, names, labels_fp = data.num_classes, data.class_names, labels_fingerprint(data)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise SoftTargetsError(
            f"the teacher outputs {tuple(logits.shape[1:])} logits per row but the data has "
            f"{num_classes} classes; use a teacher trained on these classes"
        )
    check_finite(logits, "teacher logits", "the teacher has diverged; retrain it")
    if dtype == torch.float16 and logits.abs().max() > torch.finfo(torch.float16).max:
        raise SoftTargetsError(
            "teacher logits exceed float16's range (65504); store them as float32"
        )
    store = SoftTargetStore(
        logits=logits.to(dtype),
        ids=ids,
        teacher_fingerprint=fingerprint_module(teacher),
        data_fingerprint=data_fingerprint,
        class_names=tuple(str(n) for n in names),
        info=dict(info or {}),
        labels_fingerprint=labels_fp,
    )
    return store if top_k is None else store.top_k(top_k)


def _label_stream(
    teacher: nn.Module, data: TorchDataset, batch_size: int, device: torch.device | None
) -> tuple[Tensor, Tensor, str, str]:
    """A streamed dataset's teacher logits ``(N, K)``, ids ``(N,)`` and the data and labels
    fingerprints, computed on the way as the in-memory dataset's would be."""
    from softtargets.data import Fingerprinter

    device = device or next(teacher.parameters()).device
    hasher: Fingerprinter | None = None
    logits, labels, ids = [], [], []
    was_training = teacher.training
    teacher.eval()
    try:
        for x, y, i in streams.batches(data, batch_size, device):
            if hasher is None:
                hasher = Fingerprinter(tuple(x.shape[1:]))
            hasher.update(x, i)
            logits.append(teacher(x).float().cpu())
            labels.append(y.cpu())
            ids.append(i)
    finally:
        teacher.train(was_training)
    if hasher is None:
        raise SoftTargetsError("the streamed dataset has no rows; nothing to label")
    all_ids, all_labels = torch.cat(ids), torch.cat(labels)
    if torch.unique(all_ids).numel() != len(all_ids):
        raise SoftTargetsError("the streamed dataset gives an id twice; ids must be unique")
    fingerprint = labels_fingerprint(ids=all_ids, labels=all_labels)
    return torch.cat(logits), all_ids, hasher.hexdigest(), fingerprint


def _map_tensor(path: Path, name: str) -> Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped (copy-on-write: the file is never
    written) rather than read."""
    import numpy as np

    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(size))[name]
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    if entry["dtype"] not in dtypes:
        raise ValueError(f"{name} has dtype {entry['dtype']}, which a store does not use")
    start, end = entry["data_offsets"]
    dtype, shape = np.dtype(dtypes[entry["dtype"]]), tuple(entry["shape"])
    if end - start != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{name}'s offsets do not match its shape")
    if end == start:
        return torch.from_numpy(np.empty(shape, dtype=dtype))
    mapped = np.memmap(path, dtype=dtype, mode="c", offset=8 + size + start, shape=shape)
    return torch.from_numpy(mapped)


def _safetensors_header(
    num_rows: int, num_classes: int, dtype: torch.dtype, metadata: dict[str, str]
) -> bytes:
    """The header of a safetensors file holding ``ids (N,) int64`` then ``logits (N, K)``."""
    width = 2 if dtype == torch.float16 else 4
    ids_bytes, logits_bytes = 8 * num_rows, width * num_rows * num_classes
    header = {
        "__metadata__": metadata,
        "ids": {"dtype": "I64", "shape": [num_rows], "data_offsets": [0, ids_bytes]},
        "logits": {
            "dtype": "F16" if dtype == torch.float16 else "F32",
            "shape": [num_rows, num_classes],
            "data_offsets": [ids_bytes, ids_bytes + logits_bytes],
        },
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    return len(blob).to_bytes(8, "little") + blob


@torch.no_grad()
def label_to_file(
    teacher: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_rows: int,
    path: str | Path,
    class_names: Sequence[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    info: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Label data too large for memory: stream ``(features (B, ...), ids (B,))`` batches through
    the teacher and write the store chunk by chunk.

    Memory stays at one batch whatever ``num_rows`` is: each chunk's ids and logits are written at
    their place in the file as they come (the layout is fixed by the header, written first), into
    a temporary file renamed over ``path`` at the end. The data fingerprint is computed on the way,
    equal to the in-memory :class:`~softtargets.data.Dataset` fingerprint of the same rows. Load
    the result with :meth:`SoftTargetStore.load`.

    ``shard=(i, n)``: write only shard ``i`` of ``n`` of the store's rows, those of
    :func:`shard_rows` ``(num_rows, i, n)`` (``batches`` holds exactly them), into the shared
    file ``path + ".partial"``, and say so in a small JSON file beside it; the processes may run
    at once (one per rank under torchrun) or one after another. :func:`finish_shards` then checks
    that every shard is there and renames the whole into ``path``: the same store, fingerprint
    included, as one process labelling every row. Returns the path written (the shard's note
    when sharded).
    """
    if dtype not in (torch.float32, torch.float16):
        raise SoftTargetsError(f"store dtype must be float32 or float16, got {dtype}")
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    header = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "teacher_fingerprint": fingerprint_module(teacher),
        "data_fingerprint": "0" * 16,  # known only at the end; the header keeps room for it
        "class_names": json.dumps(list(class_names)),
        "info": json.dumps(info or {}, sort_keys=True),
        "labels_fingerprint": "",  # the batches carry no labels
    }
    layout = _StoreLayout(num_rows, len(class_names), dtype, dict(header))
    if shard is None:
        with atomic_open(path, "wb") as handle:
            handle.truncate(layout.size)
            hasher = _write_rows(
                handle, layout, teacher, batches, range(num_rows), device, f"num_rows={num_rows}"
            )
            header["data_fingerprint"] = hasher.hexdigest()
            handle.seek(0)
            handle.write(layout.header(header))
        return Path(path)
    index, count = _check_shard(shard)
    rows = shard_rows(num_rows, index, count)
    partial = Path(f"{path}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    # Every shard opens the one file without truncating it (the others may be writing) and sets
    # its size, the same for all; each writes only its own byte ranges.
    if partial.exists() and partial.stat().st_size not in (0, layout.size):
        raise SoftTargetsError(
            f"{partial} exists and is not a shard file of this store; softtargets does not "
            "overwrite it: move it, or write the store elsewhere"
        )
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
    with os.fdopen(fd, "r+b") as handle:
        if handle.seek(0, os.SEEK_END) != layout.size:
            handle.truncate(layout.size)
        expected = f"the {len(rows)} rows of shard {index} of {count} (shard_rows({num_rows}, {index}, {count}))"
        hasher = _write_rows(handle, layout, teacher, batches, rows, device, expected)
        handle.flush()
        os.fsync(handle.fileno())
    note = {
        "shard": [index, count],
        "rows": [rows.start, rows.stop],
        "digests": [d.hex() for d in hasher.block_digests()] if len(rows) else [],
        "feature_shape": list(hasher.feature_shape) if len(rows) else None,
        "num_rows": num_rows,
        "dtype": "float16" if dtype == torch.float16 else "float32",
        "header": header,
    }
    note_path = _shard_note(path, index, count)
    atomic_write_text(note_path, json.dumps(note))
    return note_path


def label_dataset_to_file(
    teacher: nn.Module,
    data: Dataset | TorchDataset,
    path: str | Path,
    batch_size: int = 65536,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """:func:`label_to_file` for a whole dataset (in memory, or streamed: a torch ``Dataset`` of
    ``(x, label, id)``), on every process at once under torchrun.

    Under torchrun each process labels its :func:`shard_rows` and writes them into the one file;
    rank 0 joins the shards (:func:`finish_shards`) when all are written. The store is the one a
    single process makes (same ids and fingerprint): 1M rows on N processes take about 1/N of
    the time. Outside torchrun it is :func:`label_to_file` over every row.
    """
    from softtargets import distributed

    rank, world = distributed.rank(), distributed.world_size()
    names = list(getattr(data, "class_names", None) or [])
    if not names:
        raise SoftTargetsError("the dataset does not name its classes; give it class_names")
    rows = shard_rows(len(data), rank, world) if world > 1 else range(len(data))

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        if isinstance(data, Dataset):
            for start in range(rows.start, rows.stop, batch_size):
                end = min(start + batch_size, rows.stop)
                yield data.features[start:end], data.ids[start:end]
        else:
            part = Subset(data, list(rows))
            for x, _, ids in streams.batches(part, batch_size, torch.device("cpu")):
                yield x, ids

    shard = (rank, world) if world > 1 else None
    written = label_to_file(teacher, chunks(), len(data), path, names, dtype, device, info, shard)
    if world == 1:
        return written
    distributed.barrier()  # every shard written
    if distributed.is_main():
        finish_shards(path, world)
    distributed.barrier()  # the store is in place for every process
    return Path(path)


def shard_rows(num_rows: int, index: int, count: int) -> range:
    """The rows of shard ``index`` of ``count``: whole fingerprint blocks
    (:data:`~softtargets.data.FINGERPRINT_BLOCK` rows), split as evenly as they go; a shard may
    be empty when there are fewer blocks than shards."""
    from softtargets.data import FINGERPRINT_BLOCK

    blocks = -(-num_rows // FINGERPRINT_BLOCK)
    first, last = index * blocks // count, (index + 1) * blocks // count
    return range(min(first * FINGERPRINT_BLOCK, num_rows), min(last * FINGERPRINT_BLOCK, num_rows))


def finish_shards(path: str | Path, count: int) -> Path:
    """Join the ``count`` shards written by ``label_to_file(..., shard=(i, count))`` into the
    store at ``path``: checks that every shard is there and that they agree (teacher, classes,
    rows), writes the header with the whole data's fingerprint and renames the file into place.
    """
    from softtargets.data import Fingerprinter

    notes = []
    for index in range(count):
        note_path = _shard_note(path, index, count)
        if not note_path.exists():
            raise SoftTargetsError(
                f"shard {index} of {count} of {path} is not written yet ({note_path} is missing); "
                "run its labelling, then finish again"
            )
        notes.append(json.loads(note_path.read_text()))
    first = notes[0]
    for note in notes:
        if (note["header"], note["num_rows"], note["dtype"]) != (
            first["header"], first["num_rows"], first["dtype"]
        ):  # fmt: skip
            raise SoftTargetsError(
                f"the shards of {path} were written by different teachers or for different "
                "data; label them again with one teacher"
            )
    expected = [shard_rows(first["num_rows"], i, count) for i in range(count)]
    if [tuple(n["rows"]) for n in notes] != [(r.start, r.stop) for r in expected]:
        raise SoftTargetsError(f"the shards of {path} do not cover its rows; label them again")
    shapes = {tuple(n["feature_shape"]) for n in notes if n["feature_shape"] is not None}
    if len(shapes) > 1:
        raise SoftTargetsError(f"the shards of {path} saw different feature shapes; label again")
    digests = [bytes.fromhex(d) for note in notes for d in note["digests"]]
    header = dict(first["header"])
    header["data_fingerprint"] = Fingerprinter.combine(shapes.pop() if shapes else (), digests)
    dtype = torch.float16 if first["dtype"] == "float16" else torch.float32
    layout = _StoreLayout(
        first["num_rows"], len(json.loads(header["class_names"])), dtype, first["header"]
    )
    partial = Path(f"{path}.partial")
    with open(partial, "r+b") as handle:
        handle.write(layout.header(header))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    for index in range(count):
        _shard_note(path, index, count).unlink()
    return Path(path)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise SoftTargetsError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    return index, count


def _shard_note(path: str | Path, index: int, count: int) -> Path:
    return Path(f"{path}.shard-{index:05d}-of-{count:05d}.json")


@dataclass(frozen=True)
class _StoreLayout:
    """Where a store file of ``num_rows x num_classes`` logits keeps what: header, ids, logits."""

    num_rows: int
    num_classes: int
    dtype: torch.dtype
    metadata: dict[str, str]  # with a placeholder fingerprint of the final one's length

    @property
    def width(self) -> int:
        return 2 if self.dtype == torch.float16 else 4

    def header(self, metadata: dict[str, str] | None = None) -> bytes:
        blob = _safetensors_header(
            self.num_rows, self.num_classes, self.dtype, metadata or self.metadata
        )
        if len(blob) != self.ids_at:
            raise SoftTargetsError("the store header changed length; label the data again")
        return blob

    @property
    def ids_at(self) -> int:
        return len(_safetensors_header(self.num_rows, self.num_classes, self.dtype, self.metadata))

    @property
    def size(self) -> int:
        return self.ids_at + 8 * self.num_rows + self.width * self.num_rows * self.num_classes


def _write_rows(
    handle: Any,
    layout: _StoreLayout,
    teacher: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    rows: range,
    device: torch.device,
    expected: str,
) -> Any:
    """Label ``batches`` (exactly the rows ``rows``) into their byte ranges of an open store file;
    returns the :class:`~softtargets.data.Fingerprinter` of what it wrote."""
    from softtargets.data import Fingerprinter

    hasher: Fingerprinter | None = None
    k, width = layout.num_classes, layout.width
    ids_at = layout.ids_at
    logits_at = ids_at + 8 * layout.num_rows
    written = 0
    was_training = teacher.training
    teacher.eval()
    try:
        # The teacher runs on pieces of limits.CHUNK_NUMBERS logits, whatever the caller's chunk:
        # 65,536 rows at K = 10,000 would otherwise be 2.6 GB of logits at once. With 16 MB
        # pieces the process kept +100 MB at K = 10,000 (freed blocks of that size stay in the C
        # heap; bench/run_all.py's label_peak_mb_in_k).
        piece = chunk_rows(k)
        for features, ids in batches:
            if hasher is None:
                hasher = Fingerprinter(tuple(features.shape[1:]))
            hasher.update(features, ids)
            if written + len(ids) > len(rows):
                raise SoftTargetsError(f"the batches hold more rows than {expected}")
            row = rows.start + written
            handle.seek(ids_at + 8 * row)
            handle.write(ids.to(torch.int64).cpu().contiguous().numpy())
            handle.seek(logits_at + width * k * row)
            for start in range(0, len(ids), piece):
                logits = teacher(features[start : start + piece].to(device)).float().cpu()
                if logits.shape != (min(piece, len(ids) - start), k):
                    raise SoftTargetsError(
                        f"the teacher outputs {tuple(logits.shape[1:])} logits per row but there "
                        f"are {k} classes; use a teacher trained on these classes"
                    )
                check_finite(
                    logits, f"teacher logits (rows from {row + start})", "the teacher has diverged"
                )
                handle.write(logits.to(layout.dtype).contiguous().numpy())  # no bytes copy
            written += len(ids)
    finally:
        teacher.train(was_training)
    if written != len(rows):
        raise SoftTargetsError(f"the batches held {written} rows, not {expected}")
    return hasher if hasher is not None else Fingerprinter(())


def ensemble(
    stores: Sequence[SoftTargetStore],
    combine: str = "probs",
    weights: Sequence[float] | None = None,
) -> SoftTargetStore:
    """One store from several teachers' stores of the same rows: Hinton's ensemble -> one model.

    ``combine="probs"``: the (weighted) mean of the teachers' probabilities at ``T = 1``, stored
    as its log (so ``soften(1.0)`` is that mean; at another ``T`` the store softens the mean's
    log); ``"logits"``: the (weighted) mean of their logits. ``weights`` (one per store, >= 0,
    not all 0) default to equal. The stores must hold the same ids, classes and data (each row
    is matched by id); top-k stores enter through their dense reading.
    """
    if not stores:
        raise SoftTargetsError("ensemble needs at least one store")
    if combine not in ("probs", "logits"):
        raise SoftTargetsError(f"unknown combine {combine!r}; use 'probs' or 'logits'")
    w = torch.ones(len(stores)) if weights is None else torch.as_tensor(weights, dtype=torch.float)
    if w.shape != (len(stores),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise SoftTargetsError(
            f"ensemble weights must be {len(stores)} finite numbers >= 0, not all 0; got "
            f"{list(weights or [])}"
        )
    w = w / w.sum()
    first = stores[0]
    for i, store in enumerate(stores[1:], start=1):
        if store.class_names != first.class_names:
            raise SoftTargetsError(
                f"store {i} has classes {list(store.class_names)[:5]}... but store 0 "
                f"{list(first.class_names)[:5]}...; an ensemble's teachers share their classes"
            )
        if store.data_fingerprint != first.data_fingerprint or len(store) != len(first):
            raise SoftTargetsError(
                f"store {i} was made for other data than store 0; label the same data with "
                "every teacher"
            )
    rows = [torch.arange(len(first))] + [s.rows_for(first.ids) for s in stores[1:]]
    out = torch.empty(len(first), first.num_classes)
    chunk = chunk_rows(first.num_classes)
    for start in range(0, len(first), chunk):
        part = slice(start, min(start + chunk, len(first)))
        logits = torch.stack([s.dense(r[part]) for s, r in zip(stores, rows, strict=True)])
        if combine == "logits":
            out[part] = torch.einsum("m,mbk->bk", w, logits)
        else:  # log sum_m w_m softmax(v_m): stable in log space
            log_p = torch.log_softmax(logits, dim=-1) + w.log()[:, None, None]
            out[part] = torch.logsumexp(log_p, dim=0)
    members = hashlib.sha256("".join(s.teacher_fingerprint for s in stores).encode())
    members.update(f"{combine}:{w.tolist()}".encode())
    return SoftTargetStore(
        logits=out,
        ids=first.ids.clone(),
        teacher_fingerprint=members.hexdigest()[:16],
        data_fingerprint=first.data_fingerprint,
        class_names=first.class_names,
        info={
            "ensemble": [s.teacher_fingerprint for s in stores],
            "combine": combine,
            "weights": w.tolist(),
        },  # fmt: skip
        labels_fingerprint=first.labels_fingerprint,
    )
