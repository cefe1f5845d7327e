"""The distilled model out: students kept, the validation-best named, served, exported, measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.config import demo_config
from softtargets.files import read_jsonl
from softtargets.run.data import load_splits
from softtargets.run.deployment import deployment_markdown
from softtargets.run.distill import run_distillation
from softtargets.run.students import load_saved

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("students") / "run"
    outcome = run_distillation(demo_config(quick=True), out)
    assert outcome.deployment
    return out


def test_every_student_is_kept_and_the_named_one_is_best_on_validation(run) -> None:
    students = [r for r in read_jsonl(run / "results.jsonl") if r["role"] == "student"]
    assert len(students) == 4
    for r in students:
        assert (run / r["weights"]).is_file() and 0 <= r["val_accuracy"] <= 1
    meta = json.loads((run / "student.json").read_text())
    chosen = max(students, key=lambda r: (r["val_accuracy"], -r["val_nll"]))
    assert (meta["method"], meta["seed"]) == (chosen["method"], chosen["seed"])
    assert "test set chose nothing" in meta["selected"]
    assert (run / "student.safetensors").read_bytes() == (run / chosen["weights"]).read_bytes()
    # loaded back as a user would, it gives the recorded test accuracy
    saved = load_saved(run)
    config = demo_config(quick=True)
    _, splits = load_splits(config)
    with torch.no_grad():
        predicted = saved.model(splits.test.features).argmax(1)
    accuracy = (predicted == splits.test.labels).float().mean().item()
    assert accuracy == pytest.approx(chosen["test_accuracy"], abs=1e-6)


def test_predict_serves_the_run_student_for_labelled_and_unlabelled_rows(run, tmp_path) -> None:
    config = demo_config(quick=True)
    _, splits = load_splits(config)
    rows = splits.test.features[:7].numpy()
    np.savez(tmp_path / "rows.npz", x=rows)  # no labels: rows to predict
    out = tmp_path / "probs.csv"
    result = runner.invoke(app, ["predict", "--model", str(run), "--data",
                                 str(tmp_path / "rows.npz"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].split(",") == ["row", *json.loads((run / "student.json").read_text())[
        "class_names"]]  # fmt: skip
    probs = np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    assert probs.shape == (7, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with torch.no_grad():
        expected = load_saved(run).model(torch.from_numpy(rows)).softmax(1).numpy()
    assert np.allclose(probs, expected, atol=1e-6)
    # rows of another width are one line
    np.savez(tmp_path / "wide.npz", x=np.zeros((3, 5), dtype=np.float32))
    result = runner.invoke(app, ["predict", "--model", str(run), "--data",
                                 str(tmp_path / "wide.npz")])  # fmt: skip
    assert result.exit_code == 2 and "the model reads (40,)" in result.output


@pytest.mark.parametrize("fmt", ["safetensors", "pt2", "onnx"])
def test_export_writes_a_model_that_matches_pytorch_on_the_test_rows(run, tmp_path, fmt) -> None:
    out = tmp_path / f"model.{fmt}"
    result = runner.invoke(app, ["export", "--model", str(run), "--format", fmt,
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "differ from PyTorch's by at most" in " ".join(result.output.split())
    _, splits = load_splits(demo_config(quick=True))
    x = splits.test.features
    with torch.no_grad():
        expected = load_saved(run).model(x)
    if fmt == "safetensors":
        got = load_saved(out).model(x).detach()
    elif fmt == "pt2":
        got = torch.export.load(str(out)).module()(x)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"rows": x.numpy()})[0])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # refused when it exists, unless --overwrite
    again = runner.invoke(app, ["export", "--model", str(run), "--format", fmt, "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output


def test_export_and_predict_refuse_what_holds_no_student(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for command in (["export", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "m")],
                    ["predict", "--model", str(tmp_path / "empty"), "--data", "x.csv"]):  # fmt: skip
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "holds no model softtargets saved" in result.output
    result = runner.invoke(app, ["export", "--model", str(tmp_path), "--format", "tflite"])
    assert result.exit_code == 2 and "choose one of safetensors, pt2, onnx" in result.output


def test_the_report_has_a_deployment_table_with_measured_ratios(run) -> None:
    report = (run / "report.md").read_text()
    assert "## What distillation bought" in report and "| student / teacher |" in report
    outcome = run_distillation(demo_config(quick=True), run)  # resumed: nothing retrained
    teacher, student = outcome.deployment
    # (the quick teacher is the smaller model: the table says so, whichever way it goes)
    assert teacher["parameters"] == outcome.teacher["parameters"]
    assert student["parameters"] == outcome.results[0]["parameters"]
    assert teacher["flops"] == outcome.teacher["flops"] and student["flops"] > 0
    for row in (teacher, student):
        assert row["seconds_per_row_batch1"] > 0 and row["seconds_per_row_batch256"] > 0
        assert row["test_accuracy_low"] <= row["test_accuracy"] <= row["test_accuracy_high"]
    assert 0 <= student["agreement"] <= 1 and teacher["agreement"] == 1
    assert (run / "teacher.safetensors").stat().st_size == teacher["file_bytes"]
    text = deployment_markdown(outcome.deployment)
    ratio = student["parameters"] / teacher["parameters"]
    shown = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"
    assert f"| student / teacher | {shown} |" in text


def test_a_safetensors_export_never_writes_over_a_users_json(run, tmp_path) -> None:
    (tmp_path / "model.json").write_text("the user's own notes")
    result = runner.invoke(app, ["export", "--model", str(run), "--format", "safetensors",
                                 "--out", str(tmp_path / "model.safetensors")])  # fmt: skip
    assert result.exit_code == 2 and "exists" in result.output
    assert (tmp_path / "model.json").read_text() == "the user's own notes"
    assert not (tmp_path / "model.safetensors").exists()
