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
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softtargets.config import DistillConfig, dump_config
from softtargets.data import Dataset, Splits, split
from softtargets.errors import SoftTargetsError
from softtargets.files import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl
from softtargets.loaders import load_data
from softtargets.models import build_model, count_parameters, forward_flops
from softtargets.report import markdown_table, plot_epoch_curves
from softtargets.stats import mean_ci, paired_difference
from softtargets.teacher import SoftTargetStore, label
from softtargets.train import Distillation, evaluate, fit, resolve_device

METHODS = ("hard", "soft")


@dataclass
class DistillOutcome:
    """Results of one run: the teacher's test metrics and one record per (method, seed)."""

    out_dir: Path
    teacher: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

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
    data_cfg = config.data
    data = load_data(data_cfg.name, data_cfg.label_column, **data_cfg.options)
    if data_cfg.classes is not None:
        data = data.subset(classes=data_cfg.classes, relabel=True)
    parts = split(data, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.split_seed)
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


def config_key(config: DistillConfig, teacher_only: bool = False) -> str:
    """A short hash of the settings that determine the teacher (or the whole run)."""
    values = config.model_dump(mode="json")
    if teacher_only:
        values = {
            k: values[k]
            for k in ("data", "teacher", "teacher_training", "first_seed", "store_dtype")
        }
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def _forget_unfinished(out_dir: Path, finished: set[tuple[str, str, str, int]]) -> None:
    """Drop history lines of fits that did not finish (an interrupted run), before resuming."""
    path = out_dir / "history.jsonl"
    records = read_jsonl(path)
    kept = [r for r in records if (r["key"], r["role"], r["method"], r["seed"]) in finished]
    if len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


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
    progress: Any = None,
    log: Callable[[str], None] = lambda message: None,
) -> TeacherRun:
    """Fit the teacher and store its logits in ``out_dir``, or reload them if a previous run with the
    same teacher settings finished them. A teacher made with other settings is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    out_dir = Path(out_dir)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_config(config))
    device = resolve_device(config.device)
    data, splits = load_splits(config)
    log(
        f"data: {data.name}, {len(splits.train)} train / {len(splits.val)} validation / "
        f"{len(splits.test)} test rows, {data.num_classes} classes; device: {device}"
    )

    key = config_key(config, teacher_only=True)
    teacher = build_model(
        config.teacher.name,
        data.feature_shape,
        data.num_classes,
        seed=config.first_seed,
        **config.teacher.options,
    )
    weights_path, store_path = out_dir / "teacher.safetensors", out_dir / "store.safetensors"
    fresh = not weights_path.exists()
    if not fresh:
        try:
            with safe_open(str(weights_path), framework="pt") as handle:
                saved_key = (handle.metadata() or {}).get("key")
            if saved_key != key:
                raise SoftTargetsError(
                    f"{out_dir} holds a teacher made with other data or teacher settings; pass "
                    "--overwrite to replace it or --out to write elsewhere"
                )
            teacher.load_state_dict(load_file(str(weights_path)))
        except SoftTargetsError:
            raise
        except Exception as err:  # a torn or foreign file
            raise SoftTargetsError(
                f"{weights_path} cannot be loaded ({str(err).splitlines()[0]}); delete it or pass "
                "--overwrite"
            ) from None
        teacher.to(device)
        log("teacher: reloaded from a previous run")
    else:
        _forget_unfinished(out_dir, set())  # a teacher that never finished leaves no history
        fit(
            teacher,
            splits.train,
            val=splits.val or None,
            test=splits.test,
            seed=config.first_seed,
            device=device,
            progress=progress,
            log_path=out_dir / "history.jsonl",
            log_extra={
                "key": key,
                "role": "teacher",
                "method": "teacher",
                "seed": config.first_seed,
            },
            **config.teacher_training.model_dump(),
        )
        state = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
        atomic_write_bytes(weights_path, save(state, metadata={"key": key}))

    store = None
    if store_path.exists() and not fresh:
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
        store.save(store_path)
    metrics = evaluate(teacher, splits.test)
    record = {
        "key": key,
        "role": "teacher",
        "method": "teacher",
        "seed": config.first_seed,
        **{f"test_{k}": v for k, v in metrics.items()},
        "parameters": count_parameters(teacher),
        "flops": forward_flops(teacher, data.feature_shape),
    }
    log(
        f"teacher {config.teacher.name}: test accuracy {metrics['accuracy']:.2%} "
        f"({metrics['errors']} errors)"
    )
    return TeacherRun(teacher, store, data, splits, record, device)


def run_distillation(
    config: DistillConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: Any = None,
    log: Callable[[str], None] = lambda message: None,
) -> DistillOutcome:
    """Run (or resume) the whole job described by ``config`` into ``out_dir``; see the module doc.

    Fits that finished under the same config are kept; a changed student setting (say, another
    temperature) reuses the teacher and its store and trains new students.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    part = run_teacher(config, out_dir, overwrite=overwrite, progress=progress, log=log)
    key, teacher_key = config_key(config), part.record["key"]
    results_path = out_dir / "results.jsonl"
    results = [r for r in read_jsonl(results_path) if r.get("key") == key]
    finished = {(r["key"], r["role"], r["method"], r["seed"]) for r in read_jsonl(results_path)}
    finished.add((teacher_key, "teacher", "teacher", config.first_seed))
    _forget_unfinished(out_dir, finished)

    seeds = range(config.first_seed, config.first_seed + config.seeds)
    done = {(r["method"], r["seed"]) for r in results}
    pending = [(m, s) for s in seeds for m in METHODS if (m, s) not in done]
    if pending and config.student.name == "mlp" and part.splits.train.weights is None:
        # MLP students train all at once (softtargets.vectorised), several times faster; each
        # step equals fit's to float tolerance. A resumed run trains the ones not yet finished.
        results += _fit_students_together(config, part, pending, key, out_dir, progress)
    else:
        task = progress.add_task("students", total=len(pending)) if progress else None
        for method, seed in pending:
            results.append(_fit_student(config, part, method, seed, key, out_dir, progress))
            if task is not None:
                progress.update(task, advance=1)
        if task is not None:
            progress.remove_task(task)

    outcome = DistillOutcome(
        out_dir,
        part.record,
        [r for r in results if r["seed"] in seeds],
        time.perf_counter() - started,
    )
    write_report(outcome, config)
    return outcome


def _student(
    config: DistillConfig, part: TeacherRun, method: str, seed: int
) -> tuple[nn.Module, Distillation | None]:
    """A fresh student model and its targets: ``None`` (hard labels) or a Distillation."""
    data = part.data
    student = build_model(
        config.student.name,
        data.feature_shape,
        data.num_classes,
        seed=seed,
        **config.student.options,
    )
    targets = (
        None if method == "hard" else Distillation(part.store, config.temperature, config.alpha)
    )
    return student, targets


def _fit_student(
    config: DistillConfig,
    part: TeacherRun,
    method: str,
    seed: int,
    key: str,
    out_dir: Path,
    progress: Any,
) -> dict[str, Any]:
    """Fit one student (hard or soft targets, one seed), log it, and return its result record."""
    splits = part.splits
    student, targets = _student(config, part, method, seed)
    outcome = fit(
        student,
        splits.train,
        targets,
        val=splits.val or None,
        test=splits.test,
        seed=seed,
        device=part.device,
        progress=progress,
        log_path=out_dir / "history.jsonl",
        log_extra={"key": key, "role": "student", "method": method, "seed": seed},
        **config.student_training.model_dump(),
    )
    return _student_record(part, student, outcome, method, seed, key, out_dir)


def _fit_students_together(
    config: DistillConfig,
    part: TeacherRun,
    pending: list[tuple[str, int]],
    key: str,
    out_dir: Path,
    progress: Any,
) -> list[dict[str, Any]]:
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
        log_path=out_dir / "history.jsonl",
        **config.student_training.model_dump(),
    )
    return [
        _student_record(part, outcome.model, outcome, method, seed, key, out_dir)
        for (method, seed), outcome in zip(pending, outcomes, strict=True)
    ]


def _student_record(
    part: TeacherRun,
    student: nn.Module,
    outcome: Any,
    method: str,
    seed: int,
    key: str,
    out_dir: Path,
) -> dict[str, Any]:
    """Evaluate a trained student, append its result record to results.jsonl and return it."""
    metrics = evaluate(student, part.splits.test, reference=part.teacher)
    record = {
        "key": key,
        "role": "student",
        "method": method,
        "seed": seed,
        **{f"test_{k}": v for k, v in metrics.items()},
        "selected_epoch": outcome.best_epoch,
        "epochs_run": len(outcome.history),
        "seconds": round(outcome.seconds, 3),
        "parameters": count_parameters(student),
        "flops": forward_flops(student, part.data.feature_shape),
    }
    append_jsonl(out_dir / "results.jsonl", record)
    return record


def summary_rows(outcome: DistillOutcome) -> list[list[str]]:
    """Rows of the results table: model, targets, runs, test accuracy (%), test errors."""
    t = outcome.teacher
    rows = [
        [
            "teacher",
            "hard labels",
            "1",
            f"{t['test_accuracy'] * 100:.2f}",
            f"{t['test_errors']:.0f}",
        ]
    ]
    names = {"hard": "hard labels", "soft": "teacher soft targets"}
    for method in METHODS:
        acc, err = outcome.accuracies(method), outcome.errors(method)
        if acc:
            rows.append(
                [
                    "student",
                    names[method],
                    str(len(acc)),
                    mean_ci(acc).format(100),
                    mean_ci(err).format(1, 1),
                ]
            )
    return rows


def soft_minus_hard(outcome: DistillOutcome) -> str:
    hard, soft = outcome.accuracies("hard"), outcome.accuracies("soft")
    if len(hard) != len(soft) or len(hard) < 2:
        return "n/a (needs >= 2 seeds of each)"
    diff = paired_difference(soft, hard)
    return (
        f"{diff.format(100)} points (95% CI {diff.low * 100:+.2f} to {diff.high * 100:+.2f}, "
        f"paired over {diff.n} seeds)"
    )


def write_report(outcome: DistillOutcome, config: DistillConfig) -> Path:
    """Redraw ``accuracy.png`` and ``report.md`` from the run directory's files."""
    out = outcome.out_dir
    key = config_key(config)
    history = [
        r
        for r in read_jsonl(out / "history.jsonl")
        if r.get("role") == "student" and r.get("key") == key
    ]
    names = {
        "hard": "student, hard labels",
        "soft": f"student, soft targets (T={config.temperature:g}, alpha={config.alpha:g})",
    }
    for r in history:
        r["curve"] = names.get(r["method"], r["method"])
    plot_epoch_curves(
        history,
        out / "accuracy.png",
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

Soft minus hard, test accuracy: {soft_minus_hard(outcome)}.

Means over seeds with 95% Student-t confidence intervals. Each model's weights are those of its
best *validation* epoch; the test set is only evaluated, never used to choose anything.

![test accuracy per epoch](accuracy.png)

Files: `config.yaml` (resolved config), `history.jsonl` (every epoch), `results.jsonl` (every
fit), `store.safetensors` (teacher logits), `teacher.safetensors` (teacher weights).
Wall time of this invocation: {outcome.seconds:.1f} s.
"""
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


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
