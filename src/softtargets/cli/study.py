"""The ``study`` and ``report`` commands: measure one claim about soft targets (on built-in data,
or on the user's data and models), and gather every study into one report.
:mod:`softtargets.cli.app` registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from softtargets.cli.console import console, friendly_errors, make_progress, say
from softtargets.cli.launch import relaunch_under_torchrun
from softtargets.cli.options import (
    DEFAULTS,
    Data,
    Nproc,
    TeacherName,
    TeacherOpt,
    TeacherWeights,
    TestData,
    parse_options,
)


@friendly_errors
def study(
    name: Annotated[
        str,
        typer.Argument(
            help="similarity, temperature, data-fraction, learning-rate, gradient-variance, "
            "width, label-noise, omit-class, smoothing-vs-teacher, methods, lighter-student or "
            "generalisation."
        ),
    ],
    data: Data = None,
    test_data: TestData = None,
    teacher: TeacherName = None,
    teacher_option: TeacherOpt = None,
    teacher_weights: TeacherWeights = None,
    student: Annotated[
        str | None, typer.Option("--student", help="Your student, in any model form.")
    ] = None,
    student_option: Annotated[
        list[str] | None, typer.Option("--student-option", help="key=value (repeatable).")
    ] = None,
    store: Annotated[
        Path | None, typer.Option("--store", help="Your stored teacher logits (label).")
    ] = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", help="Student seeds per teacher (default 3).")
    ] = None,
    teachers: Annotated[
        int | None,
        typer.Option(
            "--teachers",
            help="Independently trained teachers, each on its own split: the unit of every "
            "verdict (default 3; --quick 2).",
        ),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A miniature of the same steps.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Default runs/study-NAME.")] = None,
    nproc: Nproc = 1,
) -> None:
    """Measure one claim about soft targets: results, figures, verdict (runs/study-NAME/)."""
    from softtargets import distributed
    from softtargets.config import StudyConfig
    from softtargets.studies import study_module
    from softtargets.studies.base import run_study

    study_module(name)  # an unknown name fails here, before any work
    values: dict[str, Any] = {"quick": quick}
    if data is not None:
        values["data"] = data
    if test_data is not None:
        values["test_data"] = test_data
    if seeds is not None:
        values["seeds"] = seeds
    if teachers is not None:
        values["teachers"] = teachers
    if teacher is not None or teacher_weights is not None:
        values["teacher"] = {
            "name": teacher or DEFAULTS.teacher.name,
            "options": parse_options(teacher_option or [], "teacher"),
            "weights": None if teacher_weights is None else str(teacher_weights),
        }
    if student is not None:
        values["student"] = {
            "name": student,
            "options": parse_options(student_option or [], "student"),
        }
    if store is not None:
        values["store"] = str(store)
    from softtargets.config import parse_config

    config = parse_config(StudyConfig, values, "flags")
    out = out or Path("runs") / f"study-{name}"
    if nproc > 1 and not distributed.launched():
        raise typer.Exit(relaunch_under_torchrun(nproc))
    distributed.setup()
    if not distributed.is_main():  # the students are spread over the processes; rank 0 reports
        run_study(name, config, out)
        return
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
    from softtargets.run.report import build_report
    from softtargets.studies import STUDIES

    md_path, html_path = build_report(runs, out, order=list(STUDIES))
    console.print(f"wrote {md_path} and {html_path}", highlight=False)
