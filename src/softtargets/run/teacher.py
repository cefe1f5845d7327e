"""The main job's first half: the run's data and splits, checked before anything is written, then
the teacher (trained, or reloaded when the folder has it for the same settings and data) and its
store. The studies reuse it for their cached teachers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from softtargets import distributed
from softtargets.config import DistillConfig, dump_config
from softtargets.data.dataset import Dataset, Splits
from softtargets.data.fingerprint import labels_fingerprint
from softtargets.data.stream_parts import first_rows
from softtargets.data.targets import smooth
from softtargets.errors import SoftTargetsError
from softtargets.losses.methods import METHODS, check_run_methods
from softtargets.run.data import RunData, load_splits, rows_of
from softtargets.run.folder import (
    FIT_IDENTITY,
    RunFolder,
    check_out_of_inputs,
    config_key,
    fit_records,
    settings_key,
)
from softtargets.run.report import of_total
from softtargets.store.label import label
from softtargets.store.store import SoftTargetStore
from softtargets.training import checkpoint as checkpoints
from softtargets.training.common import resolve_device
from softtargets.training.fit import fit
from softtargets.training.hf import check_hf_classes, hf_weights_file
from softtargets.training.metrics import classification_report, evaluate
from softtargets.training.models import (
    build_model,
    check_model_fits,
    count_parameters,
    forward_flops,
)
from softtargets.training.weights import file_fingerprint, load_into


def is_pretrained(config: DistillConfig) -> bool:
    """Whether the run's teacher comes trained (``--teacher-weights``, or an ``hf:`` folder's
    weights) rather than being trained here."""
    return config.teacher.weights is not None or config.teacher.name.startswith("hf:")


def pretrained_weights(config: DistillConfig) -> str | None:
    """The file a pretrained teacher's weights come from (``--teacher-weights``, or an ``hf:``
    folder's ``model.safetensors``), which keys it by content; ``None`` for a teacher trained
    here."""
    if config.teacher.weights is not None:
        return config.teacher.weights
    return str(hf_weights_file(config.teacher.name)) if is_pretrained(config) else None


@dataclass
class Prepared:
    """Everything checked before a run writes anything: the data, its splits, the device, a
    freshly built teacher and the key of the teacher's settings and data."""

    data: RunData
    splits: Splits
    device: torch.device
    teacher: nn.Module | None  # None when the students learn from an existing store
    teacher_key: str
    store: SoftTargetStore | None = None


def prepare(config: DistillConfig) -> Prepared:
    """Check the whole config against its data before any training or writing: the device, the
    data and its split, and that both models build with their options on this data."""
    check_run_methods(config.methods, config.method_options)  # the registry's names
    device = resolve_device(config.device)
    if config.student.weights is not None:
        raise SoftTargetsError(
            "students are trained, not loaded: weights apply to the teacher (--teacher-weights)"
        )
    data, splits = load_splits(config)
    sample = first_rows(splits.train, 2)
    keyed: dict[str, Any] = {}
    teacher, store = None, None
    if config.store is not None:  # label once, distil many times: no teacher here
        store = SoftTargetStore.load(config.store, data=data, mmap=True)
        keyed["store"] = [store.teacher_fingerprint, store.kept]
        features = [m for m in config.methods if METHODS[m].features]
        if features:
            raise SoftTargetsError(
                f"{features[0]} pairs the student's features with the teacher's, so it needs the "
                "teacher model, not a store; leave out --store or that method"
            )
    else:
        teacher = build_model(
            config.teacher.name,
            data.feature_shape,
            data.num_classes,
            seed=config.first_seed,
            **config.teacher.options,
        )
        if config.teacher.weights is not None:
            load_into(teacher, config.teacher.weights, "teacher")
        weights = pretrained_weights(config)
        if weights is not None:
            keyed["weights"] = file_fingerprint(weights)
        check_model_fits(teacher, sample, data.num_classes, f"teacher {config.teacher.name}")
        check_hf_classes(teacher, data.class_names, f"teacher {config.teacher.name}")
    # The student is built now only to check it (an error after the teacher has trained for
    # minutes would waste them); each fit builds its own.
    student = build_model(
        config.student.name, data.feature_shape, data.num_classes, seed=0, **config.student.options
    )  # seeded: the caller's random stream is left untouched
    check_model_fits(student, sample, data.num_classes, f"student {config.student.name}")
    if config.data.augment and config.store is not None:
        raise SoftTargetsError(
            "--augment needs the teacher model, run on every augmented batch: stored logits "
            "belong to the images as they are; leave out --store or --augment"
        )
    if config.data.stream and (
        config.teacher_training.label_smoothing or config.student_training.label_smoothing
    ):
        raise SoftTargetsError("label smoothing is not applied to streamed data; leave it out")
    if config.student.name == "mlp" and getattr(splits.train, "weights", 1) is None:
        config.student_training.stacked_options()  # they train together: fp32, no compile
    key = settings_key(
        {
            "settings": config_key(config, teacher_only=True),
            "data": data.fingerprint,
            "labels": labels_fingerprint(data),
            **keyed,
        }
    )
    return Prepared(data, splits, device, teacher, key, store)


def forget_unfinished(folder: RunFolder, finished: set[tuple]) -> None:
    """Drop history lines of fits that did not finish (an interrupted run), before resuming;
    a fit with a checkpoint keeps the lines of the epochs it saved (it continues after them)."""
    records = fit_records(folder, "history.jsonl")
    saved: dict[tuple, int] = {}

    def keep(record: dict[str, Any]) -> bool:
        identity = tuple(record[k] for k in FIT_IDENTITY)
        if identity in finished:
            return True
        if identity not in saved:
            path = folder.root / checkpoint_name(identity)
            saved[identity] = checkpoints.saved_epoch(path) if path.exists() else 0
        return int(record.get("epoch", 0)) <= saved[identity]

    kept = [r for r in records if keep(r)]
    if len(kept) != len(records):
        folder.rewrite_records("history.jsonl", kept)


def checkpoint_name(identity: tuple) -> str:
    """The run folder's checkpoint file of the fit ``(key, role, method, seed)``."""
    key, role, method, seed = identity
    return f"{role}-{method}-seed{seed}-{key}.ckpt"


def name_student_checkpoints(
    folder: RunFolder, every: int, key: str, pending: list[tuple[str, int]]
) -> None:
    """Before a sweep is spread over the processes: rank 0 names every pending student's
    checkpoint in the manifest (none when ``every`` is 0), and all wait, so that no process
    writes one the manifest does not list."""
    if folder.writer and every:
        for method, seed in pending:
            folder.path(checkpoint_name((key, "student", method, seed)))
    distributed.barrier()


def checkpoint_args(folder: RunFolder, every: int, identity: tuple) -> dict[str, Any]:
    """``fit``'s checkpoint arguments for this fit (none when ``every`` is 0)."""
    if every == 0:
        return {}
    return {"checkpoint": folder.path(checkpoint_name(identity)), "checkpoint_every": every}


@dataclass
class Finished:
    """A finished student fit: its result record, its epoch records (for the history) and, until
    rank 0 has saved them, its weights (on the CPU)."""

    record: dict[str, Any]
    history: list[dict[str, Any]]
    state: dict[str, Tensor] | None = None


def history_path(folder: RunFolder) -> Path | None:
    """Where fits log their epochs: the run's history, written by rank 0 only."""
    return folder.path("history.jsonl") if folder.writer else None


@dataclass
class TeacherRun:
    """A fitted (or reloaded) teacher with its store, the data and the splits it was made on
    (``teacher`` is ``None`` when the run learns from an existing store)."""

    teacher: nn.Module | None
    store: SoftTargetStore
    data: RunData
    splits: Splits
    record: dict[str, Any]
    device: torch.device


def run_teacher(
    config: DistillConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    wait: bool = False,
    progress: Any = None,
    log: Callable[[str], None] = lambda message: None,
) -> TeacherRun:
    """Fit the teacher and store its logits in ``out_dir``, or reload them if a previous run with the
    same teacher settings and data finished them. A teacher made otherwise is refused.

    ``wait``: if another process holds the folder, wait for it instead of failing (the studies'
    shared teachers).
    """
    check_out_of_inputs(out_dir, [config.data.name, config.data.test])
    prepared = prepare(config)
    with RunFolder.open(out_dir, overwrite=overwrite, wait=wait, log=log) as folder:
        return teacher_in(folder, config, prepared, progress, log)


def teacher_in(
    folder: RunFolder,
    config: DistillConfig,
    prepared: Prepared,
    progress: Any,
    log: Callable[[str], None],
) -> TeacherRun:
    """:func:`run_teacher` inside an open run folder."""
    key, teacher = prepared.teacher_key, prepared.teacher
    data, splits = prepared.data, prepared.splits
    # Everything is checked before anything is written: the teacher's settings, and that the
    # run's records are readable (a foreign line in them is an error naming it).
    if folder.key("teacher") not in (None, key):
        raise SoftTargetsError(
            f"{folder.root} holds a teacher made with other data or teacher settings; pass "
            "--overwrite to replace it or --out to write elsewhere"
        )
    for name in ("history.jsonl", "results.jsonl"):
        fit_records(folder, name)
    folder.write_text("config.yaml", dump_config(config))
    log(
        f"data: {data.name}, {len(splits.train)} train / {len(splits.val)} validation / "
        f"{len(splits.test)} test rows, {data.num_classes} classes; device: {prepared.device}"
    )
    if prepared.store is not None:
        return _teacher_from_store(folder, config, prepared, log)
    assert teacher is not None  # prepare builds one unless there is a store
    reloaded = folder.load_weights("teacher.safetensors", teacher, key)
    pretrained = is_pretrained(config)
    if reloaded:
        teacher.to(prepared.device)
        log("teacher: reloaded from a previous run")
    elif pretrained:  # prepare loaded the user's weights: nothing to train
        teacher.to(prepared.device)
        folder.save_weights("teacher.safetensors", teacher, key)
        folder.set_key("teacher", key)
        log(f"teacher: pretrained weights from {config.teacher.weights or config.teacher.name}")
    else:
        forget_unfinished(folder, set())  # a teacher that never finished leaves no history
        identity = (key, "teacher", "teacher", config.first_seed)
        fit(
            teacher,
            splits.train,
            hard_targets(splits.train, config.teacher_training.label_smoothing),
            val=splits.val or None,
            test=splits.test,
            seed=config.first_seed,
            device=prepared.device,
            progress=progress,
            log_path=folder.path("history.jsonl"),
            log_extra={
                "key": key,
                "role": "teacher",
                "method": "teacher",
                "seed": config.first_seed,
            },
            num_workers=config.data.workers,
            **checkpoint_args(folder, config.teacher_training.checkpoint_every, identity),
            **config.teacher_training.fit_options(),
        )
        folder.save_weights("teacher.safetensors", teacher, key)
        folder.set_key("teacher", key)
        folder.remove(checkpoint_name(identity))

    store_path = folder.path("store.safetensors")
    store = None
    if store_path.exists() and reloaded:
        try:
            store = SoftTargetStore.load(store_path, data=data, teacher=teacher)
        except SoftTargetsError as err:
            log(f"store: {err}; labelling again")
    if store is None:
        dtype = torch.float16 if config.store_dtype == "float16" else torch.float32
        store = label(
            teacher,
            rows_of(data),
            dtype=dtype,
            info={"teacher": config.teacher.model_dump(), "data": config.data.name},
        )
        if folder.writer:
            store.save(store_path)
    metrics = evaluate(teacher, splits.test)
    record = {
        "key": key,
        "role": "teacher",
        "method": "teacher",
        "seed": config.first_seed,
        "pretrained": pretrained,
        **({"val_accuracy": evaluate(teacher, splits.val)["accuracy"]} if len(splits.val) else {}),
        **{f"test_{k}": v for k, v in metrics.items()},
        "test_rows": len(splits.test),
        "parameters": count_parameters(teacher),
        "flops": forward_flops(teacher, data.feature_shape),
    }
    if not reloaded:  # one line per teacher, as per student (a reloaded one has its line)
        folder.append("results.jsonl", record)
    log(
        f"teacher {config.teacher.name}{' (pretrained)' if pretrained else ''}: test accuracy {metrics['accuracy']:.2%} "
        f"({of_total(metrics['errors'], len(splits.test))} errors)"
    )
    return TeacherRun(teacher, store, data, splits, record, prepared.device)


def _teacher_from_store(
    folder: RunFolder, config: DistillConfig, prepared: Prepared, log: Callable[[str], None]
) -> TeacherRun:
    """The teacher's part of a run given ``--store``: its stored logits, already checked against
    the data, stand for it; its record is that of the logits on the validation and test rows."""
    store, splits, key = prepared.store, prepared.splits, prepared.teacher_key
    assert store is not None
    first = folder.key("teacher") is None
    if not first and folder.key("teacher") != key:
        raise SoftTargetsError(
            f"{folder.root} holds a run with another teacher or store; pass --overwrite to "
            "replace it or --out to write elsewhere"
        )
    folder.write_text("config.yaml", dump_config(config))
    folder.set_key("teacher", key)

    def lookup(part: Any) -> Tensor:  # a dataset is checked by the store; streamed rows by id
        return store.logits_for(part if isinstance(part, Dataset) else part.ids).float()

    metrics = classification_report(lookup(splits.test), splits.test.labels)
    val = {}
    if len(splits.val):
        logits = lookup(splits.val)
        val = {"val_accuracy": classification_report(logits, splits.val.labels)["accuracy"]}
    record = {
        "key": key,
        "role": "teacher",
        "method": "teacher",
        "seed": config.first_seed,
        "store": str(config.store),
        **val,
        **{f"test_{k}": v for k, v in metrics.items()},
        "test_rows": len(splits.test),
    }
    if first:
        folder.append("results.jsonl", record)
    log(
        f"teacher: the store {config.store} ({len(store)} rows, "
        f"{'top ' + str(store.kept) if store.kept < store.num_classes else 'all'} of "
        f"{store.num_classes} logits); its test accuracy {metrics['accuracy']:.2%}"
    )
    return TeacherRun(None, store, prepared.data, splits, record, prepared.device)


def hard_targets(train: Dataset, eps: float) -> Tensor | None:
    """The labels as targets: ``None`` (plain cross-entropy), or smoothed by ``eps``."""
    return smooth(train.labels, train.num_classes, eps) if eps else None
