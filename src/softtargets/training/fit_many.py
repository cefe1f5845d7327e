"""Training many small MLPs at once: one batched matrix multiply per layer for all of them.

The studies train hundreds of small models (seeds x widths x data fractions x learning rates).
One at a time, each step of a small MLP is mostly Python and dispatch overhead and leaves the
machine idle; stacked, ``M`` models cost one ``baddbmm`` per layer. Each model (a
:class:`Member`) keeps its own seed, batch order, training rows, targets, learning rate, weight
decay and optimizer state, so a member's result equals :func:`softtargets.training.fit.fit` on that model
alone, to float tolerance (``tests/test_vectorised.py`` checks it).

MLPs of similar hidden widths and equal depth share a stack, zero-padded to the widest; very
different widths (or depths) go to separate stacks (:func:`stack_groups` weighs padding's wasted
arithmetic against another stack's fixed cost per step). The padding is exact: a padded unit has
zero incoming and outgoing weights, so its pre-activation is 0, ReLU'(0) is 0 in PyTorch, and
every gradient it receives or sends is 0; Adam, AdamW and SGD then leave it at exactly 0. (The
tests train padded and unpadded models side by side.)

The stacked model, its optimizer and the grouping into stacks live in :mod:`softtargets.training.stacked`;
the loss and its closed-form gradient in :mod:`softtargets.losses.closed`; the epoch bookkeeping
(records, learning rates, divergence, early stopping, the best epoch) is
:mod:`softtargets.training.selection`'s, the same as ``fit``'s. What differs from ``fit`` is only how a
step is computed and a batch fetched (:class:`_Batches`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.config import TRAINING
from softtargets.data.dataset import Dataset
from softtargets.data.targets import check_labels
from softtargets.errors import SoftTargetsError
from softtargets.losses.closed import StackedCrossEntropy, method_step, method_value_and_grad
from softtargets.losses.methods import check_warmup_fits, warmup_ramp
from softtargets.training.common import check_lengths, resolve_device
from softtargets.training.fit import fit
from softtargets.training.objectives import (
    Targets,
    objective_for,
    resolve_targets,
)
from softtargets.training.selection import FitResult, LearningRates, Selection
from softtargets.training.stacked import StackedMLP, StackedOptimizer, stack_groups, stackable


@dataclass
class Member:
    """One model of a vectorised run.

    Attributes:
        seed: batch order and dropout seed (as ``fit``'s ``seed``).
        targets: as ``fit``'s ``targets``: ``None`` (hard labels), an ``(N, K)`` probability
            matrix, a store, or a :class:`~softtargets.training.objectives.Distillation`.
        rows: positions of ``data``'s rows this member trains on (default: all).
        labels: ``(N,)`` labels replacing ``data.labels`` for this member (e.g. noisy ones).
        lr, weight_decay: override the run's values for this member.
        log: extra fields for this member's JSON lines and history.
    """

    seed: int = 0
    targets: Targets = None
    rows: Tensor | None = None
    labels: Tensor | None = None
    lr: float | None = None
    weight_decay: float | None = None
    log: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- targets
def _member_data(member: Member, data: Dataset) -> Dataset:
    """``data`` with the member's own labels (say noisy ones) when it has them."""
    if member.labels is None:
        return data
    labels = check_labels(member.labels, data.num_classes, len(data)).long()
    return replace(data, labels=labels.to(data.labels.device))


def _padded_orders(
    rows_per_member: Sequence[Tensor], generators: Sequence[torch.Generator], length: int
) -> tuple[Tensor, Tensor]:
    """One epoch's batch order per member, as ``fit`` draws it, padded: ``(M, length)`` row
    positions and a ``(M, length)`` mask of the real ones."""
    order = torch.zeros(len(rows_per_member), length, dtype=torch.long)
    valid = torch.zeros(len(rows_per_member), length, dtype=torch.bool)
    for m, (rows, gen) in enumerate(zip(rows_per_member, generators, strict=True)):
        order[m, : len(rows)] = rows[torch.randperm(len(rows), generator=gen)]
        valid[m, : len(rows)] = True
    return order, valid


def _rows_by_step(order: Tensor, steps: int, offset: int = 0) -> Tensor:
    """``order (M, S * B)`` -> ``(S, M * B)``: step ``s``'s rows of every member, contiguous, so a
    step gathers all members' rows with one ``index_select``. Member ``m``'s rows get
    ``m * offset`` added (to address a table stacked as ``(M * N, ...)``)."""
    count = order.shape[0]
    shifted = order + torch.arange(count, device=order.device)[:, None] * offset
    return shifted.view(count, steps, -1).transpose(0, 1).reshape(steps, -1)


class _MethodSettings(NamedTuple):
    """What the stacked call of a member's method needs (not its resolved targets: those hold
    the teacher's logits, which the member's gatherer has already moved where they are read)."""

    method: str
    options: dict[str, Any]
    temperature: float
    alpha: float
    warmup: int


class StackedTargets(StackedCrossEntropy):
    """Every member's loss over a stacked batch, each member's targets resolved and checked
    against the data as ``fit`` resolves them (:func:`~softtargets.training.objectives.make_objective`).

    Hard labels and probability rows are one stacked cross-entropy
    (:class:`~softtargets.losses.closed.StackedCrossEntropy`). A distillation member gets
    ``fit``'s own objective: members of one method and options in one closed-form call on their
    stacked batches (each with its own ``T`` and ``alpha``), from the teacher's side that each
    member's objective tabled for every row (:func:`~softtargets.losses.closed.method_step`), or
    with many classes from its gathered logits
    (:func:`~softtargets.losses.closed.method_value_and_grad`); a member whose batch is short (its
    epoch's last) or with a top-k store's bucket tail, through its objective alone (the bucket
    tail through autograd).
    """

    @classmethod
    def for_members(
        cls, members: Sequence[Member], data: Dataset, device: torch.device | str = "cpu"
    ) -> StackedTargets:
        """Resolve and check each member's targets against ``data``; the table on ``device``."""
        device = torch.device(device)
        rows, objectives, groups, settings = [], {}, {}, {}
        for m, member in enumerate(members):
            own = _member_data(member, data)
            targets = resolve_targets(member.targets, own)
            if targets.kind != "distill":
                rows.append((targets.probs, own.labels))
                continue
            rows.append((None, own.labels))  # a placeholder: its loss is computed apart
            objectives[m] = objective_for(targets, own, device)
            if targets.tail == "uniform":
                key = (targets.method, repr(sorted(targets.options.items())))
                groups.setdefault(key, []).append(m)
                settings[m] = _MethodSettings(
                    targets.method, targets.options, targets.temperature, targets.alpha,
                    targets.warmup,
                )  # fmt: skip
        stacked = cls(rows, data.num_classes).to(device)
        stacked.num_rows, stacked.objectives = len(data), objectives
        stacked.groups, stacked.settings = list(groups.values()), settings
        stacked.start_epoch(1)
        return stacked

    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (from 1): each member's warm-up factor for its soft term."""
        self.ramps = {m: warmup_ramp(epoch, s.warmup) for m, s in self.settings.items()}
        for objective in self.objectives.values():
            if hasattr(objective, "start_epoch"):
                objective.start_epoch(epoch)

    def loss(self, logits: Tensor, table_rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`StackedCrossEntropy.loss`, with the members outside the table replaced by their
        loss's batch mean over their real rows and its gradient."""
        value, grad = super().loss(logits, table_rows, weight)
        if not self.objectives:
            return value, grad
        count, batch, _ = logits.shape
        data_rows = table_rows.view(count, batch) - (
            torch.arange(count, device=table_rows.device)[:, None] * self.num_rows
        )
        real = weight > 0
        complete = real.all(1).tolist()  # one host sync a step
        alone = set(self.objectives)
        for group in self.groups:
            whole = [m for m in group if complete[m]]
            if not whole:
                continue
            alone -= set(whole)
            index = torch.tensor(whole, device=logits.device)
            rows = data_rows.index_select(0, index)
            pairs = list(zip(whole, rows, strict=True))
            first = self.settings[whole[0]]
            temperature, alpha = (
                torch.tensor([getattr(self.settings[m], k) for m in whole], device=logits.device)
                for k in ("temperature", "alpha")
            )
            ramp = torch.tensor([self.ramps[m] for m in whole], device=logits.device)
            member_logits = logits.index_select(0, index)
            table = self.objectives[whole[0]].table  # one method, one K: all have one, or none
            if table is not None:  # (G, B, C) gathered from each member's table
                parts = torch.stack(
                    [self.objectives[m].table.table.index_select(0, r) for m, r in pairs]
                )
                member_value, member_grad = method_step(
                    first.method, first.options, member_logits, parts.split(table.widths, -1),
                    temperature, alpha, ramp,
                )  # fmt: skip
            else:
                teacher = torch.stack([self.objectives[m].teacher_of(r) for m, r in pairs])
                member_labels = torch.stack([self.objectives[m].labels_of(r) for m, r in pairs])
                member_value, member_grad = method_value_and_grad(
                    first.method, first.options, member_logits, teacher, member_labels,
                    temperature, alpha, ramp,
                )  # fmt: skip
            value[index], grad[index] = member_value, member_grad.to(grad.dtype)
        for m in sorted(alone):
            if not bool(real[m].any()):
                continue  # this member has finished its epoch: nothing to add
            member_logits = logits[m][real[m]].detach().requires_grad_(True)
            with torch.enable_grad():  # the bucket tail's objective needs autograd
                member_value, member_grad = self.objectives[m](member_logits, data_rows[m][real[m]])
                if member_grad is None:
                    (member_grad,) = torch.autograd.grad(member_value, member_logits)
            value[m] = member_value.detach()
            grad[m].zero_()[real[m]] = member_grad
        return value, grad


# ---------------------------------------------------------------------------- fit_many
def fit_many(
    models: Sequence[nn.Module],
    data: Dataset,
    members: Sequence[Member] | None = None,
    *,
    val: Dataset | None = None,
    test: Dataset | None = None,
    epochs: int = TRAINING.epochs,
    batch_size: int = TRAINING.batch_size,
    optimizer: str = TRAINING.optimizer,
    lr: float = TRAINING.lr,
    weight_decay: float = TRAINING.weight_decay,
    momentum: float = TRAINING.momentum,
    schedule: str = TRAINING.schedule,
    device: torch.device | str | None = None,
    patience: int | None = TRAINING.patience,
    restore_best: bool = True,
    log_path: str | Path | None = None,
    progress: Any = None,
) -> list[FitResult]:
    """Train ``models[m]`` as ``members[m]`` describes, all at once; one :class:`FitResult` each.

    The arguments mean what they mean in :func:`softtargets.training.fit.fit`; ``members`` adds what
    differs between models. Each result's ``model`` is ``models[m]`` itself, trained in place as
    ``fit`` trains its model, holding that member's weights (of its best validation epoch with
    ``val`` and ``restore_best``).

    Models are trained in stacks (:func:`stack_groups`): MLPs of one depth whose widths are close
    share one stack, zero-padded to its widest member; very different widths, depths or dropout
    rates go to separate stacks, trained one after another. Any other model (a CNN, a user's own
    architecture, a Hugging Face model) is trained alone by :func:`fit`, as its member describes:
    the same result, without the stacking's speed.
    """
    members = list(members) if members is not None else [Member(seed=i) for i in range(len(models))]
    if len(members) != len(models) or not models:
        raise SoftTargetsError("fit_many needs one Member per model (and at least one model)")
    if data.weights is not None:
        raise SoftTargetsError("fit_many does not take row weights; use fit() for weighted rows")
    check_lengths(epochs, batch_size)
    settings = dict(
        val=val,
        test=test,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        schedule=schedule,
        device=device,
        patience=patience,
        restore_best=restore_best,
        log_path=log_path,
        progress=progress,
    )
    results: list[FitResult | None] = [None] * len(models)
    together = [i for i, model in enumerate(models) if stackable(model)]
    for i in sorted(set(range(len(models))) - set(together)):
        results[i] = _fit_alone(models[i], data, members[i], settings)
    for stack in stack_groups([models[i] for i in together], batch_size):
        group = [together[j] for j in stack]
        stacked = _fit_stack(
            [models[i] for i in group], data, [members[i] for i in group], **settings
        )
        for i, result in zip(group, stacked, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def _fit_alone(
    model: nn.Module, data: Dataset, member: Member, settings: dict[str, Any]
) -> FitResult:
    """One member trained by :func:`fit`: its rows, labels, targets, seed and overrides."""
    member_data, targets = _member_data(member, data), member.targets
    if member.rows is not None:
        member_data = member_data.take(member.rows)
        if isinstance(targets, Tensor):  # aligned with data's rows: the member's rows of them
            targets = targets[member.rows.to(targets.device)]
    options = dict(settings)
    if member.lr is not None:
        options["lr"] = member.lr
    if member.weight_decay is not None:
        options["weight_decay"] = member.weight_decay
    return fit(model, member_data, targets, seed=member.seed, log_extra=member.log, **options)


def _fit_stack(
    models: Sequence[nn.Module],
    data: Dataset,
    members: Sequence[Member],
    *,
    val: Dataset | None,
    test: Dataset | None,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    schedule: str,
    device: torch.device | str | None,
    patience: int | None,
    restore_best: bool,
    log_path: str | Path | None,
    progress: Any,
) -> list[FitResult]:
    """:func:`fit_many` for models that form one :class:`StackedMLP`."""
    started = time.perf_counter()
    device = resolve_device(device)
    net = StackedMLP(models).to(device)
    if net.in_features != data.num_features or net.out_features != data.num_classes:
        raise SoftTargetsError(
            f"the models map {net.in_features} features to {net.out_features} classes; the data "
            f"has {data.num_features} features and {data.num_classes} classes"
        )
    targets = StackedTargets.for_members(members, data, device)
    for setting in targets.settings.values():
        check_warmup_fits(setting.warmup, epochs)
    batches = _Batches(members, data, batch_size, device)
    rates = LearningRates(
        [m.lr if m.lr is not None else lr for m in members],
        schedule,
        [epochs * steps for steps in batches.steps_per_member],
    )
    decay = [m.weight_decay if m.weight_decay is not None else weight_decay for m in members]
    opt = StackedOptimizer(list(net.parameters()), optimizer, decay, momentum)
    tracker = Selection(models, patience, log_path, [m.log for m in members])
    best = [p.detach().clone() for p in net.parameters()]  # each member's best weights so far
    val_dev = None if val is None else val.to(device)
    test_dev = None if test is None else test.to(device)
    task = (
        progress.add_task(f"training {len(models)} models at once", total=epochs)
        if progress
        else None
    )

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(members[0].seed)
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            net.train()
            targets.start_epoch(epoch)  # warm-ups
            train_loss = _train_epoch(net, opt, targets, batches, rates, tracker.running)
            scores = _scores(net, val_dev), _scores(net, test_dev)
            seconds = time.perf_counter() - epoch_start  # of the whole stack: the members share it
            improved = tracker.end_epoch(epoch, train_loss, scores, seconds, rates)
            if improved and restore_best:
                with torch.no_grad():
                    rows = torch.tensor(improved, device=device)
                    for b, p in zip(best, net.parameters(), strict=True):
                        b.index_copy_(0, rows, p.index_select(0, rows))
            if task is not None:
                progress.update(task, advance=1)
            if not any(tracker.running):
                break

    with torch.no_grad():
        for m, restore in enumerate(tracker.finish(restore_best)):
            if restore:
                for b, p in zip(best, net.parameters(), strict=True):
                    p[m] = b[m]
    share = (time.perf_counter() - started) / len(models)  # one clock reading: equal shares
    for m, result in enumerate(tracker.results):
        result.model = net.load_member(m, models[m])  # trained in place, as fit() does
        result.seconds = share
    if task is not None:
        progress.remove_task(task)
    return tracker.results


class _Batches:
    """Each member's shuffled batches of one epoch, laid out for the stacked step.

    Members draw their own batch order from their own generator, exactly as ``fit`` does, and are
    padded to the longest member's number of steps (padding rows get weight 0).
    """

    def __init__(
        self, members: Sequence[Member], data: Dataset, batch_size: int, device: torch.device
    ) -> None:
        self.rows_per_member = [
            torch.arange(len(data)) if m.rows is None else torch.as_tensor(m.rows).long()
            for m in members
        ]
        if min(len(r) for r in self.rows_per_member) == 0:
            raise SoftTargetsError("every member needs at least one training row")
        # a batch larger than every member's rows is one batch of all of them: the buffers need
        # no more (--batch-size 1000000 on 1,797 rows would preallocate members x 10^6 rows)
        batch_size = min(batch_size, max(len(r) for r in self.rows_per_member))
        self.steps_per_member = [math.ceil(len(r) / batch_size) for r in self.rows_per_member]
        self.steps = max(self.steps_per_member)
        self.batch_size, self.num_rows, self.device = batch_size, len(data), device
        self.generators = [torch.Generator().manual_seed(m.seed) for m in members]
        self.features = data.features.reshape(len(data), -1).to(device)
        self.batch_features = self.features.new_empty(
            len(members) * batch_size, self.features.shape[1]
        )
        self.rows_seen = torch.tensor([len(r) for r in self.rows_per_member], device=device)

    def draw(self) -> None:
        """Shuffle for a new epoch: per step, every member's data rows and target-table rows
        ``(S, M * B)``, row weights ``(M, S, B)`` (a batch mean per member) and row counts."""
        count, steps, size = len(self.generators), self.steps, self.batch_size
        order, valid = _padded_orders(self.rows_per_member, self.generators, steps * size)
        order, valid = order.to(self.device), valid.to(self.device).float()
        self.data_rows = _rows_by_step(order, steps)
        self.table_rows = _rows_by_step(order, steps, offset=self.num_rows)
        self.counts = valid.view(count, steps, size).sum(2)  # (M, S); 0 once a member is done
        self.weights = valid.view(count, steps, size) / self.counts.clamp_min(1)[..., None]
        self.counts_by_step = self.counts.T.tolist()  # (S, M), on the host

    def features_of(self, step: int) -> Tensor:
        """The stacked input batch of ``step``: ``(M, B, features)``."""
        torch.index_select(self.features, 0, self.data_rows[step], out=self.batch_features)
        return self.batch_features.view(len(self.generators), self.batch_size, -1)


def _train_epoch(
    net: StackedMLP,
    opt: StackedOptimizer,
    targets: StackedTargets,
    batches: _Batches,
    rates: LearningRates,
    running: list[bool],
) -> list[float]:
    """One epoch of every running member; each member's mean training loss."""
    batches.draw()
    loss_sum = torch.zeros(len(running), device=batches.device)
    for s in range(batches.steps):
        active = [c > 0 and r for c, r in zip(batches.counts_by_step[s], running, strict=True)]
        step_rates = rates.for_step(active)
        logits = net.train_forward(batches.features_of(s))
        value, grad = targets.loss(logits, batches.table_rows[s], batches.weights[:, s])
        net.train_backward(grad)
        opt.step(step_rates, active)
        loss_sum.addcmul_(value, batches.counts[:, s])
    return (loss_sum / batches.rows_seen).tolist()


@torch.no_grad()
def _scores(net: StackedMLP, data: Dataset | None) -> tuple[list[float], list[float]] | None:
    """Per member accuracy and NLL on ``data`` (all members see the same rows)."""
    if data is None:
        return None
    net.eval()
    correct = torch.zeros(len(net.weights[0]), device=data.features.device)
    nll = torch.zeros_like(correct)
    chunk = 512  # the evaluation buffers hold M x chunk x width floats per layer
    for start in range(0, len(data), chunk):
        x = data.features[start : start + chunk]
        logits = net.infer(x.reshape(len(x), -1))
        labels = data.labels[start : start + chunk].expand(logits.shape[0], -1)
        correct += (logits.argmax(-1) == labels).sum(1)
        nll += F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)
    return (correct / len(data)).tolist(), (nll / len(data)).tolist()
