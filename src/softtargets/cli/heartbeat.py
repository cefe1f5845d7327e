"""Progress for output that is not a terminal (a log file, CI): a heartbeat line instead of bars.

A rich progress bar draws nothing useful into a log, so a user could not tell a slow run from a
hung one. :class:`HeartbeatProgress` takes the same calls as ``rich.progress.Progress``
(``add_task``, ``update``, ``remove_task``) and, from a background thread, prints one line every
``interval`` seconds (30 by default) saying what is running and how far it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


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
