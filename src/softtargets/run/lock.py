"""The lock of a run folder: an exclusive OS lock (``fcntl.flock``, ``msvcrt.locking`` on
Windows) held while a job runs, on a file that says who holds it. The OS releases it when the
process ends, however it ends; the file is opened without following links."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softtargets.errors import SoftTargetsError
from softtargets.files import open_own


class Lock:
    """An exclusive OS lock on ``path`` (``fcntl.flock``, ``msvcrt.locking`` on Windows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def acquire(self, wait: bool, log: Callable[[str], None]) -> None:
        # held open for the lock's lifetime; never through a link planted in the folder
        handle = os.fdopen(open_own(self.path, os.O_RDWR | os.O_CREAT), "r+")
        if not self._try(handle, blocking=False):
            holder = handle.read().strip() or "another process"
            if not wait:
                handle.close()
                raise SoftTargetsError(
                    f"{self.path.parent} is in use by another softtargets run ({holder}); wait "
                    "for it to finish or use another --out"
                )
            log(f"waiting for {self.path.parent}, in use by {holder}")
            self._try(handle, blocking=True)
        handle.seek(0)
        handle.truncate()
        command = " ".join(["softtargets", *sys.argv[1:]]) if sys.argv else "python"
        handle.write(
            f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n"
        )
        handle.flush()
        self._handle = handle

    @staticmethod
    def _try(handle: Any, blocking: bool) -> bool:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except ImportError:  # Windows
            import msvcrt

            handle.seek(0)
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
            except OSError:
                return False
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()  # the file stays (removing a lock file races); it is empty
            self._handle.close()  # closing releases the lock
            self._handle = None
