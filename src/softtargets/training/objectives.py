"""What ``fit``'s ``targets`` mean, and the loss of a batch they give: one resolver for every
data container.

:func:`resolve_targets` checks a ``targets`` argument against the data once (hard labels, a
probability matrix, a store, a :class:`Distillation` of stored logits, of logits or of a teacher
module), whether the data is in memory or streamed, and :func:`make_objective` turns it into
``objective(student_logits (B, K), key) -> (loss, grad)``, the one function a training step
calls. ``key`` is the batch's rows of in-memory data, or ``(labels, ids, inputs)`` of a streamed
batch. Every distillation method, Hinton's KD included, is the same closed form
(:mod:`softtargets.losses.closed`): its teacher side tabled once per row where the rows are known
in advance and the classes few, else computed from each batch's teacher logits. ``fit_many``
resolves each member's targets with the same two functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.config import ALPHA, TEMPERATURE
from softtargets.data.streams import is_stream
from softtargets.data.targets import check_finite, check_temperature, validate
from softtargets.errors import SoftTargetsError
from softtargets.losses.closed import (
    TABLE_CLASSES,
    MethodTable,
    method_step,
    method_value_and_grad,
)
from softtargets.losses.methods import check_method, split_warmup, warmup_ramp
from softtargets.losses.reference import bucket_distillation_loss, soft_cross_entropy
from softtargets.store.label import predict_logits
from softtargets.store.store import SoftTargetStore
from softtargets.training.features import FeatureDistillation


@dataclass(frozen=True)
class Distillation:
    """Targets for distillation: ``alpha x method + (1 - alpha) x cross-entropy``; the method is
    Hinton's ``T^2 KL(teacher_T || student_T)`` unless named.

    Attributes:
        teacher: a :class:`SoftTargetStore` (rows looked up by sample id), ``(N, K)`` teacher
            logits aligned with the training data's rows, or the teacher module itself (run on
            each batch of streamed data, for augmentation; once over in-memory data).
        temperature: ``T > 0``.
        alpha: weight of the soft term in ``[0, 1]``.
        tail: for a top-k store, how the classes a row did not keep enter the loss:
            ``"uniform"`` (each gets an equal share of the remaining mass, the store's
            :meth:`~softtargets.store.store.SoftTargetStore.dense` reading) or ``"bucket"`` (one
            "other" class holding the remaining mass,
            :func:`~softtargets.losses.reference.bucket_distillation_loss`; ``fit`` only).
            ``bench/topk_vs_full.py`` measures which works better.
        method: the soft term, a name of the method registry
            (:mod:`softtargets.losses.methods`): ``"kd"`` (Hinton's, the default), ``"dkd"``,
            ``"dist"``, ``"jsd"``, ``"rkl"`` or ``"tv"``.
        options: the method's own options (say ``{"beta": 8.0}`` for DKD,
            ``{"standardize": True}`` for logit standardisation with KD or DKD), and ``warmup``
            for any method: epochs over which the soft term's weight rises linearly to
            ``alpha`` (``alpha x min(epoch / warmup, 1)``, the cross-entropy's staying
            ``1 - alpha``; DKD's recipe, 20 epochs in Zhao et al.).
    """

    teacher: SoftTargetStore | Tensor | nn.Module
    temperature: float = TEMPERATURE
    alpha: float = ALPHA
    tail: Literal["uniform", "bucket"] = "uniform"
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)


Targets = None | str | Tensor | SoftTargetStore | Distillation | FeatureDistillation
#: ``objective(student_logits (B, K), key) -> (loss, grad)``; ``grad`` is the loss's gradient in
#: the logits in closed form, or ``None`` where autograd differentiates ``loss``
Objective = Callable[[Tensor, Any], tuple[Tensor, Tensor | None]]


def check_output_width(logits: Tensor, num_classes: int) -> None:
    """Refuse a model whose ``(B, K')`` output does not have one logit per class of the data."""
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise SoftTargetsError(
            f"the model outputs shape {tuple(logits.shape)} per batch but the data has "
            f"{num_classes} classes; build the model with {num_classes} outputs"
        )


@dataclass(frozen=True)
class ResolvedTargets:
    """What a ``targets`` argument means for one dataset, checked once.

    ``kind`` is ``"hard"`` (the labels), ``"probs"`` (``probs``: ``(N, K)`` probability rows,
    soft cross-entropy; in-memory data) or ``"distill"``: ``method`` with its ``options`` at
    ``temperature``, weight ``alpha``, the soft term warmed up over ``warmup`` epochs, against
    ``teacher``: ``(N, K)`` logits (row ``i`` of the data has ``teacher[teacher_rows[i]]``, or
    ``teacher[i]`` when ``teacher_rows`` is ``None``), a store read through its rows (never a
    copy: at 100k rows x 1,000 classes a copy is 400 MB), or, for streamed data, the teacher
    module run on each batch.
    """

    kind: Literal["hard", "probs", "distill"]
    probs: Tensor | None = None
    teacher: Tensor | SoftTargetStore | nn.Module | None = None
    temperature: float = 1.0
    alpha: float = 1.0
    teacher_rows: Tensor | None = None
    tail: Literal["uniform", "bucket"] = "uniform"
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)
    warmup: int = 0


def check_tail(targets: Distillation) -> Literal["uniform", "bucket"]:
    """``targets.tail``, refused unless it is a known reading that applies to its teacher."""
    if targets.tail not in ("uniform", "bucket"):
        raise SoftTargetsError(f"unknown tail {targets.tail!r}; use 'uniform' or 'bucket'")
    top_k = isinstance(targets.teacher, SoftTargetStore) and targets.teacher.top_indices is not None
    if targets.tail == "bucket" and not top_k:
        raise SoftTargetsError(
            "tail='bucket' reads a top-k store's missing classes; this teacher keeps every class "
            "(use store.top_k(k), or drop tail=)"
        )
    return targets.tail


def resolve_targets(targets: Targets, data: Any) -> ResolvedTargets:
    """Check ``targets`` against ``data`` (an in-memory :class:`Dataset` or a streamed one) and
    say what they are (see :func:`~softtargets.training.fit.fit`'s ``targets``)."""
    streamed = is_stream(data)
    if targets is None or (isinstance(targets, str) and targets == "hard"):
        return ResolvedTargets("hard")
    if isinstance(targets, str):
        if targets != "soft":
            raise SoftTargetsError(f"unknown targets {targets!r}; use 'hard', 'soft' or a tensor")
        if streamed or data.soft_targets is None:
            raise SoftTargetsError("targets='soft' but the data carries no soft_targets")
        targets = data.soft_targets
    if isinstance(targets, SoftTargetStore):
        targets = Distillation(targets, temperature=1.0, alpha=1.0)
    if isinstance(targets, Distillation):
        return _resolve_distillation(targets, data, streamed)
    if streamed:
        raise SoftTargetsError(
            "streamed data takes hard labels, a SoftTargetStore or a Distillation of a store or "
            "a teacher module (probability matrices need in-memory data, aligned by row)"
        )
    probs = validate(targets, data.num_classes).float()
    if probs.shape[0] != len(data):
        raise SoftTargetsError(
            f"soft targets have {probs.shape[0]} rows but the data has {len(data)}; give one row "
            "per sample, in the data's order"
        )
    return ResolvedTargets("probs", probs)


def _resolve_distillation(targets: Distillation, data: Any, streamed: bool) -> ResolvedTargets:
    temperature = check_temperature(targets.temperature)
    if not 0.0 <= float(targets.alpha) <= 1.0:
        raise SoftTargetsError(f"alpha must be in [0, 1], got {targets.alpha!r}")
    tail = check_tail(targets)
    options, warmup = split_warmup(check_method(targets.method, targets.options))
    if (targets.method != "kd" or options or warmup) and tail == "bucket":
        raise SoftTargetsError(
            f"tail='bucket' is a reading of Hinton's plain loss; method {targets.method!r} "
            "with options or a warm-up takes a top-k store with the uniform tail"
        )
    num_classes = getattr(data, "num_classes", None)
    teacher, teacher_rows = targets.teacher, None
    if isinstance(teacher, SoftTargetStore):
        if streamed:  # rows are looked up by id as batches come
            if num_classes is not None and teacher.num_classes != num_classes:
                raise SoftTargetsError(
                    f"the teacher has {teacher.num_classes} classes but the data has "
                    f"{num_classes}; teacher and data must share their classes"
                )
        else:
            teacher.check(data)
            teacher_rows = teacher.rows_for(data.ids.cpu())
        teacher.check_finite()
    elif isinstance(teacher, nn.Module):
        if streamed:  # online: the teacher sees each (augmented) batch the student sees
            teacher.eval()
        else:
            # In memory there is no augmentation: the teacher's outputs are the same every
            # epoch, so it runs once here (as label() would), not on every batch.
            teacher = predict_logits(teacher, data.features).cpu()
            check_output_width(teacher, num_classes)
            check_finite(teacher, "teacher logits", "the teacher has diverged; retrain it")
    elif streamed:
        raise SoftTargetsError(
            "for streamed data, Distillation's teacher is a SoftTargetStore or a teacher module"
        )
    else:
        teacher = torch.as_tensor(teacher).float()
        if teacher.shape != (len(data), num_classes):
            raise SoftTargetsError(
                f"teacher logits have shape {tuple(teacher.shape)} but the data needs "
                f"({len(data)}, {num_classes}): one row per sample, one column per class"
            )
        check_finite(teacher, "teacher logits", "the teacher has diverged; retrain it")
    return ResolvedTargets(
        "distill", None, teacher, temperature, float(targets.alpha), teacher_rows, tail,
        targets.method, options, warmup,
    )  # fmt: skip


class MethodObjective:
    """``objective(logits, key) -> (loss, grad)`` of a distillation method with its warm-up:
    ``step(logits, key, ramp)`` with the soft term's factor of the epoch, which the trainers set
    with :meth:`start_epoch` (the one hook an objective may have). ``grad`` is ``None`` where
    autograd differentiates ``loss`` (feature distillation, a top-k store's bucket tail).

    ``table``: the teacher's side of every row, where the step reads one; ``teacher_of(key)``
    and ``labels_of(key)``: the batch's teacher logits and labels. ``fit_many`` reads these for
    its stacked call of every member of one method.
    """

    def __init__(
        self,
        step: Callable[[Tensor, Any, float], tuple[Tensor, Tensor | None]],
        warmup: int,
        table: MethodTable | None = None,
        teacher_of: Callable[[Any], Tensor] | None = None,
        labels_of: Callable[[Any], Tensor] | None = None,
    ):
        self.step, self.warmup, self.table = step, warmup, table
        self.teacher_of, self.labels_of = teacher_of, labels_of
        self.ramp = warmup_ramp(1, warmup)

    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (from 1): the soft term's factor ``min(epoch / warmup, 1)``."""
        self.ramp = warmup_ramp(epoch, self.warmup)

    def __call__(self, logits: Tensor, key: Any) -> tuple[Tensor, Tensor | None]:
        return self.step(logits, key, self.ramp)


def make_objective(targets: Targets, data: Any, device: torch.device) -> Objective:
    """The training loss of ``targets`` on ``data`` as ``objective(student_logits (B, K), key)
    -> (loss, grad)``; ``key`` is a batch's rows of in-memory ``data``, or ``(labels (B,),
    ids (B,), inputs (B, ...))`` of a streamed batch. Every per-row tensor is resolved and moved
    to ``device`` here, once, so a step only gathers rows."""
    return objective_for(resolve_targets(targets, data), data, device)


def objective_for(resolved: ResolvedTargets, data: Any, device: torch.device) -> Objective:
    """:func:`make_objective` of targets already resolved against ``data`` (``fit_many`` resolves
    each member's once, and a teacher module runs over the data once)."""
    if is_stream(data):
        weights = None

        def labels_of(key: Any) -> Tensor:
            return key[0]

    else:
        labels = data.labels.to(device)
        weights = None if data.weights is None else data.weights.to(device)

        def labels_of(key: Any) -> Tensor:
            return labels[key]

    if resolved.kind == "hard":
        if weights is None:
            return lambda logits, key: (F.cross_entropy(logits, labels_of(key)), None)
        return lambda logits, rows: (
            (F.cross_entropy(logits, labels[rows], reduction="none") * weights[rows]).sum()
            / weights[rows].sum(),
            None,
        )
    if resolved.kind == "probs":
        probs = resolved.probs.to(device)
        return lambda logits, rows: (
            soft_cross_entropy(logits, probs[rows], None if weights is None else weights[rows],
                               check=False),
            None,
        )  # fmt: skip
    if weights is not None:
        raise SoftTargetsError(
            "distillation ignores row weights; drop the data's weights or pass soft targets"
        )
    return _distillation_objective(resolved, data, labels_of, device)


def _store_rows(resolved: ResolvedTargets, key: Any, streamed: bool) -> Tensor:
    """The store rows (CPU) of a batch: looked up by id, or through the data's row map."""
    store, rows = resolved.teacher, resolved.teacher_rows
    if streamed:
        return store.rows_for(key[1])
    where = key.cpu()
    return where if rows is None else rows[where]


def _teacher_reader(
    resolved: ResolvedTargets, streamed: bool, device: torch.device
) -> Callable[[Any], Tensor]:
    """``teacher_of(key) -> (B, K)`` float32 teacher logits on ``device``: a top-k store expanded
    a batch at a time on the CPU; a full store's own tensor or logits moved to ``device`` once,
    with the row map; the online teacher run on the batch's inputs."""
    teacher, rows = resolved.teacher, resolved.teacher_rows
    if isinstance(teacher, nn.Module):
        checked: list[bool] = []

        def online(key: Any) -> Tensor:
            with torch.inference_mode():
                v = teacher(key[2].to(next(teacher.parameters()).device)).float().to(device)
            if not checked:  # once: a diverged teacher gives NaN everywhere
                check_finite(v, "teacher logits", "the teacher has diverged; retrain it")
                checked.append(True)
            return v.clone()  # a normal tensor: inference tensors cannot enter autograd

        return online
    if isinstance(teacher, SoftTargetStore) and (streamed or teacher.top_indices is not None):
        return lambda key: teacher.dense(_store_rows(resolved, key, streamed)).to(device)
    logits = (teacher.logits if isinstance(teacher, SoftTargetStore) else teacher).to(device)
    rows = None if rows is None else rows.to(device)

    def tensor(key: Tensor) -> Tensor:
        where = key.to(device)
        return logits.index_select(0, where if rows is None else rows[where]).float()

    return tensor


def _distillation_objective(
    resolved: ResolvedTargets, data: Any, labels_of: Callable[[Any], Tensor], device: torch.device
) -> Objective:
    """A method's value and closed-form gradient (:mod:`softtargets.losses.closed`), or a top-k
    store's bucket reading (autograd). In memory with few classes the teacher's side of every row
    is computed once (:class:`~softtargets.losses.closed.MethodTable`); otherwise from each
    batch's teacher logits, so memory stays at the store's size."""
    streamed = is_stream(data)
    method, options = resolved.method, resolved.options
    t, alpha = resolved.temperature, resolved.alpha
    if resolved.tail == "bucket":
        store = resolved.teacher

        def bucket(logits: Tensor, key: Any) -> tuple[Tensor, None]:
            kept = store.kept_rows(_store_rows(resolved, key, streamed))
            kept, classes, tail = (part.to(logits.device) for part in kept)
            return bucket_distillation_loss(
                logits, kept, classes, tail, labels_of(key), t, alpha
            ), None

        return bucket
    teacher_of = _teacher_reader(resolved, streamed, device)
    if not streamed and data.num_classes <= TABLE_CLASSES:
        labels = data.labels.to(device)
        table = MethodTable(method, options, teacher_of, labels, t, data.num_classes)

        def tabled(logits: Tensor, rows: Tensor, ramp: float) -> tuple[Tensor, Tensor]:
            value, grad = method_step(method, options, logits, table.rows(rows), t, alpha, ramp)
            return value, grad.to(logits.dtype)

        return MethodObjective(tabled, resolved.warmup, table, teacher_of, labels_of)

    def per_batch(logits: Tensor, key: Any, ramp: float) -> tuple[Tensor, Tensor]:
        value, grad = method_value_and_grad(
            method, options, logits, teacher_of(key), labels_of(key), t, alpha, ramp
        )
        return value, grad.to(logits.dtype)

    return MethodObjective(per_batch, resolved.warmup, None, teacher_of, labels_of)
