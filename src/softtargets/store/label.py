"""Running a teacher once: :func:`label` turns a teacher and data (in memory or streamed) into a
:class:`~softtargets.store.store.SoftTargetStore`; :func:`ensemble` combines several teachers'
stores; :func:`predict_logits` is the batched eval-mode forward pass they share."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from softtargets.config import chunk_rows
from softtargets.data import streams
from softtargets.data.dataset import Dataset
from softtargets.data.fingerprint import Fingerprinter, labels_fingerprint
from softtargets.data.targets import check_finite
from softtargets.errors import SoftTargetsError
from softtargets.store.store import SoftTargetStore, fingerprint_module


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
            dataset of ``(x, label, id)`` items (:mod:`softtargets.data.streams`; label it without
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
