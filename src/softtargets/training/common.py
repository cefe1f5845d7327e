"""What every trainer shares: the device, the optimizer, and the checks of a fit's lengths and parts."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from softtargets.data.dataset import Dataset
from softtargets.errors import SoftTargetsError

OptimizerName = Literal["sgd", "adam", "adamw"]


ScheduleName = Literal["none", "cosine", "step"]


Precision = Literal["fp32", "bf16", "fp16"]


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``cuda`` when available and no device is named, else the named device, if it exists here."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SoftTargetsError(
            f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise SoftTargetsError(
                f"device {device!r} is not available here ({count} CUDA devices; this PyTorch "
                f"is {torch.__version__}); use --device cpu or auto"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise SoftTargetsError(f"device {device!r} is not available here; use --device cpu or auto")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise SoftTargetsError(f"device {device!r} is not supported; use auto, cpu, cuda or mps")
    return resolved


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    if lr <= 0 or not math.isfinite(lr):
        raise SoftTargetsError(f"learning rate must be > 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise SoftTargetsError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise SoftTargetsError(f"momentum must be in [0, 1), got {momentum}")
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in classes:
        raise SoftTargetsError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")
    options: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        options["momentum"] = momentum
    try:
        # The fused kernels update every parameter in one call: about a third of a small
        # model's step on the CPU (bench/epoch_cost.py). Older torch lacks them on the CPU.
        return classes[name](model.parameters(), fused=True, **options)
    except (RuntimeError, TypeError):
        return classes[name](model.parameters(), **options)


def check_not_empty(data: Dataset | TorchDataset, name: str) -> None:
    if len(data) == 0:
        raise SoftTargetsError(f"the {name} has no rows; nothing to train or evaluate on")


def check_lengths(epochs: int, batch_size: int) -> None:
    """Refuse an empty training run (``fit`` and ``fit_many`` share this check)."""
    if epochs < 1 or batch_size < 1:
        raise SoftTargetsError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")


def _classes_of(data: Any) -> int | None:
    """The number of classes of a dataset, if it says (a user's torch Dataset may not)."""
    return getattr(data, "num_classes", None)
