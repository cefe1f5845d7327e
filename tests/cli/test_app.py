"""The command line end to end, in quick mode."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.config import DistillConfig, demo_config, load_config
from softtargets.errors import SoftTargetsError
from softtargets.files import SoftTargetsWarning, read_jsonl
from softtargets.run.distill import run_distillation

runner = CliRunner()


def test_every_command_has_help() -> None:
    for command in ([], ["demo"], ["teacher"], ["distill"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_quick_demo_writes_a_complete_run(tmp_path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "soft targets" in result.output and "teacher" in result.output
    for name in (
        "config.yaml",
        "store.safetensors",
        "teacher.safetensors",
        "history.jsonl",
        "results.jsonl",
        "accuracy.png",
        "report.md",
    ):
        assert (out / name).stat().st_size > 0, name
    results = read_jsonl(out / "results.jsonl")
    assert sorted((r["method"], r["seed"]) for r in results) == [
        ("hard", 0),
        ("hard", 1),
        ("kd", 0),
        ("kd", 1),
        ("teacher", 0),
    ]
    assert "| student | teacher soft targets | 2 |" in (out / "report.md").read_text()
    assert load_config(DistillConfig, out / "config.yaml") == demo_config(quick=True)


def test_interrupted_run_resumes_without_redoing_finished_fits(tmp_path) -> None:
    out = tmp_path / "run"
    config = demo_config(quick=True)
    first = run_distillation(config, out)
    # Simulate an interruption: drop the last finished fit and leave a torn history line.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with open(out / "history.jsonl", "a") as handle:
        handle.write('{"torn": ')
    teacher_mtime = (out / "teacher.safetensors").stat().st_mtime_ns
    with pytest.warns(SoftTargetsWarning, match="torn last line"):
        second = run_distillation(config, out)
    assert (out / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime  # not retrained
    assert len(read_jsonl(out / "results.jsonl")) == 5  # the teacher and four students
    assert [r["test_accuracy"] for r in second.results] == [
        r["test_accuracy"] for r in first.results
    ]
    history = read_jsonl(out / "history.jsonl")
    per_fit = {}
    for r in history:
        per_fit.setdefault((r["role"], r["method"], r["seed"]), []).append(r["epoch"])
    assert all(epochs == sorted(set(epochs)) for epochs in per_fit.values())  # no duplicates


def test_mlp_students_train_together_and_other_students_one_by_one(tmp_path) -> None:
    from softtargets.config import ModelConfig

    mlp_run = run_distillation(demo_config(quick=True), tmp_path / "mlp")
    # fit_many trains all four at once; each record's time is its share of the one run
    assert len({r["seconds"] for r in mlp_run.results}) == 1
    config = demo_config(quick=True)
    config.student = ModelConfig(name="cnn1d", options={"channels": [4]})  # fit_many refuses it
    cnn_run = run_distillation(config, tmp_path / "cnn")
    assert sorted((r["method"], r["seed"]) for r in cnn_run.results) == [
        ("hard", 0),
        ("hard", 1),
        ("kd", 0),
        ("kd", 1),
    ]
    history = read_jsonl(tmp_path / "cnn" / "history.jsonl")
    assert len([r for r in history if r.get("role") == "student"]) == 4 * 3


def test_changed_teacher_settings_are_refused_and_student_settings_reuse_the_teacher(
    tmp_path,
) -> None:
    out = tmp_path / "run"
    config = demo_config(quick=True)
    run_distillation(config, out)
    changed = config.model_copy(deep=True)
    changed.temperature = 2.0
    outcome = run_distillation(changed, out)  # same teacher, new students
    assert len(outcome.results) == 4
    other_teacher = config.model_copy(deep=True)
    other_teacher.teacher_training.epochs = 4
    with pytest.raises(SoftTargetsError, match="holds a teacher made with other"):
        run_distillation(other_teacher, out)


def test_distill_with_flags_and_a_user_file(tmp_path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 0.5).astype(int)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "distill",
            "--data",
            str(tmp_path / "mine.npz"),
            "--teacher",
            "mlp",
            "--teacher-option",
            "hidden=[32, 32]",
            "--teacher-epochs",
            "3",
            "--student",
            "mlp",
            "--student-option",
            "hidden=[4]",
            "--epochs",
            "2",
            "--seeds",
            "2",
            "-T",
            "3",
            "--alpha",
            "0.5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = load_config(DistillConfig, out / "config.yaml")
    assert saved.student.options == {"hidden": [4]} and saved.temperature == 3.0
    assert saved.teacher.options == {"hidden": [32, 32]} and saved.alpha == 0.5


def test_teacher_command_then_store_reused(tmp_path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        "data: {name: gaussians, options: {num_samples: 200}}\n"
        "teacher: {name: mlp, options: {hidden: [8]}}\n"
        "teacher_training: {epochs: 2}\n"
    )
    out = tmp_path / "t"
    result = runner.invoke(app, ["teacher", "--config", str(config_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "stored 200 x 10 logits" in result.output


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("tempreature: 4\n", "unknown key 'tempreature'"),
        ("student_training: {epochs: 3, lrr: 0.1}\n", "unknown key 'student_training.lrr'"),
        ("alpha: 2\n", "alpha: Input should be less than or equal to 1"),
        ("student: {name: resnet}\n", "unknown model 'resnet'"),
        ("teacher: {name: mlp, options: {hiden: [3]}}\n", "unknown option 'hiden' for model 'mlp'"),
        ("data: {name: nonexistent}\n", "unknown dataset 'nonexistent'"),
        ("- a list\n", "must be a mapping"),
        ("student_training: {precision: bf16}\n", "MLP students are trained together"),
        ("teacher_training: {precision: fp8}\n", "Input should be 'fp32', 'bf16' or 'fp16'"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, yaml_text: str, message: str) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        yaml_text + "teacher_training: {epochs: 1}\n"
        if yaml_text.startswith("teacher:")
        else yaml_text
    )
    result = runner.invoke(
        app,
        [
            "distill",
            "--config",
            str(config_file),
            "--out",
            str(tmp_path / "o"),
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--teacher-epochs",
            "1",
        ],
    )
    assert result.exit_code == 2
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1


def test_bad_option_syntax(tmp_path) -> None:
    result = runner.invoke(app, ["distill", "--student-option", "hidden", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "must look like key=value" in result.output


def test_results_are_json_lines(tmp_path) -> None:
    out = tmp_path / "demo"
    run_distillation(demo_config(quick=True), out)
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert 0.0 <= record["test_accuracy"] <= 1.0
        if record["role"] == "student":
            assert record["selected_epoch"] >= 1


def test_the_command_line_starts_without_torch() -> None:
    # --help must answer at once: torch is imported only by the commands that train
    import subprocess
    import sys

    code = "import sys, softtargets.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_teacher_interrupted_mid_fit_resumes_from_its_checkpoint(tmp_path, monkeypatch) -> None:
    import softtargets.run.teacher as pipeline
    from softtargets.training.fit import fit as real_fit

    config = demo_config(quick=True)
    whole = run_distillation(config, tmp_path / "whole")
    calls = []

    def interrupted(*args, **kwargs):  # the teacher's fit is stopped after its second epoch
        calls.append(kwargs["checkpoint"].name)

        def stop(record):
            if record["epoch"] == 2:
                raise KeyboardInterrupt

        return real_fit(*args, on_epoch_end=stop, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(pipeline, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_distillation(config, out)
    assert calls[0].startswith("teacher-") and (out / calls[0]).exists()
    monkeypatch.setattr(pipeline, "fit", real_fit)
    resumed = run_distillation(config, out)
    assert (out / "teacher.safetensors").read_bytes() == (
        tmp_path / "whole" / "teacher.safetensors"
    ).read_bytes()
    assert [r["test_accuracy"] for r in resumed.results] == [
        r["test_accuracy"] for r in whole.results
    ]
    epochs = [r["epoch"] for r in read_jsonl(out / "history.jsonl") if r["role"] == "teacher"]
    assert epochs == list(range(1, config.teacher_training.epochs + 1))  # each epoch once
    assert not list(out.glob("*.ckpt"))  # a finished fit's checkpoint is removed


def test_a_bf16_teacher_and_a_checkpointless_run(tmp_path) -> None:
    fp32 = run_distillation(demo_config(quick=True), tmp_path / "fp32")
    config = demo_config(quick=True)
    config.teacher_training.precision = "bf16"
    config.student_training.checkpoint_every = 0
    bf16 = run_distillation(config, tmp_path / "bf16")
    # the same teacher to bf16's rounding: 100 test rows, at most 3 of them decided otherwise
    assert abs(bf16.teacher["test_accuracy"] - fp32.teacher["test_accuracy"]) <= 0.03
    assert len(bf16.results) == 4 and not list((tmp_path / "bf16").glob("*.ckpt"))


def test_one_run_compares_several_methods_on_the_same_teacher_and_seeds(tmp_path) -> None:
    from softtargets.cli.options import parse_method_options
    from softtargets.run.report import distill_rows, method_differences

    assert parse_method_options(["dkd:beta=2", "standardize=true"], ["kd", "dkd"]) == {
        "dkd": {"beta": 2, "standardize": True},
        "kd": {"standardize": True},
    }
    with pytest.raises(SoftTargetsError, match="none of the methods \\['jsd'\\] takes it"):
        parse_method_options(["gamma=1"], ["jsd"])
    config = demo_config(quick=True)
    config.methods = ["kd", "dkd", "jsd"]
    config.method_options = {"dkd": {"beta": 2.0}}
    out = run_distillation(config, tmp_path / "run")
    assert sorted((r["method"], r["seed"]) for r in out.results) == [
        (m, s) for m in ("dkd", "hard", "jsd", "kd") for s in (0, 1)
    ]
    assert [row[1] for row in distill_rows(out)][-2:] == ["teacher, DKD", "teacher, JSD"]
    lines = method_differences(out)
    assert lines[0].startswith("DKD: minus hard labels") and "minus KD" in lines[0]
    assert "JSD: minus hard labels" in (tmp_path / "run" / "report.md").read_text()
    # a method added later trains only its own students; the others are kept
    config.methods = ["kd", "dkd", "jsd", "rkl"]
    again = run_distillation(config, tmp_path / "run")
    assert len(again.results) == 10 and len(read_jsonl(tmp_path / "run" / "results.jsonl")) == 11
    result = runner.invoke(app, ["distill", "--method", "fitnets", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown method 'fitnets'" in result.output
    assert not (tmp_path / "x").exists()


def test_fitnet_from_the_command_line_pairs_the_penultimate_features(tmp_path) -> None:
    """``--method fitnet``: KD plus a hint between the features feeding each classifier (the
    demo: CNN teacher, MLP student: a Linear adapter), one student at a time, checkpointed."""
    from softtargets.config import dump_config

    quick = tmp_path / "quick.yaml"
    quick.write_text(dump_config(demo_config(quick=True)))
    result = runner.invoke(app, ["distill", "--config", str(quick), "--method", "kd", "--method",
                                 "fitnet", "--method-option", "fitnet:weight=2", "--out",
                                 str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = [r for r in read_jsonl(tmp_path / "run" / "results.jsonl") if r["role"] == "student"]
    assert sorted((r["method"], r["seed"]) for r in results) == [
        (m, s) for m in ("fitnet", "hard", "kd") for s in (0, 1)
    ]
    assert "FITNET: minus hard labels" in (tmp_path / "run" / "report.md").read_text()
    assert not list((tmp_path / "run").glob("*.ckpt"))  # each fit's checkpoint went with it
    bad = runner.invoke(app, ["distill", "--config", str(quick), "--method", "fitnet",
                              "--method-option",
                              "fitnet:student_layer=fc9", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 2 and "the student has no module 'fc9'" in bad.output
