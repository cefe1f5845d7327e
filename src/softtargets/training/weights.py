"""Pretrained weights from a user's file, never unpickled.

* ``.safetensors`` (recommended): read with ``safetensors``, which holds only tensors.
* ``.pt`` / ``.pth`` / ``.bin``: read only through ``torch.load(..., weights_only=True)``, whose
  restricted unpickler builds tensors and plain containers and refuses anything else, so a file
  carrying a pickled payload is refused before any of it runs.

A checkpoint that wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``, as Lightning and
many training scripts save them) and keys prefixed ``module.`` (saved from DistributedDataParallel)
are unwrapped. Missing keys, unexpected keys and shape mismatches are one line naming the first few.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from softtargets.config import check_budget
from softtargets.errors import SoftTargetsError, first_line

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPERS = ("state_dict", "model", "model_state_dict")


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a weights file's bytes (it keys the store the teacher labels)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, by name; see the module doc for the forms read."""
    path = Path(path)
    if not path.is_file():
        raise SoftTargetsError(f"weights file {path} does not exist or is not a regular file")
    check_budget(path.stat().st_size, f"weights file {path}", "use a smaller model")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            state: Any = load_file(str(path))
        except Exception as err:
            raise SoftTargetsError(
                f"{path} is not a safetensors file ({first_line(err, typed=False, limit=200)}); save weights with "
                "safetensors.torch.save_file(model.state_dict(), PATH)"
            ) from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the restricted unpickler refused it, or it is not torch's
            raise SoftTargetsError(
                f"{path} is not a plain weights file: torch.load(weights_only=True) refused it "
                f"({_why_refused(err)}); nothing in it was run. Save model.state_dict() with "
                "safetensors instead"
            ) from None
    else:
        raise SoftTargetsError(
            f"{path}: weights must be .safetensors (recommended) or .pt/.pth/.bin/.ckpt"
        )
    return _unwrap(state, path)


def _unwrap(state: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(state, dict):
        for wrapper in WRAPPERS:
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state:
        raise SoftTargetsError(f"{path} holds no weights (a dict of tensors by name)")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise SoftTargetsError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def load_into(model: nn.Module, path: str | Path, what: str = "teacher") -> None:
    """Load the weights of ``path`` into ``model``, every key and shape checked first."""
    state = read_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise SoftTargetsError(
            f"{path} does not fit the {what}'s architecture: {'; '.join(parts)}; check "
            f"--{what} and its options"
        )
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise SoftTargetsError(
                f"{path} does not fit the {what}: {key} has shape {tuple(state[key].shape)} in the "
                f"file and {tuple(value.shape)} in the model; check --{what} and its options"
            )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return f"{len(keys)} keys ({shown}{', ...' if len(keys) > 3 else ''})"


def _why_refused(err: BaseException) -> str:
    """The line of torch's refusal that names what the file holds (``unsupported GLOBAL ...``),
    not its advice to load without ``weights_only``, which would run the file's code."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0][:200]


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A model's weights, detached on the CPU, each its own copy: safe to send between processes
    and to save (safetensors refuses tensors that share memory, as tied embeddings do)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
