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
| ``results.jsonl`` | one line per finished fit, the teacher's too (test accuracy, errors, NLL, ECE, agreement), keyed by the config |
| ``accuracy.png`` | test accuracy per epoch, hard vs soft, mean and 95% band over seeds |
| ``report.md`` | the table, the figure and how the run was made |

The folder is a :class:`~softtargets.run.folder.RunFolder`: locked while the job runs, with a
manifest of these files (the only ones ``--overwrite`` removes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from softtargets import distributed
from softtargets.config import DistillConfig, dump_config
from softtargets.data.dataset import Dataset
from softtargets.data.stream_parts import first_rows
from softtargets.losses.methods import METHODS, check_run_methods
from softtargets.run.deployment import deployment_rows
from softtargets.run.folder import (
    FIT_IDENTITY,
    RunFolder,
    check_out_of_inputs,
    config_key,
    fit_records,
)
from softtargets.run.report import (
    DistillOutcome,
    method_label,
    of_total,
    write_report,
)
from softtargets.run.sequence_data import (
    TOKEN_FILE,
    SequenceSplits,
    is_sequence_job,
    load_sequence_splits,
    reads_from_token_file,
    with_sequence_models,
)
from softtargets.run.sequence_report import SequenceOutcome, write_sequence_report
from softtargets.run.sequences import (
    SequenceSource,
    check_sequence_job,
    name_best_student,
    run_sequences,
)
from softtargets.run.students import BEST, load_saved, name_best, save_student
from softtargets.run.teacher import (
    Finished,
    TeacherRun,
    checkpoint_args,
    checkpoint_name,
    forget_unfinished,
    hard_targets,
    history_path,
    name_student_checkpoints,
    prepare,
    teacher_in,
)
from softtargets.training.features import FeatureDistillation, FeaturePair, penultimate
from softtargets.training.fit import fit
from softtargets.training.fit_many import Member, fit_many
from softtargets.training.metrics import evaluate
from softtargets.training.models import build_model, count_parameters, forward_flops
from softtargets.training.objectives import Distillation
from softtargets.training.weights import cpu_state


def student_methods(config: DistillConfig) -> list[str]:
    """The students' targets of a run, as results name them: ``hard``, then each method."""
    return ["hard", *config.methods]


def run_distillation(
    config: DistillConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: Any = None,
    log: Callable[[str], None] = lambda message: None,
) -> DistillOutcome | SequenceOutcome:
    """Run (or resume) the whole job described by ``config`` into ``out_dir``; see the module doc.

    Everything is checked before anything is written (:func:`prepare`), and the folder is locked
    while the job runs. Fits that finished under the same config are kept, whatever the number of
    seeds was; a changed student setting (say, another temperature) reuses the teacher and its
    store and trains new students.
    """
    started = time.perf_counter()
    check_out_of_inputs(out_dir, [config.data.name, config.data.test])
    if is_sequence_job(config):  # text in token blocks: every position is a row
        return _run_sequences(config, out_dir, overwrite, progress, log, started)
    prepared = prepare(config)
    with RunFolder.open(out_dir, overwrite=overwrite, log=log) as folder:
        part = teacher_in(folder, config, prepared, progress, log)
        key, teacher_key = config_key(config), part.record["key"]
        every = fit_records(folder, "results.jsonl", unique=True)
        results = [r for r in every if r["key"] == key and r["role"] == "student"]
        finished = {tuple(r[k] for k in FIT_IDENTITY) for r in every}
        finished.add((teacher_key, "teacher", "teacher", config.first_seed))
        forget_unfinished(folder, finished)

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
        deployment = _name_and_measure_best(config, part, results, folder, log)
        outcome = DistillOutcome(
            folder.root,
            part.record,
            [r for r in results if r["seed"] in seeds],
            time.perf_counter() - started,
            len(part.splits.test),
            deployment,
        )
        write_report(outcome, config, folder)
    return outcome


def _run_sequences(
    config: DistillConfig,
    out_dir: str | Path,
    overwrite: bool,
    progress: Any,
    log: Callable[[str], None],
    started: float,
) -> SequenceOutcome:
    """:func:`run_distillation` on text (:mod:`softtargets.run.sequences`): the corpus, the
    models and their vocabulary are checked before the folder is opened."""
    config = with_sequence_models(config)
    check_run_methods(config.methods, config.method_options)
    if reads_from_token_file(config):  # --stream, or a corpus beyond the memory budget: the
        # token file goes in the run folder, so it is opened first (a folder this run created is
        # removed whole if the checks then fail)
        if not config.data.stream:
            log("data: the corpus would not fit the memory budget; reading it from tokens.bin")
        with RunFolder.open(out_dir, overwrite=overwrite, log=log) as folder:
            splits = load_sequence_splits(config, folder.path(TOKEN_FILE))
            source = check_sequence_job(config, splits.train)
            return _run_sequences_in(folder, config, splits, source, progress, log, started)
    splits = load_sequence_splits(config)
    source = check_sequence_job(config, splits.train)
    with RunFolder.open(out_dir, overwrite=overwrite, log=log) as folder:
        return _run_sequences_in(folder, config, splits, source, progress, log, started)


def _run_sequences_in(
    folder: RunFolder,
    config: DistillConfig,
    splits: SequenceSplits,
    source: SequenceSource,
    progress: Any,
    log: Callable[[str], None],
    started: float,
) -> SequenceOutcome:
    """The text job's stages in the open, checked run ``folder``, and its report."""
    folder.write_text("config.yaml", dump_config(config))
    teacher, students, store = run_sequences(folder, config, splits, source, log, progress)
    deployment = name_best_student(folder, config, splits, teacher, source.teacher, students, log)
    outcome = SequenceOutcome(folder.root, teacher, students, None if store is None else store.bytes_per_token,
                              time.perf_counter() - started, splits.unit, splits.split_unit,
                              deployment)  # fmt: skip
    write_sequence_report(outcome, config, folder)
    return outcome


def _name_and_measure_best(
    config: DistillConfig,
    part: TeacherRun,
    results: list[dict[str, Any]],
    folder: RunFolder,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Name the run's validation-best student (``student.safetensors``, ``student.json``), load it
    back as a user would, and measure it beside the teacher (the report's deployment table)."""
    if not folder.writer:
        return []
    model = _student(config, part, "hard", config.first_seed)[0]  # how an hf: student is set up
    best = name_best(folder, config, part.data, model, results, part.record["key"])
    if best is None:
        return []
    log(
        f"student: {method_label(best['method'])}, seed {best['seed']} (best on validation) "
        f"saved as {folder.root / BEST}.safetensors"
    )
    record = next(r for r in results if (r["method"], r["seed"]) == (best["method"], best["seed"]))
    if not len(part.splits.test) or part.teacher is None:  # a store: no teacher to measure
        return []
    sizes = {
        "teacher": (folder.root / "teacher.safetensors").stat().st_size,
        "student": (folder.root / f"{BEST}.safetensors").stat().st_size,
    }
    return deployment_rows(
        part.teacher,
        load_saved(folder.root).model,
        part.record,
        record,
        sizes,
        first_rows(part.splits.test, 256),
    )


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
    processes, each fit whole on one (``distributed.spread``), and rank 0 writes every
    result and epoch record; the list holds them all on rank 0 (none elsewhere)."""
    if not distributed.active():
        return _fit_students_here(config, part, pending, key, folder, progress, log)
    # spread() deals out rank 0's pending fits (what it read from results.jsonl)
    name_student_checkpoints(folder, config.student_training.checkpoint_every, key, pending)
    gathered = distributed.spread(
        pending, lambda mine: _fit_students_here(config, part, mine, key, folder, progress, log)
    )
    if gathered is None:
        return []
    theirs = [f for rank_finished in gathered[1:] for f in rank_finished]
    for f in theirs:  # rank 0 wrote its own as they finished
        for epoch in f.history:
            folder.append("history.jsonl", epoch)
        if f.state is not None:
            save_student(folder, f.state, f.record)
            f.state = None
        folder.append("results.jsonl", f.record)
    for method, seed in pending:
        folder.remove(checkpoint_name((key, "student", method, seed)))
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
    if (
        config.student.name == "mlp"
        and isinstance(part.splits.train, Dataset)
        and part.splits.train.weights is None
    ):
        # MLP students train all at once (softtargets.training.fit_many), several times faster; each
        # step equals fit's to float tolerance (every logit method: those outside the stacked
        # closed form use fit's own objective). A resumed run trains the unfinished ones.
        # Feature methods run the teacher on every batch: one student at a time, below.
        together = [p for p in pending if not _is_feature_method(p[0])]
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
        return student, hard_targets(part.splits.train, config.student_training.label_smoothing)
    if _is_feature_method(method):
        return student, _feature_targets(config, part, student, method)
    # Augmented rows are not the rows the store was labelled on: the teacher runs online on
    # every augmented batch instead, and sees what the student sees.
    teacher_side = part.teacher if config.data.augment else part.store
    targets = Distillation(
        teacher_side,
        config.temperature,
        config.alpha,
        method=method,
        options=dict(config.method_options.get(method, {})),
    )
    return student, targets


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
        log_path=history_path(folder),
        log_extra={"key": key, "role": "student", "method": method, "seed": seed},
        num_workers=config.data.workers,
        **checkpoint_args(folder, every, identity),
        **config.student_training.fit_options(),
    )
    finished = _student_record(part, student, outcome, method, seed, key, folder, log)
    folder.remove(checkpoint_name(identity))
    if not folder.writer:  # a sweep's other process: rank 0 keeps the records, not this file
        (folder.root / checkpoint_name(identity)).unlink(missing_ok=True)
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
        log_path=history_path(folder),
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
    """Evaluate a trained student, save its weights, append its result record to results.jsonl and
    return it with its epoch records (and, in a process that does not write, its weights)."""
    reference = part.teacher if part.teacher is not None else part.store
    metrics = evaluate(student, part.splits.test, reference=reference)
    val = evaluate(student, part.splits.val) if len(part.splits.val) else {}
    record = {
        "key": key,
        "role": "student",
        "method": method,
        "seed": seed,
        **{f"val_{k}": val[k] for k in ("accuracy", "nll") if k in val},
        **{f"test_{k}": v for k, v in metrics.items()},
        "test_rows": len(part.splits.test),
        "selected_epoch": outcome.best_epoch,
        "epochs_run": len(outcome.history),
        "seconds": round(outcome.seconds, 3),
        "parameters": count_parameters(student),
        "flops": forward_flops(student, part.data.feature_shape),
    }
    state = cpu_state(student)
    if folder.writer:
        save_student(folder, state, record)
    folder.append("results.jsonl", record)
    log(
        f"student, {method_label(method)}, seed {seed}: test accuracy {metrics['accuracy']:.2%} "
        f"({of_total(metrics['errors'], len(part.splits.test))} errors), epoch "
        f"{outcome.best_epoch} of {len(outcome.history)} selected on validation"
    )
    identity = {"key": key, "role": "student", "method": method, "seed": seed}
    history = [{**identity, **epoch} for epoch in outcome.history]
    return Finished(record, history, None if folder.writer else state)


def _is_feature_method(method: str) -> bool:
    """Whether a student's method pairs features (``fitnet``): trained one at a time."""
    return method in METHODS and METHODS[method].features
