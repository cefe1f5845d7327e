"""Resume inside a fit: a fit stopped after any epoch (by an exception, or by kill -9 in a real
process) and run again ends with exactly the weights and metrics of an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from softtargets.data.builtin import gaussians
from softtargets.data.dataset import split
from softtargets.data.streams import TensorRows
from softtargets.errors import SoftTargetsError
from softtargets.store.label import label
from softtargets.training.fit import fit
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation


@pytest.fixture(scope="module")
def parts():
    return split(gaussians(num_samples=400, num_classes=3, dim=6, separation=3.0), 0.2, 0.2)


def student(seed: int = 0) -> nn.Module:
    # dropout: the resumed run must also continue the dropout draws where they were
    return build_model("mlp", (6,), 3, seed=seed, hidden=[12], dropout=0.2)


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


class Stop(Exception):
    pass


def stop_after(epoch: int):
    def hook(record: dict) -> None:
        if record["epoch"] == epoch:
            raise Stop

    return hook


@pytest.mark.parametrize(
    ("streamed", "method"), [(False, "kd"), (True, "kd"), (False, "dkd"), (True, "dkd")]
)
def test_a_fit_stopped_after_an_epoch_resumes_exactly(parts, tmp_path, streamed, method) -> None:
    teacher = fit(build_model("mlp", (6,), 3, seed=9, hidden=[12]), parts.train, epochs=3).model
    # DKD with a warm-up over 5 epochs: the resumed epochs take up the warm-up where it was
    options = {"warmup": 5} if method == "dkd" else {}
    targets = Distillation(label(teacher, parts.train), 4.0, 0.7, method=method, options=options)
    train = TensorRows(parts.train) if streamed else parts.train
    common = dict(val=parts.val, epochs=6, lr=1e-2, schedule="cosine", batch_size=32)
    whole = fit(student(), train, targets, **common)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Stop):
        fit(student(), train, targets, checkpoint=path, on_epoch_end=stop_after(4), **common)
    resumed = fit(student(), train, targets, checkpoint=path, **common)
    assert torch.equal(weights(resumed.model), weights(whole.model))
    assert metrics(resumed.history) == metrics(whole.history)
    assert resumed.best_epoch == whole.best_epoch
    # a finished fit's checkpoint answers at once, with the same result
    again = fit(student(), train, targets, checkpoint=path, **common)
    assert torch.equal(weights(again.model), weights(whole.model))


def test_another_fits_checkpoint_or_a_foreign_file_is_refused(parts, tmp_path) -> None:
    path = tmp_path / "fit.ckpt"
    fit(student(), parts.train, epochs=1, checkpoint=path)
    with pytest.raises(SoftTargetsError, match="checkpoint of another fit"):
        fit(student(), parts.train, epochs=1, lr=0.5, checkpoint=path)
    with pytest.raises(SoftTargetsError, match="checkpoint of another fit"):
        fit(student(seed=1), parts.train, epochs=1, checkpoint=path)  # other initial weights
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    with pytest.raises(SoftTargetsError, match="not a readable checkpoint"):
        fit(student(), parts.train, epochs=1, checkpoint=foreign)
    assert foreign.read_text() == "mine"


CHILD = """
import sys, time, torch
from safetensors.torch import save_file
from softtargets.data.dataset import split
from softtargets.data.builtin import gaussians
from softtargets.training.models import build_model
from softtargets.training.fit import fit
parts = split(gaussians(num_samples=400, num_classes=3, dim=6, separation=3.0), 0.2, 0.2)
out, checkpoint, marker = sys.argv[1], sys.argv[2], sys.argv[3]
def hook(record):
    if record["epoch"] == 3 and marker != "-":
        open(marker, "w").write("3")
        time.sleep(120)  # killed here, with epoch 3 checkpointed and epoch 4 not begun
model = build_model("mlp", (6,), 3, seed=0, hidden=[12], dropout=0.2)
result = fit(model, parts.train, val=parts.val, epochs=6, lr=1e-2, batch_size=32,
             checkpoint=None if checkpoint == "-" else checkpoint, on_epoch_end=hook)
save_file(result.model.state_dict(), out)
"""


def test_kill_9_mid_fit_then_the_same_command_ends_bit_identical(tmp_path) -> None:
    from safetensors.torch import load_file

    def run(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)])

    assert run(tmp_path / "whole.st", "-", "-").wait(timeout=300) == 0
    checkpoint, marker = tmp_path / "fit.ckpt", tmp_path / "epoch3"
    child = run(tmp_path / "never.st", checkpoint, marker)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert checkpoint.exists() and not (tmp_path / "never.st").exists()
    assert run(tmp_path / "resumed.st", checkpoint, "-").wait(timeout=300) == 0
    whole, resumed = load_file(tmp_path / "whole.st"), load_file(tmp_path / "resumed.st")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not list(Path(tmp_path).glob("*.tmp"))


def test_bf16_autocast_trains_as_well_as_fp32_on_the_cpu(parts) -> None:
    common = dict(val=parts.val, epochs=8, lr=1e-2)
    fp32 = fit(student(), parts.train, **common).selected["val_accuracy"]
    bf16 = fit(student(), parts.train, precision="bf16", **common).selected["val_accuracy"]
    assert bf16 > 0.6 and abs(bf16 - fp32) <= 0.1  # chance is 1/3
    with pytest.raises(SoftTargetsError, match="unknown precision 'fp8'"):
        fit(student(), parts.train, precision="fp8", epochs=1)


def test_compile_trains_the_model_itself(parts) -> None:
    def plain() -> nn.Module:  # no dropout: compiled code draws its random numbers otherwise
        return build_model("mlp", (6,), 3, seed=0, hidden=[12])

    eager = fit(plain(), parts.train, epochs=2, lr=1e-2)
    compiled = fit(plain(), parts.train, epochs=2, lr=1e-2, compile=True)
    assert isinstance(compiled.model, nn.Sequential)  # the caller's module, trained
    torch.testing.assert_close(weights(compiled.model), weights(eager.model), rtol=1e-4, atol=1e-5)
