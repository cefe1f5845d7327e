"""Loaders for the user's own files, each returning a :class:`~softtargets.data.dataset.Dataset`.

| file | layout |
| --- | --- |
| ``.npz`` | arrays ``x`` (or ``features``) and ``y`` (or ``labels``); optional ``ids``, ``class_names``, ``soft_targets``, ``weights`` |
| ``.npy`` | one 2-D array; the label is column ``label_column`` (default: the last) |
| ``.csv`` | a header row; the label column (default ``label``) may hold names or integers; the other columns are numeric features; an ``id`` column, if present, gives the ids |
| MNIST IDX | ``*-images-idx3-ubyte[.gz]`` with its ``*-labels-idx1-ubyte[.gz]`` beside it |
| CIFAR batch | a pickled ``data_batch_*`` / ``test_batch`` dict with ``data`` and ``labels``, read by a restricted unpickler |
| image folder | ``root/<class name>/<image>``, one sub-folder per class (PNG, JPEG, ...) |

Every loader gives ids ``0..N-1`` in file order unless the file carries its own. Integer labels
that are not ``0..K-1`` (``1..10``, or a stray ``99999999``) become class indices in increasing
order, keeping the values as class names (:func:`softtargets.data.dataset.encode_labels`).

No data file is ever unpickled with the standard unpickler: a pickle can run any code. CIFAR's
python batches are read by :class:`CifarUnpickler`, which builds only containers, strings, numbers
and NumPy arrays; generic ``.pkl`` files are refused.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import pickle
import stat
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softtargets.config import check_budget
from softtargets.data.builtin import BUILTIN, load_builtin
from softtargets.data.dataset import Dataset, encode_labels
from softtargets.data.streams import ImageFolderRows
from softtargets.errors import SoftTargetsError


def load_file(
    path: str | Path, label_column: str | int | None = None, labelled: bool = True
) -> Dataset:
    """Load a dataset from ``path``, choosing the loader by file name (see the module docstring).

    ``labelled=False`` (rows to predict): a CSV without the label column, or an ``.npz`` without
    labels, is read as features only, every label 0 of one class named ``"?"``.
    """
    path = Path(path)
    try:
        info = os.stat(path)  # follows a link: what is read is what it points to
    except FileNotFoundError:
        raise SoftTargetsError(f"no such file or folder: {path}") from None
    except OSError as err:
        raise SoftTargetsError(f"{path}: cannot read it ({err.strerror})") from None
    name = path.name.lower()
    if stat.S_ISDIR(info.st_mode):
        return load_image_folder(path)
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block for ever, /dev/zero never end
        raise SoftTargetsError(
            f"{path} is not a regular file (a device, FIFO or socket); give a data file"
        )
    if name.endswith(".npz"):
        return load_npz(path, labelled)
    if name.endswith(".npy"):
        if label_column is not None and not _is_int(str(label_column)):
            raise SoftTargetsError(
                f"{path}: the label column of an .npy file is a column number, got {label_column!r}"
            )
        return load_npy(path, -1 if label_column is None else int(label_column))
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        return load_csv(path, "label" if label_column is None else str(label_column), labelled)
    if "idx3-ubyte" in name or "idx1-ubyte" in name:
        return load_idx(path)
    if name.startswith(("data_batch", "test_batch")):
        return load_cifar_batch(path)
    if name.endswith((".pkl", ".pickle")):
        raise SoftTargetsError(
            f"{path.name}: pickle files are not read, since loading one can run any code; save the "
            "arrays as .npz (np.savez(path, x=features, y=labels))"
        )
    raise SoftTargetsError(
        f"cannot tell the format of {path.name}; use .npz, .npy, .csv, an MNIST IDX file "
        "(*-images-idx3-ubyte[.gz]), a CIFAR batch (data_batch_N) or an image folder"
    )


def _declared_npy(handle: Any, where: str, data_bytes: int, kind: str = ".npy file") -> int:
    """The bytes an ``.npy`` stream's header declares (shape x item size), checked against the
    ``data_bytes`` that follow its header and against the memory budget before any is read."""
    try:
        major, _ = np.lib.format.read_magic(handle)
        read = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(handle)
    except Exception as err:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
        raise SoftTargetsError(f"{where}: not a readable {kind} ({type(err).__name__})") from None
    if dtype.hasobject:
        raise SoftTargetsError(
            f"{where}: not a readable {kind} (an object array needs pickle, which is never read)"
        )
    declared = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    follows = data_bytes - handle.tell()
    if declared != follows:
        raise SoftTargetsError(
            f"{where}: its header declares shape {shape} ({declared:,} bytes) but {follows:,} "
            "bytes follow; the file is damaged or not what it says"
        )
    check_budget(declared, where)
    return declared


def _check_npz(path: Path) -> None:
    """Each member of an ``.npz`` archive declares no more than it holds, and all fit the
    budget together (a compressed member is decompressed only up to what it declares)."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = 0
            for info in archive.infolist():
                with archive.open(info) as member:
                    total += _declared_npy(
                        member, f"{path}: {info.filename}", info.file_size, ".npz file"
                    )
    except SoftTargetsError:
        raise
    except Exception as err:  # zipfile raises BadZipFile, OSError, NotImplementedError, ...
        raise SoftTargetsError(f"{path}: not a readable .npz file ({type(err).__name__})") from None
    check_budget(total, str(path))


def load_npz(path: str | Path, labelled: bool = True) -> Dataset:
    """An ``.npz`` archive with ``x``/``features`` and ``y``/``labels`` arrays (``y`` may be
    missing when not ``labelled``)."""
    _check_npz(Path(path))
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as err:  # object arrays need pickle: refused; a damaged archive, likewise
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise SoftTargetsError(f"{path}: not a readable .npz file ({first})") from None
    x_key = next((k for k in ("x", "features", "X") if k in arrays), None)
    y_key = next((k for k in ("y", "labels", "Y") if k in arrays), None)
    if x_key is not None and y_key is None and not labelled:
        return _unlabelled(arrays[x_key], Path(path).stem)
    if x_key is None or y_key is None:
        raise SoftTargetsError(
            f"{path}: expected arrays 'x' and 'y' (or 'features' and 'labels'), found "
            f"{sorted(arrays)}"
        )
    optional = {k: arrays[k] for k in ("ids", "soft_targets", "weights") if k in arrays}
    labels: Any = arrays[y_key]
    if "class_names" in arrays:
        names: Any = [str(c) for c in arrays["class_names"].reshape(-1)]
    elif "soft_targets" in arrays:
        names = None
    else:
        labels, names = encode_labels(labels)
    return Dataset.from_arrays(
        arrays[x_key], labels, class_names=names, name=Path(path).stem, **optional
    )


def load_npy(path: str | Path, label_column: int = -1) -> Dataset:
    """One 2-D ``.npy`` array whose column ``label_column`` holds integer labels."""
    with open(path, "rb") as handle:
        _declared_npy(handle, str(path), os.fstat(handle.fileno()).st_size)
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SoftTargetsError(f"{path}: not a readable .npy file ({err})") from None
    if table.ndim != 2 or table.shape[1] < 2:
        raise SoftTargetsError(
            f"{path}: expected a 2-D array (rows x [features..., label]), got shape {table.shape}; "
            "for other layouts save an .npz with arrays x and y"
        )
    if not -table.shape[1] <= label_column < table.shape[1]:
        raise SoftTargetsError(
            f"{path}: label column {label_column} does not exist; the array has "
            f"{table.shape[1]} columns"
        )
    col = label_column % table.shape[1]
    labels, names = encode_labels(table[:, col])
    features = np.delete(table, col, axis=1)
    return Dataset.from_arrays(features, labels, class_names=names, name=Path(path).stem)


def _unlabelled(features: Any, name: str) -> Dataset:
    """Rows to predict: features only, every label 0 of one class named ``"?"``."""
    return Dataset.from_arrays(
        features, np.zeros(len(features), dtype=np.int64), class_names=["?"], name=name
    )


def load_csv(path: str | Path, label_column: str = "label", labelled: bool = True) -> Dataset:
    """A CSV with a header; ``label_column`` holds class names or integers, the rest are features
    (all of them, when not ``labelled`` and there is no such column)."""
    opener: Any = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SoftTargetsError(f"{path}: not a readable text CSV file ({err})") from None
    if not rows:
        raise SoftTargetsError(f"{path}: the file is empty; it needs a header row and data rows")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    repeated = sorted(name for name, n in Counter(header).items() if n > 1)  # linear
    if repeated:
        raise SoftTargetsError(
            f"{path}: the header names column {repeated[0]!r} more than once; give every "
            "column its own name"
        )
    unlabelled = label_column not in header and not labelled
    if label_column not in header and labelled:
        raise SoftTargetsError(
            f"{path}: no column named {label_column!r}; columns are {_shown(header)} "
            "(choose one with --label-column)"
        )
    if not body:
        raise SoftTargetsError(f"{path}: the file has a header but no data rows")
    label_at = None if unlabelled else header.index(label_column)
    id_at = header.index("id") if "id" in header and label_column != "id" else None
    feature_at = [i for i in range(len(header)) if i not in (label_at, id_at)]
    features = np.empty((len(body), len(feature_at)), dtype=np.float32)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise SoftTargetsError(
                f"{path}: line {r + 2} has {len(row)} fields but the header has {len(header)}"
            )
        for j, i in enumerate(feature_at):
            try:
                features[r, j] = float(row[i])
            except ValueError:
                raise SoftTargetsError(
                    f"{path}: line {r + 2}, column {header[i]!r} is not a number ({row[i]!r}); "
                    "features must be numeric"
                ) from None
    if label_at is None:
        return _unlabelled(features, Path(path).stem)
    raw_labels = [row[label_at].strip() for row in body]
    if "" in raw_labels:
        line = raw_labels.index("") + 2
        raise SoftTargetsError(
            f"{path}: line {line} has an empty {label_column!r}; fill it or drop the row"
        )
    if all(_is_int(v) for v in raw_labels):
        labels, names = encode_labels(np.array([int(v) for v in raw_labels]))
    else:
        fractional = next((v for v in raw_labels if _is_number(v)), None)
        if fractional is not None:  # as the .npz loader: a label is a class, not a quantity
            raise SoftTargetsError(
                f"{path}: label {fractional!r} in {label_column!r} is a number that is not whole; "
                "labels are class names or whole numbers (for proportions use fit-proportions)"
            )
        labels, names = encode_labels(raw_labels)
    ids = None
    if id_at is not None:
        bad = next((r for r, row in enumerate(body) if not _is_int(row[id_at])), None)
        if bad is not None:
            raise SoftTargetsError(
                f"{path}: line {bad + 2}, column 'id' is not an integer ({body[bad][id_at]!r}); "
                "ids must be integers (or rename the column)"
            )
        ids = np.array([int(row[id_at]) for row in body])
    return Dataset.from_arrays(features, labels, ids=ids, class_names=names, name=Path(path).stem)


def _shown(header: list[str], most: int = 20) -> str:
    """Column names for a one-line message (a name may hold a newline), at most ``most``."""
    names = ", ".join(name.replace("\n", "\\n").replace("\r", "\\r") for name in header[:most])
    return names + (f", ... ({len(header)} in all)" if len(header) > most else "")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file's array, its declared shape checked against the budget before the data is
    read (or decompressed), and never more than it declares read."""
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise SoftTargetsError(f"{path}: not an IDX file (bad magic number)")
            dtype_code, ndim = head[2], head[3]
            dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
            if dtype_code not in dtypes:
                raise SoftTargetsError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
            if not 1 <= ndim <= 4:  # MNIST's files have 1 (labels) or 3 (images)
                raise SoftTargetsError(f"{path}: an IDX file of {ndim} dimensions; expected 1 to 4")
            dims = handle.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise SoftTargetsError(
                    f"{path}: the IDX header is cut short; download the file again"
                )
            shape = struct.unpack(f">{ndim}I", dims)
            itemsize = np.dtype(dtypes[dtype_code]).itemsize
            check_budget(math.prod(shape) * itemsize, str(path))
            raw = handle.read(math.prod(shape) * itemsize + 1)  # one more: is there extra?
    except (OSError, EOFError, zlib.error) as err:
        raise SoftTargetsError(f"{path}: not a readable IDX file ({err})") from None
    data = np.frombuffer(raw, dtype=dtypes[dtype_code])
    if data.size != math.prod(shape):
        raise SoftTargetsError(
            f"{path}: IDX header promises shape {shape} but the file holds {data.size} values "
            "(truncated download?)"
        )
    return data.reshape(shape)


def load_idx(path: str | Path) -> Dataset:
    """MNIST-style IDX files: give the images file; the labels file beside it is found by name."""
    path = Path(path)
    if "idx1-ubyte" in path.name:
        images_path = path.with_name(path.name.replace("labels-idx1", "images-idx3"))
        labels_path = path
    else:
        images_path = path
        labels_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if not labels_path.exists() or not images_path.exists():
        raise SoftTargetsError(
            f"MNIST IDX needs both {images_path.name} and {labels_path.name} in {path.parent}"
        )
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SoftTargetsError(
            f"IDX shapes do not match: images {images.shape}, labels {labels.shape}; expected "
            "(N, H, W) and (N,)"
        )
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    features = (images.astype(np.float32) / scale)[:, None]
    codes, names = encode_labels(labels.astype(np.int64))
    return Dataset.from_arrays(
        features, codes, class_names=names, name=images_path.name.split("-")[0]
    )


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch holds: dicts, lists, tuples, bytes,
    strings, numbers and NumPy arrays. Any other global a pickle names (``os.system``,
    ``builtins.eval``, a class to instantiate) is refused before it is looked up."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR batch never does"
            )
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module.removeprefix("numpy.core.")  # renamed in NumPy 2
        return super().find_class(module, name)


def load_cifar_batch(path: str | Path) -> Dataset:
    """One CIFAR-10/100 python batch: ``data (N, 3072) uint8`` and ``labels`` (or ``fine_labels``),
    read with :class:`CifarUnpickler` (no code in the file can run)."""
    check_budget(Path(path).stat().st_size, str(path))
    try:
        with open(path, "rb") as handle:
            batch = CifarUnpickler(handle, encoding="bytes").load()
    except (
        Exception
    ) as err:  # the restricted unpickler builds nothing else: any failure is a bad file
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise SoftTargetsError(f"{path}: not a readable CIFAR batch ({first})") from None
    if not isinstance(batch, dict):
        raise SoftTargetsError(f"{path}: a CIFAR batch is a dict, this file holds {type(batch)}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    label_key = next((k for k in ("labels", "fine_labels") if k in batch), None)
    if "data" not in batch or label_key is None:
        raise SoftTargetsError(f"{path}: a CIFAR batch needs 'data' and 'labels' entries")
    given = batch[label_key]
    # data is one array; labels one flat list of numbers: a nested list of shared lists (a few
    # bytes of pickle) would otherwise expand to billions of entries in np.asarray
    flat = isinstance(given, np.ndarray) or (
        isinstance(given, list | tuple) and all(isinstance(v, int | np.integer) for v in given)
    )
    if not isinstance(batch["data"], np.ndarray) or not flat:
        raise SoftTargetsError(
            f"{path}: a CIFAR batch holds 'data' as one array and 'labels' as a flat list"
        )
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        raw_labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise SoftTargetsError(f"{path}: 'data' or 'labels' is not numeric ({err})") from None
    side = int(round((data.shape[1] / 3) ** 0.5)) if data.ndim == 2 else 0
    if data.ndim != 2 or 3 * side * side != data.shape[1] or len(raw_labels) != len(data):
        raise SoftTargetsError(
            f"{path}: 'data' has shape {data.shape} and {len(raw_labels)} labels; a CIFAR batch "
            "holds (N, 3 * side * side) bytes and N labels"
        )
    features = data.reshape(-1, 3, side, side).astype(np.float32) / 255.0
    labels, names = encode_labels(raw_labels)
    return Dataset.from_arrays(features, labels, class_names=names, name=Path(path).stem)


def load_image_folder(root: str | Path, size: tuple[int, int] | None = None) -> Dataset:
    """``root/<class>/<image>``: classes sorted by folder name, images converted to RGB floats.

    All images must share one size unless ``size=(height, width)`` is given to resize them. The
    folder is read as :class:`softtargets.data.streams.ImageFolderRows` reads it (one implementation of
    the layout and its checks), then held in memory.
    """

    rows = ImageFolderRows(root, size=size)
    images = [rows[i][0] for i in range(len(rows))]  # (3, H, W) each
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) > 1:
        raise SoftTargetsError(
            f"{root}: images have different sizes {sorted(shapes)[:3]}; pass size=(H, W) to resize"
        )
    labels = [label for _, label in rows.files]
    return Dataset.from_arrays(
        torch.stack(images), labels, class_names=rows.class_names, name=Path(root).name
    )


def load_data(
    name_or_path: str, label_column: str | int | None = None, labelled: bool = True, **options: Any
) -> Dataset:
    """A built-in dataset by name (with generator options) or a file/folder by path."""

    if name_or_path in BUILTIN:
        return load_builtin(name_or_path, **options)
    if options:
        raise SoftTargetsError(
            f"dataset options {sorted(options)} apply to built-in datasets only, not to files"
        )
    if not Path(name_or_path).exists():
        raise SoftTargetsError(
            f"unknown dataset {name_or_path!r}: not a built-in ({', '.join(sorted(BUILTIN))}) "
            "and no such file"
        )
    return load_file(name_or_path, label_column, labelled)
