"""Training: :func:`fit`, one explicit loop, and :func:`evaluate`.

In-memory data is moved to the device once and batched by index permutation: no ``DataLoader``,
no worker processes, no per-batch collation. For the small models of this field that overhead
would otherwise cost more than the model itself.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from softtargets import distributed
from softtargets.config import TRAINING
from softtargets.data import streams
from softtargets.data.dataset import Dataset, holdout
from softtargets.data.fingerprint import labels_fingerprint
from softtargets.errors import SoftTargetsError
from softtargets.losses.methods import check_warmup_fits
from softtargets.store.label import predict_logits
from softtargets.store.store import SoftTargetStore, fingerprint_module
from softtargets.training import checkpoint as checkpoints
from softtargets.training.batches import _MemoryBatches, _StreamBatches
from softtargets.training.common import (
    OptimizerName,
    Precision,
    ScheduleName,
    _classes_of,
    check_lengths,
    check_not_empty,
    make_optimizer,
    resolve_device,
)
from softtargets.training.features import FeatureDistillation, FeatureObjective
from softtargets.training.objectives import (
    Distillation,
    MethodObjective,
    Targets,
    check_output_width,
)
from softtargets.training.selection import FitResult, LearningRates, Selection


@torch.no_grad()
def _score(
    model: nn.Module, data: Dataset | TorchDataset | None, device: torch.device
) -> tuple[list[float], list[float]] | None:
    """``([accuracy], [NLL])`` of ``model`` on ``data`` (one member, as :class:`Selection` takes)."""
    if data is None:
        return None
    if streams.is_stream(data):
        logits, labels, _, _ = streams.predict(model, data, 1024, device)
    else:
        logits, labels = predict_logits(model, data.features, device=device), data.labels.to(device)
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return [accuracy], [float(F.cross_entropy(logits, labels))]


def fit(
    model: nn.Module,
    data: Dataset | TorchDataset,
    targets: Targets = None,
    *,
    val: Dataset | TorchDataset | float | None = None,
    test: Dataset | TorchDataset | None = None,
    epochs: int = TRAINING.epochs,
    batch_size: int = TRAINING.batch_size,
    optimizer: OptimizerName = TRAINING.optimizer,
    lr: float = TRAINING.lr,
    weight_decay: float = TRAINING.weight_decay,
    momentum: float = TRAINING.momentum,
    schedule: ScheduleName = TRAINING.schedule,
    seed: int = 0,
    device: torch.device | str | None = None,
    patience: int | None = TRAINING.patience,
    restore_best: bool = True,
    log_path: str | Path | None = None,
    log_extra: dict[str, Any] | None = None,
    progress: Any = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    num_workers: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = TRAINING.checkpoint_every,
    precision: Precision = TRAINING.precision,
    compile: bool = TRAINING.compile,
) -> FitResult:
    """Train ``model`` on ``data`` and return a :class:`FitResult`.

    Args:
        model: any module mapping ``(B, *data.feature_shape)`` to ``(B, K)`` logits.
        data: training rows: an in-memory :class:`Dataset` (features, labels, ids; soft
            targets/weights if used), or a streamed ``torch.utils.data.Dataset`` of
            ``(x, label, id)`` items (:mod:`softtargets.data.streams`), read through a ``DataLoader``.
        targets: ``None``/``"hard"`` for the labels; ``"soft"`` for ``data.soft_targets``; an
            ``(N, K)`` probability matrix aligned with ``data``; a :class:`SoftTargetStore`
            (soft targets at T=1, looked up by id); or a :class:`Distillation` (whose teacher, for
            streamed data, may be a module run on each batch: online distillation).
        val: validation rows, or a fraction of ``data`` to hold out (seeded, stratified; in-memory
            data only). Used for early stopping and to select the returned weights, never the
            test set.
        test: evaluated after every epoch for the history only; it never influences training.
        epochs, batch_size, optimizer, lr, weight_decay, momentum, schedule: the usual.
        seed: seeds batch order and dropout; the global random state is left untouched.
        device: default ``cuda`` when available.
        patience: stop after this many epochs without a better validation accuracy.
        restore_best: with validation data, return the weights of the best validation epoch
            (ties broken by validation NLL); otherwise the last epoch's.
        log_path: append one JSON line per epoch here (plus ``log_extra``).
        progress: a ``rich.progress.Progress`` to report epochs to.
        on_epoch_end: called with each epoch's record (one plain hook, minGPT-style).
        num_workers: ``DataLoader`` worker processes for streamed data.
        checkpoint: a file to save the whole training state to every ``checkpoint_every`` epochs
            (and at the end), atomically; if it holds this fit's state already (same settings,
            data and initial weights), training continues from there and ends with exactly the
            weights and metrics of an uninterrupted run (:mod:`softtargets.training.checkpoint`).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the model's forward pass
            runs under autocast in that type (the loss is computed in float32; fp16 on CUDA
            scales the loss against underflow).
        compile: train through ``torch.compile(model)`` (the first steps compile it, which
            takes seconds to minutes; evaluation uses the model itself).
    """
    started = time.perf_counter()
    device = resolve_device(device)
    check_lengths(epochs, batch_size)
    if checkpoint is not None and checkpoint_every < 1:
        raise SoftTargetsError(f"checkpoint_every must be >= 1 epoch, got {checkpoint_every}")
    num_classes = _check_parts(data, val, test)
    model.to(device)
    features = targets if isinstance(targets, FeatureDistillation) else None
    targets = None if features is not None else targets  # the feature objective replaces it
    batches, val = _batches(data, targets, val, batch_size, seed, num_workers, device)
    trainable, adapters, hooks = _trainable(model, features, data, batches, seed, device)
    forward = _forward(model, compile, precision, device)
    # fp16 on CUDA scales the loss against underflow; everywhere else the scaler is a no-op
    scaler = torch.amp.GradScaler(
        device.type, enabled=precision == "fp16" and device.type == "cuda"
    )
    settings = dict(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
        weight_decay=weight_decay, momentum=momentum, schedule=schedule, seed=seed,
        patience=patience, restore_best=restore_best, precision=precision, compile=compile,
    )  # fmt: skip
    described = features if features is not None else targets
    key = _fit_key(model, data, described, val, settings) if checkpoint is not None else ""
    opt = make_optimizer(trainable, optimizer, lr, weight_decay, momentum)
    rates = LearningRates([lr], schedule, [epochs * math.ceil(len(batches) / batch_size)])
    main = distributed.rank() == 0  # of the processes training this model, rank 0 writes
    tracker = Selection([model], patience, log_path if main else None, [log_extra])
    result = tracker.results[0]
    task = progress.add_task("training", total=epochs) if progress is not None else None
    saved = checkpoints.load(checkpoint, key, epochs) if checkpoint is not None else None
    val_dev, test_dev = (
        part.to(device) if isinstance(part, Dataset) else part for part in (val, test)
    )
    start_epoch = getattr(batches.loss, "start_epoch", None)  # a warm-up's hook
    check_warmup_fits(getattr(batches.loss, "warmup", 0), epochs)

    # fork_rng keeps dropout's random draws seeded without changing the caller's global stream.
    # The feature objective's hooks leave the caller's models when training ends, however it ends.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), hooks:
        torch.manual_seed(seed + distributed.rank())  # dropout differs between the processes
        best_state, first_epoch = _resume(saved, trainable, opt, tracker, rates, batches, device)
        if task is not None:
            progress.update(task, advance=first_epoch - 1)
        step = rates.taken[0]
        for epoch in range(first_epoch, epochs + 1):
            if not tracker.running[0]:  # diverged or stopped early (before a resume)
                break
            epoch_start = time.perf_counter()
            model.train()
            if start_epoch is not None:  # a warm-up's factor for this epoch (resumes included)
                start_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            for inputs, key_, count, weight in batches:
                (rate,) = rates.for_step((True,))
                for group in opt.param_groups:
                    group["lr"] = rate
                logits = forward(inputs)
                if step == 0 and num_classes is not None:
                    check_output_width(logits, num_classes)
                loss, logits_grad = batches.loss(logits, key_)
                value = loss.detach()
                if weight != 1.0:  # this process's share of the global batch (see _MemoryBatches)
                    loss = loss * weight
                    logits_grad = None if logits_grad is None else logits_grad * weight
                opt.zero_grad(set_to_none=True)
                if logits_grad is None:
                    scaler.scale(loss).backward()
                else:  # the gradient is known in closed form: autograd runs the model only
                    logits.backward(scaler.scale(logits_grad))
                if adapters is not None:
                    distributed.average_gradients(adapters)
                scaler.step(opt)
                scaler.update()
                loss_sum += value * count  # a device-side sum: no host sync inside the loop
                step += 1
            train_loss = float(distributed.sum_(loss_sum)) / len(batches)  # one sync per epoch
            scores = _score(model, val_dev, device), _score(model, test_dev, device)
            seconds = time.perf_counter() - epoch_start
            if tracker.end_epoch(epoch, [train_loss], scores, seconds, rates) and restore_best:
                best_state = copy.deepcopy(model.state_dict())
            last = epoch == epochs or not tracker.running[0]
            if checkpoint is not None and main and (epoch % checkpoint_every == 0 or last):
                checkpoints.save(checkpoint, checkpoints.FitState(
                    key=key, epoch=epoch, model=trainable.state_dict(), optimizer=opt.state_dict(),
                    best=best_state, rng=checkpoints.rng_states(batches.generators(), device),
                    progress={"selection": tracker.state(), "rates": rates.state()},
                ))  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(result.history[-1])
            if task is not None:
                progress.update(task, advance=1)

    if tracker.finish(restore_best)[0] and best_state is not None:
        model.load_state_dict(best_state)
    if task is not None:
        progress.remove_task(task)
    result.seconds = time.perf_counter() - started
    return result


def _batches(
    data: Any,
    targets: Targets,
    val: Any,
    batch_size: int,
    seed: int,
    num_workers: int,
    device: torch.device,
) -> tuple[_MemoryBatches | _StreamBatches, Any]:
    """The training batches of ``data`` with their objective, and the validation rows (a
    fraction of in-memory ``data`` held out here, seeded and stratified)."""
    if streams.is_stream(data):
        if isinstance(val, float):
            raise SoftTargetsError(
                "a validation fraction needs in-memory data; pass val= a dataset of its own"
            )
        return _StreamBatches(data, targets, batch_size, seed, num_workers, device), val
    train_rows = torch.arange(len(data))
    if isinstance(val, float):
        train_rows, val_rows = holdout(data, val, seed)
        val = data.take(val_rows)
    generator = torch.Generator().manual_seed(seed)
    return _MemoryBatches(data, train_rows, targets, batch_size, generator, device), val


def _trainable(
    model: nn.Module,
    features: FeatureDistillation | None,
    data: Any,
    batches: _MemoryBatches | _StreamBatches,
    seed: int,
    device: torch.device,
) -> tuple[nn.Module, nn.Module | None, Any]:
    """``(what the optimizer trains and a checkpoint saves, the feature adapters, a context that
    removes the feature hooks)``: the model, and with feature distillation the adapters too
    (trained beside it, averaged like it under DDP)."""
    if features is None:
        return model, None, contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]):  # the adapters' initial weights follow seed
        torch.manual_seed(seed)
        objective = _feature_objective(features, model, data, batches, device)
    distributed.broadcast_parameters(objective.adapters)
    return nn.ModuleList([model, objective.adapters]), objective.adapters, objective.hooks_removed()


def _forward(
    model: nn.Module, compile: bool, precision: str, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """The training forward pass: under DDP (gradients averaged over the processes, rank 0's
    weights to start), compiled if asked, in ``precision``."""
    trained = model
    if distributed.active():
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return _autocast_forward(torch.compile(trained) if compile else trained, precision, device)


def _resume(
    saved: checkpoints.FitState | None,
    trainable: nn.Module,
    opt: torch.optim.Optimizer,
    tracker: Selection,
    rates: LearningRates,
    batches: _MemoryBatches | _StreamBatches,
    device: torch.device,
) -> tuple[dict[str, Tensor] | None, int]:
    """``(best weights so far, first epoch to train)``: from a checkpoint, every state restored
    where it left off, or ``(None, 1)`` for a fresh fit."""
    if saved is None:
        return None, 1
    trainable.load_state_dict(saved.model)
    opt.load_state_dict(saved.optimizer)
    tracker.restore(saved.progress["selection"])
    rates.restore(saved.progress["rates"])
    checkpoints.set_rng_states(saved.rng, batches.generators(), device)
    if distributed.rank():  # rank 0's states were saved: the others' dropout draws apart
        torch.manual_seed(int(torch.randint(2**62, ())) + distributed.rank())
    return saved.best, saved.epoch + 1


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast_forward(
    model: nn.Module | Callable[[Tensor], Tensor], precision: str, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """``model``'s forward pass in ``precision``, returning float32 logits ``(B, K)``: the
    losses' softmax and closed-form gradients need float32's range and digits."""
    if precision == "fp32":
        return model
    if precision not in _AUTOCAST:
        raise SoftTargetsError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    dtype = _AUTOCAST[precision]

    def forward(inputs: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return model(inputs).float()

    return forward


def _fit_key(
    model: nn.Module, data: Any, targets: Targets, val: Any, settings: dict[str, Any]
) -> str:
    """The checkpoint key of a fit: its settings, the data, the targets and the initial weights."""

    def describe(part: Any) -> Any:
        if part is None or isinstance(part, (float, int, str)):
            return part
        if isinstance(part, Dataset):
            return [part.fingerprint, len(part), labels_fingerprint(part)]
        if isinstance(part, SoftTargetStore):
            return [part.teacher_fingerprint, part.data_fingerprint, part.kept]
        if isinstance(part, FeatureDistillation):
            pairs = [
                list(p) if isinstance(p, tuple) else list(vars(p).values()) for p in part.pairs
            ]
            return [
                "features", fingerprint_module(part.teacher), pairs, part.weight,
                part.temperature, part.alpha, part.method, part.options,
            ]  # fmt: skip
        if isinstance(part, Distillation):
            return [
                "distill", describe(part.teacher), part.temperature, part.alpha, part.tail,
                part.method, part.options,
            ]  # fmt: skip
        if isinstance(part, nn.Module):
            return fingerprint_module(part)
        if isinstance(part, Tensor):
            return hashlib.sha256(part.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        return [type(part).__name__, len(part) if hasattr(part, "__len__") else None]

    return checkpoints.fit_key(
        settings=settings,
        model=fingerprint_module(model),
        data=describe(data),
        targets=describe(targets),
        val=describe(val),
    )


def _feature_objective(
    spec: FeatureDistillation,
    model: nn.Module,
    data: Any,
    batches: _MemoryBatches | _StreamBatches,
    device: torch.device,
) -> FeatureObjective:
    """Build the feature objective on a sample of ``data`` and make it ``batches``' loss."""
    if isinstance(batches, _MemoryBatches):
        objective = FeatureObjective(spec, model, batches.features[:2])
        labels = data.labels.to(device)

        def step(logits: Tensor, rows: Tensor, ramp: float) -> tuple[Tensor, None]:
            inputs = batches.features.index_select(0, rows)
            return objective.loss(logits, inputs, labels[rows], ramp), None

    else:
        objective = FeatureObjective(spec, model, torch.as_tensor(data[0][0])[None].to(device))

        def step(logits: Tensor, key: Any, ramp: float) -> tuple[Tensor, None]:
            return objective.loss(logits, key[2], key[0], ramp), None

    batches.loss = MethodObjective(step, objective.warmup)  # autograd: the grad is None
    return objective


def _check_parts(data: Any, val: Any, test: Any) -> int | None:
    """Refuse empty parts and parts with different numbers of classes; the number of classes."""
    num_classes = _classes_of(data)
    for part, name in ((data, "training data"), (val, "validation data"), (test, "test data")):
        if part is None or isinstance(part, float):
            continue
        check_not_empty(part, name)
        k = _classes_of(part)
        if None not in (k, num_classes) and k != num_classes:
            raise SoftTargetsError(
                f"the {name} has {k} classes but the training data {num_classes}; give both the "
                "same classes"
            )
    if num_classes is not None and num_classes < 2:
        raise SoftTargetsError(
            f"the training data has {num_classes} class; a classifier needs at least 2 (every "
            "row would be right by construction)"
        )
    return num_classes
