"""The main job: fit a teacher, store its logits, train a student with hard and with soft targets.

:func:`run_distillation` is what ``softtargets demo`` and ``softtargets distill`` run. It writes
everything into one run directory, so any figure can be redrawn without retraining and an
interrupted run resumes where it stopped:

| file | holds |
| --- | --- |
| ``config.yaml`` | the resolved config of the latest invocation |
| ``teacher.safetensors`` | the teacher's weights, keyed by the teacher settings (other settings are refused) |
| ``store.safetensors`` | the teacher's logits for every sample id |
| ``history.jsonl`` | one line per epoch of every fit (role, method, seed, losses, accuracies) |
| ``results.jsonl`` | one line per finished fit (test accuracy, errors, NLL, ECE, agreement), keyed by the config |
| ``accuracy.png`` | test accuracy per epoch, hard vs soft, mean and 95% band over seeds |
| ``report.md`` | the table, the figure and how the run was made |

The folder is a :class:`~softtargets.runfolder.RunFolder`: locked while the job runs, with a
manifest of these files (the only ones ``--overwrite`` removes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from softtargets import checkpoint as checkpoints
from softtargets import distributed
from softtargets.config import DistillConfig, dump_config
from softtargets.data import Dataset, Splits, align_classes, labels_fingerprint, split
from softtargets.errors import SoftTargetsError
from softtargets.features import FeatureDistillation, FeaturePair, penultimate
from softtargets.limits import FEATURE_METHOD_OPTIONS
from softtargets.loaders import load_data
from softtargets.models import build_model, count_parameters, forward_flops
from softtargets.report import markdown_table, of_total, plot_epoch_curves
from softtargets.runfolder import RunFolder, settings_key
from softtargets.stats import mean_ci, paired_difference
from softtargets.targets import smooth
from softtargets.teacher import SoftTargetStore, label
from softtargets.train import Distillation, evaluate, fit, resolve_device

METHODS = ("hard", "soft")  # the demo's two: hard labels and Hinton's soft targets ("kd")


def record_method(method: str) -> str:
    """A distillation method's name in results and tables: Hinton's KD is ``"soft"``."""
    return "soft" if method == "kd" else method


def student_methods(config: DistillConfig) -> list[str]:
    """The students' targets of a run, as results name them: ``hard``, then each method."""
    return ["hard", *(record_method(m) for m in config.methods)]


@dataclass
class DistillOutcome:
    """Results of one run: the teacher's test metrics and one record per (method, seed)."""

    out_dir: Path
    teacher: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    test_rows: int = 0

    def accuracies(self, method: str) -> list[float]:
        return [
            r["test_accuracy"]
            for r in sorted(self.results, key=lambda r: r["seed"])
            if r["method"] == method
        ]

    def errors(self, method: str) -> list[float]:
        return [
            r["test_errors"]
            for r in sorted(self.results, key=lambda r: r["seed"])
            if r["method"] == method
        ]


def load_splits(config: DistillConfig) -> tuple[Dataset, Splits]:
    """The data of ``config`` and its train / validation / test parts.

    With ``data.test`` (a separate test file, such as MNIST's ``t10k``) the data file is split into
    training and validation rows only, and the test rows are that file's, with its classes matched
    to the data's by name.
    """
    data_cfg = config.data
    data = load_data(data_cfg.name, data_cfg.label_column, **data_cfg.options)
    test = None
    if data_cfg.test is not None:
        test = align_classes(load_data(data_cfg.test, data_cfg.label_column), data, data_cfg.test)
    if data_cfg.classes is not None:
        data = data.subset(classes=data_cfg.classes, relabel=True)
        test = None if test is None else test.subset(classes=data_cfg.classes, relabel=True)
    if test is None:
        parts = split(data, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.split_seed)
    else:
        train_val = split(data, data_cfg.val_fraction, 0.0, data_cfg.split_seed)
        parts = Splits(train_val.train, train_val.val, test)
    if data_cfg.label_noise > 0:
        # Training and validation labels are noisy alike (a real noisy dataset has no clean
        # validation set); the test labels stay clean, to measure what was learned.
        rate, seed = data_cfg.label_noise, data_cfg.split_seed
        parts = Splits(
            parts.train.with_label_noise(rate, seed),
            parts.val.with_label_noise(rate, seed + 1),
            parts.test,
        )
    return data, parts


TEACHER_SETTINGS = ("data", "teacher", "teacher_training", "first_seed", "store_dtype")


def config_key(config: DistillConfig, teacher_only: bool = False) -> str:
    """A short hash of the settings that determine the teacher (or the students' fits).

    The number of seeds is not part of it: fits are recorded per seed, so raising ``seeds``
    keeps the finished ones and trains only the new seeds.
    """
    values = config.model_dump(mode="json")
    for training in ("teacher_training", "student_training"):
        if not values[training]["label_smoothing"]:  # keys from before the option stay valid
            del values[training]["label_smoothing"]
    if teacher_only:
        values = {k: values[k] for k in TEACHER_SETTINGS}
    else:  # fits are recorded per seed and method: more of either trains only the new ones
        values.pop("seeds")
        values.pop("methods")
    return settings_key(values)


FIT_IDENTITY = ("key", "role", "method", "seed")


@dataclass
class Prepared:
    """Everything checked before a run writes anything: the data, its splits, the device, a
    freshly built teacher and the key of the teacher's settings and data."""

    data: Dataset
    splits: Splits
    device: torch.device
    teacher: nn.Module
    teacher_key: str


def prepare(config: DistillConfig) -> Prepared:
    """Check the whole config against its data before any training or writing: the device, the
    data and its split, and that both models build with their options on this data."""
    device = resolve_device(config.device)
    data, splits = load_splits(config)
    teacher = build_model(
        config.teacher.name,
        data.feature_shape,
        data.num_classes,
        seed=config.first_seed,
        **config.teacher.options,
    )
    # The student is built now only to check its options (an error after the teacher has
    # trained for minutes would waste them); each fit builds its own.
    build_model(
        config.student.name, data.feature_shape, data.num_classes, seed=0, **config.student.options
    )  # seeded: the caller's random stream is left untouched
    if config.student.name == "mlp" and splits.train.weights is None:
        config.student_training.stacked_options()  # they train together: fp32, no compile
    key = settings_key(
        {
            "settings": config_key(config, teacher_only=True),
            "data": data.fingerprint,
            "labels": labels_fingerprint(data),
        }
    )
    return Prepared(data, splits, device, teacher, key)


def _forget_unfinished(folder: RunFolder, finished: set[tuple]) -> None:
    """Drop history lines of fits that did not finish (an interrupted run), before resuming;
    a fit with a checkpoint keeps the lines of the epochs it saved (it continues after them)."""
    records = folder.records("history.jsonl", required=FIT_IDENTITY)
    saved: dict[tuple, int] = {}

    def keep(record: dict[str, Any]) -> bool:
        identity = tuple(record[k] for k in FIT_IDENTITY)
        if identity in finished:
            return True
        if identity not in saved:
            path = folder.root / _checkpoint_name(identity)
            saved[identity] = checkpoints.saved_epoch(path) if path.exists() else 0
        return int(record.get("epoch", 0)) <= saved[identity]

    kept = [r for r in records if keep(r)]
    if len(kept) != len(records):
        folder.rewrite_records("history.jsonl", kept)


def _checkpoint_name(identity: tuple) -> str:
    """The run folder's checkpoint file of the fit ``(key, role, method, seed)``."""
    key, role, method, seed = identity
    return f"{role}-{method}-seed{seed}-{key}.ckpt"


def _checkpoint(folder: RunFolder, every: int, identity: tuple) -> dict[str, Any]:
    """``fit``'s checkpoint arguments for this fit (none when ``every`` is 0)."""
    if every == 0:
        return {}
    return {"checkpoint": folder.path(_checkpoint_name(identity)), "checkpoint_every": every}


@dataclass
class Finished:
    """A finished student fit: its result record and its epoch records (for the history)."""

    record: dict[str, Any]
    history: list[dict[str, Any]]


def _history(folder: RunFolder) -> Path | None:
    """Where fits log their epochs: the run's history, written by rank 0 only."""
    return folder.path("history.jsonl") if folder.writer else None


@dataclass
class TeacherRun:
    """A fitted (or reloaded) teacher with its store, the data and the splits it was made on."""

    teacher: nn.Module
    store: SoftTargetStore
    data: Dataset
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
    prepared = prepare(config)
    with RunFolder.open(out_dir, overwrite=overwrite, wait=wait, log=log) as folder:
        return _teacher_in(folder, config, prepared, progress, log)


def _teacher_in(
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
        folder.records(name, required=FIT_IDENTITY)
    folder.write_text("config.yaml", dump_config(config))
    log(
        f"data: {data.name}, {len(splits.train)} train / {len(splits.val)} validation / "
        f"{len(splits.test)} test rows, {data.num_classes} classes; device: {prepared.device}"
    )
    reloaded = folder.load_weights("teacher.safetensors", teacher, key)
    if reloaded:
        teacher.to(prepared.device)
        log("teacher: reloaded from a previous run")
    else:
        _forget_unfinished(folder, set())  # a teacher that never finished leaves no history
        identity = (key, "teacher", "teacher", config.first_seed)
        fit(
            teacher,
            splits.train,
            _hard_targets(splits.train, config.teacher_training.label_smoothing),
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
            **_checkpoint(folder, config.teacher_training.checkpoint_every, identity),
            **config.teacher_training.fit_options(),
        )
        folder.save_weights("teacher.safetensors", teacher, key)
        folder.set_key("teacher", key)
        folder.remove(_checkpoint_name(identity))

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
            data,
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
        **{f"test_{k}": v for k, v in metrics.items()},
        "test_rows": len(splits.test),
        "parameters": count_parameters(teacher),
        "flops": forward_flops(teacher, data.feature_shape),
    }
    log(
        f"teacher {config.teacher.name}: test accuracy {metrics['accuracy']:.2%} "
        f"({of_total(metrics['errors'], len(splits.test))} errors)"
    )
    return TeacherRun(teacher, store, data, splits, record, prepared.device)


def run_distillation(
    config: DistillConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: Any = None,
    log: Callable[[str], None] = lambda message: None,
) -> DistillOutcome:
    """Run (or resume) the whole job described by ``config`` into ``out_dir``; see the module doc.

    Everything is checked before anything is written (:func:`prepare`), and the folder is locked
    while the job runs. Fits that finished under the same config are kept, whatever the number of
    seeds was; a changed student setting (say, another temperature) reuses the teacher and its
    store and trains new students.
    """
    started = time.perf_counter()
    prepared = prepare(config)
    with RunFolder.open(out_dir, overwrite=overwrite, log=log) as folder:
        part = _teacher_in(folder, config, prepared, progress, log)
        key, teacher_key = config_key(config), part.record["key"]
        every = folder.records("results.jsonl", unique=FIT_IDENTITY, required=FIT_IDENTITY)
        results = [r for r in every if r["key"] == key and r["role"] == "student"]
        finished = {tuple(r[k] for k in FIT_IDENTITY) for r in every}
        finished.add((teacher_key, "teacher", "teacher", config.first_seed))
        _forget_unfinished(folder, finished)

        seeds = range(config.first_seed, config.first_seed + config.seeds)
        done = {(r["method"], r["seed"]) for r in results}
        methods = student_methods(config)
        pending = [(m, s) for s in seeds for m in methods if (m, s) not in done]
        if len(pending) < len(methods) * len(seeds):
            kept = len(methods) * len(seeds) - len(pending)
            log(f"students: {kept} fits kept from a previous run")
        results += [
            f.record for f in _fit_students(config, part, pending, key, folder, progress, log)
        ]

        outcome = DistillOutcome(
            folder.root,
            part.record,
            [r for r in results if r["seed"] in seeds],
            time.perf_counter() - started,
            len(part.splits.test),
        )
        write_report(outcome, config, folder)
    return outcome


def _fit_students(
    config: DistillConfig,
    part: TeacherRun,
    pending: list[tuple[str, int]],
    key: str,
    folder: RunFolder,
    progress: Any,
    log: Callable[[str], None],
) -> list[Finished]:
    """Fit the ``pending`` (method, seed) students. Under torchrun they are spread over the
    processes, each fit whole on one (``distributed.my_share``), and rank 0 writes every
    result and epoch record; the list holds them all on rank 0 (and this process's elsewhere)."""
    if not distributed.active():
        return _fit_students_here(config, part, pending, key, folder, progress, log)
    pending = distributed.share_from_main(pending)  # what rank 0 read from results.jsonl
    every = config.student_training.checkpoint_every
    if folder.writer and every:  # register every checkpoint name before any process writes one
        for method, seed in pending:
            folder.path(_checkpoint_name((key, "student", method, seed)))
    distributed.barrier()
    mine = [pending[i] for i in distributed.my_share(len(pending))]
    with distributed.alone():
        finished = _fit_students_here(config, part, mine, key, folder, progress, log)
    gathered = distributed.gather_to_main(finished)
    if gathered is None:
        return finished
    theirs = [f for rank_finished in gathered[1:] for f in rank_finished]
    for f in theirs:  # rank 0 wrote its own as they finished
        for epoch in f.history:
            folder.append("history.jsonl", epoch)
        folder.append("results.jsonl", f.record)
    for method, seed in pending:
        folder.remove(_checkpoint_name((key, "student", method, seed)))
    return [f for rank_finished in gathered for f in rank_finished]


def _fit_students_here(
    config: DistillConfig,
    part: TeacherRun,
    pending: list[tuple[str, int]],
    key: str,
    folder: RunFolder,
    progress: Any,
    log: Callable[[str], None],
) -> list[Finished]:
    """Fit the ``pending`` students in this process."""
    finished = []
    if config.student.name == "mlp" and part.splits.train.weights is None:
        # MLP students train all at once (softtargets.vectorised), several times faster; each
        # step equals fit's to float tolerance (every logit method: those outside the stacked
        # closed form use fit's own objective). A resumed run trains the unfinished ones.
        # Feature methods run the teacher on every batch: one student at a time, below.
        together = [p for p in pending if p[0] not in FEATURE_METHOD_OPTIONS]
        if together:
            finished += _fit_students_together(config, part, together, key, folder, progress, log)
        pending = [p for p in pending if p not in together]
    task = progress.add_task("students", total=len(pending)) if progress else None
    for method, seed in pending:
        finished.append(_fit_student(config, part, method, seed, key, folder, progress, log))
        if task is not None:
            progress.update(task, advance=1)
    if task is not None:
        progress.remove_task(task)
    return finished


def _student(
    config: DistillConfig, part: TeacherRun, method: str, seed: int
) -> tuple[nn.Module, Distillation | FeatureDistillation | None]:
    """A fresh student model and its targets: ``None`` (hard labels), a Distillation, or a
    FeatureDistillation (``fitnet``)."""
    data = part.data
    student = build_model(
        config.student.name,
        data.feature_shape,
        data.num_classes,
        seed=seed,
        **config.student.options,
    )
    if method == "hard":
        return student, _hard_targets(part.splits.train, config.student_training.label_smoothing)
    if method in FEATURE_METHOD_OPTIONS:
        return student, _feature_targets(config, part, student, method)
    name = "kd" if method == "soft" else method
    targets = Distillation(
        part.store,
        config.temperature,
        config.alpha,
        method=name,
        options=dict(config.method_options.get(name, {})),
    )
    return student, targets


def _hard_targets(train: Dataset, eps: float) -> Tensor | None:
    """The labels as targets: ``None`` (plain cross-entropy), or smoothed by ``eps``."""
    return smooth(train.labels, train.num_classes, eps) if eps else None


def _feature_targets(
    config: DistillConfig, part: TeacherRun, student: nn.Module, method: str
) -> FeatureDistillation:
    """``fitnet``: the run's KD (its T and alpha) against the teacher run online, plus one hint
    pair — by default the features feeding each model's classifier, MSE through an adapter."""
    options = dict(config.method_options.get(method, {}))
    pair = FeaturePair(
        options.get("student_layer") or penultimate(student, "student"),
        options.get("teacher_layer") or penultimate(part.teacher, "teacher"),
        options.get("loss", "mse"),
    )
    weight = float(options.get("weight", 1.0))
    warmup = {"warmup": options["warmup"]} if "warmup" in options else {}
    return FeatureDistillation(
        part.teacher, [pair], weight, config.temperature, config.alpha, options=warmup
    )


def _fit_student(
    config: DistillConfig,
    part: TeacherRun,
    method: str,
    seed: int,
    key: str,
    folder: RunFolder,
    progress: Any,
    log: Callable[[str], None],
) -> Finished:
    """Fit one student (hard or soft targets, one seed), log it, and return what it gave."""
    splits = part.splits
    student, targets = _student(config, part, method, seed)
    identity, every = (key, "student", method, seed), config.student_training.checkpoint_every
    outcome = fit(
        student,
        splits.train,
        targets,
        val=splits.val or None,
        test=splits.test,
        seed=seed,
        device=part.device,
        progress=progress,
        log_path=_history(folder),
        log_extra={"key": key, "role": "student", "method": method, "seed": seed},
        **_checkpoint(folder, every, identity),
        **config.student_training.fit_options(),
    )
    finished = _student_record(part, student, outcome, method, seed, key, folder, log)
    folder.remove(_checkpoint_name(identity))
    if not folder.writer:  # a sweep's other process: rank 0 keeps the records, not this file
        (folder.root / _checkpoint_name(identity)).unlink(missing_ok=True)
    return finished


def _fit_students_together(
    config: DistillConfig,
    part: TeacherRun,
    pending: list[tuple[str, int]],
    key: str,
    folder: RunFolder,
    progress: Any,
    log: Callable[[str], None],
) -> list[Finished]:
    """Fit the ``pending`` (method, seed) MLP students at once with :func:`fit_many`."""
    from softtargets.vectorised import Member, fit_many

    splits = part.splits
    built = [_student(config, part, method, seed) for method, seed in pending]
    members = [
        Member(
            seed=seed,
            targets=targets,
            log={"key": key, "role": "student", "method": method, "seed": seed},
        )
        for (method, seed), (_, targets) in zip(pending, built, strict=True)
    ]
    outcomes = fit_many(
        [student for student, _ in built],
        splits.train,
        members,
        val=splits.val or None,
        test=splits.test,
        device=part.device,
        progress=progress,
        log_path=_history(folder),
        **config.student_training.stacked_options(),
    )
    return [
        _student_record(part, outcome.model, outcome, method, seed, key, folder, log)
        for (method, seed), outcome in zip(pending, outcomes, strict=True)
    ]


def _student_record(
    part: TeacherRun,
    student: nn.Module,
    outcome: Any,
    method: str,
    seed: int,
    key: str,
    folder: RunFolder,
    log: Callable[[str], None],
) -> Finished:
    """Evaluate a trained student, append its result record to results.jsonl and return it with
    its epoch records."""
    metrics = evaluate(student, part.splits.test, reference=part.teacher)
    record = {
        "key": key,
        "role": "student",
        "method": method,
        "seed": seed,
        **{f"test_{k}": v for k, v in metrics.items()},
        "test_rows": len(part.splits.test),
        "selected_epoch": outcome.best_epoch,
        "epochs_run": len(outcome.history),
        "seconds": round(outcome.seconds, 3),
        "parameters": count_parameters(student),
        "flops": forward_flops(student, part.data.feature_shape),
    }
    folder.append("results.jsonl", record)
    log(
        f"student, {method} targets, seed {seed}: test accuracy {metrics['accuracy']:.2%} "
        f"({of_total(metrics['errors'], len(part.splits.test))} errors), epoch "
        f"{outcome.best_epoch} of {len(outcome.history)} selected on validation"
    )
    identity = {"key": key, "role": "student", "method": method, "seed": seed}
    return Finished(record, [{**identity, **epoch} for epoch in outcome.history])


def summary_rows(outcome: DistillOutcome) -> list[list[str]]:
    """Rows of the results table: model, targets, runs, test accuracy (%), test errors."""
    t = outcome.teacher
    rows = [
        [
            "teacher",
            "hard labels",
            "1",
            f"{t['test_accuracy'] * 100:.2f}",
            of_total(t["test_errors"], outcome.test_rows),
        ]
    ]
    names = {"hard": "hard labels", "soft": "teacher soft targets"}
    for method in dict.fromkeys([*METHODS, *(r["method"] for r in outcome.results)]):
        acc, err = outcome.accuracies(method), outcome.errors(method)
        if acc:
            rows.append(
                [
                    "student",
                    names.get(method, f"teacher, {method.upper()}"),
                    str(len(acc)),
                    mean_ci(acc).format(100),
                    f"{mean_ci(err).format(1, 1)} of {outcome.test_rows:,}",
                ]
            )
    return rows


def method_differences(outcome: DistillOutcome) -> list[str]:
    """For each method other than hard labels and KD: its paired test-accuracy difference from
    hard labels and from KD (95% CIs over the seeds both have)."""
    lines = []
    methods = dict.fromkeys(r["method"] for r in outcome.results)
    for method in methods:
        if method in ("hard", "soft"):
            continue
        parts = []
        for base, base_name in (("hard", "hard labels"), ("soft", "KD")):
            pair = _paired(outcome, method, base)
            if pair is not None:
                parts.append(f"minus {base_name} {pair}")
        lines.append(f"{method.upper()}: " + ("; ".join(parts) or "n/a (needs >= 2 seeds)"))
    return lines


def _paired(outcome: DistillOutcome, method: str, base: str) -> str | None:
    mine = {r["seed"]: r["test_accuracy"] for r in outcome.results if r["method"] == method}
    theirs = {r["seed"]: r["test_accuracy"] for r in outcome.results if r["method"] == base}
    seeds = sorted(set(mine) & set(theirs))
    if len(seeds) < 2:
        return None
    diff = paired_difference([mine[s] for s in seeds], [theirs[s] for s in seeds])
    return (
        f"{diff.format(100)} points [{diff.low * 100:+.2f}, {diff.high * 100:+.2f}], {diff.n} seeds"
    )


def soft_minus_hard(outcome: DistillOutcome) -> str:
    hard, soft = outcome.accuracies("hard"), outcome.accuracies("soft")
    if len(hard) != len(soft) or len(hard) < 2:
        return "n/a (needs >= 2 seeds of each)"
    diff = paired_difference(soft, hard)
    return (
        f"{diff.format(100)} points (95% CI {diff.low * 100:+.2f} to {diff.high * 100:+.2f}, "
        f"paired over {diff.n} seeds)"
    )


def _methods_paragraph(outcome: DistillOutcome) -> str:
    lines = method_differences(outcome)
    if not lines:
        return ""
    return "\n\nOther methods, paired over seeds (test accuracy, 95% CI):\n\n" + "\n".join(
        f"- {line}" for line in lines
    )


def write_report(outcome: DistillOutcome, config: DistillConfig, folder: RunFolder) -> Path:
    """Redraw ``accuracy.png`` and ``report.md`` from the run folder's files."""
    out = outcome.out_dir
    key = config_key(config)
    history = [
        r
        for r in folder.records("history.jsonl", required=FIT_IDENTITY)
        if r["role"] == "student" and r["key"] == key
    ]
    names = {
        "hard": "student, hard labels",
        "soft": f"student, soft targets (T={config.temperature:g}, alpha={config.alpha:g})",
    }
    for r in history:
        r["curve"] = names.get(r["method"], r["method"])
    plot_epoch_curves(
        history,
        folder.path("accuracy.png"),
        group="curve",
        reference={"teacher (selected epoch)": outcome.teacher["test_accuracy"]},
        title=f"{config.data.name}: test accuracy per epoch",
    )
    s = outcome.results[0] if outcome.results else {}
    table = markdown_table(
        ["model", "targets", "runs", "test accuracy (%)", "test errors"], summary_rows(outcome)
    )
    text = f"""# Distillation run: {out.name}

Data: `{config.data.name}`. Teacher: `{config.teacher.name}` {config.teacher.options}
({outcome.teacher["parameters"]:,} parameters, {outcome.teacher["flops"]:,} FLOPs per sample).
Student: `{config.student.name}` {config.student.options} ({s.get("parameters", 0):,} parameters,
{s.get("flops", 0):,} FLOPs per sample). Soft targets: T = {config.temperature:g},
alpha = {config.alpha:g}.

{table}

Soft minus hard, test accuracy: {soft_minus_hard(outcome)}.{_methods_paragraph(outcome)}

Means over seeds with 95% Student-t confidence intervals. Each model's weights are those of its
best *validation* epoch; the test set is only evaluated, never used to choose anything.

![test accuracy per epoch](accuracy.png)

Files: `config.yaml` (resolved config), `history.jsonl` (every epoch), `results.jsonl` (every
fit), `store.safetensors` (teacher logits), `teacher.safetensors` (teacher weights).
Wall time of this invocation: {outcome.seconds:.1f} s.
"""
    return folder.write_text("report.md", text)


def demo_config(quick: bool = False) -> DistillConfig:
    """The demo: MNIST-1D at its standard size, a CNN teacher, an MLP student.

    Why this pairing: on MNIST-1D a small CNN is far better than an MLP of similar cost (its
    convolutions know that a digit may be shifted), so there is knowledge to transfer; the MLP
    student overfits the 3,500 training signals with hard labels, which is where soft targets help
    most. ``quick`` shrinks every step (data, epochs, seeds) for tests; the code path is the same.
    """
    config = DistillConfig()
    if quick:
        config.data.options["num_samples"] = 500
        config.teacher.options["channels"] = [8, 8]
        config.teacher_training.epochs = 3
        config.student_training.epochs = 3
        config.seeds = 2
    return config
