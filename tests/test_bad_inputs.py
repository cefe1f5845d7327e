"""Bad input, as a careless or hostile user gives it: each is one clear error, never a traceback.

Two tables. ``API_CASES``: a call and the message its :class:`SoftTargetsError` must match (one
line). ``CLI_CASES``: a command line and the message of its one ``error:`` line (exit status 2,
no traceback). Both run against small bad files written by :func:`workdir`.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.config import DistillConfig, load_yaml, parse_config
from softtargets.data.dataset import Dataset, split
from softtargets.data.files import load_file
from softtargets.data.targets import from_counts, mix, smooth, soften, validate
from softtargets.errors import SoftTargetsError
from softtargets.losses.reference import distillation_loss, kl_at_temperature, soft_cross_entropy
from softtargets.run.folder import RunFolder
from softtargets.store.label import label
from softtargets.store.store import FORMAT_VERSION, SoftTargetStore
from softtargets.training.fit import fit
from softtargets.training.fit_many import Member, fit_many
from softtargets.training.metrics import evaluate
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation

runner = CliRunner()
MARKER = "pwned-marker"


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


class Evil:
    """Pickles to a call of os.system: what a crafted 'CIFAR batch' can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def store_file(path: Path, logits: torch.Tensor, **meta: str) -> Path:
    header = {
        "format": "softtargets.store",
        "version": str(FORMAT_VERSION),
        "teacher_fingerprint": "t" * 16,
        "data_fingerprint": "d" * 16,
        "class_names": json.dumps([str(i) for i in range(logits.shape[1])]),
        "info": "{}",
        **meta,
    }
    header = {k: v for k, v in header.items() if v != "DROP"}
    save_file({"logits": logits, "ids": torch.arange(len(logits))}, str(path), metadata=header)
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding one small bad file of each kind; the tests run inside it."""
    w = tmp_path / "work"
    w.mkdir()
    (w / "bad-id.csv").write_text("a,b,id,label\n1,2,x7,0\n3,4,8,1\n")
    (w / "binary.csv").write_bytes(b"a,label\n\xff\xfe\x00\x81,\x9c\n")
    (w / "empty-label.csv").write_text("a,label\n1,cat\n2,\n3,dog\n")
    (w / "dup-header.csv").write_text("a,a,label\n1,2,0\n3,4,1\n")
    (w / "ragged.csv").write_text("a,b,label\n1,2,0\n3,1\n")
    (w / "words.csv").write_text("a,label\nhigh,0\n1,1\n")
    (w / "good.csv").write_text(
        "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))
    )
    (w / "counts.csv").write_text("x,yes,no\n1,3,4\n2,5,1\n3,2,2\n")
    (w / "other-class.csv").write_text("a,b,label\n1,2,0\n3,4,7\n")
    from PIL import Image

    for name in ("cats", "dogs"):
        (w / "images" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(w / "images" / name / "0.png")
    (w / "images" / "dogs" / "broken.png").write_bytes(b"not a png at all")
    (w / "empty-class" / "cats").mkdir(parents=True)
    (w / "empty-class" / "dogs").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(w / "empty-class" / "cats" / "0.png")
    (w / "cut-images-idx3-ubyte").write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    (w / "cut-labels-idx1-ubyte").write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 2, 1, 0]))
    write_idx(w / "short-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    (w / "short-images-idx3-ubyte").write_bytes((w / "short-images-idx3-ubyte").read_bytes()[:-2])
    write_idx(w / "short-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with open(w / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": Evil(w / MARKER), b"labels": [0]}, handle)
    with open(w / "model.pkl", "wb") as handle:
        pickle.dump({"x": 1}, handle)
    np.savez(w / "objects.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    np.savez(w / "no-y.npz", x=np.zeros((3, 2)))
    np.save(w / "flat.npy", np.zeros(5))
    np.save(w / "table.npy", np.zeros((4, 3)))
    (w / "folder.yaml").mkdir()
    (w / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81")
    (w / "inf.yaml").write_text("temperature: .inf\n")
    with RunFolder.open(w / "oldrun") as folder:
        folder.write_text("results.jsonl", '{"accuracy": 0.9}\n')  # a line from elsewhere
    (w / "fakeruns" / "study-x").mkdir(parents=True)
    (w / "fakeruns" / "study-x" / "results.json").write_text('{"study": "x"}')
    (w / "userdir").mkdir()
    (w / "userdir" / "report.md").write_text("my own notes\n")
    monkeypatch.chdir(w)
    return w


def tiny(k: int = 3, n: int = 30) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset.from_arrays(torch.randn(n, 4, generator=g), torch.arange(n) % k)


def mlp(outputs: int = 3) -> torch.nn.Module:
    return build_model("mlp", (4,), outputs, seed=0, hidden=[5])


Z, P = torch.zeros(2, 3), torch.full((2, 3), 1 / 3)
NAN_LOGITS = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0]])


def _store_case(w: Path, **kind: object) -> None:
    logits = kind.get("logits", torch.zeros(4, 3))
    SoftTargetStore.load(store_file(w / "s.safetensors", logits, **kind.get("meta", {})))


def _relabelled_store(w: Path) -> None:
    data = tiny(3, 30)
    path = label(mlp(), data).save(w / "s.safetensors")
    relabelled = Dataset.from_arrays(data.features, (data.labels + 1) % 3, ids=data.ids)
    SoftTargetStore.load(path, data=relabelled)


def _nan_teacher(w: Path) -> None:
    teacher = mlp()
    with torch.no_grad():
        teacher[-1].bias.fill_(float("nan"))
    label(teacher, tiny())


def _foreign_results(w: Path) -> None:
    with RunFolder.open(w / "run") as folder:
        folder.append("results.jsonl", {"key": "k", "role": "student", "method": "hard", "seed": 0})
        with open(w / "run" / "results.jsonl", "a") as handle:
            handle.write('{"accuracy": 0.9}\n')
        folder.records("results.jsonl", required=("key", "role", "method", "seed"))


def _home(w: Path) -> None:
    os.environ["HOME"] = str(w / "userdir")
    with RunFolder.open(w / "userdir"):
        pass


API_CASES: list[tuple[str, Callable[[Path], object], str]] = [
    # soft targets and temperatures
    ("soften NaN logits", lambda w: soften(NAN_LOGITS, 2.0), "logits: row 1 holds NaN"),
    ("soften T=1e-45", lambda w: soften(Z, 1e-45), "temperature must be a number from"),
    ("soften T=inf", lambda w: soften(Z, float("inf")), "temperature must be"),
    ("soften T<0", lambda w: soften(Z, -1.0), "temperature must be"),
    ("soften T text", lambda w: soften(Z, "hot"), "temperature must be"),  # type: ignore[arg-type]
    ("validate negative", lambda w: validate([[1.5, -0.5]]), "row 0, class 1 is negative"),
    ("validate sum 2", lambda w: validate([[1.0, 1.0]]), "row 0 sums to 2"),
    ("validate NaN", lambda w: validate([[float("nan"), 1.0]]), "row 0 holds NaN"),
    ("validate columns", lambda w: validate(P, 4), "3 columns but the data has 4 classes"),
    ("validate empty", lambda w: validate(torch.zeros(0, 3)), "is empty"),
    ("counts negative", lambda w: from_counts([[3, -1]]), "row 0, class 1 is negative"),
    ("counts zero row", lambda w: from_counts([[0, 0]]), "row 0 has no observations"),
    ("smooth eps 2", lambda w: smooth(torch.tensor([0, 1]), 2, 2.0), "eps must be in"),
    ("mix weight", lambda w: mix(P, P, -1.0), "mix weight must be in"),
    # losses
    ("CE negative target", lambda w: soft_cross_entropy(Z, -P), "class 0 is negative"),
    ("CE rows sum 2", lambda w: soft_cross_entropy(Z, 2 * P), "row 0 sums to 2"),
    (
        "CE negative weight",
        lambda w: soft_cross_entropy(Z, P, torch.tensor([1.0, -1.0])),
        "row weights: row 1 is negative",
    ),
    (
        "CE NaN weight",
        lambda w: soft_cross_entropy(Z, P, torch.tensor([float("nan"), 1.0])),
        "row weights: row 0 holds NaN",
    ),
    ("CE shapes", lambda w: soft_cross_entropy(Z, torch.ones(2, 4) / 4), "one logit per target"),
    (
        "KD NaN teacher",
        lambda w: distillation_loss(Z, NAN_LOGITS, torch.tensor([0, 1]), 4.0, 0.5),
        "teacher logits: row 1 holds NaN",
    ),
    (
        "KD label out of range",
        lambda w: distillation_loss(Z, Z, torch.tensor([0, 7]), 4.0, 0.5),
        "row 1 has class 7, outside 0..2",
    ),
    (
        "KD float labels",
        lambda w: distillation_loss(Z, Z, torch.tensor([0.0, 1.0]), 4.0, 0.5),
        "labels must be integers",
    ),
    ("KD alpha 2", lambda w: distillation_loss(Z, Z, None, 4.0, 2.0), "alpha must be in"),
    ("KD no labels", lambda w: distillation_loss(Z, Z, None, 4.0, 0.5), "needs labels"),
    ("KL shapes", lambda w: kl_at_temperature(Z, torch.zeros(2, 4), 2.0), "same classes"),
    # datasets and splits
    (
        "sparse labels",
        lambda w: Dataset.from_arrays(np.zeros((4, 2)), [0, 1, 0, 1000000]),
        "classes are missing",
    ),
    (
        "NaN feature",
        lambda w: Dataset.from_arrays(np.array([[0.0], [np.nan]]), [0, 1]),
        "row 1 holds NaN",
    ),
    (
        "duplicate ids",
        lambda w: Dataset.from_arrays(np.zeros((2, 2)), [0, 1], ids=[4, 4]),
        "unique",
    ),
    ("fractional labels", lambda w: Dataset.from_arrays(np.zeros((2, 2)), [0.5, 1.0]), "integer"),
    ("label count", lambda w: Dataset.from_arrays(np.zeros((3, 2)), [0, 1]), "one label per row"),
    (
        "negative weights",
        lambda w: Dataset.from_arrays(np.zeros((2, 2)), [0, 1], weights=[1.0, -2.0]),
        "non-negative",
    ),
    ("split empty", lambda w: split(tiny().take([])), "no rows"),
    ("split fractions", lambda w: split(tiny(), 0.6, 0.5), "sum to less than 1"),
    ("subset classes", lambda w: tiny().subset(classes=[5]), "classes \\[5\\] do not exist"),
    ("noise rate", lambda w: tiny().with_label_noise(2.0), "rate must be in"),
    # training and evaluation
    ("fit empty", lambda w: fit(mlp(), tiny().take([]), epochs=1), "training data has no rows"),
    ("fit 1 row val", lambda w: fit(mlp(), tiny().take([0]), val=0.1, epochs=1), "leaves no rows"),
    ("fit 5 outputs", lambda w: fit(mlp(5), tiny(), epochs=1), "outputs shape \\(30, 5\\)"),
    ("evaluate 5 outputs", lambda w: evaluate(mlp(5), tiny()), "data has 3 classes"),
    (
        "fit NaN teacher logits",
        lambda w: fit(
            mlp(),
            Dataset.from_arrays(torch.zeros(2, 4), [0, 1], class_names=["a", "b", "c"]),
            Distillation(NAN_LOGITS),
            epochs=1,
        ),
        "teacher logits: row 1 holds NaN",
    ),
    (
        "fit teacher shape",
        lambda w: fit(mlp(), tiny(), Distillation(torch.zeros(30, 4)), epochs=1),
        "one column per class",
    ),
    ("fit epochs 0", lambda w: fit(mlp(), tiny(), epochs=0), "epochs and batch_size must be"),
    ("fit lr < 0", lambda w: fit(mlp(), tiny(), lr=-1.0, epochs=1), "learning rate must be > 0"),
    ("fit optimizer", lambda w: fit(mlp(), tiny(), optimizer="adagrad", epochs=1), "adagrad"),  # type: ignore[arg-type]
    ("fit device tpu", lambda w: fit(mlp(), tiny(), device="tpu", epochs=1), "unknown device"),
    ("fit device cuda", lambda w: fit(mlp(), tiny(), device="cuda", epochs=1), "not available"),
    ("fit_many outputs", lambda w: fit_many([mlp(5)], tiny(), epochs=1), "to 5 classes"),
    (
        "fit_many member labels",
        lambda w: fit_many([mlp()], tiny(), [Member(seed=0, labels=torch.arange(30))], epochs=1),
        "row 3 has class 3, outside 0..2",
    ),
    # the teacher store
    ("store NaN logits", lambda w: _store_case(w, logits=NAN_LOGITS), "logits: row 1 holds NaN"),
    (
        "store int32 logits",
        lambda w: _store_case(w, logits=torch.zeros(4, 3, dtype=torch.int32)),
        "logits are torch.int32",
    ),
    (
        "store no fingerprint",
        lambda w: _store_case(w, meta={"teacher_fingerprint": "DROP"}),
        "header lacks 'teacher_fingerprint'",
    ),
    ("store class names", lambda w: _store_case(w, meta={"class_names": "{oops"}), "corrupt"),
    (
        "store format 1",  # its data fingerprint hashed rows in one piece, not in blocks
        lambda w: _store_case(w, meta={"version": "1"}),
        "store format version 1, this softtargets reads version 2; label the data again",
    ),
    ("store other labels", _relabelled_store, "same features but other labels"),
    ("label wrong classes", lambda w: label(mlp(5), tiny()), "5,\\) logits per row"),
    ("label NaN teacher", _nan_teacher, "teacher logits: row 0 holds NaN"),
    (
        "store not safetensors",
        lambda w: SoftTargetStore.load(w / "good.csv"),
        "not a readable store",
    ),
    # the user's files
    ("CSV text id", lambda w: load_file(w / "bad-id.csv"), "line 2, column 'id' is not an integer"),
    ("CSV binary", lambda w: load_file(w / "binary.csv"), "not a readable text CSV"),
    ("CSV empty label", lambda w: load_file(w / "empty-label.csv"), "line 3 has an empty 'label'"),
    ("CSV duplicate header", lambda w: load_file(w / "dup-header.csv"), "column 'a' more than"),
    ("CSV label column", lambda w: load_file(w / "good.csv", "species"), "no column named"),
    ("CSV ragged", lambda w: load_file(w / "ragged.csv"), "line 3 has 2 fields"),
    ("CSV words", lambda w: load_file(w / "words.csv"), "'a' is not a number"),
    ("image unreadable", lambda w: load_file(w / "images"), "broken.png: not a readable image"),
    ("image empty class", lambda w: load_file(w / "empty-class"), "'dogs' holds no images"),
    ("IDX cut header", lambda w: load_file(w / "cut-images-idx3-ubyte"), "header is cut short"),
    ("IDX cut data", lambda w: load_file(w / "short-images-idx3-ubyte"), "truncated"),
    ("CIFAR evil pickle", lambda w: load_file(w / "data_batch_1"), "posix.system|os.system"),
    ("pickle file", lambda w: load_file(w / "model.pkl"), "pickle files are not read"),
    ("npz objects", lambda w: load_file(w / "objects.npz"), "not a readable .npz"),
    ("npz no y", lambda w: load_file(w / "no-y.npz"), "expected arrays 'x' and 'y'"),
    ("npy 1-D", lambda w: load_file(w / "flat.npy"), "expected a 2-D array"),
    ("npy column", lambda w: load_file(w / "table.npy", 9), "label column 9 does not exist"),
    ("npy named column", lambda w: load_file(w / "table.npy", "y"), "is a column number"),
    # configs
    ("config key", lambda w: parse_config(DistillConfig, {"tempreature": 4}), "'tempreature'"),
    ("config inf", lambda w: parse_config(DistillConfig, load_yaml("inf.yaml")), "temperature"),
    ("config folder", lambda w: load_yaml(w / "folder.yaml"), "is a folder, not a config"),
    ("config binary", lambda w: load_yaml(w / "binary.yaml"), "not a text file"),
    # run folders
    ("out = cwd", lambda w: RunFolder.open(w).__enter__(), "current folder or a parent"),
    ("out = parent", lambda w: RunFolder.open(w.parent).__enter__(), "current folder or a parent"),
    ("out = home", _home, "home folder"),
    ("out foreign", lambda w: RunFolder.open(w / "userdir").__enter__(), "did not make"),
    ("out is a file", lambda w: RunFolder.open(w / "good.csv").__enter__(), "is a file"),
    ("foreign record", _foreign_results, "record 2 has no 'key'"),
]


@pytest.mark.parametrize(
    ("call", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_api_refuses_bad_input_with_one_line(workdir: Path, monkeypatch, call, message) -> None:
    monkeypatch.setenv("HOME", os.environ.get("HOME", "/root"))  # _home changes it
    with pytest.raises(SoftTargetsError, match=message) as caught:
        call(workdir)
    assert "\n" not in str(caught.value)
    assert not (workdir / MARKER).exists()  # no code from a data file ran


SMALL = ["--teacher-epochs", "1", "--epochs", "1", "--seeds", "1"]
CLI_CASES: list[tuple[str, list[str], str]] = [
    ("demo seeds 0", ["demo", "--quick", "--seeds", "0"], "seeds: Input should be greater"),
    ("demo seeds -1", ["demo", "--quick", "--seeds", "-1"], "seeds: Input should be greater"),
    ("demo device tpu", ["demo", "--quick", "--device", "tpu"], "the device must be auto"),
    ("demo device cuda", ["demo", "--quick", "--device", "cuda"], "'cuda' is not available"),
    ("demo out cwd", ["demo", "--quick", "--out", "."], "current folder"),
    ("demo out user folder", ["demo", "--quick", "--out", "userdir"], "did not make"),
    ("distill text id", ["distill", "--data", "bad-id.csv", *SMALL], "column 'id' is not an"),
    ("distill binary csv", ["distill", "--data", "binary.csv", *SMALL], "not a readable text"),
    ("distill bad image", ["distill", "--data", "images", *SMALL], "not a readable image"),
    ("distill cut IDX", ["distill", "--data", "cut-images-idx3-ubyte", *SMALL], "cut short"),
    ("distill evil CIFAR", ["distill", "--data", "data_batch_1", *SMALL], "not a readable CIFAR"),
    ("distill config folder", ["distill", "--config", "folder.yaml"], "is a folder"),
    ("distill T inf", ["distill", "--data", "good.csv", "-T", "inf"], "temperature"),
    ("distill config T inf", ["distill", "--config", "inf.yaml"], "temperature"),
    (
        "distill student option typo",
        ["distill", "--data", "good.csv", "--student-option", "hiden=[4]", *SMALL],
        "unknown option 'hiden' for model 'mlp'",
    ),
    ("distill lr", ["distill", "--data", "good.csv", "--lr", "-1"], "lr: Input should be greater"),
    (
        "distill optimizer",
        ["distill", "--data", "good.csv", "--teacher-optimizer", "adagrad"],
        "teacher_training.optimizer",
    ),
    ("distill val fraction", ["distill", "--val-fraction", "1.5"], "val_fraction"),
    (
        "distill test classes",
        ["distill", "--data", "good.csv", "--test-data", "other-class.csv", *SMALL],
        "class '7', which the training data does not have",
    ),
    (
        "distill overwrite cwd",
        ["distill", "--data", "good.csv", "--out", ".", "--overwrite"],
        "current",
    ),
    (
        "distill foreign record",
        ["distill", "--data", "good.csv", "--out", "oldrun", *SMALL],
        "record 1 has no 'key'",
    ),
    ("teacher lr", ["teacher", "--data", "good.csv", "--lr", "0"], "lr: Input should be greater"),
    ("study name", ["study", "nothing"], "unknown study 'nothing'"),
    ("study seeds", ["study", "similarity", "--seeds", "0"], "seeds: Input should be greater"),
    ("report nothing", ["report", "--runs", "userdir"], "no studies found"),
    ("report foreign study", ["report", "--runs", "fakeruns"], "has no 'title'"),
    (
        "fit-proportions out",
        [
            "fit-proportions",
            "counts.csv",
            "--features",
            "x",
            "--counts",
            "yes,no",
            "--out",
            "userdir",
        ],
        "did not make",
    ),
    ("predict no model", ["predict", "userdir", "good.csv"], "holds no model"),
    ("predict over a file", ["predict", "userdir", "good.csv", "--out", "good.csv"], "exists"),
]


@pytest.mark.parametrize(
    ("args", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_refuses_bad_input_with_one_error_line(workdir: Path, args, message) -> None:
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert __import__("re").search(message, errors[0]), errors[0]
    # refused before anything was written: no run folder, no trained teacher
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
    assert not (workdir / MARKER).exists()


def test_the_tables_hold_at_least_sixty_cases() -> None:
    assert len(API_CASES) + len(CLI_CASES) >= 60


def test_a_gzipped_idx_cut_in_its_header_is_refused(tmp_path) -> None:
    (tmp_path / "z-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3, 0])))
    (tmp_path / "z-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 0]))
    )
    with pytest.raises(SoftTargetsError, match="cut short"):
        load_file(tmp_path / "z-images-idx3-ubyte.gz")
