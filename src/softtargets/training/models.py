"""Models by name: the small built-in builders, and the one resolver of every model form.

Any ``nn.Module`` that maps ``(N, *feature_shape)`` to ``(N, K)`` logits works everywhere a built
model does. :func:`build_model` takes any of these names:

| form | example | built by |
| --- | --- | --- |
| a built-in name | ``mlp``, ``cnn1d``, ``cnn2d`` | :data:`MODELS` |
| an import path | ``mypkg.nets:resnet18``, ``nets.py:Student`` | :mod:`softtargets.training.imported` |
| a Hugging Face folder | ``hf:PATH`` (its weights), ``hf-config:PATH`` (random weights) | :mod:`softtargets.training.hf` |

| built-in | builder | input |
| --- | --- | --- |
| ``mlp`` | :func:`mlp` | anything (flattened) |
| ``cnn1d`` | :func:`cnn1d` | ``(N, L)`` or ``(N, C, L)`` signals |
| ``cnn2d`` | :func:`cnn2d` | ``(N, C, H, W)`` images (or ``(N, H, W)``) |
| ``gpt`` | :func:`~softtargets.training.gpt.gpt` | ``(N, L)`` token ids -> ``(N, L, V)`` logits (a language model) |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from softtargets.config import check_budget, check_options
from softtargets.errors import SoftTargetsError, first_line
from softtargets.training import hf
from softtargets.training.gpt import gpt
from softtargets.training.imported import build_imported, is_import_path


def mlp(
    in_features: int,
    hidden: Sequence[int] = (128, 128),
    out_features: int = 10,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Flatten, then ``Linear -> ReLU (-> Dropout)`` per hidden width, then a linear output layer.

    ``(N, *shape) -> (N, out_features)`` with ``prod(shape) == in_features``.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class _AddChannel(nn.Module):
    """``(N, L) -> (N, 1, L)`` (or ``(N, H, W) -> (N, 1, H, W)``) when the channel axis is missing."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1) if x.ndim == self.spatial_dims + 1 else x


def cnn1d(
    in_shape: Sequence[int],
    num_classes: int = 10,
    channels: Sequence[int] = (32, 32, 32),
    kernel_size: int = 5,
    dropout: float = 0.0,
) -> nn.Sequential:
    """1-D CNN: per entry of ``channels``, ``Conv1d(stride 2) -> ReLU``; then a linear classifier.

    ``in_shape`` is ``(L,)`` or ``(C, L)``. ``(N, [C,] L) -> (N, num_classes)``.
    """
    in_channels, length = (1, in_shape[0]) if len(in_shape) == 1 else (in_shape[0], in_shape[1])
    layers: list[nn.Module] = [_AddChannel(1)]
    for c in channels:
        layers += [
            nn.Conv1d(in_channels, int(c), kernel_size, stride=2, padding=kernel_size // 2),
            nn.ReLU(),
        ]
        in_channels = int(c)
        length = (length + 2 * (kernel_size // 2) - kernel_size) // 2 + 1
    layers.append(nn.Flatten())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_channels * length, num_classes))
    return nn.Sequential(*layers)


def cnn2d(
    in_shape: Sequence[int],
    num_classes: int = 10,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.0,
) -> nn.Sequential:
    """2-D CNN: per entry of ``channels``, ``Conv2d(3x3) -> ReLU -> MaxPool(2)`` (pooling while the
    image is at least 2 pixels), then ``Linear(hidden) -> ReLU -> Linear``.

    ``in_shape`` is ``(C, H, W)`` or ``(H, W)``. ``(N, [C,] H, W) -> (N, num_classes)``.
    """
    c_in, h, w = (1, *in_shape) if len(in_shape) == 2 else tuple(in_shape)
    layers: list[nn.Module] = [_AddChannel(2)]
    for c in channels:
        layers += [nn.Conv2d(c_in, int(c), 3, padding=1), nn.ReLU()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c_in = int(c)
    layers += [nn.Flatten(), nn.Linear(c_in * h * w, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


def _build_mlp(in_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    return mlp(math.prod(in_shape), out_features=num_classes, **options)


def _build_gpt(in_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    # a language model's classes are its vocabulary; its rows are blocks of in_shape[0] tokens
    options.setdefault("context", max(256, int(in_shape[0])))
    return gpt(num_classes, **options)


# name -> (builder taking (in_shape, num_classes, **options), the function whose options it takes)
MODELS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "mlp": (_build_mlp, mlp),
    "cnn1d": (cnn1d, cnn1d),
    "cnn2d": (cnn2d, cnn2d),
    "gpt": (_build_gpt, gpt),
}


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    /,
    seed: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` (any form in the module's table) for inputs of shape ``in_shape`` and
    ``num_classes`` outputs.

    ``seed`` makes the initial weights reproducible without touching the global random stream.
    An unknown name or option raises with the list of valid ones.
    """
    if name not in MODELS:
        if hf.is_hf_name(name):
            return _seeded(seed, lambda: hf.build_hf(name, num_classes, options))
        if is_import_path(name):
            return _seeded(seed, lambda: build_imported(name, in_shape, num_classes, options))
        raise SoftTargetsError(
            f"unknown model {name!r}; give a built-in name ({', '.join(MODELS)}), an import path "
            "(package.module:callable or path/file.py:callable) or hf:PATH; see softtargets models"
        )
    builder, documented = MODELS[name]
    check_options(
        documented,
        options,
        f"model {name!r}",
        skip=("in_features", "in_shape", "out_features", "num_classes", "vocab_size"),
    )
    if name == "cnn1d" and len(in_shape) not in (1, 2):
        raise SoftTargetsError(
            f"cnn1d needs (L,) or (C, L) inputs; this data has {tuple(in_shape)}"
        )
    if name == "cnn2d" and len(in_shape) not in (2, 3):
        raise SoftTargetsError(
            f"cnn2d needs (H, W) or (C, H, W) inputs; this data has {tuple(in_shape)}"
        )
    with torch.device("meta"):  # counted without allocating: hidden=[10**8] asks for 40 GB
        parameters = count_parameters(builder(in_shape, num_classes, **options))
    # weights, their gradients and an optimizer's two moments, in float32
    check_budget(
        16 * parameters, f"model {name!r} with {parameters:,} parameters", "use a smaller model"
    )
    return _seeded(seed, lambda: builder(in_shape, num_classes, **options))


def _seeded(seed: int | None, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``, under ``seed`` when one is given, leaving the global random stream as it was."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def check_model_fits(model: nn.Module, sample: Tensor, num_classes: int, what: str) -> None:
    """Run ``model`` on ``sample`` (a batch of a few rows, ``(n, *feature_shape)``) and check that it
    gives ``(n, num_classes)`` logits: one line naming the model and what it gave otherwise.

    Every model is checked so before anything trains, so a model that does not fit the data fails
    in a second, not after a teacher has trained for minutes.
    """
    device = next(iter(model.parameters()), sample).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample.to(device))
    except Exception as err:
        raise SoftTargetsError(
            f"{what} cannot take this data's rows of shape {tuple(sample.shape[1:])}: "
            f"{first_line(err)}"
        ) from None
    finally:
        model.train(was_training)
    out = getattr(out, "logits", out)  # a Hugging Face model's output
    expected = (len(sample), num_classes)
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise SoftTargetsError(
            f"{what} gives {got} for {len(sample)} rows; it must give (rows, classes) = "
            f"{expected} logits for this data's {num_classes} classes"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, in_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one sample (``torch.utils.flop_counter``; matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with counter, torch.no_grad():
        model(torch.zeros(1, *in_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())
