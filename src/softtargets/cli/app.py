"""The ``softtargets`` command.

Each command is a thin shell over a Python function (``pipeline.run_distillation``, ...): it
builds a typed config from a YAML file and flags (the flags and that step are
:mod:`softtargets.cli.options`'s), shows progress, and prints a table. Bad input ends with one
``error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from softtargets.cli.catalogue import methods, models
from softtargets.cli.console import (
    console,
    friendly_errors,
    make_progress,
    say,
    show_warning,
)
from softtargets.cli.launch import relaunch_under_torchrun, run_job
from softtargets.cli.options import (
    DEFAULTS,
    MODEL_FORMS,
    Augment,
    BlockLength,
    ConfigFile,
    Data,
    Device,
    LabelColumn,
    MaxLength,
    Nproc,
    OnlyBatchSize,
    OnlyCompile,
    OnlyEpochs,
    OnlyLr,
    OnlyOptimizer,
    OnlyPatience,
    OnlyPrecision,
    OnlyWeightDecay,
    OnPolicy,
    Out,
    Overwrite,
    Seeds,
    StoreTemperatures,
    StoreTop,
    Stream,
    StudentBatchSize,
    StudentCompile,
    StudentEpochs,
    StudentLr,
    StudentOptimizer,
    StudentPatience,
    StudentPrecision,
    StudentWeightDecay,
    TeacherBatchSize,
    TeacherCompile,
    TeacherEpochs,
    TeacherLr,
    TeacherName,
    TeacherOpt,
    TeacherOptimizer,
    TeacherPatience,
    TeacherPrecision,
    TeacherWeightDecay,
    TeacherWeights,
    TestData,
    TestFraction,
    TextColumn,
    Tokenizer,
    ValFraction,
    Workers,
    build_distill_config,
    parse_method_options,
    parse_temperatures,
)
from softtargets.cli.proportions import fit_proportions_command
from softtargets.cli.serve import export, predict
from softtargets.cli.study import report, study
from softtargets.losses.methods import METHODS

app = typer.Typer(
    help="Train classifiers on soft targets and distil knowledge from teachers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


# ---------------------------------------------------------------------- commands
@app.callback()
def _setup() -> None:
    warnings.showwarning = show_warning


@app.command()
@friendly_errors
def demo(
    out: Out = None,
    seeds: Seeds = None,
    quick: Annotated[bool, typer.Option("--quick", help="A tiny run of the same steps.")] = False,
    overwrite: Overwrite = False,
    device: Device = None,
    nproc: Nproc = 1,
) -> None:
    """The main job on built-in data: teacher, stored logits, student with hard vs soft targets."""
    from softtargets.config import demo_config

    config = build_distill_config(None, base=demo_config(quick=quick), seeds=seeds, device=device)
    run_job(config, out or Path("runs/demo"), overwrite, nproc)


@app.command()
@friendly_errors
def teacher(
    data: Data = None,
    test_data: TestData = None,
    teacher: TeacherName = None,
    teacher_option: TeacherOpt = None,
    teacher_weights: TeacherWeights = None,
    epochs: OnlyEpochs = None,
    lr: OnlyLr = None,
    optimizer: OnlyOptimizer = None,
    batch_size: OnlyBatchSize = None,
    weight_decay: OnlyWeightDecay = None,
    patience: OnlyPatience = None,
    precision: OnlyPrecision = None,
    compile: OnlyCompile = None,
    val_fraction: ValFraction = None,
    test_fraction: TestFraction = None,
    label_column: LabelColumn = None,
    text_column: TextColumn = None,
    stream: Stream = None,
    augment: Augment = None,
    workers: Workers = None,
    max_length: MaxLength = None,
    tokenizer: Tokenizer = None,
    out: Out = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    device: Device = None,
) -> None:
    """Fit a teacher and store its logits for every sample (runs/<name>/store.safetensors)."""
    from softtargets.run.teacher import run_teacher

    cfg = build_distill_config(
        config,
        data=data,
        test_data=test_data,
        teacher=teacher,
        teacher_option=teacher_option,
        teacher_weights=teacher_weights,
        teacher_epochs=epochs,
        teacher_lr=lr,
        teacher_optimizer=optimizer,
        teacher_batch_size=batch_size,
        teacher_weight_decay=weight_decay,
        teacher_patience=patience,
        teacher_precision=precision,
        teacher_compile=compile,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        label_column=label_column,
        text_column=text_column,
        stream=stream,
        augment=augment,
        workers=workers,
        max_length=max_length,
        tokenizer=tokenizer,
        device=device,
    )
    out = out or Path("runs/teacher")
    with make_progress() as progress:
        part = run_teacher(cfg, out, overwrite=overwrite, progress=progress, log=say)
    console.print(
        f"stored {len(part.store)} x {part.store.num_classes} logits in {out}/store.safetensors",
        highlight=False,
    )


@app.command()
@friendly_errors
def label(
    data: Data = None,
    test_data: TestData = None,
    teacher: TeacherName = None,
    teacher_option: TeacherOpt = None,
    teacher_weights: TeacherWeights = None,
    label_column: LabelColumn = None,
    text_column: TextColumn = None,
    stream: Stream = None,
    augment: Augment = None,
    workers: Workers = None,
    max_length: MaxLength = None,
    tokenizer: Tokenizer = None,
    block_length: BlockLength = None,
    store_temperatures: StoreTemperatures = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", help="Language models: the T students will distil at."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="The store to write, a .safetensors file.")
    ] = Path("store.safetensors"),
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            help="Keep each row's k largest logits and the rest's log-sum-exp [language "
            "models: 32 per position].",
        ),
    ] = None,
    store_dtype: Annotated[
        str | None, typer.Option("--store-dtype", help="float32 (default) or float16.")
    ] = None,
    config: ConfigFile = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
    ] = False,
    device: Device = None,
    nproc: Nproc = 1,
) -> None:
    """Run a trained teacher over the data once and write its store (for distill --store)."""
    from softtargets import distributed
    from softtargets.run.label import run_label
    from softtargets.training.common import resolve_device

    cfg = build_distill_config(
        config,
        data=data,
        test_data=test_data,
        teacher=teacher,
        teacher_option=teacher_option,
        teacher_weights=teacher_weights,
        label_column=label_column,
        text_column=text_column,
        stream=stream,
        augment=augment,
        workers=workers,
        max_length=max_length,
        tokenizer=tokenizer,
        block_length=block_length,
        store_temperatures=parse_temperatures(store_temperatures),
        temperature=temperature,
        store_dtype=store_dtype,
        device=device,
    )
    if nproc > 1 and not distributed.launched():
        raise typer.Exit(relaunch_under_torchrun(nproc))
    distributed.setup(resolve_device(cfg.device))
    log = say if distributed.is_main() else (lambda message: None)
    done = run_label(cfg, out, top_k=top_k, overwrite=overwrite, log=log)
    if distributed.is_main() and cfg.data.block_length is not None:
        console.print(
            f"stored the top {done.kept} of {done.classes} logits at each of {done.rows:,} "
            f"positions in {done.path} ({done.bytes / done.rows:,.1f} bytes per token); train "
            f"students from it with softtargets distill --block-length "
            f"{cfg.data.block_length} --store {done.path}",
            highlight=False,
        )
    elif distributed.is_main():
        console.print(
            f"stored {done.kept} of {done.classes} logits for each of {done.rows:,} rows in "
            f"{done.path} ({done.bytes / (1 << 20):,.1f} MB); train students from it with "
            f"softtargets distill --store {done.path}",
            highlight=False,
        )


@app.command()
@friendly_errors
def distill(
    data: Data = None,
    test_data: TestData = None,
    teacher: TeacherName = None,
    teacher_option: TeacherOpt = None,
    teacher_weights: TeacherWeights = None,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            help="Train the students from this store (softtargets label) instead of a teacher; "
            "it must have been made for --data.",
        ),
    ] = None,
    teacher_epochs: TeacherEpochs = None,
    teacher_lr: TeacherLr = None,
    teacher_optimizer: TeacherOptimizer = None,
    teacher_batch_size: TeacherBatchSize = None,
    teacher_weight_decay: TeacherWeightDecay = None,
    teacher_patience: TeacherPatience = None,
    teacher_precision: TeacherPrecision = None,
    teacher_compile: TeacherCompile = None,
    student: Annotated[
        str | None,
        typer.Option(
            "--student",
            help=f"Student model: {MODEL_FORMS}, hf-config:PATH (softtargets models) "
            f"\\[default: {DEFAULTS.student.name}].",
        ),
    ] = None,
    student_option: Annotated[
        list[str] | None,
        typer.Option(
            "--student-option",
            help="Student builder option key=value (repeatable) "
            f"\\[default: {DEFAULTS.student.options}]; see `softtargets models`.",
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            "-T",
            help=f"Softmax temperature T \\[default: {DEFAULTS.temperature}].",
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help=f"Weight of the soft term (0 = hard only) \\[default: {DEFAULTS.alpha}]."
        ),
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Distillation method, repeatable to compare several on the same teacher and "
            f"seeds: {', '.join(METHODS)} (softtargets methods says what each is) "
            "\\[default: kd].",
        ),
    ] = None,
    method_option: Annotated[
        list[str] | None,
        typer.Option(
            "--method-option",
            help="A method's option, key=value or METHOD:key=value (repeatable), e.g. dkd:beta=8.",
        ),
    ] = None,
    epochs: StudentEpochs = None,
    lr: StudentLr = None,
    optimizer: StudentOptimizer = None,
    batch_size: StudentBatchSize = None,
    weight_decay: StudentWeightDecay = None,
    patience: StudentPatience = None,
    precision: StudentPrecision = None,
    compile: StudentCompile = None,
    seeds: Seeds = None,
    val_fraction: ValFraction = None,
    test_fraction: TestFraction = None,
    label_column: LabelColumn = None,
    text_column: TextColumn = None,
    stream: Stream = None,
    augment: Augment = None,
    workers: Workers = None,
    max_length: MaxLength = None,
    block_length: BlockLength = None,
    store_top: StoreTop = None,
    on_policy: OnPolicy = None,
    store_temperatures: StoreTemperatures = None,
    tokenizer: Tokenizer = None,
    out: Out = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    device: Device = None,
    nproc: Nproc = 1,
) -> None:
    """Teacher (reused if the run folder has it), then students on hard vs soft targets."""
    cfg = build_distill_config(
        config,
        data=data,
        test_data=test_data,
        teacher=teacher,
        teacher_option=teacher_option,
        teacher_weights=teacher_weights,
        store=str(store) if store is not None else None,
        teacher_epochs=teacher_epochs,
        teacher_lr=teacher_lr,
        teacher_optimizer=teacher_optimizer,
        teacher_batch_size=teacher_batch_size,
        teacher_weight_decay=teacher_weight_decay,
        teacher_patience=teacher_patience,
        teacher_precision=teacher_precision,
        teacher_compile=teacher_compile,
        student=student,
        student_option=student_option,
        temperature=temperature,
        alpha=alpha,
        methods=method,
        method_options=parse_method_options(method_option, method or ["kd"]) or None,
        student_epochs=epochs,
        student_lr=lr,
        student_optimizer=optimizer,
        student_batch_size=batch_size,
        student_weight_decay=weight_decay,
        student_patience=patience,
        student_precision=precision,
        student_compile=compile,
        seeds=seeds,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        label_column=label_column,
        text_column=text_column,
        stream=stream,
        augment=augment,
        workers=workers,
        max_length=max_length,
        block_length=block_length,
        store_top=store_top,
        on_policy=on_policy,
        store_temperatures=parse_temperatures(store_temperatures),
        tokenizer=tokenizer,
        device=device,
    )
    run_job(cfg, out or Path("runs/distill"), overwrite, nproc)


app.command()(study)
app.command()(report)
app.command("fit-proportions")(fit_proportions_command)
app.command()(methods)
app.command()(models)
app.command("predict")(predict)
app.command("export")(export)


def main() -> None:
    app()
