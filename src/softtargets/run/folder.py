"""A run folder: where one softtargets job writes, and the only place it ever removes anything.

A run folder holds two files of its own beside what the job writes:

| file | holds |
| --- | --- |
| ``.softtargets-run.json`` | the manifest: every file softtargets wrote here, and the settings keys it was made with |
| ``.softtargets.lock`` | an OS file lock held while a job runs, with who holds it (pid, host, command, start) |

The rules, for every command that writes a folder (``demo``, ``teacher``, ``distill``, ``study``,
the study teachers, ``fit-proportions``, ``report``):

* ``--overwrite`` removes only the files the manifest lists, never the folder or anything else in it.
* A folder is accepted if it is new, empty, or has a manifest. The current folder, a parent of it,
  the home folder and the file-system root are refused, and so is a non-empty folder without a
  manifest (someone else's files). The shared ``runs/`` folder of ``report`` (``shared=True``) may
  hold other things, but a file softtargets did not write is never overwritten.
* One job at a time: a second job on the same folder fails at once, naming the running one (or,
  with ``wait=True``, as for the study teachers, waits for it). The lock is the OS's, so it is
  released when the process ends, however it ends.
* Files are written atomically (:mod:`softtargets.files`); JSON-lines records are read back
  de-duplicated by their key, so a record written twice counts once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from softtargets import distributed
from softtargets.config import DistillConfig
from softtargets.errors import SoftTargetsError
from softtargets.files import (
    RUN_MANIFEST,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    identity,
    parse_json,
    read_jsonl,
    read_small_text,
    remove_dead_temporaries,
    still_ours,
)
from softtargets.run.lock import Lock
from softtargets.training.weights import cpu_state

MANIFEST = RUN_MANIFEST


LOCK = ".softtargets.lock"


FORMAT = "softtargets.run"


_OWN = (MANIFEST, LOCK)


def settings_key(values: dict[str, Any]) -> str:
    """A short hash of JSON-able settings (which settings made a teacher, a set of fits, ...)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def resolved(path: Path) -> Path:
    """``path`` made absolute with its links resolved; a link loop is one line, not Python's
    RuntimeError."""
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError):  # Python's resolve raises RuntimeError on a link loop
        raise SoftTargetsError(
            f"{path}: a symbolic link there points round in a loop; remove it"
        ) from None


def check_out_path(path: Path, shared: bool = False) -> Path:
    """Refuse a folder softtargets must not write into as a run folder; return it resolved."""
    target = resolved(path)
    if target.exists() and not target.is_dir():
        raise SoftTargetsError(f"--out {path} is a file, not a folder; give a folder for the run")
    if shared:
        return target
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd or target in cwd.parents:
        raise SoftTargetsError(
            f"--out {path} is the current folder or a parent of it; give a new sub-folder such "
            "as runs/mine"
        )
    if target == home or target == Path(target.anchor):
        raise SoftTargetsError(f"--out {path} is your home folder or the root; give a sub-folder")
    foreign = target.is_dir() and any(p.name not in _OWN for p in target.iterdir())
    if foreign and not (target / MANIFEST).is_file():
        raise SoftTargetsError(
            f"--out {path} is a folder that softtargets did not make and it is not empty; give "
            "a new or empty folder"
        )
    return target


def check_out_of_inputs(out: str | Path, inputs: Sequence[str | None]) -> None:
    """Refuse an ``--out`` inside a folder the run reads (``--data``, ``--test-data``): its files
    would become part of the data (a figure read as an image of a new class)."""
    target = resolved(Path(out))
    for given in inputs:
        if given is None or not Path(given).expanduser().is_dir():
            continue
        source = resolved(Path(given))
        if target == source or source in target.parents:
            raise SoftTargetsError(
                f"--out {out} is inside the data folder {given}; write the run elsewhere (its "
                "files would be read as data)"
            )


class RunFolder:
    """A locked run folder. Open it with :meth:`open`; write files through it.

    ``path(name)`` registers ``name`` in the manifest and returns where to write it, for writers
    that take a path (a figure, a store); ``write_text``/``write_bytes`` write atomically;
    ``append``/``records`` handle JSON lines.
    """

    def __init__(self, root: Path, writer: bool = True) -> None:
        self.root = root
        # Under torchrun only rank 0 writes; the other processes read the folder through a
        # view whose writing methods do nothing (their results reach rank 0 as objects).
        self.writer = writer
        self._manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": 1,
            "files": [],
            "keys": {},
            "written": {},
        }
        self._log: Callable[[str], None] = lambda message: None
        self._touched: set[str] = set()  # the files this job was handed (path())

    # ------------------------------------------------------------------ opening
    @classmethod
    @contextmanager
    def open(
        cls,
        path: str | Path,
        *,
        overwrite: bool = False,
        shared: bool = False,
        wait: bool = False,
        log: Callable[[str], None] = lambda message: None,
    ) -> Iterator[RunFolder]:
        """Check ``path``, lock it, and (with ``overwrite``) remove what softtargets wrote there.

        Under torchrun rank 0 does all that; the other processes wait for it and get a view that
        reads the folder and writes nothing.
        """

        if distributed.active() and not distributed.is_main():
            distributed.barrier()  # rank 0 has checked, locked and prepared the folder
            folder = cls(Path(path).resolve(), writer=False)
            folder._read_manifest()
            yield folder
            return
        with cls._open_as_writer(path, overwrite, shared, wait, log) as folder:
            if distributed.active():
                distributed.barrier()
            yield folder

    @classmethod
    @contextmanager
    def _open_as_writer(
        cls,
        path: str | Path,
        overwrite: bool,
        shared: bool,
        wait: bool,
        log: Callable[[str], None],
    ) -> Iterator[RunFolder]:
        root = check_out_path(Path(path), shared)
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        folder = cls(root)
        folder._log = log
        lock = Lock(root / LOCK)
        try:
            lock.acquire(wait, log)
        except BaseException:
            if created:
                _remove_if_only_ours(root)
            raise
        try:
            for name in remove_dead_temporaries(root):  # left by a writer killed mid-write
                log(f"removed {name}, a temporary file of an interrupted softtargets run")
            folder._read_manifest()
            if not (root / MANIFEST).exists():
                folder._save_manifest()  # from now on the folder is known as a run folder
            if overwrite:
                folder.remove_written()
            yield folder
            folder.record_written()  # what the job wrote, as it left it
        except BaseException:
            if created:
                _remove_if_only_ours(root)
            else:
                folder.record_written()  # an interrupted job's files are still its own
            raise
        finally:
            lock.release()

    def _read_manifest(self) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            return
        try:
            manifest = parse_json(read_small_text(path, "manifest"), str(path))
        except SoftTargetsError:
            raise SoftTargetsError(
                f"{path} is unreadable; this run folder's manifest is corrupt, use another --out"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SoftTargetsError(f"{path} is not a softtargets manifest; use another --out")
        files = manifest.get("files", [])
        keys = manifest.get("keys", {})
        if not isinstance(files, list) or not isinstance(keys, dict):
            raise SoftTargetsError(f"{path} is not a softtargets manifest; use another --out")
        written = manifest.get("written", {})
        if not isinstance(written, dict):
            raise SoftTargetsError(f"{path} is not a softtargets manifest; use another --out")
        self._manifest = {
            **self._manifest,
            "files": [str(f) for f in files],
            "keys": keys,
            "written": written,
        }

    def _save_manifest(self) -> None:
        if not self.writer:
            return
        text = json.dumps(self._manifest, indent=1, sort_keys=True) + "\n"
        atomic_write_text(self.root / MANIFEST, text)

    # ------------------------------------------------------------------ files
    def path(self, name: str) -> Path:
        """Where to write ``name`` (a plain file name); it is recorded in the manifest first."""
        if not name or "/" in name or "\\" in name or name.startswith(".") or name in _OWN:
            raise SoftTargetsError(f"{name!r} is not a plain file name for a run folder")
        target = self.root / name
        if not self.writer:
            return target
        if name not in self._manifest["files"]:
            if target.exists() or target.is_symlink():
                raise SoftTargetsError(
                    f"{target} exists and softtargets did not write it; it is left alone: move it "
                    "or write elsewhere (--out)"
                )
            self._manifest["files"].append(name)
            self._save_manifest()
            self._touched.add(name)
        elif not self._ours(name):
            raise SoftTargetsError(
                f"{target} was changed or replaced since softtargets wrote it, so it is yours: it "
                "is left alone; move it, or write elsewhere (--out)"
            )
        else:
            self._touched.add(name)
        return target

    def _ours(self, name: str) -> bool:
        """Whether listed file ``name`` is still what softtargets last recorded writing."""
        recorded = self._manifest["written"].get(name)
        return recorded is None or still_ours(self.root / name, recorded)

    def record_written(self, names: Sequence[str] | None = None) -> None:
        """Record the identity (size, time, content hash) of files softtargets just wrote: when
        the folder closes, every file this job was handed, so a file replaced afterwards is known
        as the user's.
        Checkpoints (they change every epoch; a finished fit removes them) and JSON-lines records
        (only ever appended to, read back line by line against their keys, and cut by a resume)
        are left out."""
        for name in sorted(self._touched) if names is None else names:
            if name.endswith((".ckpt", ".jsonl")):
                continue
            self._touched.discard(name)  # recorded now: the folder's close need not again
            found = identity(self.root / name)
            if found is None:
                self._manifest["written"].pop(name, None)
            else:
                self._manifest["written"][name] = found
        self._save_manifest()

    def write_text(self, name: str, text: str) -> Path:
        target = self.path(name)
        if self.writer:
            atomic_write_text(target, text)
            self.record_written([name])
        return target

    def write_bytes(self, name: str, data: bytes) -> Path:
        target = self.path(name)
        if self.writer:
            atomic_write_bytes(target, data)
            self.record_written([name])
        return target

    def remove(self, name: str) -> None:
        """Delete ``name``, a file this folder wrote (a finished fit's checkpoint)."""
        if self.writer and name in self._manifest["files"]:
            check_writable(self.root / name)
            if self._ours(name):
                (self.root / name).unlink(missing_ok=True)
            self._manifest["files"].remove(name)
            self._manifest["written"].pop(name, None)
            self._save_manifest()

    def remove_written(self) -> list[str]:
        """Remove every file the manifest lists (``--overwrite``) that is still as softtargets wrote
        it; nothing else (a listed file changed since is the user's, kept and reported). Returns
        the names removed."""
        removed: list[str] = []
        kept: list[str] = []
        for name in self._manifest["files"]:
            target = self.root / name
            # a manifest entry is a plain name inside this folder; anything else is not ours
            if "/" in name or "\\" in name or name.startswith(".") or not target.is_file():
                continue
            try:
                check_writable(target)  # a link or hard link put in its place is not ours
            except SoftTargetsError:
                continue
            if not self._ours(name):
                kept.append(name)
                continue
            target.unlink()
            removed.append(name)
        if kept:
            self._log(f"kept {', '.join(kept)}: changed since softtargets wrote them (yours)")
        self._manifest["files"], self._manifest["keys"], self._manifest["written"] = [], {}, {}
        self._save_manifest()
        return removed

    # ------------------------------------------------------------------ keys
    def key(self, what: str) -> str | None:
        """The settings key this folder's ``what`` (say, ``"teacher"``) was made with, if any."""
        return self._manifest["keys"].get(what)

    def set_key(self, what: str, key: str) -> None:
        self._manifest["keys"][what] = key
        self._save_manifest()

    # ------------------------------------------------------------------ JSON lines
    def append(self, name: str, record: dict[str, Any]) -> None:
        if self.writer:
            append_jsonl(self.path(name), record)

    def records(
        self, name: str, unique: Sequence[str] = (), required: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """The records of JSON-lines file ``name``: each with the ``required`` keys (else an error
        naming the line), the first of any that share the values of ``unique``."""
        target = self.root / name
        records = read_jsonl(target)
        seen: set[tuple] = set()
        kept = []
        for number, record in enumerate(records, start=1):
            missing = [k for k in required if k not in record]
            if missing:
                raise SoftTargetsError(
                    f"{target}: record {number} has no {missing[0]!r}; it was not written by "
                    "softtargets, remove that line"
                )
            identity = tuple(json.dumps(record.get(k), sort_keys=True) for k in unique)
            if unique and identity in seen:
                continue
            seen.add(identity)
            kept.append(record)
        return kept

    def rewrite_records(self, name: str, records: list[dict[str, Any]]) -> None:
        """Replace JSON-lines file ``name`` with ``records``, atomically."""
        self.write_text(name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    # ------------------------------------------------------------------ weights
    def save_weights(self, name: str, model: nn.Module, key: str) -> Path:
        """Save ``model``'s state as safetensors, tagged with the settings ``key``."""
        from safetensors.torch import save

        return self.write_bytes(name, save(cpu_state(model), metadata={"key": key}))

    def load_weights(self, name: str, model: nn.Module, key: str) -> bool:
        """Load ``name`` into ``model`` if this folder wrote it with settings ``key``.

        Returns ``False`` when there is no such file; raises when it was made with other settings
        or cannot be read.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        target = self.root / name
        if name not in self._manifest["files"] or not target.exists():
            return False
        try:
            with safe_open(str(target), framework="pt") as handle:
                saved_key = (handle.metadata() or {}).get("key")
            state = load_file(str(target)) if saved_key == key else None
            if state is not None:
                model.load_state_dict(state)
        except Exception as err:  # a torn or foreign file; safetensors raises several types
            raise SoftTargetsError(
                f"{target} cannot be loaded ({str(err).splitlines()[0]}); pass --overwrite to "
                "replace it"
            ) from None
        if state is None:
            raise SoftTargetsError(
                f"{self.root} holds a {Path(name).stem} made with other data or settings; pass "
                "--overwrite to replace it or --out to write elsewhere"
            )
        return True


def _remove_if_only_ours(root: Path) -> None:
    """Undo the creation of a folder that a refused job made: only if nothing else is in it."""
    try:
        if all(p.name in _OWN for p in root.iterdir()):
            for name in _OWN:
                (root / name).unlink(missing_ok=True)
            root.rmdir()
    except OSError:
        pass


FIT_IDENTITY = ("key", "role", "method", "seed")


def fit_records(folder: RunFolder, name: str, unique: bool = False) -> list[dict[str, Any]]:
    """The fit records of JSON-lines file ``name`` (``results.jsonl``, ``history.jsonl``), each
    with the :data:`FIT_IDENTITY` keys; with ``unique``, the first of each fit.

    Runs written before Hinton's KD was called ``kd`` everywhere recorded its students as
    ``"soft"``: they are read as ``"kd"``, so such a run resumes and reports as it did.
    """
    records = folder.records(name, unique=FIT_IDENTITY if unique else (), required=FIT_IDENTITY)
    for record in records:
        if record["method"] == "soft":
            record["method"] = "kd"
    return records


TEACHER_SETTINGS = ("data", "teacher", "teacher_training", "first_seed", "store_dtype")


def config_key(config: DistillConfig, teacher_only: bool = False) -> str:
    """A short hash of the settings that determine the teacher (or the students' fits).

    The number of seeds is not part of it: fits are recorded per seed, so raising ``seeds``
    keeps the finished ones and trains only the new seeds.
    """
    values = config.model_dump(mode="json")
    for training in ("teacher_training", "student_training"):
        if not values[training]["label_smoothing"]:  # keys from before the option stay valid
            del values[training]["label_smoothing"]
    for model in ("teacher", "student"):
        # Pretrained weights are keyed by their content (run.teacher.prepare), not their path;
        # and runs from before the option keep their keys.
        del values[model]["weights"]
    del values["store"]  # likewise keyed by its content: its teacher's and data's fingerprints
    data = values["data"]
    data.pop("workers")  # how many loader processes read the rows does not change them
    for name, default in (("text_column", None), ("tokenizer", None), ("stream", False),
                          ("augment", False), ("block_length", None)):  # fmt: skip
        if data[name] == default:  # runs from before these options keep their keys
            del data[name]
    if "block_length" not in data:  # a classifier's run: the language-model settings
        del values["store_top"], values["store_temperatures"], values["on_policy"]
    else:  # text read from a token file is the same blocks: a run may switch either way
        data.pop("stream", None)
        if not values["on_policy"]:  # language-model runs from before the option keep their keys
            del values["on_policy"]
    if "text_column" not in data:
        del data["max_length"]
    if teacher_only:
        values = {k: values[k] for k in TEACHER_SETTINGS}
    else:  # fits are recorded per seed and method: more of either trains only the new ones
        values.pop("seeds")
        values.pop("methods")
    return settings_key(values)
