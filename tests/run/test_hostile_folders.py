"""Run and study folders that someone tampered with: links planted where softtargets writes, files
a report must not disclose, temporaries of killed writers, an --out inside the data. Each test
builds the hostile folder itself and checks that nothing outside the run folder changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.errors import SoftTargetsError
from softtargets.files import SoftTargetsWarning
from softtargets.run.folder import LOCK, RunFolder
from softtargets.run.report import build_report

THESIS = "chapter 1: soft targets\n"


@pytest.fixture
def thesis(tmp_path: Path) -> Path:
    path = tmp_path / "home" / "thesis.txt"
    path.parent.mkdir()
    path.write_text(THESIS)
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lock_planted_as_a_symlink_is_refused_and_its_target_kept(tmp_path, thesis) -> None:
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / LOCK).symlink_to(thesis)  # a folder holding only a lock passes the folder check
    with pytest.raises(SoftTargetsError, match="symbolic link") as caught:
        with RunFolder.open(run):
            pass
    assert "\n" not in str(caught.value)
    assert thesis.read_text() == THESIS


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_records_are_never_appended_through_a_link(tmp_path, thesis, link) -> None:
    run = tmp_path / "run"
    with RunFolder.open(run) as folder:
        folder.append("history.jsonl", {"epoch": 1})
    (run / "history.jsonl").unlink()
    thesis.write_text("an unterminated line")  # what a torn record looks like
    if link == "symlink":
        (run / "history.jsonl").symlink_to(thesis)
    else:
        os.link(thesis, run / "history.jsonl")
    with (
        RunFolder.open(run) as folder,
        pytest.raises(SoftTargetsError, match="does not write through links"),
    ):
        folder.append("history.jsonl", {"epoch": 2})
    assert thesis.read_text() == "an unterminated line"


def test_files_are_not_replaced_through_a_hard_link_nor_removed_through_a_link(
    tmp_path, thesis
) -> None:
    run = tmp_path / "run"
    with RunFolder.open(run) as folder:
        folder.write_text("report.md", "ours")
        folder.write_text("config.yaml", "ours")
    (run / "report.md").unlink()
    os.link(thesis, run / "report.md")
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(thesis)
    with RunFolder.open(run) as folder, pytest.raises(SoftTargetsError, match="hard link|replaced"):
        folder.write_text("report.md", "the next run's report")
    with RunFolder.open(run, overwrite=True):  # --overwrite removes only what softtargets wrote
        pass
    assert (run / "config.yaml").is_symlink() and (run / "report.md").exists()
    assert thesis.read_text() == THESIS


def test_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path) -> None:
    run = tmp_path / "run"
    with RunFolder.open(run):
        pass
    dead = run / f".store.safetensors.softtargets-{_dead_pid()}-k2j4x9.tmp"
    alive = run / f".store.safetensors.softtargets-{os.getpid()}-a8b7c6.tmp"
    users = run / ".notes.tmp"
    for path in (dead, alive, users):
        path.write_bytes(b"\0" * 1000)
    removed = []
    with RunFolder.open(run, log=removed.append):
        pass
    assert not dead.exists() and alive.exists() and users.exists()
    assert len(removed) == 1 and dead.name in removed[0]


def _study(runs: Path, name: str, section: str) -> Path:
    folder = runs / f"study-{name}"
    folder.mkdir(parents=True)
    (folder / "section.md").write_text(section)
    verdict = {"claim": "a claim", "label": "inconclusive", "evidence": "e"}
    result = {"study": name, "title": name, "verdict": verdict, "config": {}}
    (folder / "results.json").write_text(json.dumps(result))
    return folder


PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def test_a_report_embeds_only_pngs_inside_their_study_folder(tmp_path) -> None:
    runs = tmp_path / "runs"
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG + b"SECRET-BYTES")
    outside_text = tmp_path / "shadow"
    outside_text.write_text("root:$6$hash")
    folder = _study(
        runs,
        "similarity",
        "\n".join(
            [
                "# similarity",
                "![ok](fig.png)",
                f"![abs]({outside_text})",
                "![up](../../secret.png)",
                "![link](linked.png)",
                "![zero](/dev/zero)",
                "![text](notes.png)",
            ]
        ),
    )
    (folder / "fig.png").write_bytes(PNG)
    (folder / "linked.png").symlink_to(secret)
    (folder / "notes.png").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, html_path = build_report(runs)
    page = html_path.read_text()
    import base64

    assert base64.b64encode(PNG).decode() in page  # the study's own figure
    assert "SECRET" not in page and base64.b64encode(b"SECRET-BYTES").decode()[:8] not in page
    assert "cm9vdD" not in page  # "root:" in base64
    assert page.count("<img") == 1
    messages = [str(w.message) for w in caught if issubclass(w.category, SoftTargetsWarning)]
    assert len(messages) == 5 and all("\n" not in m for m in messages)


def test_an_out_inside_the_data_folder_is_refused_and_run_folders_are_not_classes(
    tmp_path,
) -> None:
    from PIL import Image

    from softtargets.data.streams import ImageFolderRows

    data = tmp_path / "images"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(data / name / f"{i}.png")
    result = CliRunner().invoke(
        app, ["distill", "--data", str(data), "--out", str(data / "runs"), "--seeds", "1"]
    )
    assert result.exit_code == 2 and "inside the data folder" in result.output
    assert not (data / "runs").exists()
    # a run folder left inside the data by an older version is skipped, not read as a class
    with RunFolder.open(data / "old-run") as folder:
        folder.write_bytes("accuracy.png", b"x")
    (data / "old-run" / "sub").mkdir()
    assert ImageFolderRows(data).class_names == ("cat", "dog")


def test_a_file_the_user_replaced_is_theirs_never_overwritten_nor_removed(tmp_path) -> None:
    run = tmp_path / "run"
    with RunFolder.open(run) as folder:
        folder.write_text("report.md", "ours")
        folder.write_text("config.yaml", "ours too")
    (run / "report.md").write_text("my own notes on the run")  # replaced in place
    with RunFolder.open(run) as folder:
        with pytest.raises(SoftTargetsError, match="replaced since softtargets wrote it") as caught:
            folder.write_text("report.md", "the next run's report")
        assert "\n" not in str(caught.value)
        folder.write_text("config.yaml", "rewritten: still ours")  # unchanged files are ours
    said = []
    with RunFolder.open(run, overwrite=True, log=said.append):
        pass
    assert (run / "report.md").read_text() == "my own notes on the run"
    assert not (run / "config.yaml").exists()
    assert len(said) == 1 and "report.md" in said[0]


@pytest.mark.parametrize("case", ["file in the way", "link loop", "name too long"])
def test_operating_system_errors_are_one_line(tmp_path, case) -> None:
    if case == "file in the way":
        (tmp_path / "notes.txt").write_text(THESIS)
        out = tmp_path / "notes.txt" / "sub"
    elif case == "link loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out = tmp_path / "loop" / "sub"
    else:
        out = tmp_path / ("x" * 300)
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    if case == "file in the way":
        assert (tmp_path / "notes.txt").read_text() == THESIS


def test_a_full_disk_while_a_file_is_written_is_one_line_and_leaves_no_part(
    tmp_path, monkeypatch
) -> None:
    import errno

    import softtargets.files

    run = tmp_path / "run"
    with RunFolder.open(run) as folder:
        folder.write_text("report.md", "the first report")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    from softtargets.cli.console import describe_os_error

    with RunFolder.open(run) as folder:
        monkeypatch.setattr(softtargets.files.os, "fsync", full)
        with pytest.raises(OSError) as caught:
            folder.write_text("report.md", "a second report, cut short by the full disk")
        monkeypatch.undo()  # the disk has room again when the folder closes
    line = describe_os_error(caught.value)
    assert "disk is full" in line and "\n" not in line
    assert (run / "report.md").read_text() == "the first report"  # the old file, whole
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temporary left


def _proportion_model(tmp_path: Path) -> Path:
    data = tmp_path / "counts.csv"
    data.write_text("a,b,yes,no\n1,2,3,4\n2,3,1,5\n3,1,4,2\n4,4,2,2\n")
    model = tmp_path / "model"
    result = CliRunner().invoke(
        app, ["fit-proportions", str(data), "--features", "a,b", "--counts", "yes,no",
              "--out", str(model)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return model


@pytest.mark.parametrize("case", ["latin-1", "folder as file", "out is a folder", "extra key",
                                  "missing key", "three classes over two"])  # fmt: skip
def test_predict_refuses_bad_files_in_one_line(tmp_path, case) -> None:
    model = _proportion_model(tmp_path)
    data = tmp_path / "counts.csv"
    args = ["predict", str(model), str(data)]
    meta = json.loads((model / "model.json").read_text())
    if case == "latin-1":
        (tmp_path / "latin.csv").write_bytes(b"a,b\n1,\xe92\n")
        args[2] = str(tmp_path / "latin.csv")
    elif case == "folder as file":
        args[2] = str(model)
    elif case == "out is a folder":
        (tmp_path / "existing").mkdir()
        args += ["--out", str(tmp_path / "existing"), "--overwrite"]
    elif case == "extra key":
        meta["extra"] = 1
    elif case == "missing key":
        del meta["scale"]
    else:
        meta["classes"] = ["x", "y", "z"]
    (model / "model.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert len(result.output.strip().splitlines()) <= 3 and "Traceback" not in result.output
    if case == "out is a folder":
        assert (tmp_path / "existing").is_dir()


@pytest.mark.parametrize(
    "change",
    [
        {"verdict": "yes"},
        {"config": None},
        {"study": ["x"]},
        "results.json is a folder",
        "section.md is Latin-1",
    ],
)
def test_report_refuses_a_study_folder_that_is_not_a_studys(tmp_path, change) -> None:
    runs = tmp_path / "runs"
    folder = _study(runs, "similarity", "# similarity\n")
    if isinstance(change, dict):
        result = json.loads((folder / "results.json").read_text())
        result.update(change)
        (folder / "results.json").write_text(json.dumps(result))
    elif change == "results.json is a folder":
        (folder / "results.json").unlink()
        (folder / "results.json").mkdir()
    else:
        (folder / "section.md").write_bytes("# similarit\xe9\n".encode("latin-1"))
    with pytest.raises(SoftTargetsError) as caught:
        build_report(runs)
    assert "re-run that study" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("code", ["EROFS", "EACCES"])
def test_a_read_only_or_forbidden_parent_is_one_line_and_nothing_is_made(
    tmp_path, monkeypatch, code
) -> None:
    """As root a chmod cannot forbid anything, so the file system's answer is simulated where the
    run folder is made: the command says which path and why, in one line, and makes nothing."""
    import errno

    made = Path.mkdir

    def refuse(self, *args, **kwargs):
        if tmp_path in self.parents or self == tmp_path / "runs":
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(self))
        return made(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "runs" / "x")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and len(lines) <= 3
    assert ("read-only" if code == "EROFS" else "not writable") in result.output
    assert list(tmp_path.iterdir()) == []
