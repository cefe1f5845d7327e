"""A language-model run across processes: killed with ``kill -9`` mid-fit and run again, it ends
as an uninterrupted run does; on two processes (torchrun, gloo) it writes the one-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = ["distill", "--block-length", "16", "--store-top", "4", "--batch-size", "8",
        "--teacher-option", "layers=1", "--teacher-option", "width=16", "--teacher-option",
        "heads=2", "--student-option", "width=16", "--student-option", "heads=2",
        "--seeds", "2", "--epochs", "2"]  # fmt: skip

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# The command line with a progress bar that stops the teacher's fit partway through its third
# epoch (two epochs checkpointed), writes a marker and waits there to be killed.
STOPPED = """
import sys, time
import softtargets.cli.launch as launch

class Stopped:
    def __init__(self):
        self.steps = {}
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def add_task(self, description, total):
        self.steps[description] = 0
        return description
    def update(self, task, advance=1):
        self.steps[task] += advance
        if task == "teacher" and self.steps[task] == int(sys.argv[1]):
            open(sys.argv[2], "w").write("stopped")
            time.sleep(120)
    def remove_task(self, task):
        pass

launch.make_progress = Stopped
from softtargets.cli.app import app
app(sys.argv[3:])
"""


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(5):
        lines = [" ".join(words[(i + j + k) % 8] for k in range(6)) for j in range(12)]
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _fits(out) -> dict:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {(r["role"], r["method"], r["seed"]): r for r in map(json.loads, lines)}


def _distill(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "softtargets", *TINY, *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_kill_9_mid_fit_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path, corpus):
    common = ["--data", corpus, "--teacher-epochs", "4"]
    _distill(*common, "--out", tmp_path / "whole")
    out, marker = tmp_path / "killed", tmp_path / "stopped"
    steps_per_epoch = 4  # 50 training blocks, the teacher 16 a step
    child = subprocess.Popen(
        [sys.executable, "-c", STOPPED, str(2 * steps_per_epoch + 2), str(marker), *TINY,
         *map(str, common), "--out", str(out)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:] if child.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert len(list(out.glob("teacher-teacher-seed0-*.ckpt"))) == 1
    assert not (out / "teacher.safetensors").exists()
    again = _distill(*common, "--out", out)  # the same command again
    assert "teacher: continuing after epoch 2" in " ".join(again.split())
    whole, resumed = _fits(tmp_path / "whole"), _fits(out)
    assert whole.keys() == resumed.keys()
    for fit in whole:  # the teacher continued from its third epoch to the same weights
        for field in ("val_loss", "test_loss", "best_epoch"):
            assert resumed[fit][field] == whole[fit][field], (fit, field)
    assert not list(out.glob("*.ckpt")) and not list(out.glob("*.tmp"))


@pytest.fixture
def examples(tmp_path):
    """Prompt / completion examples whose completions differ in length: the processes of a step
    hold different numbers of counted positions."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    path = tmp_path / "examples.jsonl"
    lines = [json.dumps({"prompt": f"{words[i % 8]}:", "completion": " " + " ".join(
        words[(i + k) % 8] for k in range(i % 3 + 1))}) for i in range(60)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("data", ["corpus", "examples"])
def test_a_text_run_on_two_processes_writes_the_one_process_run(tmp_path, data, request) -> None:
    """Also with ``--stream``: the blocks, their keys and so the records are those in memory."""
    common = ["--data", request.getfixturevalue(data), "--teacher-epochs", "2"]
    _distill(*common, "--out", tmp_path / "one")
    # two processes reading the corpus from the run's token file (rank 0 writes it, both map it)
    _distill(*common, "--out", tmp_path / "two", "--nproc", "2", "--stream")
    one, two = _fits(tmp_path / "one"), _fits(tmp_path / "two")
    assert one.keys() == two.keys()  # every student once, written by rank 0 alone
    for fit in one:  # the teacher trained data-parallel differs by rounding only
        assert two[fit]["test_loss"] == pytest.approx(one[fit]["test_loss"], abs=1e-4), fit
    manifest = json.loads((tmp_path / "two" / ".softtargets-run.json").read_text())
    written = sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith("."))
    assert sorted(manifest["files"]) == written
    assert not any(name.endswith(".ckpt") for name in written) and "tokens.bin" in written
    assert {f"student-{m}-seed{s}.safetensors" for m in ("hard", "kd") for s in (0, 1)} <= set(
        written
    )


def test_label_on_text_writes_the_runs_store_on_one_or_two_processes(
    tmp_path, corpus, same_token_store
) -> None:
    run = tmp_path / "run"
    _distill("--data", corpus, "--teacher-epochs", "1", "--store-temperatures", "2,4",
             "--temperature", "4", "--out", run)  # fmt: skip
    label = ["label", "--data", str(corpus), "--block-length", "16", "--teacher-option",
             "layers=1", "--teacher-option", "width=16", "--teacher-option", "heads=2",
             "--teacher-weights", str(run / "teacher.safetensors"), "--top-k", "4",
             "--store-temperatures", "2,4"]  # fmt: skip
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        done = subprocess.run(
            [sys.executable, "-m", "softtargets", *label, "--out", str(tmp_path / f"{name}.safetensors"),
             *extra], env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "distill --block-length 16 --store" in " ".join(done.stdout.split())
    same_token_store(tmp_path / "one.safetensors", run / "store.safetensors")
    same_token_store(tmp_path / "two.safetensors", run / "store.safetensors")


def test_a_bad_example_read_by_rank_0_alone_stops_every_process_with_its_line(tmp_path, examples):
    """With ``--stream`` rank 0 alone reads the examples into the token file: the others stop
    with its one-line error instead of waiting for it until the group's timeout, and the command
    says that line, not torchrun's traceback."""
    with examples.open("a", encoding="utf-8") as handle:
        handle.write('{"prompt": 1}\n')
    done = subprocess.run(
        [sys.executable, "-m", "softtargets", *TINY, "--data", str(examples), "--teacher-epochs",
         "1", "--nproc", "2", "--stream", "--out", str(tmp_path / "run")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]  # bad input's status, as with one process
    assert output.count("examples.jsonl:61: needs two strings") == 2, output[-3000:]  # both ranks
    assert "Traceback" not in output  # torchrun's report of the failed processes is left out
    assert not (tmp_path / "run").exists()
