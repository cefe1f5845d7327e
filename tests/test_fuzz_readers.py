"""Fuzzing the loaders and softtargets' own readers: whatever bytes a file holds, reading it either
works or raises SoftTargetsError (one line) — never another exception, a hang or a traceback
from deep inside numpy, PIL, pickle or safetensors."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softtargets.config import DistillConfig, load_config
from softtargets.data.files import load_file
from softtargets.errors import SoftTargetsError
from softtargets.files import read_jsonl
from softtargets.store.store import SoftTargetStore

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples every run: CI never meets a new one by chance
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _valid_seed(name: str) -> bytes:
    """A valid file of each kind, for mutations that keep most of its structure."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    if name == "data.npy":
        return _npy(np.column_stack([x, [0, 1, 0, 1]]))
    if name == "data.npz":
        buffer = io.BytesIO()
        np.savez(buffer, x=x, y=np.array([0, 1, 0, 1]))
        return buffer.getvalue()
    if name == "data.csv":
        return b"a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n"
    if name == "train-images-idx3-ubyte":
        return bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]) + bytes(8)
    return b""


def _mutate(seed: bytes, data: st.DataObject) -> bytes:
    choice = data.draw(st.sampled_from(["random", "flip", "cut", "extend"]))
    if choice == "random" or not seed:
        return data.draw(st.binary(max_size=400))
    raw = bytearray(seed)
    if choice == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        return bytes(raw)
    if choice == "cut":
        return bytes(raw[: data.draw(st.integers(0, len(raw)))])
    return bytes(raw) + data.draw(st.binary(max_size=200))


def _read(path: Path, read) -> None:  # noqa: ANN001 - a reader
    try:
        read(path)
    except SoftTargetsError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize(
    "name", ["data.npy", "data.npz", "data.csv", "train-images-idx3-ubyte", "data_batch_1"]
)
@FUZZ
@given(data=st.data())
def test_the_loaders_load_or_say_one_line(name, data) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(_mutate(_valid_seed(name), data))
        if name.startswith("train-images"):  # its labels file beside it
            labels = bytes([0, 0, 8, 1, 0, 0, 0, 2, 0, 1])
            (Path(folder) / "train-labels-idx1-ubyte").write_bytes(labels)
        os.environ["SOFTTARGETS_MEMORY_BUDGET_MB"] = "64"
        try:
            _read(path, load_file)
        finally:
            del os.environ["SOFTTARGETS_MEMORY_BUDGET_MB"]


@FUZZ
@given(text=st.text(max_size=300))
def test_configs_load_or_say_one_line(text) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text)
        _read(path, lambda p: load_config(DistillConfig, p))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_records_and_stores_load_or_say_one_line(raw) -> None:
    with tempfile.TemporaryDirectory() as folder:
        records = Path(folder) / "results.jsonl"
        records.write_bytes(raw)
        _read(records, read_jsonl)
        store = Path(folder) / "store.safetensors"
        store.write_bytes(raw)
        _read(store, SoftTargetStore.load)
