"""The main job on streamed data from the command line: image folders and memory-mapped .npy
files read lazily, with augmentation and an online teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.data.builtin import digits
from softtargets.data.stream_parts import crop_and_flip
from softtargets.files import read_jsonl

runner = CliRunner()
QUICK = ["--teacher", "cnn2d", "--teacher-option", "channels=[8]", "--teacher-option",
         "hidden=16", "--student", "mlp", "--student-option", "hidden=[16]",
         "--teacher-epochs", "3", "--epochs", "3", "--seeds", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three classes of 8x8 digits as 16x16 PNGs, 40 of each."""
    root = tmp_path_factory.mktemp("images") / "digits"
    data = digits()
    for k in range(3):
        rows = (data.labels == k).nonzero().squeeze(1)[:40]
        (root / str(k)).mkdir(parents=True)
        for i in rows.tolist():
            x = data.features[i].reshape(8, 8).numpy() * 16
            Image.fromarray(x.astype(np.uint8)).resize((16, 16)).save(root / str(k) / f"{i}.png")
    return root


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["distill", *args])
    return result.exit_code, result.output


def test_a_streamed_run_is_the_in_memory_run(images, tmp_path) -> None:
    streamed, in_memory = tmp_path / "streamed", tmp_path / "memory"
    code, output = _run("--data", str(images), "--stream", *QUICK, "--out", str(streamed))
    assert code == 0, output
    code, output = _run("--data", str(images), *QUICK, "--out", str(in_memory))
    assert code == 0, output
    # the same rows in the same parts: the same teacher and store, bit for bit
    for name in ("store.safetensors", "teacher.safetensors"):
        a, b = load_file(str(streamed / name)), load_file(str(in_memory / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # and the same students: streamed ones train alone (fit), in-memory MLPs together
    # (fit_many), equal to float tolerance
    a, b = (load_file(str(run / "student.safetensors")) for run in (streamed, in_memory))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    records = [read_jsonl(run / "results.jsonl") for run in (streamed, in_memory)]
    for x, y in zip(*records, strict=True):
        assert (x["method"], x["seed"]) == (y["method"], y["seed"])
        assert abs(x["test_accuracy"] - y["test_accuracy"]) <= 1 / x["test_rows"] + 1e-9
    assert "streamed from disk" in (streamed / "report.md").read_text()


def test_augmented_images_train_against_an_online_teacher(images, tmp_path) -> None:
    out = tmp_path / "augmented"
    code, output = _run("--data", str(images), "--stream", "--augment", "--workers", "1",
                        *QUICK, "--out", str(out))  # fmt: skip
    assert code == 0, output
    assert "teacher ran online on every augmented batch" in (out / "report.md").read_text()
    students = [r for r in read_jsonl(out / "results.jsonl") if r["role"] == "student"]
    assert len(students) == 4 and all(0 <= r["test_accuracy"] <= 1 for r in students)


def test_crop_and_flip_keeps_the_shape_and_moves_the_pixels() -> None:
    torch.manual_seed(0)
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16)
    augment = crop_and_flip((3, 16, 16))
    assert augment.padding == 2
    outs = [augment(image) for _ in range(20)]
    assert all(o.shape == image.shape for o in outs)
    assert any(not torch.equal(o, image) for o in outs)  # shifted or flipped
    # a crop keeps a block of the image: every value is the image's or padding's zero
    values = set(image.flatten().tolist()) | {0.0}
    assert all(set(o.flatten().tolist()) <= values for o in outs)
    # without padding only the flip is left: half of the draws, each the image or its mirror
    flips = [crop_and_flip((3, 16, 16), padding=0)(image) for _ in range(20)]
    mirrored = [torch.equal(o, image.flip(-1)) for o in flips]
    assert all(m or torch.equal(o, image) for m, o in zip(mirrored, flips, strict=True))
    assert 0 < sum(mirrored) < 20


def test_a_memory_mapped_npy_streams_with_its_label_column(tmp_path) -> None:
    data = digits()
    table = np.concatenate([data.features.reshape(len(data), -1).numpy(),
                            data.labels.numpy()[:, None].astype(np.float32)], axis=1)  # fmt: skip
    np.save(tmp_path / "digits.npy", table)
    out = tmp_path / "run"
    code, output = _run("--data", str(tmp_path / "digits.npy"), "--stream", "--student", "mlp",
                        "--teacher", "mlp", "--teacher-epochs", "2", "--epochs", "2",
                        "--seeds", "2", "--out", str(out))  # fmt: skip
    assert code == 0, output
    teacher = next(r for r in read_jsonl(out / "results.jsonl") if r["role"] == "teacher")
    assert teacher["test_rows"] == 359 and teacher["test_accuracy"] > 0.5


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--augment"], "it needs --stream"),
        (["--stream", "--augment", "--data", "digits.npy"], "crops and flips images"),
        (["--stream", "--data", "rows.csv"], "--stream reads image folders and .npy files"),
    ],
)
def test_streaming_flags_that_cannot_work_are_one_line(tmp_path, args, expected) -> None:
    data = digits()
    np.save(tmp_path / "digits.npy", np.concatenate(
        [data.features.reshape(len(data), -1).numpy(), data.labels.numpy()[:, None]], axis=1
    ))  # fmt: skip
    (tmp_path / "rows.csv").write_text("a,label\n1,0\n2,1\n")
    args = [a if not a.endswith((".npy", ".csv")) else str(tmp_path / a) for a in args]
    if "--data" not in args:
        args += ["--data", str(tmp_path / "digits.npy")]
    code, output = _run(*args, "--out", str(tmp_path / "run"))
    assert code == 2 and expected in output, output
    assert not (tmp_path / "run").exists()


def test_label_streamed_data_then_distil_from_the_store(images, tmp_path) -> None:
    trained = tmp_path / "trained"
    code, output = _run("--data", str(images), "--stream", *QUICK, "--out", str(trained))
    assert code == 0, output
    weights = str(trained / "teacher.safetensors")
    for stream, name in ((["--stream"], "streamed"), ([], "memory")):
        result = runner.invoke(app, ["label", "--data", str(images), *stream, "--teacher", "cnn2d",
                                     "--teacher-option", "channels=[8]", "--teacher-option",
                                     "hidden=16", "--teacher-weights", weights, "--out",
                                     str(tmp_path / f"{name}.safetensors")])  # fmt: skip
        assert result.exit_code == 0, result.output
    a, b = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("streamed", "memory"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same store either way
    out = tmp_path / "from-store"
    code, output = _run("--data", str(images), "--stream", "--store",
                        str(tmp_path / "streamed.safetensors"), "--student", "mlp",
                        "--epochs", "2", "--seeds", "2", "--out", str(out))  # fmt: skip
    assert code == 0, output
    teacher = next(r for r in read_jsonl(out / "results.jsonl") if r["role"] == "teacher")
    trained_teacher = next(
        r for r in read_jsonl(trained / "results.jsonl") if r["role"] == "teacher"
    )
    assert teacher["test_accuracy"] == trained_teacher["test_accuracy"]  # the stored logits' own
