"""Atomic file writes and JSON lines: a crash or Ctrl-C never leaves a half-written file behind.

Each writer writes a temporary file in the target's directory, flushes it to disk, then renames it
over the target (``os.replace`` is atomic on POSIX and Windows). Files get the permissions the
user's umask gives any new file (``mkstemp`` alone would make them 0600).

JSON lines are appended one line per call; a run killed mid-write leaves at most a torn last line,
which :func:`read_jsonl` drops with a warning and :func:`append_jsonl` cuts off before appending.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from softtargets.errors import SoftTargetsError


class SoftTargetsWarning(UserWarning):
    """Something was repaired or skipped; the command line prints it as one ``warning:`` line."""


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, at the first write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def _cut_torn_tail(path: Path) -> None:
    """If ``path`` does not end with a newline (a write was killed), cut it back to its last one."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        end = size
        while end > 0:  # scan back in blocks for the last complete line
            start = max(0, end - 65536)
            handle.seek(start)
            at = handle.read(end - start).rfind(b"\n")
            if at >= 0:
                end = start + at + 1
                break
            end = start
        warnings.warn(
            f"{path}: dropped a torn last line ({size - end} bytes) left by an interrupted run",
            SoftTargetsWarning,
            stacklevel=3,
        )
        handle.truncate(end)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line, written in one call and flushed; never onto a torn line."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        _cut_torn_tail(target)
    with open(target, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (a missing file gives ``[]``).

    A torn last line (no newline, not JSON) is dropped with a warning; any other line that is not
    a JSON object is an error naming it, since it was not written by softtargets.
    """
    target = Path(path)
    if not target.exists():
        return []
    try:
        text = target.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SoftTargetsError(f"{target} cannot be read ({err}); remove the file") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, with no newline after it: torn by a kill
                warnings.warn(
                    f"{target}: ignored a torn last line left by an interrupted run",
                    SoftTargetsWarning,
                    stacklevel=2,
                )
                continue
            raise SoftTargetsError(
                f"{target}, line {number} is not JSON; remove that line (softtargets writes one "
                "JSON object per line)"
            ) from None
        if not isinstance(record, dict):
            raise SoftTargetsError(
                f"{target}, line {number} is not a JSON object; remove that line"
            )
        records.append(record)
    return records
