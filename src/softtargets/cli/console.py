"""What the command shows: its consoles, one ``error:`` line per bad input, and progress.

On a terminal progress is rich's bars; in output that is not a terminal (a log file, CI) it is a
heartbeat line instead. A rich progress bar draws nothing useful into a log, so a user could not tell a slow run from a
hung one. :class:`HeartbeatProgress` takes the same calls as ``rich.progress.Progress``
(``add_task``, ``update``, ``remove_task``) and, from a background thread, prints one line every
``interval`` seconds (30 by default) saying what is running and how far it is.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from softtargets.errors import SoftTargetsError


class HeartbeatProgress:
    """A stand-in for ``rich.progress.Progress`` that prints a status line every ``interval`` s."""

    def __init__(self, say: Callable[[str], None], interval: float = 30.0) -> None:
        self.say = say
        self.interval = interval
        self._tasks: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    # ------------------------------------------------------------------ rich's interface
    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        with self._lock:
            task = self._next_id
            self._next_id += 1
            self._tasks[task] = {"description": description, "total": total, "completed": 0.0}
        return task

    def update(self, task: int, advance: float = 0.0, **_: Any) -> None:
        with self._lock:
            if task in self._tasks:
                self._tasks[task]["completed"] += advance

    def remove_task(self, task: int) -> None:
        with self._lock:
            self._tasks.pop(task, None)

    def __enter__(self) -> HeartbeatProgress:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ the beat
    def status(self) -> str:
        """One line: the time so far and every running task with its progress."""
        elapsed = int(time.monotonic() - self._started)
        with self._lock:
            parts = [
                f"{t['description']} {t['completed']:.0f}/{t['total']:.0f}"
                if t["total"]
                else t["description"]
                for t in self._tasks.values()
            ]
        doing = "; ".join(parts) if parts else "working"
        return f"still running after {elapsed // 60}m{elapsed % 60:02d}s: {doing}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.say(self.status())


console = Console()


err_console = Console(stderr=True)


F = TypeVar("F", bound=Callable[..., Any])


#: what to do about an operating-system error, by its errno
_OS_FIXES = {
    errno.EACCES: "it is not writable by you: choose another --out",
    errno.EPERM: "it is not writable by you: choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.ENOSPC: "the disk is full: free some space and run again (the run resumes)",
    errno.EDQUOT: "your disk quota is full: free some space and run again (the run resumes)",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter one",
    errno.ELOOP: "a symbolic link there points round in a loop: remove it",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: give a file",
    errno.EEXIST: "something of that name is in the way: choose another path",
}


def describe_os_error(err: OSError) -> str:
    """An operating-system error as one line: the path, the cause and what to do."""
    where = err.filename if err.filename is not None else "a file"
    cause = err.strerror or type(err).__name__
    fix = _OS_FIXES.get(err.errno or 0, "check the path and its permissions")
    return f"{where}: {cause}; {fix}"


def friendly_errors(command: F) -> F:
    """Turn :class:`SoftTargetsError` and the operating system's errors (a read-only folder, a
    full disk, a name too long, ...) into one ``error:`` line and exit status 2; the files are
    written atomically, so nothing is left half-written."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SoftTargetsError as err:
            message = str(err)
        except OSError as err:
            message = describe_os_error(err)
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def say(message: str) -> None:
    """Print one progress line (passed as ``log=`` to the long-running functions)."""
    console.print(message, highlight=False)


def show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    """Warnings (a repaired file, say) as one ``warning:`` line, without a source line."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def make_progress() -> Any:
    """Progress bars on a terminal; elsewhere (a log, CI) a heartbeat line every 30 s."""
    if err_console.is_terminal:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
    return HeartbeatProgress(say, float(os.environ.get("SOFTTARGETS_HEARTBEAT_SECONDS", 30)))


def print_outcome(outcome: Any) -> None:
    from softtargets.run.report import distill_rows, method_differences, soft_minus_hard
    from softtargets.run.sequence_report import SequenceOutcome, sequence_header, sequence_rows

    if isinstance(outcome, SequenceOutcome):  # a language model: bits per byte
        table = Table(
            title=f"held-out {outcome.split_unit}s: mean ± 95% CI over seeds", title_justify="left"
        )
        for column in sequence_header(outcome.unit):
            table.add_column(column, justify="left" if column in ("model", "targets") else "right")
        for row in sequence_rows(outcome):
            table.add_row(*row)
        console.print(table)
        stored = outcome.store_bytes_per_token
        console.print(
            f"store: {'none' if stored is None else f'{stored:.1f} bytes per token'}; wrote "
            f"{outcome.out_dir}/ (report.md, results.jsonl, "
            f"{'' if stored is None else 'store, '}students) in "
            f"{outcome.seconds:.1f} s",
            highlight=False,
        )
        return

    table = Table(title="test set: mean ± 95% CI over seeds", title_justify="left")
    for column in ("model", "targets", "runs", "test accuracy (%)", "test errors"):
        table.add_column(column, justify="left" if column in ("model", "targets") else "right")
    for row in distill_rows(outcome):
        table.add_row(*row)
    console.print(table)
    console.print(f"soft - hard: {soft_minus_hard(outcome)}", highlight=False)
    for line in method_differences(outcome):
        console.print(line, highlight=False)
    if outcome.deployment:
        from softtargets.run.deployment import ratio_text

        teacher, student = outcome.deployment
        parameters = ratio_text(student["parameters"], teacher["parameters"])
        latency = ratio_text(student["seconds_per_row_batch1"], teacher["seconds_per_row_batch1"])
        points = (student["test_accuracy"] - teacher["test_accuracy"]) * 100
        console.print(
            f"the run's student (best on validation): {parameters} the teacher's parameters, "
            f"{latency} its latency at batch 1, {points:+.2f} points of test accuracy; saved as "
            f"{outcome.out_dir}/student.safetensors",
            highlight=False,
        )
    console.print(
        f"wrote {outcome.out_dir}/ (report.md, accuracy.png, results.jsonl, store, students) "
        f"in {outcome.seconds:.1f} s",
        highlight=False,
    )
