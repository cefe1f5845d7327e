"""Stores too large for memory: :func:`label_to_file` streams batches through the teacher into the
store's file chunk by chunk (its layout fixed by the header), one shard per process under
torchrun (:func:`shard_rows`), and :func:`finish_shards` joins the shards into one store."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset

from softtargets import distributed
from softtargets.config import chunk_rows
from softtargets.data import fingerprint, streams
from softtargets.data.dataset import Dataset
from softtargets.data.fingerprint import Fingerprinter
from softtargets.data.targets import check_finite
from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_open, atomic_write_text, parse_json, read_small_text
from softtargets.store.layout import safetensors_header
from softtargets.store.store import FORMAT, FORMAT_VERSION, fingerprint_module


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
    equal to the in-memory :class:`~softtargets.data.dataset.Dataset` fingerprint of the same rows. Load
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
    (:data:`~softtargets.data.fingerprint.FINGERPRINT_BLOCK` rows), split as evenly as they go; a shard may
    be empty when there are fewer blocks than shards."""
    block = fingerprint.FINGERPRINT_BLOCK  # read when called: tests shrink it

    blocks = -(-num_rows // block)
    first, last = index * blocks // count, (index + 1) * blocks // count
    return range(min(first * block, num_rows), min(last * block, num_rows))


def finish_shards(path: str | Path, count: int) -> Path:
    """Join the ``count`` shards written by ``label_to_file(..., shard=(i, count))`` into the
    store at ``path``: checks that every shard is there and that they agree (teacher, classes,
    rows), writes the header with the whole data's fingerprint and renames the file into place.
    """

    notes = []
    for index in range(count):
        note_path = _shard_note(path, index, count)
        if not note_path.exists():
            raise SoftTargetsError(
                f"shard {index} of {count} of {path} is not written yet ({note_path} is missing); "
                "run its labelling, then finish again"
            )
        notes.append(parse_json(read_small_text(note_path, "shard note"), str(note_path)))
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
        first["num_rows"],
        len(parse_json(header["class_names"], "a shard note's class_names")),
        dtype,
        first["header"],
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
        blob = self._header(metadata or self.metadata)
        if len(blob) != self.ids_at:
            raise SoftTargetsError("the store header changed length; label the data again")
        return blob

    @property
    def ids_at(self) -> int:
        return len(self._header(self.metadata))

    def _header(self, metadata: dict[str, str]) -> bytes:
        """``ids (N,) int64`` then ``logits (N, K)``."""
        entries = {
            "ids": (torch.int64, (self.num_rows,)),
            "logits": (self.dtype, (self.num_rows, self.num_classes)),
        }
        return safetensors_header(entries, metadata)[0]

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
    returns the :class:`~softtargets.data.dataset.Fingerprinter` of what it wrote."""

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
