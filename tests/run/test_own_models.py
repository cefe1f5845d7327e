"""Users' own models in the main job: import paths, pretrained weights, and their bad forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.errors import SoftTargetsError
from softtargets.files import read_jsonl
from softtargets.training.models import build_model, check_model_fits
from softtargets.training.weights import load_into

runner = CliRunner()

NETS = """
import torch
from torch import nn

CALLS = []


class Wide(nn.Module):
    def __init__(self, in_features, num_classes, width=32):
        super().__init__()
        CALLS.append(width)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes)
        )

    def forward(self, x):
        return self.net(x)


def tiny(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))


def three_outputs(in_features):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 3))


def broken(num_classes):
    raise ValueError("this builder is broken on purpose")


def not_a_model(num_classes):
    return 42
"""

QUICK = ["--data", "digits", "--seeds", "2", "--teacher-epochs", "3", "--epochs", "3"]


@pytest.fixture
def nets(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def _distill(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["distill", *QUICK, *args])
    return result.exit_code, result.output


def test_a_teacher_and_student_from_a_file_train_end_to_end(tmp_path, nets) -> None:
    out = tmp_path / "run"
    code, output = _distill(
        tmp_path, "--teacher", f"{nets}:Wide", "--teacher-option", "width=48",
        "--student", f"{nets}:tiny", "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    records = read_jsonl(out / "results.jsonl")
    teacher = next(r for r in records if r["role"] == "teacher")
    # Linear(64, 48) + Linear(48, 10): the option reached the class, the data's shape too
    assert teacher["parameters"] == 64 * 48 + 48 + 48 * 10 + 10
    students = [r for r in records if r["role"] == "student"]
    assert {r["parameters"] for r in students} == {64 * 10 + 10}
    assert len(students) == 4 and all(0.1 < r["test_accuracy"] <= 1 for r in students)
    assert f"{nets}:Wide" in (out / "report.md").read_text()


def test_an_importable_module_path_builds_with_data_arguments() -> None:
    model = build_model("torch.nn:Linear", (5,), 3, out_features=2, bias=False)
    # in_features came from the data, the rest from the options
    assert model.weight.shape == (2, 5) and model.bias is None


def test_a_pretrained_teacher_is_loaded_not_trained_and_keys_its_store(tmp_path, nets) -> None:
    trained = tmp_path / "trained"
    code, output = _distill(tmp_path, "--teacher", f"{nets}:Wide", "--out", str(trained))
    assert code == 0, output
    weights = load_file(str(trained / "teacher.safetensors"))
    as_pt = tmp_path / "teacher.pt"  # how many training scripts save: wrapped, DDP-prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, as_pt)
    for i, given in enumerate([trained / "teacher.safetensors", as_pt]):
        out = tmp_path / f"pretrained{i}"
        code, output = _distill(
            tmp_path, "--teacher", f"{nets}:Wide", "--teacher-weights", str(given),
            "--out", str(out),
        )  # fmt: skip
        assert code == 0, output
        assert "pretrained weights" in output
        history = read_jsonl(out / "history.jsonl")
        assert not [h for h in history if h["role"] == "teacher"]  # not trained
        records = read_jsonl(out / "results.jsonl")
        teacher = next(r for r in records if r["role"] == "teacher")
        assert teacher["pretrained"] and "val_accuracy" in teacher
        before = next(r for r in read_jsonl(trained / "results.jsonl") if r["role"] == "teacher")
        assert teacher["test_accuracy"] == before["test_accuracy"]
        # the same weights give the same logits: the same students, bit for bit
        assert torch.equal(
            load_file(str(out / "store.safetensors"))["logits"],
            load_file(str(trained / "store.safetensors"))["logits"],
        )
    # other weights in the same folder are another teacher: refused, not mixed
    other = {k: v + 1 for k, v in weights.items()}
    save_file(other, tmp_path / "other.safetensors")
    code, output = _distill(
        tmp_path, "--teacher", f"{nets}:Wide", "--teacher-weights",
        str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "pretrained0"),
    )  # fmt: skip
    assert code == 2 and "other data or teacher settings" in output


def test_a_pickled_payload_in_weights_is_refused_and_never_run(tmp_path, nets) -> None:
    planted = tmp_path / "planted"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (planted,))

    torch.save({"state_dict": {}, "payload": Payload()}, tmp_path / "evil.pt")
    out = tmp_path / "run"
    code, output = _distill(
        tmp_path, "--teacher", f"{nets}:Wide", "--teacher-weights", str(tmp_path / "evil.pt"),
        "--out", str(out),
    )  # fmt: skip
    assert code == 2 and "weights_only=True" in output and "nothing in it was run" in output
    assert not planted.exists() and not out.exists()


@pytest.mark.parametrize(
    "teacher, option, expected",
    [
        ("no_such_package.nets:Wide", None, "no module named 'no_such_package'"),
        ("{nets}:Missing", None, "has no attribute 'Missing'"),
        ("{dir}/absent.py:Wide", None, "does not exist"),
        ("{nets}:broken", None, "ValueError: this builder is broken on purpose"),
        ("{nets}:not_a_model", None, "returned a int, not a torch.nn.Module"),
        ("{nets}:three_outputs", None, "(2, 3) for 2 rows"),
        ("{nets}:Wide", "depth=3", "unknown option 'depth'"),
        ("{nets}:Wide", "num_classes=3", "comes from the data"),
        ("{nets}:Wide", None, "missing"),  # weights of another architecture
        ("{nets}:Wide", None, "not a safetensors file"),  # a file that is not weights
    ],
)
def test_bad_models_and_weights_are_one_line_and_write_nothing(
    tmp_path, nets, teacher, option, expected
) -> None:
    args = ["--teacher", teacher.format(nets=nets, dir=tmp_path)]
    if option:
        args += ["--teacher-option", option]
    if expected == "missing":
        save_file({"fc.weight": torch.zeros(3, 3)}, tmp_path / "w.safetensors")
        args += ["--teacher-weights", str(tmp_path / "w.safetensors")]
    if expected.startswith("not a safetensors"):
        (tmp_path / "w.safetensors").write_bytes(b"\x00" * 64)
        args += ["--teacher-weights", str(tmp_path / "w.safetensors")]
    out = tmp_path / "run"
    code, output = _distill(tmp_path, *args, "--out", str(out))
    assert code == 2, output
    assert expected in output and "Traceback" not in output
    assert len(output.strip().splitlines()) <= 3
    assert not out.exists()


def test_weights_with_the_right_names_but_wrong_shapes_name_the_first(tmp_path) -> None:
    model = build_model("mlp", (4,), 3, hidden=[5])
    state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(SoftTargetsError, match=r"1.weight has shape \(6, 4\) in the file"):
        load_into(model, tmp_path / "w.safetensors")


def test_every_model_is_run_on_two_rows_before_training() -> None:
    model = build_model("mlp", (4,), 3, hidden=[5])
    check_model_fits(model, torch.zeros(2, 4), 3, "student mlp")
    with pytest.raises(SoftTargetsError, match="cannot take this data's rows of shape"):
        check_model_fits(model, torch.zeros(2, 7), 3, "student mlp")
    with pytest.raises(SoftTargetsError, match="for this data's 5 classes"):
        check_model_fits(model, torch.zeros(2, 4), 5, "student mlp")


def test_models_explains_the_forms() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for form in ("package.module:callable", "path/to/file.py:callable", "hf:PATH"):
        assert form in result.output


def test_label_once_then_distil_from_the_store_without_the_teacher(tmp_path, nets) -> None:
    trained = tmp_path / "trained"
    code, output = _distill(tmp_path, "--teacher", f"{nets}:Wide", "--out", str(trained))
    assert code == 0, output
    weights = str(trained / "teacher.safetensors")
    for k, name in ((None, "full"), (3, "top3")):
        args = ["label", "--data", "digits", "--teacher", f"{nets}:Wide", "--teacher-weights",
                weights, "--out", str(tmp_path / f"{name}.safetensors")]  # fmt: skip
        result = runner.invoke(app, args + (["--top-k", str(k)] if k else []))
        assert result.exit_code == 0, result.output
        assert f"stored {k or 10} of 10 logits for each of 1,797 rows" in " ".join(
            result.output.split()
        )
    code, output = _distill(
        tmp_path, "--store", str(tmp_path / "full.safetensors"), "--out", str(tmp_path / "s")
    )
    assert code == 0, output
    from_store = read_jsonl(tmp_path / "s" / "results.jsonl")
    with_teacher = read_jsonl(trained / "results.jsonl")
    # the same logits, so the same teacher accuracy and the same students, without the teacher
    assert [r["test_accuracy"] for r in from_store] == [r["test_accuracy"] for r in with_teacher]
    assert not (tmp_path / "s" / "teacher.safetensors").exists()
    assert "the logits stored in" in (tmp_path / "s" / "report.md").read_text()
    code, output = _distill(
        tmp_path, "--store", str(tmp_path / "top3.safetensors"), "--out", str(tmp_path / "t")
    )
    assert code == 0, output
    # a store made for other data is refused, before anything is written
    code, output = _distill(
        tmp_path, "--data", "mnist1d", "--store", str(tmp_path / "full.safetensors"),
        "--out", str(tmp_path / "other"),
    )  # fmt: skip
    assert code == 2 and "this store was made for data" in output
    assert not (tmp_path / "other").exists()
    # fitnet needs the teacher model, not its logits
    code, output = _distill(
        tmp_path, "--store", str(tmp_path / "full.safetensors"), "--method", "fitnet",
        "--out", str(tmp_path / "f"),
    )  # fmt: skip
    assert code == 2 and "needs the teacher model, not a store" in output


def test_label_refuses_an_untrained_teacher_and_an_existing_file(tmp_path, nets) -> None:
    result = runner.invoke(
        app, ["label", "--data", "digits", "--out", str(tmp_path / "s.safetensors")]
    )
    assert result.exit_code == 2 and "label runs a trained teacher" in result.output
    (tmp_path / "mine.safetensors").write_text("the user's")
    weights = tmp_path / "w.safetensors"
    save_file(build_model(f"{nets}:Wide", (1, 8, 8), 10).state_dict(), weights)
    result = runner.invoke(app, ["label", "--data", "digits", "--teacher", f"{nets}:Wide",
                                 "--teacher-weights", str(weights), "--out",
                                 str(tmp_path / "mine.safetensors")])  # fmt: skip
    assert result.exit_code == 2 and "exists" in result.output
    assert (tmp_path / "mine.safetensors").read_text() == "the user's"


def test_fit_many_trains_a_model_it_cannot_stack_alone_exactly_as_fit_does(nets) -> None:
    from softtargets.data.builtin import digits
    from softtargets.data.dataset import split
    from softtargets.training.fit import fit
    from softtargets.training.fit_many import Member, fit_many

    parts = split(digits(), seed=0)
    rows = torch.arange(0, len(parts.train), 2)
    member = Member(seed=3, rows=rows, lr=0.01)
    built = [build_model(f"{nets}:Wide", (1, 8, 8), 10, seed=1, width=16) for _ in range(2)]
    [together] = fit_many([built[0]], parts.train, [member], val=parts.val, epochs=2)
    alone = fit(built[1], parts.train.take(rows), seed=3, lr=0.01, val=parts.val, epochs=2)
    for a, b in zip(together.model.parameters(), alone.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_study_tests_its_claim_on_your_teacher_and_student(tmp_path, nets) -> None:
    trained = tmp_path / "trained"
    code, output = _distill(tmp_path, "--teacher", f"{nets}:Wide", "--out", str(trained))
    assert code == 0, output
    out = tmp_path / "runs" / "study-similarity"
    result = runner.invoke(app, [
        "study", "similarity", "--quick", "--data", "digits", "--teacher", f"{nets}:Wide",
        "--teacher-weights", str(trained / "teacher.safetensors"), "--student", f"{nets}:tiny",
        "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    facts = json.loads((out / "results.json").read_text())
    assert facts["config"]["student"]["name"] == f"{nets}:tiny"
    assert facts["config"]["teacher"]["weights"].endswith("teacher.safetensors")
    assert "pretrained" in result.output  # the user's teacher, not the preset's
    # a study that cannot test its claim on a user's model says why, before any work
    for args, expected in (
        (["width", "--student", f"{nets}:tiny"], "cannot take your student"),
        (["label-noise", "--teacher", f"{nets}:Wide"], "cannot take your teacher"),
        (["lighter-student", "--store", str(tmp_path / "s.safetensors")], "needs --teacher"),
    ):
        result = runner.invoke(app, ["study", *args, "--quick", "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not (tmp_path / "x").exists()
