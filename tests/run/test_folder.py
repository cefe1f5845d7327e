"""Run folders: nothing a user owns is ever removed or overwritten, one job at a time, resumes
that count each fit once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.config import demo_config
from softtargets.errors import SoftTargetsError
from softtargets.files import SoftTargetsWarning, append_jsonl, atomic_write_text, read_jsonl
from softtargets.run.distill import run_distillation
from softtargets.run.folder import LOCK, MANIFEST, RunFolder

runner = CliRunner()


def user_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_overwrite_in_the_current_folder_removes_nothing(tmp_path, monkeypatch) -> None:
    (tmp_path / "thesis.tex").write_text("years of work\n")
    (tmp_path / "c.yaml").write_text("seeds: 1\n")
    monkeypatch.chdir(tmp_path)
    before = user_files(tmp_path)
    result = runner.invoke(app, ["distill", "--config", "c.yaml", "--out", ".", "--overwrite"])
    assert result.exit_code == 2 and "current folder" in result.output
    assert user_files(tmp_path) == before


def test_overwrite_of_a_folder_holding_the_data_file_removes_nothing(tmp_path, monkeypatch) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    rng = np.random.default_rng(0)
    np.savez(project / "mine.npz", x=rng.normal(size=(60, 3)), y=np.arange(60) % 2)
    monkeypatch.chdir(tmp_path)
    before = user_files(project)
    result = runner.invoke(
        app, ["distill", "--data", "proj/mine.npz", "--out", "proj", "--overwrite"]
    )
    assert result.exit_code == 2 and "did not make" in result.output
    assert user_files(project) == before


def test_overwrite_removes_only_what_softtargets_wrote(tmp_path) -> None:
    out = tmp_path / "run"
    run_distillation(demo_config(quick=True), out)
    written = json.loads((out / MANIFEST).read_text())["files"]
    assert {"config.yaml", "results.jsonl", "store.safetensors", "report.md"} <= set(written)
    (out / "my-notes.txt").write_text("keep me\n")
    (out / "sub").mkdir()
    (out / "sub" / "also.txt").write_text("and me\n")
    results_before = without_seconds(read_jsonl(out / "results.jsonl"))
    run_distillation(demo_config(quick=True), out, overwrite=True)
    assert (out / "my-notes.txt").read_text() == "keep me\n"
    assert (out / "sub" / "also.txt").read_text() == "and me\n"
    # the run's own files were removed and written again: the same deterministic results
    assert without_seconds(read_jsonl(out / "results.jsonl")) == results_before


def test_a_manifest_naming_files_outside_the_folder_removes_nothing_there(tmp_path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("mine\n")
    with RunFolder.open(tmp_path / "run") as folder:
        folder.write_text("a.txt", "ours\n")
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    manifest["files"] += ["../precious.txt", str(outside), ".softtargets-run.json"]
    (tmp_path / "run" / MANIFEST).write_text(json.dumps(manifest))
    with RunFolder.open(tmp_path / "run", overwrite=True):
        pass
    assert outside.read_text() == "mine\n" and not (tmp_path / "run" / "a.txt").exists()


def test_a_user_file_in_a_run_folder_is_never_overwritten(tmp_path) -> None:
    with RunFolder.open(tmp_path / "run") as folder:
        folder.write_text("config.yaml", "ours\n")
    (tmp_path / "run" / "report.md").write_text("the user's\n")
    with RunFolder.open(tmp_path / "run") as folder:
        folder.write_text("config.yaml", "ours again\n")  # ours: replaced
        with pytest.raises(SoftTargetsError, match="softtargets did not write it"):
            folder.write_text("report.md", "ours\n")
    assert (tmp_path / "run" / "report.md").read_text() == "the user's\n"


def test_a_refused_run_writes_nothing(tmp_path) -> None:
    out = tmp_path / "run"
    config = demo_config(quick=True)
    run_distillation(config, out)
    before = user_files(out)
    other = config.model_copy(deep=True)
    other.teacher_training.epochs = 4
    with pytest.raises(SoftTargetsError, match="holds a teacher made with other"):
        run_distillation(other, out)
    assert user_files(out) == before


def test_a_refused_run_leaves_no_new_folder(tmp_path) -> None:
    config = demo_config(quick=True)
    config.data.name, config.data.options = str(tmp_path / "missing.csv"), {}
    with pytest.raises(SoftTargetsError, match="unknown dataset"):
        run_distillation(config, tmp_path / "new")
    assert not (tmp_path / "new").exists()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from softtargets.run.folder import RunFolder
    folder, ready, release = (Path(a) for a in sys.argv[1:4])
    with RunFolder.open(folder):
        ready.write_text("locked")
        while not release.exists():
            time.sleep(0.05)
    """
)


def start_holder(tmp_path: Path, folder: Path) -> tuple[subprocess.Popen, Path]:
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(ready), str(release)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")},
    )
    deadline = time.monotonic() + 120  # only a bound on a broken test, never reached otherwise
    while not ready.exists():
        assert holder.poll() is None, "the lock holder died"
        assert time.monotonic() < deadline, "the lock holder never took the lock"
        time.sleep(0.05)
    return holder, release


def test_a_second_process_on_the_same_folder_fails_at_once_naming_the_first(tmp_path) -> None:
    folder = tmp_path / "run"
    holder, release = start_holder(tmp_path, folder)
    try:
        with pytest.raises(
            SoftTargetsError, match=f"in use by another softtargets run .pid {holder.pid}"
        ):
            with RunFolder.open(folder):
                pass
        with pytest.raises(SoftTargetsError, match="in use"):
            run_distillation(demo_config(quick=True), folder)
    finally:
        release.write_text("go")
        holder.wait(timeout=120)
    assert holder.returncode == 0
    with RunFolder.open(folder):  # released when the holder finished
        pass


def test_the_lock_is_released_when_its_process_is_killed(tmp_path) -> None:
    folder = tmp_path / "run"
    holder, _ = start_holder(tmp_path, folder)
    holder.kill()
    holder.wait(timeout=120)
    with RunFolder.open(folder):
        assert (folder / LOCK).exists()


def test_records_count_once_and_a_torn_line_is_dropped_not_appended_onto(tmp_path) -> None:
    path = tmp_path / "run" / "results.jsonl"
    record = {"key": "k", "role": "student", "method": "hard", "seed": 0, "acc": 0.5}
    with RunFolder.open(tmp_path / "run") as folder:
        folder.append("results.jsonl", record)
        folder.append("results.jsonl", {**record, "acc": 0.6})  # a duplicate fit
        with open(path, "a") as handle:
            handle.write('{"key": "k", "ro')  # killed mid-write
        with pytest.warns(SoftTargetsWarning, match="torn last line"):
            assert len(read_jsonl(path)) == 2
        with pytest.warns(SoftTargetsWarning, match="dropped a torn last line"):
            folder.append("results.jsonl", {**record, "seed": 1})
        kept = folder.records("results.jsonl", unique=("key", "role", "method", "seed"))
    assert [(r["seed"], r["acc"]) for r in kept] == [(0, 0.5), (1, 0.5)]
    assert path.read_text().count("\n") == 3 and path.read_text().endswith("\n")


def test_duplicated_results_do_not_count_as_extra_seeds(tmp_path) -> None:
    out = tmp_path / "run"
    first = run_distillation(demo_config(quick=True), out)
    lines = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(lines + lines)  # two writers' records, before the lock
    second = run_distillation(demo_config(quick=True), out)
    assert len(second.results) == len(first.results) == 4


def test_more_seeds_train_only_the_new_ones(tmp_path) -> None:
    out = tmp_path / "run"
    config = demo_config(quick=True)
    first = run_distillation(config, out)
    config.seeds = 3
    second = run_distillation(config, out)
    old = {(r["method"], r["seed"]): r for r in first.results}
    new = {(r["method"], r["seed"]): r for r in second.results}
    assert sorted(new) == sorted([*old, ("hard", 2), ("kd", 2)])
    assert all(new[k] == old[k] for k in old)  # kept, not retrained
    students = [r for r in read_jsonl(out / "history.jsonl") if r["role"] == "student"]
    assert len(students) == 6 * config.student_training.epochs  # each fit's epochs once


def test_files_get_the_users_umask(tmp_path) -> None:
    mask = os.umask(0o027)
    os.umask(mask)
    expected = 0o666 & ~mask
    atomic_write_text(tmp_path / "a.txt", "x")
    append_jsonl(tmp_path / "b.jsonl", {"a": 1})
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == expected
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == expected


def test_a_separate_test_file_is_the_test_set(tmp_path) -> None:
    rng = np.random.default_rng(0)

    def write(name: str, rows: int, labels: list[str]) -> Path:
        x = rng.normal(size=(rows, 3))
        y = [labels[i % len(labels)] for i in range(rows)]
        text = "a,b,c,label\n" + "".join(
            f"{r[0]},{r[1]},{r[2]},{v}\n" for r, v in zip(x, y, strict=True)
        )
        (tmp_path / name).write_text(text)
        return tmp_path / name

    train, test = (
        write("train.csv", 90, ["cat", "dog", "eel"]),
        write("t10k.csv", 21, ["eel", "cat"]),
    )
    result = runner.invoke(
        app,
        [
            "distill", "--data", str(train), "--test-data", str(test), "--teacher", "mlp",
            "--teacher-option", "hidden=[8]", "--teacher-epochs", "2", "--student-option",
            "hidden=[4]", "--epochs", "2", "--seeds", "2", "--out", str(tmp_path / "run"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    assert {r["test_rows"] for r in records} == {21}
    assert "of 21" in (tmp_path / "run" / "report.md").read_text()


def test_output_to_a_log_gets_a_line_per_fit(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    fits = [line for line in result.output.splitlines() if line.startswith("student, ")]
    assert len(fits) == 4 and all(" of 100 errors" in line for line in fits)


def test_the_heartbeat_says_what_is_running() -> None:
    import threading

    from softtargets.cli.console import HeartbeatProgress

    lines: list[str] = []
    beat = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        beat.set()

    with HeartbeatProgress(say, interval=0.01) as progress:
        task = progress.add_task("training", total=40)
        progress.update(task, advance=3)
        # A beat may have come between add_task and update (it said 0/40): wait for one that
        # started after the update, whatever the load on the machine.
        beat.clear()
        assert beat.wait(timeout=120)  # a bound for a broken test only
        beat.clear()
        assert beat.wait(timeout=120)
        last = lines[-1]
    assert "still running after" in last and "training 3/40" in last


def test_new_settings_at_their_defaults_keep_the_keys_of_runs_made_before_them() -> None:
    """Options added since (label smoothing, pretrained weights, stores, text and streamed data)
    leave a config's keys as they were, so run folders made before them resume; the keys below
    are those the demo's config had before any of them existed."""
    from softtargets.config import demo_config
    from softtargets.run.folder import config_key

    assert config_key(demo_config()) == "4e6ce6100efb"
    assert config_key(demo_config(), teacher_only=True) == "aedf69b53177"
