"""The ``softtargets`` command.

Each command is a thin shell over a Python function (``pipeline.run_distillation``, ...): it
builds a typed config from a YAML file and flags, shows progress, and prints a table. Bad input
ends with one ``error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from softtargets.errors import SoftTargetsError

app = typer.Typer(
    help="Train classifiers on soft targets and distil knowledge from teachers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turn :class:`SoftTargetsError` into one ``error:`` line and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SoftTargetsError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def say(message: str) -> None:
    """Print one progress line (passed as ``log=`` to the long-running functions)."""
    console.print(message, highlight=False)


def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


def parse_options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """``["channels=[64,64]", "dropout=0.1"]`` -> ``{"channels": [64, 64], "dropout": 0.1}``."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SoftTargetsError(f"{what} option {pair!r} must look like key=value")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SoftTargetsError(f"{what} option {pair!r}: cannot read the value") from None
    return options


# ---------------------------------------------------------------------- shared options
Out = Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<command>).")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML config; flags given here override it.")
]
Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Built-in name (digits, mnist1d, "
        "gaussians) or a file (.npz .npy .csv IDX CIFAR folder).",
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Delete the run directory first.")]
TeacherName = Annotated[
    str | None, typer.Option("--teacher", help="Teacher model: mlp, cnn1d, cnn2d.")
]
TeacherOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--teacher-option",
        help="Teacher builder option key=value (repeatable), e.g. channels=[64,64].",
    ),
]
TeacherEpochs = Annotated[int | None, typer.Option("--teacher-epochs", help="Teacher epochs.")]
Seeds = Annotated[int | None, typer.Option("--seeds", help="Student seeds (>= 3 for a CI).")]
Device = Annotated[
    str | None, typer.Option("--device", help="auto (cuda if available), cpu, cuda.")
]


def build_distill_config(config_file: Path | None, **flags: Any) -> Any:
    """A :class:`DistillConfig` from an optional YAML file, then flags that were given."""
    from softtargets.config import DistillConfig, load_yaml, parse_config

    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    source = str(config_file) if config_file else "flags"
    config = parse_config(DistillConfig, values, source)
    updates = {k: v for k, v in flags.items() if v is not None and v != []}
    data = config.data.model_dump()
    if "data" in updates:
        data = {**data, "name": updates.pop("data"), "options": {}}
    if "label_column" in updates:
        data["label_column"] = updates.pop("label_column")
    merged = config.model_dump()
    merged["data"] = data
    for role in ("teacher", "student"):
        if role in updates:
            merged[role] = {"name": updates.pop(role), "options": {}}
        if f"{role}_option" in updates:
            merged[role]["options"].update(parse_options(updates.pop(f"{role}_option"), role))
        if f"{role}_epochs" in updates:
            merged[f"{role}_training"]["epochs"] = updates.pop(f"{role}_epochs")
    merged.update(updates)
    return parse_config(DistillConfig, merged, source)


def run_job(config: Any, out: Path, overwrite: bool) -> None:
    """Run (or resume) one distillation job with progress bars, then print its results."""
    from softtargets.pipeline import run_distillation

    with make_progress() as progress:
        outcome = run_distillation(config, out, overwrite=overwrite, progress=progress, log=say)
    print_outcome(outcome)


def print_outcome(outcome: Any) -> None:
    from softtargets.pipeline import soft_minus_hard, summary_rows

    table = Table(title="test set: mean ± 95% CI over seeds", title_justify="left")
    for column in ("model", "targets", "runs", "test accuracy (%)", "test errors"):
        table.add_column(column, justify="left" if column in ("model", "targets") else "right")
    for row in summary_rows(outcome):
        table.add_row(*row)
    console.print(table)
    console.print(f"soft - hard: {soft_minus_hard(outcome)}", highlight=False)
    console.print(
        f"wrote {outcome.out_dir}/ (report.md, accuracy.png, results.jsonl, store) "
        f"in {outcome.seconds:.1f} s",
        highlight=False,
    )


# ---------------------------------------------------------------------- commands
@app.command()
@friendly_errors
def demo(
    out: Out = None,
    seeds: Seeds = None,
    quick: Annotated[bool, typer.Option("--quick", help="A tiny run of the same steps.")] = False,
    overwrite: Overwrite = False,
    device: Device = None,
) -> None:
    """The main job on built-in data: teacher, stored logits, student with hard vs soft targets."""
    from softtargets.pipeline import demo_config

    config = demo_config(quick=quick)
    if seeds is not None:
        config.seeds = seeds
    if device is not None:
        config.device = device
    run_job(config, out or Path("runs/demo"), overwrite)


@app.command()
@friendly_errors
def teacher(
    data: Data = None,
    teacher: TeacherName = None,
    teacher_option: TeacherOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Teacher epochs.")] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Label column of a CSV/.npy file.")
    ] = None,
    out: Out = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    device: Device = None,
) -> None:
    """Fit a teacher and store its logits for every sample (runs/<name>/store.safetensors)."""
    from softtargets.pipeline import run_teacher

    cfg = build_distill_config(
        config,
        data=data,
        teacher=teacher,
        teacher_option=teacher_option,
        teacher_epochs=epochs,
        label_column=label_column,
        device=device,
    )
    out = out or Path("runs/teacher")
    with make_progress() as progress:
        part = run_teacher(
            cfg,
            out,
            overwrite=overwrite,
            progress=progress,
            log=say,
        )
    console.print(
        f"stored {len(part.store)} x {part.store.num_classes} logits in {out}/store.safetensors",
        highlight=False,
    )


@app.command()
@friendly_errors
def distill(
    data: Data = None,
    teacher: TeacherName = None,
    teacher_option: TeacherOpt = None,
    teacher_epochs: TeacherEpochs = None,
    student: Annotated[
        str | None, typer.Option("--student", help="Student model: mlp, cnn1d, cnn2d.")
    ] = None,
    student_option: Annotated[
        list[str] | None,
        typer.Option("--student-option", help="Student builder option key=value (repeatable)."),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-T", help="Softmax temperature T.")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Weight of the soft term (0 = hard only).")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Student epochs.")] = None,
    seeds: Seeds = None,
    label_column: Annotated[
        str | None, typer.Option(help="Label column of a CSV/.npy file.")
    ] = None,
    out: Out = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    device: Device = None,
) -> None:
    """Teacher (reused if the run directory has it), then students on hard vs soft targets."""
    cfg = build_distill_config(
        config,
        data=data,
        teacher=teacher,
        teacher_option=teacher_option,
        teacher_epochs=teacher_epochs,
        student=student,
        student_option=student_option,
        temperature=temperature,
        alpha=alpha,
        student_epochs=epochs,
        seeds=seeds,
        label_column=label_column,
        device=device,
    )
    run_job(cfg, out or Path("runs/distill"), overwrite)


@app.command()
@friendly_errors
def study(
    name: Annotated[
        str,
        typer.Argument(
            help="similarity, temperature, data-fraction, "
            "learning-rate, gradient-variance, width, label-noise, "
            "omit-class or smoothing-vs-teacher."
        ),
    ],
    data: Data = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", help="Seeds per point (default 5).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A miniature of the same steps.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Default runs/study-NAME.")] = None,
) -> None:
    """Measure one claim about soft targets: results, figures, verdict (runs/study-NAME/)."""
    from softtargets.studies import study_module
    from softtargets.studies.base import StudyConfig, run_study

    study_module(name)  # an unknown name fails here, before any work
    values: dict[str, Any] = {"quick": quick}
    if data is not None:
        values["data"] = data
    if seeds is not None:
        values["seeds"] = seeds
    from softtargets.config import parse_config

    config = parse_config(StudyConfig, values, "flags")
    out = out or Path("runs") / f"study-{name}"
    with make_progress() as progress:
        result = run_study(
            name,
            config,
            out,
            progress=progress,
            log=say,
        )
    v = result["verdict"]
    console.print(f"[bold]{result['title']}[/]: {v['label']} — {v['evidence']}", highlight=False)
    console.print(f"wrote {out}/ in {result['seconds']} s", highlight=False)


@app.command()
@friendly_errors
def report(
    runs: Annotated[Path, typer.Option("--runs", help="Where the study directories are.")] = Path(
        "runs"
    ),
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write (default: --runs).")
    ] = None,
) -> None:
    """Gather every study under runs/ into report.md and a self-contained report.html."""
    from softtargets.gather import build_report

    md_path, html_path = build_report(runs, out)
    console.print(f"wrote {md_path} and {html_path}", highlight=False)


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SoftTargetsError(f"{what}: give comma-separated column names")
    return names


@app.command("fit-proportions")
@friendly_errors
def fit_proportions_command(
    file: Annotated[Path, typer.Argument(help="CSV with a header: feature and count columns.")],
    features: Annotated[str, typer.Option("--features", help="Feature columns, e.g. a,b,c.")],
    counts: Annotated[
        str, typer.Option("--counts", help="One count column per class, e.g. yes,no.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to save the model in.")],
    hidden: Annotated[
        list[int] | None,
        typer.Option(
            "--hidden", help="Hidden layer width (repeatable); none for logistic regression."
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="L2 penalty (0 = none).")] = 0.0,
    standardize: Annotated[bool, typer.Option(help="Standardise the features first.")] = True,
) -> None:
    """Fit class proportions from counts (logistic regression on aggregated rows, or a network)."""
    from softtargets.proportions import fit_proportions

    model, result = fit_proportions(
        file, _names(features, "--features"), _names(counts, "--counts"), hidden, alpha, standardize
    )
    model.save(out)
    scaled = "; features standardised to mean 0, sd 1" if standardize else ""
    console.print(
        f"{result['rows']} rows, {result['observations']:.0f} observations{scaled}", highlight=False
    )
    if "coefficients" in result:
        for name, coefs in result["coefficients"].items():
            console.print(name, highlight=False)
            table = Table()
            table.add_column("term")
            table.add_column("coefficient", justify="right")
            for term, value in coefs.items():
                table.add_row(term, f"{value:.6f}")
            console.print(table)
    else:
        console.print(
            f"held out {result['held_out_rows']} rows: log-loss "
            f"{result['held_out_log_loss']:.4f} nats per observation, accuracy "
            f"{result['held_out_accuracy']:.2%} of observations",
            highlight=False,
        )
    console.print(f"saved the model in {out}/", highlight=False)


@app.command()
@friendly_errors
def predict(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by fit-proportions.")],
    file: Annotated[Path, typer.Argument(help="CSV holding the model's feature columns.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write here (default: stdout).")] = None,
) -> None:
    """Class probabilities for every row of a CSV, as CSV (row, then one column per class)."""
    import csv
    import io

    from softtargets.files import atomic_write_text
    from softtargets.proportions import predict_file

    classes, probs = predict_file(model_dir, file)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", *classes])
    for i, row in enumerate(probs):
        writer.writerow([i, *(f"{p:.8g}" for p in row)])
    if out is None:
        typer.echo(buffer.getvalue(), nl=False)
    else:
        atomic_write_text(out, buffer.getvalue())
        console.print(f"wrote {len(probs)} rows to {out}", highlight=False)


def main() -> None:
    app()
