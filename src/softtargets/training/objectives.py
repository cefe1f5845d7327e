"""What ``fit``'s ``targets`` mean, and the loss of a batch they give.

:func:`resolve_targets` checks a ``targets`` argument against the data once (hard labels, a
probability matrix, a store, a :class:`Distillation` of stored logits or of a teacher module) and
:func:`make_objective` turns it into ``objective(student_logits (B, K), rows (B,)) -> (loss,
grad)``, the one function the training step calls: the closed-form Hinton loss
(:class:`~softtargets.losses.closed.StoredDistillation`), a top-k store's bucket reading, another
distillation method (:mod:`softtargets.losses.reference`, each with its closed-form
gradient) or plain cross-entropy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.data.dataset import Dataset
from softtargets.data.streams import _device_of
from softtargets.data.targets import check_finite, check_temperature, validate
from softtargets.errors import SoftTargetsError
from softtargets.losses.closed import (
    TABLE_CLASSES,
    MethodTable,
    StoredDistillation,
    method_step,
    method_value_and_grad,
)
from softtargets.losses.methods import check_method, split_warmup, warmup_ramp
from softtargets.losses.reference import bucket_distillation_loss, soft_cross_entropy
from softtargets.store.label import predict_logits
from softtargets.store.store import SoftTargetStore
from softtargets.training.features import FeatureDistillation


def stream_objective(targets: Any, num_classes: int | None, device: torch.device) -> Callable:
    """The training loss for streamed batches:
    ``objective(logits (B, K), (labels (B,), ids (B,), x (B, ...))) -> (loss, grad)``, ``grad``
    the closed-form gradient in the logits, or ``None`` where autograd differentiates ``loss``.

    ``targets``: ``None``/``"hard"``, a :class:`~softtargets.store.store.SoftTargetStore` (soft
    targets at T = 1, looked up by id), or a :class:`~softtargets.training.objectives.Distillation` whose
    teacher is a store (looked up by id) or a module (run on each batch: online distillation).
    """
    pass  # (import now local)
    from softtargets.store.store import SoftTargetStore

    if targets is None or (isinstance(targets, str) and targets == "hard"):
        return lambda logits, key: (F.cross_entropy(logits, key[0]), None)
    if isinstance(targets, SoftTargetStore):
        targets = Distillation(targets, temperature=1.0, alpha=1.0)
    if not isinstance(targets, Distillation):
        raise SoftTargetsError(
            "streamed data takes hard labels, a SoftTargetStore or a Distillation of a store or "
            "a teacher module (probability matrices need in-memory data, aligned by row)"
        )
    t, alpha, teacher = (
        check_temperature(targets.temperature),
        float(targets.alpha),
        targets.teacher,
    )
    if not 0.0 <= alpha <= 1.0:
        raise SoftTargetsError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(teacher, SoftTargetStore):
        if num_classes is not None and teacher.num_classes != num_classes:
            raise SoftTargetsError(
                f"the teacher has {teacher.num_classes} classes but the data has {num_classes}; "
                "teacher and data must share their classes"
            )
        if check_tail(targets) == "bucket":

            def bucket(logits: Tensor, key: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, None]:
                kept, classes, tail = (
                    part.to(device, non_blocking=True)
                    for part in teacher.kept_rows(teacher.rows_for(key[1]))
                )
                return bucket_distillation_loss(logits, kept, classes, tail, key[0], t, alpha), None

            return bucket

        def teacher_logits(key: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            return teacher.logits_for(key[1]).to(device, non_blocking=True)

    elif isinstance(teacher, nn.Module):
        teacher.eval()  # online: the teacher sees each (augmented) batch the student sees
        checked = []

        def teacher_logits(key: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            with torch.inference_mode():
                v = teacher(key[2].to(_device_of(teacher))).float().to(device)
            if not checked:  # once: a diverged teacher gives NaN everywhere
                check_finite(v, "teacher logits", "the teacher has diverged; retrain it")
                checked.append(True)
            return v.clone()  # a normal tensor: inference tensors cannot enter autograd

    else:
        raise SoftTargetsError(
            "for streamed data, Distillation's teacher is a SoftTargetStore or a teacher module"
        )
    options, warmup = split_warmup(check_method(targets.method, targets.options))

    def step(
        logits: Tensor, key: tuple[Tensor, Tensor, Tensor], ramp: float
    ) -> tuple[Tensor, Tensor]:
        # Hinton's loss or another method, closed-form gradient (the teacher's side from this
        # batch's logits: streamed rows come in any order, so there is no table to gather from)
        value, grad = method_value_and_grad(
            targets.method, options, logits, teacher_logits(key), key[0], t, alpha, ramp
        )
        return value, grad.to(logits.dtype)

    return MethodObjective(step, warmup)


@dataclass(frozen=True)
class Distillation:
    """Targets for Hinton distillation: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``.

    Attributes:
        teacher: a :class:`SoftTargetStore` (rows looked up by sample id), ``(N, K)`` teacher
            logits aligned with the training data's rows, or the teacher module itself (run on
            each batch of streamed data, for augmentation; once over in-memory data).
        temperature: ``T > 0``.
        alpha: weight of the soft term in ``[0, 1]``.
        tail: for a top-k store, how the classes a row did not keep enter the loss:
            ``"uniform"`` (each gets an equal share of the remaining mass, the store's
            :meth:`~softtargets.store.store.SoftTargetStore.dense` reading) or ``"bucket"`` (one
            "other" class holding the remaining mass, :func:`~softtargets.losses.reference.bucket_distillation_loss`;
            ``fit`` only). ``bench/topk_vs_full.py`` measures which works better.
        method: the soft term: ``"kd"`` (Hinton's, the default), ``"dkd"``, ``"dist"``,
            ``"jsd"``, ``"rkl"`` or ``"tv"`` (:mod:`softtargets.losses.reference`); the loss is
            ``alpha x method + (1 - alpha) x cross-entropy`` either way.
        options: the method's own options (say ``{"beta": 8.0}`` for DKD,
            ``{"standardize": True}`` for logit standardisation with KD or DKD), and ``warmup``
            for any method: epochs over which the soft term's weight rises linearly to
            ``alpha`` (``alpha x min(epoch / warmup, 1)``, the cross-entropy's staying
            ``1 - alpha``; DKD's recipe, 20 epochs in Zhao et al.).
    """

    teacher: SoftTargetStore | Tensor | nn.Module
    temperature: float = 4.0
    alpha: float = 0.9
    tail: Literal["uniform", "bucket"] = "uniform"
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)


Targets = None | str | Tensor | SoftTargetStore | Distillation | FeatureDistillation


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
    soft cross-entropy) or ``"distill"`` (Hinton's loss at ``temperature`` with weight ``alpha``
    against teacher logits: row ``i`` of the data has ``teacher_logits[teacher_rows[i]]``, or
    ``teacher_logits[i]`` when ``teacher_rows`` is ``None``; ``method`` and its ``options``,
    with the soft term warmed up over ``warmup`` epochs). ``teacher_logits`` is ``(N, K)``
    logits or a store itself, read through its rows (a full store's own tensor, or a top-k store
    expanded a batch at a time), never a copy: at 100k rows x 1,000 classes a copy is 400 MB.
    """

    kind: Literal["hard", "probs", "distill"]
    probs: Tensor | None = None
    teacher_logits: Tensor | SoftTargetStore | None = None
    temperature: float = 1.0
    alpha: float = 1.0
    teacher_rows: Tensor | None = None
    tail: Literal["uniform", "bucket"] = "uniform"
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)
    warmup: int = 0

    @property
    def plain_kd(self) -> bool:
        """Hinton's loss without options or warm-up: the trainers' fastest paths apply."""
        return self.method == "kd" and not self.options and self.warmup == 0

    def dense_teacher_logits(self) -> Tensor:
        """The teacher's logits row by row with the data, ``(N, K)`` float32 (a copy)."""
        assert self.teacher_logits is not None
        rows = self.teacher_rows
        if isinstance(self.teacher_logits, SoftTargetStore):
            return self.teacher_logits.dense(rows)
        if rows is None:
            return self.teacher_logits.float()
        return self.teacher_logits.index_select(0, rows).float()


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


def resolve_targets(targets: Targets, data: Dataset) -> ResolvedTargets:
    """Check ``targets`` against ``data`` and say what they are (see :func:`fit`'s ``targets``)."""
    if targets is None or (isinstance(targets, str) and targets == "hard"):
        return ResolvedTargets("hard")
    if isinstance(targets, str):
        if targets != "soft":
            raise SoftTargetsError(f"unknown targets {targets!r}; use 'hard', 'soft' or a tensor")
        if data.soft_targets is None:
            raise SoftTargetsError("targets='soft' but the data carries no soft_targets")
        targets = data.soft_targets
    if isinstance(targets, SoftTargetStore):
        targets = Distillation(targets, temperature=1.0, alpha=1.0)
    if isinstance(targets, Distillation):
        temperature = check_temperature(targets.temperature)
        if not 0.0 <= float(targets.alpha) <= 1.0:
            raise SoftTargetsError(f"alpha must be in [0, 1], got {targets.alpha!r}")
        teacher_rows = None
        tail = check_tail(targets)
        if isinstance(targets.teacher, SoftTargetStore):
            store = targets.teacher
            store.check(data)
            teacher_logits, teacher_rows = store, store.rows_for(data.ids.cpu())
            store.check_finite()
        elif isinstance(targets.teacher, nn.Module):
            # In memory there is no augmentation: the teacher's outputs are the same every
            # epoch, so it runs once here (as label() would), not on every batch.
            teacher_logits = predict_logits(targets.teacher, data.features).cpu()
            check_output_width(teacher_logits, data.num_classes)
        else:
            teacher_logits = torch.as_tensor(targets.teacher).float()
            if teacher_logits.shape != (len(data), data.num_classes):
                raise SoftTargetsError(
                    f"teacher logits have shape {tuple(teacher_logits.shape)} but the data needs "
                    f"({len(data)}, {data.num_classes}): one row per sample, one column per class"
                )
        if not isinstance(teacher_logits, SoftTargetStore):
            check_finite(teacher_logits, "teacher logits", "the teacher has diverged; retrain it")
        options, warmup = split_warmup(check_method(targets.method, targets.options))
        if (targets.method != "kd" or options or warmup) and tail == "bucket":
            raise SoftTargetsError(
                f"tail='bucket' is a reading of Hinton's plain loss; method {targets.method!r} "
                "with options or a warm-up takes a top-k store with the uniform tail"
            )
        return ResolvedTargets(
            "distill",
            None,
            teacher_logits,
            temperature,
            float(targets.alpha),
            teacher_rows,
            tail,
            targets.method,
            options,
            warmup,
        )
    probs = validate(targets, data.num_classes).float()
    if probs.shape[0] != len(data):
        raise SoftTargetsError(
            f"soft targets have {probs.shape[0]} rows but the data has {len(data)}; give one row "
            "per sample, in the data's order"
        )
    return ResolvedTargets("probs", probs)


Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


def make_objective(targets: Targets, data: Dataset, device: torch.device) -> Objective:
    """The training loss as ``objective(student_logits (B, K), rows (B,)) -> (loss, grad)``.

    ``rows`` index ``data``'s rows. ``grad`` is ``None`` when autograd differentiates ``loss``;
    otherwise it is the loss's gradient with respect to the logits in closed form ``(B, K)`` and
    ``loss`` is a plain value. Every per-row tensor is resolved and moved to ``device`` here, once,
    so the training step only gathers rows.
    """
    resolved = resolve_targets(targets, data)
    labels = data.labels.to(device)
    weights = None if data.weights is None else data.weights.to(device)
    if resolved.kind == "hard":
        if weights is None:
            return lambda logits, rows: (F.cross_entropy(logits, labels[rows]), None)
        return lambda logits, rows: (
            (F.cross_entropy(logits, labels[rows], reduction="none") * weights[rows]).sum()
            / weights[rows].sum(),
            None,
        )
    if resolved.kind == "distill":
        if weights is not None:
            raise SoftTargetsError(
                "distillation ignores row weights; drop the data's weights or pass soft targets"
            )
        rows = None if resolved.teacher_rows is None else resolved.teacher_rows.to(device)
        teacher = resolved.teacher_logits
        if resolved.tail == "bucket":
            return bucket_objective(teacher, rows, labels, resolved.temperature, resolved.alpha)
        if not resolved.plain_kd:
            return method_objective(resolved, labels, data.num_classes, device)
        if isinstance(teacher, SoftTargetStore) and teacher.top_indices is None:
            teacher = teacher.logits  # a full store: its own tensor, gathered directly
        loss = StoredDistillation(
            teacher.to(device) if isinstance(teacher, Tensor) else teacher,
            labels,
            resolved.temperature,
            resolved.alpha,
            teacher_rows=rows,
        )
        return lambda logits, rows: loss.value_and_grad(logits.detach(), rows)
    probs = resolved.probs.to(device)
    if weights is None:
        return lambda logits, rows: (soft_cross_entropy(logits, probs[rows], check=False), None)
    return lambda logits, rows: (
        soft_cross_entropy(logits, probs[rows], weights[rows], check=False),
        None,
    )


def teacher_gatherer(resolved: ResolvedTargets, device: torch.device) -> Callable[[Tensor], Tensor]:
    """``gather(rows (B,)) -> (B, K)`` float32 teacher logits on ``device`` for rows of the data:
    a store read on the CPU (a top-k store expanded a batch at a time), a tensor of logits moved
    to ``device`` once. The row map moves once too, not on every step."""
    teacher, teacher_rows = resolved.teacher_logits, resolved.teacher_rows
    on_store = isinstance(teacher, SoftTargetStore)
    where_device = torch.device("cpu") if on_store else device
    read = teacher.dense if on_store else functools.partial(teacher.to(device).index_select, 0)
    if teacher_rows is not None:
        teacher_rows = teacher_rows.to(where_device)

    def gather(rows: Tensor) -> Tensor:
        where = rows.to(where_device)
        if teacher_rows is not None:
            where = teacher_rows[where]
        return read(where).to(device).float()

    return gather


class MethodObjective:
    """``objective(logits, rows) -> (loss, grad)`` of a distillation method with its warm-up:
    ``step(logits, rows, ramp)`` with the soft term's factor of the epoch, which the trainers set
    with :meth:`start_epoch` (the one hook an objective may have). ``grad`` is ``None`` where
    autograd differentiates ``loss`` (feature distillation). ``table``: the teacher's side of
    every row, where the step reads one (``fit_many`` reads it for its stacked call too)."""

    def __init__(
        self,
        step: Callable[[Tensor, Any, float], tuple[Tensor, Tensor | None]],
        warmup: int,
        table: MethodTable | None = None,
    ):
        self.step, self.warmup, self.table = step, warmup, table
        self.ramp = warmup_ramp(1, warmup)

    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (from 1): the soft term's factor ``min(epoch / warmup, 1)``."""
        self.ramp = warmup_ramp(epoch, self.warmup)

    def __call__(self, logits: Tensor, rows: Any) -> tuple[Tensor, Tensor | None]:
        return self.step(logits, rows, self.ramp)


def method_objective(
    resolved: ResolvedTargets, labels: Tensor, num_classes: int, device: torch.device
) -> MethodObjective:
    """The objective of a distillation method other than plain KD: its value and closed-form
    gradient (:mod:`softtargets.losses.closed`). With few classes the teacher's side of every row
    is computed once (:class:`~softtargets.losses.closed.MethodTable`); with many, from each
    batch's gathered logits (memory stays at the store's size). ``num_classes``: the data's, which
    :func:`resolve_targets` has checked the teacher's against."""
    gather = teacher_gatherer(resolved, device)
    method, options = resolved.method, resolved.options
    temperature, alpha = resolved.temperature, resolved.alpha
    if num_classes <= TABLE_CLASSES:
        table = MethodTable(method, options, gather, labels, temperature, num_classes)

        def step(logits: Tensor, rows: Tensor, ramp: float) -> tuple[Tensor, Tensor]:
            parts = table.rows(rows)
            value, grad = method_step(method, options, logits, parts, temperature, alpha, ramp)
            return value, grad.to(logits.dtype)

        return MethodObjective(step, resolved.warmup, table)

    def per_batch(logits: Tensor, rows: Tensor, ramp: float) -> tuple[Tensor, Tensor]:
        value, grad = method_value_and_grad(
            method, options, logits, gather(rows), labels[rows], temperature, alpha, ramp
        )
        return value, grad.to(logits.dtype)

    return MethodObjective(per_batch, resolved.warmup)


def bucket_objective(
    store: SoftTargetStore,
    teacher_rows: Tensor | None,
    labels: Tensor,
    temperature: float,
    alpha: float,
) -> Objective:
    """``objective(logits, rows)`` of :func:`~softtargets.losses.reference.bucket_distillation_loss` for a
    top-k store (autograd differentiates it); ``teacher_rows`` maps data rows to store rows."""

    def objective(logits: Tensor, rows: Tensor) -> tuple[Tensor, None]:
        where = (rows if teacher_rows is None else teacher_rows[rows]).cpu()
        kept, classes, tail = store.kept_rows(where)
        device = logits.device
        value = bucket_distillation_loss(
            logits, kept.to(device), classes.to(device), tail.to(device), labels[rows],
            temperature, alpha,
        )  # fmt: skip
        return value, None

    return objective
