"""Resume inside a fit: everything a training run needs to continue, in one file.

``fit(..., checkpoint=PATH)`` saves, after every epoch (or every ``checkpoint_every``), the model's
weights, the optimizer's state, the best epoch's weights, the learning-rate schedule's position,
the epoch bookkeeping and every random generator that decides what comes next (batch order,
dropout, a loader's worker seeds). Killed at any point, the same call continues from the last
epoch saved and ends with exactly the weights and metrics of an uninterrupted run (on the CPU;
``tests/test_checkpoint.py`` kills a real process).

The file is a safetensors file (tensors under ``model.``, ``best.``, ``optimizer.``, ``rng.``) with
the rest as JSON in its header: never a pickle. It is written to a temporary file and renamed, so a
kill leaves the previous checkpoint whole. It carries a key of the fit's settings, data and initial
weights: a checkpoint of another fit is refused, never silently continued.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_open, parse_json

FORMAT = "softtargets.training.checkpoint"


FORMAT_VERSION = 1


@dataclass
class FitState:
    """A fit after ``epoch`` finished epochs.

    Attributes:
        key: :func:`fit_key` of the fit this state belongs to.
        epoch: epochs finished.
        model: the model's ``state_dict`` now.
        optimizer: the optimizer's ``state_dict`` now.
        best: the best validation epoch's weights so far (``None``: none kept).
        rng: random states by name (``"torch"``, ``"cuda"``, ``"order.0"``, ...), uint8 tensors.
        progress: JSON-able bookkeeping (epoch records, best epoch, patience, schedule position).
    """

    key: str
    epoch: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    best: dict[str, Tensor] | None = None
    rng: dict[str, Tensor] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)


def fit_key(**settings: Any) -> str:
    """A short hash of a fit's settings (JSON-able values: hyperparameters, fingerprints)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save(path: str | Path, state: FitState) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    tensors: dict[str, Tensor] = {}
    for prefix, part in (("model.", state.model), ("best.", state.best or {}), ("rng.", state.rng)):
        for name, value in part.items():
            tensors[prefix + name] = value
    optimizer_json = _split_optimizer(state.optimizer, tensors)
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "key": state.key,
        "epoch": str(state.epoch),
        "has_best": str(state.best is not None),
        "optimizer": json.dumps(optimizer_json),
        "progress": json.dumps(state.progress),
    }
    write_safetensors(path, tensors, meta)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> None:
    """A safetensors file of ``tensors`` (CPU, any shape) and ``metadata``, atomically.

    Written here rather than by ``safetensors.torch.save``, whose Python side costs about 0.1 ms
    a tensor: a checkpoint of a small MLP with Adam holds 31 tensors, and with epochs of tens of
    milliseconds that was 13% of the fit (``bench/run_all.py``'s ``resume_overhead``).
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    parts, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise SoftTargetsError(f"a checkpoint cannot hold {tensor.dtype} tensors ({name})")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        parts.append(raw)
        offset += raw.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads its header to 8 bytes
    with atomic_open(path, "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little"))
        handle.write(blob)
        for raw in parts:
            handle.write(raw)


def load(path: str | Path, key: str, epochs: int | None = None) -> FitState | None:
    """The state saved at ``path`` for the fit ``key`` of ``epochs`` epochs; ``None`` if there is
    no file yet.

    Raises if ``path`` holds something else, the checkpoint of another fit, or one whose epoch
    or parts do not fit (a damaged file is one line, never a KeyError).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise SoftTargetsError(
            f"{path} is not a readable checkpoint ({str(err).splitlines()[0]}); give another "
            "checkpoint path"
        ) from None
    if meta.get("format") != FORMAT:
        raise SoftTargetsError(
            f"{path} is not a softtargets checkpoint; give another checkpoint path (softtargets "
            "never overwrites a file it did not write)"
        )
    if meta.get("version") != str(FORMAT_VERSION):
        raise SoftTargetsError(
            f"{path} is checkpoint version {meta.get('version')}; this softtargets reads "
            f"version {FORMAT_VERSION}: delete it to train from the start"
        )
    if meta.get("key") != key:
        raise SoftTargetsError(
            f"{path} is the checkpoint of another fit (other settings, data or initial weights); "
            "delete it to train from the start, or give this fit another checkpoint path"
        )
    parts: dict[str, dict[str, Tensor]] = {"model": {}, "best": {}, "rng": {}, "optimizer": {}}
    damaged = f"{path} is a damaged checkpoint; delete it to train from the start"
    try:
        for name, value in tensors.items():
            prefix, _, rest = name.partition(".")
            parts[prefix][rest] = value
        state = FitState(
            key=key,
            epoch=int(meta["epoch"]),
            model=parts["model"],
            optimizer=_join_optimizer(parse_json(meta["optimizer"], str(path)), parts["optimizer"]),
            best=parts["best"] if meta.get("has_best") == "True" else None,
            rng=parts["rng"],
            progress=parse_json(meta["progress"], str(path)),
        )
    except (KeyError, ValueError, TypeError, IndexError) as err:  # a tensor or field missing
        raise SoftTargetsError(f"{damaged} ({type(err).__name__}: {err})") from None
    if epochs is not None and not 1 <= state.epoch <= epochs:
        raise SoftTargetsError(
            f"{path} says epoch {state.epoch} of a {epochs}-epoch fit; it was not written by this "
            "fit: delete it to train from the start"
        )
    return state


def saved_epoch(path: str | Path) -> int:
    """The epochs a checkpoint has finished (0 if there is none, or it cannot be read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return 0
    return int(meta.get("epoch", 0)) if meta.get("format") == FORMAT else 0


def _split_optimizer(state_dict: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """An optimizer ``state_dict`` as JSON, its tensors moved into ``tensors`` under
    ``optimizer.<param>.<name>``."""
    state: dict[str, dict[str, Any]] = {}
    for param, entries in state_dict["state"].items():
        state[str(param)] = {}
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param}.{name}"] = value
                state[str(param)][name] = {"tensor": True, "device": str(value.device)}
            else:
                state[str(param)][name] = {"value": value}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def _join_optimizer(saved: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for param, entries in saved["state"].items():
        state[int(param)] = {
            name: tensors[f"{param}.{name}"].to(entry["device"])
            if entry.get("tensor")
            else entry["value"]
            for name, entry in entries.items()
        }
    return {"state": state, "param_groups": saved["param_groups"]}


def rng_states(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, Tensor]:
    """The global CPU (and CUDA) random states and ``generators``' states, by name."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    for name, generator in generators.items():
        states[name] = generator.get_state()
    return states


def set_rng_states(
    states: dict[str, Tensor], generators: dict[str, torch.Generator], device: torch.device
) -> None:
    """Put back what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    for name, generator in generators.items():
        generator.set_state(states[name])
