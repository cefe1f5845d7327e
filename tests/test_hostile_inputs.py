"""Inputs built to hang or exhaust the machine: special files named as data, YAML aliases that
expand to gigabytes, JSON nested past Python's recursion limit in softtargets' own files. Each
must be one line (a SoftTargetsError), at once, within a small memory budget."""

from __future__ import annotations

import json
import os
import resource
import threading

import numpy as np
import pytest
import torch

from softtargets.config import DistillConfig, load_config
from softtargets.data.files import load_file
from softtargets.errors import SoftTargetsError
from softtargets.files import append_jsonl, parse_json, parse_yaml, read_jsonl
from softtargets.run.folder import MANIFEST, RunFolder

LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one_line(call, match: str) -> str:
    with pytest.raises(SoftTargetsError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_fifo_named_as_data_is_refused_at_once(tmp_path) -> None:
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(
        target=lambda: done.append(_one_line(lambda: load_file(fifo), "not a regular file")),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=20)  # a reader that opened the FIFO would block here for ever
    assert done, "load_file blocked on a FIFO"


def test_dev_zero_linked_as_data_is_refused(tmp_path) -> None:
    for name in ("zero.csv", "train-images-idx3-ubyte", "zero.npy"):
        (tmp_path / name).symlink_to("/dev/zero")
        _one_line(lambda name=name: load_file(tmp_path / name), "not a regular file")


def test_a_fifo_in_an_image_folder_is_refused(tmp_path) -> None:
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / "0.png")
    os.mkfifo(tmp_path / "a" / "1.png")
    _one_line(lambda: load_file(tmp_path), "not a regular file")


def test_yaml_aliases_are_refused_before_they_expand(tmp_path) -> None:
    config = tmp_path / "laughs.yaml"
    config.write_text(
        f"teacher:\n  name: mlp\n  options:\n    x: {{{LAUGHS.replace(chr(10), ', ')}}}\n"
    )
    assert len(config.read_bytes()) < 1000  # 9^9 strings, some 3 GB, if expanded
    before = _peak_mb()
    _one_line(lambda: load_config(DistillConfig, config), r"aliases \(\*name\) are not")
    _one_line(lambda: parse_yaml(LAUGHS, "an option"), r"aliases \(\*name\) are not")
    assert _peak_mb() - before < 200


@pytest.mark.parametrize("depth", [70, 100_000])
def test_deeply_nested_json_in_our_files_is_one_line(tmp_path, depth) -> None:
    nested = "[" * depth + "]" * depth
    _one_line(lambda: parse_json(nested, "x.json"), "nested deeper than 64")
    # a run folder's manifest and a records file, tampered with
    run = tmp_path / "run"
    with RunFolder.open(run) as folder:
        folder.append("results.jsonl", {"ok": 1})
    (run / "results.jsonl").write_text(json.dumps({"ok": 1}) + "\n" + '{"a": ' + nested + "}\n")
    _one_line(lambda: read_jsonl(run / "results.jsonl"), "line 2")
    (run / MANIFEST).write_text('{"format": "softtargets.run", "files": ' + nested + "}")
    with pytest.raises(SoftTargetsError, match="corrupt") as caught:
        with RunFolder.open(run):
            pass
    assert "\n" not in str(caught.value)


def test_a_config_that_is_a_device_or_too_large_is_refused(tmp_path) -> None:
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    _one_line(lambda: load_config(DistillConfig, tmp_path / "zero.yaml"), "not a regular file")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as handle:
        handle.truncate(65 << 20)  # sparse: no disk used
    _one_line(lambda: load_config(DistillConfig, big), "larger than")


def test_records_still_append_and_read_after_the_budget_checks(tmp_path) -> None:
    path = tmp_path / "history.jsonl"
    for epoch in range(3):
        append_jsonl(path, {"epoch": epoch, "nested": {"a": [1, {"b": 2}]}})
    assert [r["epoch"] for r in read_jsonl(path)] == [0, 1, 2]


# ----------------------------------------------------------------------- declared sizes
@pytest.fixture
def budget(monkeypatch) -> int:
    monkeypatch.setenv("SOFTTARGETS_MEMORY_BUDGET_MB", "64")
    return 64


def _npy_bytes(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue() + payload


def test_an_npy_or_npz_header_that_lies_about_its_size_is_refused(tmp_path, budget) -> None:
    import zipfile

    lying = tmp_path / "lying.npy"
    lying.write_bytes(_npy_bytes((10**12, 3), b"\0" * 48))
    _one_line(lambda: load_file(lying), "declares shape")
    archive = tmp_path / "lying.npz"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("x.npy", _npy_bytes((10**12, 3), b"\0" * 48))
        handle.writestr("y.npy", _npy_bytes((2,), b"\0" * 16))
    _one_line(lambda: load_file(archive), "declares shape")
    # honest, but over the budget: 300 MB of zeros compress to a few hundred KB
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        with handle.open("x.npy", "w", force_zip64=True) as member:
            member.write(_npy_bytes((300 << 17, 1)))
            zeros = b"\0" * (1 << 20)
            for _ in range(300):
                member.write(zeros)
    assert bomb.stat().st_size < 2 << 20
    before = _peak_mb()
    _one_line(lambda: load_file(bomb), "memory budget")
    assert _peak_mb() - before < 150


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (bytes([0, 0, 0x08, 255]) + b"\0" * 16, "an IDX file of 255 dimensions"),
        # 2^93 bytes declared: the product wraps to 0 in int64
        (bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 3, "over the memory budget"),
        (bytes([0, 0, 0x08, 3]) + (2**16).to_bytes(4, "big") * 2 + b"\0\0\0\4", "over the memory"),
        (bytes([0, 0, 0x08, 3]) + (10).to_bytes(4, "big") * 3 + b"\0" * 5, "holds 5 values"),
    ],
)
def test_idx_dimensions_are_checked_before_reading(tmp_path, budget, header, says) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(header)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 0x08, 1]) + b"\0\0\0\1" + b"\0")
    _one_line(lambda: load_file(path), says)


def test_a_gzipped_idx_bomb_is_refused_before_it_is_decompressed(tmp_path, budget) -> None:
    import gzip

    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:  # 400 MB of zeros declared honestly
        handle.write(
            bytes([0, 0, 0x08, 3]) + (100_000).to_bytes(4, "big") + (64).to_bytes(4, "big") * 2
        )
        zeros = b"\0" * (1 << 20)
        for _ in range(400):
            handle.write(zeros)
    assert path.stat().st_size < 1 << 20
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 0x08, 1]) + (100_000).to_bytes(4, "big") + b"\0" * 100_000)
    before = _peak_mb()
    _one_line(lambda: load_file(path), "memory budget")
    assert _peak_mb() - before < 150


def test_an_image_of_too_many_pixels_is_refused_before_decoding(tmp_path) -> None:
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / "0.png")
    Image.new("1", (11_000, 11_000)).save(tmp_path / "a" / "huge.png")  # 121M pixels
    assert (tmp_path / "a" / "huge.png").stat().st_size < 1 << 20
    before = _peak_mb()
    _one_line(lambda: load_file(tmp_path), "over 16,000,000")
    assert _peak_mb() - before < 200


def test_a_cifar_pickle_of_shared_nested_lists_is_refused_small(tmp_path) -> None:
    import pickle

    labels: list = [0] * 10
    for _ in range(9):  # 10^10 entries once expanded, a few hundred bytes pickled
        labels = [labels] * 10
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": labels}))
    assert path.stat().st_size < 40_000
    before = _peak_mb()
    _one_line(lambda: load_file(path), "flat list")
    assert _peak_mb() - before < 150


def test_a_csv_with_100000_columns_is_read_in_linear_time(tmp_path) -> None:
    import time

    path = tmp_path / "wide.csv"
    header = [f"f{i}" for i in range(100_000)] + ["label"]
    rows = [",".join(header)] + [",".join(["0"] * 100_000 + [str(i % 2)]) for i in range(4)]
    path.write_text("\n".join(rows) + "\n")
    start = time.perf_counter()
    data = load_file(path)
    assert data.num_features == 100_000
    assert time.perf_counter() - start < 60  # the quadratic header check took minutes


# ----------------------------------------------------------------------- sizes and options
@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"hidden": [8.7]}, "whole numbers >= 1"),
        ({"hidden": [True]}, "whole numbers >= 1"),
        ({"hidden": [0]}, "whole numbers >= 1"),
        ({"hidden": [-4]}, "whole numbers >= 1"),
        ({"hidden": [[8]]}, "whole numbers >= 1"),
        ({"hidden": 8}, "a list of whole numbers"),
        ({"dropout": 2}, r"a fraction in \[0, 1\)"),
        ({"dropout": "abc"}, "a finite number"),
        ({"dropout": float("nan")}, "a finite number"),
    ],
)
def test_model_options_are_checked_by_type_and_range(options, says) -> None:
    from softtargets.training.models import build_model

    _one_line(lambda: build_model("mlp", (6,), 3, seed=0, **options), says)


def test_sizes_are_checked_against_the_budget_before_allocating(budget) -> None:
    from softtargets.data.builtin import load_builtin
    from softtargets.training.models import build_model

    before = _peak_mb()
    _one_line(lambda: build_model("mlp", (40,), 10, hidden=[100_000_000]), "memory budget")
    for name, options in [
        ("gaussians", {"num_samples": 10**9}),
        ("gaussians", {"num_classes": 10**6}),
        ("mnist1d", {"num_samples": 10**9}),
    ]:
        _one_line(lambda name=name, options=options: load_builtin(name, **options), "memory budget")
    assert _peak_mb() - before < 150


def test_seeds_and_processes_have_a_ceiling(tmp_path) -> None:
    from typer.testing import CliRunner

    from softtargets.cli.app import app

    with pytest.raises(SoftTargetsError, match="seeds"):
        from softtargets.config import parse_config

        parse_config(DistillConfig, {"seeds": 1_000_000_000})
    result = CliRunner().invoke(
        app, ["demo", "--quick", "--nproc", "1000", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "more processes than this machine has" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("method", "options", "says"),
    [
        ("dkd", {"beta": "abc"}, "finite number"),
        ("dkd", {"beta": float("nan")}, "finite number"),
        ("kd", {"standardize": "yes"}, "true or false"),
        ("kd", {"warmup": 1_000_000_000}, "longer than the 2 epochs"),
    ],
)
def test_method_options_are_checked_before_training(method, options, says) -> None:
    from softtargets.data.builtin import gaussians
    from softtargets.training.fit import fit
    from softtargets.training.models import build_model
    from softtargets.training.objectives import Distillation

    data = gaussians(num_samples=60, num_classes=3, dim=4)
    teacher_logits = torch.randn(60, 3)
    student = build_model("mlp", (4,), 3, seed=0, hidden=[4])
    targets = Distillation(teacher_logits, method=method, options=options)
    _one_line(lambda: fit(student, data, targets, epochs=2), says)


# ----------------------------------------------------------------------- data that cannot train
def test_one_class_is_refused_not_reported_as_perfect() -> None:
    from softtargets.data.dataset import Dataset
    from softtargets.training.fit import fit
    from softtargets.training.models import build_model

    data = Dataset.from_arrays(np.random.default_rng(0).normal(size=(20, 3)), np.zeros(20, int))
    model = build_model("mlp", (3,), 1, seed=0, hidden=[4])
    _one_line(lambda: fit(model, data, epochs=1), "needs at least 2")


def test_a_loss_that_explodes_is_flagged_as_divergence() -> None:
    from softtargets.data.dataset import Dataset
    from softtargets.training.fit import fit
    from softtargets.training.models import build_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)) * 1e30  # finite, but every loss in the millions and up
    data = Dataset.from_arrays(x, rng.integers(0, 2, 64))
    result = fit(build_model("mlp", (3,), 2, seed=0, hidden=[4]), data, epochs=5, lr=1.0)
    assert result.diverged and len(result.history) < 5


def _tamper(path, change) -> None:  # noqa: ANN001
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    change(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", ["epoch", "optimizer tensor"])
def test_a_tampered_checkpoint_is_one_line(tmp_path, damage) -> None:
    from softtargets.data.builtin import gaussians
    from softtargets.training.fit import fit
    from softtargets.training.models import build_model

    data = gaussians(num_samples=80, num_classes=3, dim=4)
    path = tmp_path / "fit.ckpt"

    def run() -> None:
        fit(build_model("mlp", (4,), 3, seed=0, hidden=[4]), data, epochs=3, checkpoint=path)

    def stop_after_one(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(build_model("mlp", (4,), 3, seed=0, hidden=[4]), data, epochs=3, checkpoint=path,
            on_epoch_end=stop_after_one)  # fmt: skip
    if damage == "epoch":
        _tamper(path, lambda meta, tensors: meta.update(epoch="100000"))
        _one_line(run, "epoch 100000 of a 3-epoch fit")
    else:
        _tamper(
            path,
            lambda meta, tensors: tensors.pop(
                next(k for k in tensors if k.startswith("optimizer."))
            ),
        )
        _one_line(run, "damaged checkpoint")


def test_labels_that_are_fractions_are_one_rule_for_every_loader(tmp_path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,label\n1,0.5\n2,1.5\n3,0.5\n")
    _one_line(lambda: load_file(path), "not whole")


def test_probabilities_must_be_real_numbers_and_a_temperature_a_number() -> None:
    from softtargets.data.targets import soften, validate

    _one_line(lambda: validate(torch.zeros(2, 3, dtype=torch.complex64), 3), "real numbers")
    _one_line(lambda: validate([["a", "b"]], 2), "must be numbers")
    _one_line(lambda: soften(torch.zeros(2, 3), True), "temperature must be a number")


def test_training_numbers_are_checked_before_training(tmp_path) -> None:
    from typer.testing import CliRunner

    from softtargets.cli.app import app
    from softtargets.data.builtin import gaussians
    from softtargets.training.fit import fit
    from softtargets.training.models import build_model

    data = gaussians(num_samples=60, num_classes=3, dim=4)
    student = build_model("mlp", (4,), 3, seed=0, hidden=[4])
    _one_line(lambda: fit(student, data, epochs=1, weight_decay=-1), "weight_decay")
    _one_line(lambda: fit(student, data, epochs=1, optimizer="sgd", momentum=1.5), "momentum")
    counts = tmp_path / "counts.csv"
    counts.write_text("a,yes,no\n1,3,4\n2,1,5\n3,4,2\n")
    for flags, says in ((["--alpha", "-1"], "--alpha"), (["--hidden", "0"], "--hidden")):
        args = ["fit-proportions", str(counts), "--features", "a", "--counts", "yes,no",
                "--out", str(tmp_path / "m"), *flags]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "m").exists()


def test_a_lock_that_is_a_folder_is_one_line(tmp_path) -> None:
    from softtargets.run.folder import LOCK, RunFolder

    (tmp_path / "run" / LOCK).mkdir(parents=True)
    with pytest.raises(SoftTargetsError, match="cannot open it") as caught:
        with RunFolder.open(tmp_path / "run"):
            pass
    assert "\n" not in str(caught.value)


def test_a_batch_larger_than_the_data_does_not_preallocate_it() -> None:
    from softtargets.data.builtin import gaussians
    from softtargets.training.fit_many import Member, fit_many
    from softtargets.training.models import build_model

    data = gaussians(num_samples=300, num_classes=3, dim=64)
    models = [build_model("mlp", (64,), 3, seed=i, hidden=[8]) for i in range(8)]
    before = _peak_mb()
    fit_many(models, data, [Member(seed=i) for i in range(8)], epochs=1, batch_size=10**7)
    assert _peak_mb() - before < 150  # 8 members x 10^7 rows x 64 floats would be 20 GB


def test_a_stratified_split_of_many_classes_is_one_sort_not_a_scan_per_class() -> None:
    import time

    from softtargets.data.dataset import Dataset, split

    labels = np.arange(200_000) % 50_000  # 50,000 classes of 4 rows
    data = Dataset.from_arrays(np.zeros((200_000, 1), np.float32), labels)
    start = time.perf_counter()
    parts = split(data, 0.25, 0.25, seed=0)
    assert len(parts.train) + len(parts.val) + len(parts.test) == 200_000
    assert time.perf_counter() - start < 60  # the scan per class took 50,000 passes over the rows


def test_deeply_nested_json_in_users_json_lines_is_one_line(tmp_path) -> None:
    """Users' JSON-lines data (text rows for classifiers, prompt / completion examples) goes
    through the same guard as softtargets' own files, naming the line."""
    from softtargets.data.text import read_text_rows

    nested = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "b"}) + "\n" + nested + "\n")
    _one_line(lambda: read_text_rows(path, "text", "label"), "rows.jsonl:2 is nested deeper than")
