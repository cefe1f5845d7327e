"""File loaders, each on small files written here."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from softtargets.data.files import load_data, load_file
from softtargets.errors import SoftTargetsError


def test_npz_with_optional_arrays(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x=x,
        y=[0, 1, 2, 0, 1, 2],
        ids=[10, 11, 12, 13, 14, 15],
        class_names=np.array(["a", "b", "c"]),
    )
    data = load_file(path)
    assert data.class_names == ("a", "b", "c") and data.ids.tolist()[:2] == [10, 11]
    torch.testing.assert_close(data.features, torch.from_numpy(x))


def test_npz_missing_arrays_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(SoftTargetsError, match="expected arrays 'x' and 'y'"):
        load_file(path)


def test_npy_label_column(tmp_path) -> None:
    table = np.array([[1, 1.0, 2], [0, 0.2, 0], [2, 0.3, 1]])
    np.save(tmp_path / "t.npy", table)
    data = load_file(tmp_path / "t.npy")
    assert data.labels.tolist() == [2, 0, 1] and data.feature_shape == (2,)
    first = load_file(tmp_path / "t.npy", label_column=0)
    assert first.feature_shape == (2,) and first.labels.tolist() == [1, 0, 2]
    with pytest.raises(SoftTargetsError, match="integer class indices"):
        load_file(tmp_path / "t.npy", label_column=1)


def test_csv_with_names_ids_and_errors(tmp_path) -> None:
    path = tmp_path / "flowers.csv"
    path.write_text("id,length,width,species\n7,1.0,2.0,rose\n8,3.0,4.0,iris\n9,5.0,6.0,rose\n")
    data = load_file(path, label_column="species")
    assert data.class_names == ("iris", "rose") and data.labels.tolist() == [1, 0, 1]
    assert data.ids.tolist() == [7, 8, 9] and data.feature_shape == (2,)
    with pytest.raises(SoftTargetsError, match="no column named 'label'; columns are id, length"):
        load_file(path)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1.0,0\nnope,1\n")
    with pytest.raises(SoftTargetsError, match="line 3, column 'a' is not a number"):
        load_file(bad)


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx(tmp_path, compress: bool) -> None:
    images = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([3, 1, 4]), compress)
    suffix = ".gz" if compress else ""
    data = load_data(str(tmp_path / f"train-images-idx3-ubyte{suffix}"))
    assert data.feature_shape == (1, 4, 5)
    # labels that are not 0..K-1 become class indices, keeping their values as class names
    assert data.class_names == ("1", "3", "4") and data.labels.tolist() == [1, 0, 2]
    assert float(data.features[0, 0, 0, 1]) == pytest.approx(1 / 255)


def test_truncated_idx_is_refused(tmp_path) -> None:
    write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((2, 2, 2)), False)
    write_idx(tmp_path / "x-labels-idx1-ubyte", np.zeros(2), False)
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SoftTargetsError, match="truncated"):
        load_file(path)


def test_cifar_batch(tmp_path) -> None:
    data = np.random.default_rng(0).integers(0, 256, size=(4, 3 * 32 * 32), dtype=np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": data, b"labels": [0, 9, 3, 3]}, handle)
    loaded = load_file(tmp_path / "data_batch_1")
    assert loaded.feature_shape == (3, 32, 32)
    assert [loaded.class_names[i] for i in loaded.labels] == ["0", "9", "3", "3"]
    # CIFAR stores each image as 1024 red, then green, then blue values
    assert float(loaded.features[1, 1, 0, 0]) == pytest.approx(data[1, 1024] / 255)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batch_in_any_pickle_protocol(tmp_path, protocol: int) -> None:
    data = np.arange(2 * 12, dtype=np.uint8).reshape(2, 12)  # two 2x2 RGB images
    batch = {b"batch_label": b"training batch 1 of 5", b"data": data, b"labels": [1, 0],
             b"filenames": [b"a.png", b"b.png"]}  # fmt: skip
    with open(tmp_path / "data_batch_2", "wb") as handle:
        pickle.dump(batch, handle, protocol=protocol)
    loaded = load_file(tmp_path / "data_batch_2")
    assert loaded.feature_shape == (3, 2, 2) and loaded.labels.tolist() == [1, 0]


def test_a_cifar_named_pickle_cannot_run_code(tmp_path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    for name, payload in (
        ("data_batch_1", {b"data": Evil(), b"labels": [0]}),
        ("test_batch", Evil()),
    ):
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(payload, handle)
        with pytest.raises(SoftTargetsError, match="not a readable CIFAR batch"):
            load_file(tmp_path / name)
    assert not marker.exists()
    # the standard unpickler would have run it: the file really is malicious
    with open(tmp_path / "test_batch", "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_image_folder(tmp_path) -> None:
    from PIL import Image

    for name, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (6, 5), colour).save(tmp_path / name / f"{i}.png")
    data = load_file(tmp_path)
    assert data.class_names == ("cats", "dogs") and data.feature_shape == (3, 5, 6)
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert float(data.features[0, 0].mean()) == 1.0 and float(data.features[3, 2].mean()) == 1.0


def test_unknown_paths_and_formats(tmp_path) -> None:
    with pytest.raises(SoftTargetsError, match="not a built-in"):
        load_data("nothing-here.csv")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(SoftTargetsError, match="cannot tell the format"):
        load_file(tmp_path / "x.parquet")
