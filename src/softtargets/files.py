"""softtargets' own files, written and read back safely: atomic writes, JSON lines, links
refused, and one reader for its JSON and YAML with a size, depth and alias budget
(:func:`parse_json`, :func:`parse_yaml`, :func:`read_small_text`).

Each writer writes a temporary file in the target's directory, flushes it to disk, then renames it
over the target (``os.replace`` is atomic on POSIX and Windows). Files get the permissions the
user's umask gives any new file (``mkstemp`` alone would make them 0600). Temporaries are named
``.NAME.softtargets-PID-XXXX.tmp`` so that those of a writer killed mid-write are recognisable as
ours (:func:`remove_dead_temporaries`).

softtargets never writes through a link: a target that is a symbolic link, has other hard links
or is not a regular file is refused with one line naming it (:func:`check_writable`), and files
it changes in place (a lock, a JSON-lines log) are opened with ``O_NOFOLLOW`` and checked on the
open descriptor (:func:`open_own`), so a link planted in a run folder cannot redirect a write
to a user's file.

JSON lines are appended one line per call; a run killed mid-write leaves at most a torn last line,
which :func:`read_jsonl` drops with a warning and :func:`append_jsonl` cuts off before appending.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from softtargets.errors import SoftTargetsError


class SoftTargetsWarning(UserWarning):
    """Something was repaired or skipped; the command line prints it as one ``warning:`` line."""


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, at the first write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the name of the manifest that makes a folder a softtargets run folder (:mod:`softtargets.run.folder`);
#: readers of users' folders skip such folders
RUN_MANIFEST = ".softtargets-run.json"

_TEMPORARY = re.compile(r"^\..+\.softtargets-(\d+)-[^.]+\.tmp$")


#: softtargets' own JSON and YAML files (configs, manifests, records, headers) are small: a larger
#: one, or one nested deeper than this, was not written by softtargets
MAX_TEXT_BYTES = 64 << 20
MAX_DEPTH = 64


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


OWN = "it was not written by softtargets"


def parse_json(text: str | bytes, where: str, fix: str = OWN) -> Any:
    """``json.loads(text)`` within softtargets' budget: one line naming ``where`` (and ``fix``:
    what to do) for text that is not JSON, larger than :data:`MAX_TEXT_BYTES` or nested deeper
    than :data:`MAX_DEPTH`."""
    if len(text) > MAX_TEXT_BYTES:
        raise SoftTargetsError(f"{where} is larger than {MAX_TEXT_BYTES >> 20} MB; {fix}")
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        deep = True
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SoftTargetsError(f"{where} is not valid JSON ({err}); {fix}") from None
    else:
        deep = _too_deep(value)
    if deep:
        raise SoftTargetsError(f"{where} is nested deeper than {MAX_DEPTH} levels; {fix}")
    return value


def json_objects(
    lines: Iterable[str], where: str, fix: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a user's JSON-lines text: a line that
    is not JSON (:func:`parse_json`'s budget) or not an object is one line naming
    ``where:LINE`` and ``fix``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        value = parse_json(line, f"{where}:{number}", fix)
        if not isinstance(value, dict):
            kind = type(value).__name__
            raise SoftTargetsError(f"{where}:{number} is a {kind}, not a JSON object; {fix}")
        yield number, value


def text_lines(path: str | os.PathLike[str], what: str, fix: str) -> Iterator[str]:
    """The lines of a user's regular UTF-8 file (a ``what``), read one at a time (a file larger
    than memory is fine; a line over :data:`MAX_TEXT_BYTES` is not): a FIFO or a device is never
    opened (:func:`regular_file`), and a bad line is one line naming ``path:LINE`` and ``fix``."""
    regular_file(path, what)
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_TEXT_BYTES + 1):
            number += 1
            if len(raw) > MAX_TEXT_BYTES:
                raise SoftTargetsError(
                    f"{path}:{number} is longer than {MAX_TEXT_BYTES >> 20} MB; {fix}"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SoftTargetsError(f"{path}:{number} is not UTF-8 text; {fix}") from None
            yield line


def regular_file(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """``os.stat(path)`` of a regular file (a ``what``); anything else (missing, a folder, a FIFO
    or a device, which are never opened) is one line."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SoftTargetsError(f"no {what} at {path}") from None
    except OSError as err:
        raise SoftTargetsError(f"{path}: cannot read it ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise SoftTargetsError(f"{path} is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise SoftTargetsError(f"{path} is not a regular file; give a {what}")
    return info


def read_small_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """The UTF-8 text of one of softtargets' own small files (a config, a manifest, a results or
    model JSON): refused with one line unless it is a regular file (:func:`regular_file`) of at
    most :data:`MAX_TEXT_BYTES`."""
    info = regular_file(path, what)
    if info.st_size > MAX_TEXT_BYTES:
        raise SoftTargetsError(f"{path} is larger than {MAX_TEXT_BYTES >> 20} MB; give a {what}")
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_TEXT_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError:
        raise SoftTargetsError(f"{path}: not a text file (not UTF-8); give a {what}") from None
    except OSError as err:
        raise SoftTargetsError(f"{path}: cannot read it ({err.strerror})") from None


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of aliases can expand to gigabytes
    ("billion laughs"), and a config has no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"YAML aliases (*name) are not accepted (line {mark.line + 1})")
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within softtargets' budget: no aliases, at most
    :data:`MAX_TEXT_BYTES` and :data:`MAX_DEPTH` levels; one line naming ``where`` otherwise."""
    if len(text) > MAX_TEXT_BYTES:
        raise SoftTargetsError(
            f"{where} is larger than {MAX_TEXT_BYTES >> 20} MB; give a config file"
        )
    try:
        value = yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader without aliases
    except RecursionError:
        raise SoftTargetsError(f"{where} is nested too deeply") from None
    except yaml.YAMLError as err:
        raise SoftTargetsError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if _too_deep(value):
        raise SoftTargetsError(f"{where} is nested deeper than {MAX_DEPTH} levels")
    return value


def _link_problem(info: os.stat_result) -> str | None:
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_nlink > 1:
        return f"has {info.st_nlink - 1} other hard link(s)"
    return None


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse to replace or change ``path`` if it is a link, a hard-linked file or not a regular
    file (a missing ``path`` is fine): writing there would reach a file softtargets did not
    write."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    problem = _link_problem(info)
    if problem and stat.S_ISDIR(info.st_mode):
        raise SoftTargetsError(f"{path} is a folder, not a file; give a file path")
    if problem:
        raise SoftTargetsError(
            f"{path} {problem}; softtargets does not write through links: remove it, or write "
            "elsewhere"
        )


def open_own(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open(path, flags)`` without following a symbolic link, refused (one line) when the file
    opened is a link, not a regular file, or (opened for writing) has other hard links; returns
    the descriptor."""
    try:
        fd = os.open(
            path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666
        )
    except OSError as err:
        if os.path.islink(path):
            raise SoftTargetsError(
                f"{path} is a symbolic link; softtargets does not write through links: remove it"
            ) from None
        raise SoftTargetsError(f"{path}: cannot open it ({err.strerror})") from None
    problem = _link_problem(os.fstat(fd))
    if problem and "hard link" in problem and flags & (os.O_WRONLY | os.O_RDWR) == 0:
        problem = None  # reading a hard-linked file (a `cp -al` backup of a run) harms nothing
    if problem:
        os.close(fd)
        raise SoftTargetsError(
            f"{path} {problem}; softtargets does not write through links: remove it"
        )
    return fd


#: files up to this size are identified by their content's hash too (JSON lines, reports, figures)
HASHED_BYTES = 16 << 20


def _sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(size))
    return digest.hexdigest()


def identity(path: Path) -> dict[str, Any] | None:
    """What softtargets records of a file it wrote: size, modification time and, for a file of at
    most :data:`HASHED_BYTES`, the hash of its content; ``None`` if it is gone."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    record: dict[str, Any] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    if stat.S_ISREG(info.st_mode) and info.st_size <= HASHED_BYTES:
        record["sha256"] = _sha256(path, info.st_size)
    return record


def still_ours(path: Path, recorded: dict[str, Any]) -> bool:
    """Whether ``path`` is still the file softtargets recorded (:func:`identity`): the same size
    and time, or the same content."""
    now = identity(path)
    if now is None:
        return True  # gone: nothing of the user's to protect
    if (now["size"], now["mtime_ns"]) == (recorded.get("size"), recorded.get("mtime_ns")):
        return True
    if "sha256" not in recorded or "sha256" not in now:
        return False
    return now["sha256"] == recorded["sha256"]


def remove_dead_temporaries(folder: Path) -> list[str]:
    """Remove the temporaries of softtargets writers in ``folder`` whose process is gone (a run
    killed mid-write); a live writer's are left alone. Returns the names removed."""
    removed = []
    for entry in folder.iterdir():
        found = _TEMPORARY.match(entry.name)
        if not found or not entry.is_file() or entry.is_symlink():
            continue
        try:
            os.kill(int(found.group(1)), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue  # another user's process, or no such pid we can ask about
        entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success rename it over ``path`` (refused when
    ``path`` is a link: :func:`check_writable`)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_writable(target)
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.softtargets-{os.getpid()}-", suffix=".tmp"
    )
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
    with os.fdopen(open_own(path, os.O_RDWR), "r+b") as handle:
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
    if target.exists() or target.is_symlink():
        _cut_torn_tail(target)
    with os.fdopen(open_own(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (a missing file gives ``[]``).

    A torn last line (no newline, not JSON) is dropped with a warning; any other line that is not
    a JSON object is an error naming it, since it was not written by softtargets.
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        return []
    try:
        with os.fdopen(open_own(target, os.O_RDONLY), "rb") as handle:
            text = handle.read().decode()
    except (OSError, UnicodeDecodeError) as err:
        raise SoftTargetsError(f"{target} cannot be read ({err}); remove the file") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{target}, line {number}")
        except SoftTargetsError:
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
