"""safetensors files written in place and read mapped: what lets a store be larger than memory.

A store's tensors all have sizes known before labelling (rows x fixed widths), so its header is
written first (:func:`safetensors_header`), the file is sized (:func:`file_size`), and each batch
of rows is written at its own byte offset as it is labelled; :func:`map_tensor` reads a tensor
back through a private mapping, so rows are read when a batch asks for them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: safetensors' dtype names of the dtypes stores use
DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32",
    torch.uint8: "U8",
}  # fmt: skip
_NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``."""
    return torch.empty((), dtype=dtype).element_size() * math.prod(shape)


def safetensors_header(
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    """The header of a safetensors file holding ``entries`` (name -> dtype, shape) in that order,
    and each tensor's byte offset in the file."""
    header: dict[str, Any] = {"__metadata__": metadata}
    start, starts = 0, {}
    for name, (dtype, shape) in entries.items():
        size = nbytes(dtype, shape)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [start, start + size]
        }  # fmt: skip
        starts[name], start = start, start + size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    head = len(blob).to_bytes(8, "little") + blob
    return head, {name: len(head) + at for name, at in starts.items()}


def file_size(header: bytes, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Bytes of the whole file :func:`safetensors_header` describes."""
    return len(header) + sum(nbytes(dtype, shape) for dtype, shape in entries.values())


def map_tensor(path: str | Path, name: str) -> Tensor:
    """Tensor ``name`` of the safetensors file at ``path``, mapped copy-on-write: its pages are
    read from the file when used (and are the page cache's, which the system reclaims)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(size))[name]
    if entry["dtype"] not in _NUMPY:
        raise ValueError(f"{name} has dtype {entry['dtype']}, which a store does not use")
    start, end = entry["data_offsets"]
    dtype, shape = np.dtype(_NUMPY[entry["dtype"]]), tuple(entry["shape"])
    if end - start != dtype.itemsize * math.prod(shape):
        raise ValueError(f"{name}'s offsets do not match its shape")
    if end == start:
        return torch.from_numpy(np.empty(shape, dtype=dtype))
    mapped = np.memmap(path, dtype=dtype, mode="c", offset=8 + size + start, shape=shape)
    return torch.from_numpy(mapped)
