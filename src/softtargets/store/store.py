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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from softtargets.config import chunk_rows
from softtargets.data.dataset import Dataset
from softtargets.data.fingerprint import labels_fingerprint
from softtargets.data.targets import check_finite
from softtargets.data.targets import soften as soften_logits
from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_write_bytes, parse_json
from softtargets.store.layout import map_tensor

FORMAT = "softtargets.store"


FORMAT_VERSION = 2  # 2: the data fingerprint hashes rows in blocks (data.FINGERPRINT_BLOCK)


def fingerprint_module(module: nn.Module) -> str:
    """A short hash of a module's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors too
        digest.update(f"{name}:{value.dtype}:{tuple(tensor.shape)}".encode())
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
        labels_fingerprint: :func:`~softtargets.data.dataset.labels_fingerprint` of the labelled data
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
                tensors["logits"] = map_tensor(path, "logits")
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
            names = parse_json(meta["class_names"], "its class_names")
            info = parse_json(meta.get("info", "{}"), "its info")
            fingerprints = (meta["teacher_fingerprint"], meta["data_fingerprint"])
        except KeyError as err:
            raise SoftTargetsError(f"{corrupt} (its header lacks {err}); label again") from None
        except SoftTargetsError as err:
            raise SoftTargetsError(f"{corrupt} ({err}); label again") from None
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
