"""Built-in datasets, made locally with no download.

* ``digits`` — scikit-learn's 1,797 8x8 handwritten digits, features ``(1, 8, 8)`` in ``[0, 1]``.
* ``mnist1d`` — Greydanus's MNIST-1D: 10 digit templates turned into 1-D signals of length 40
  and distorted (shift, scale, shear, noise). Generated with the ``mnist1d`` package, seeded,
  cached on disk after the first generation. Small models separate clearly: an MLP reaches about
  two thirds of the accuracy of a small CNN, which is what makes it a good distillation testbed.
* ``gaussians`` — synthetic K-class data whose every class is a mixture of Gaussian clusters, with
  a ``separation`` knob for difficulty and the exact Bayes class probabilities of every sample.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softtargets.config import check_budget, check_options
from softtargets.data.dataset import Dataset
from softtargets.errors import SoftTargetsError
from softtargets.files import atomic_write_bytes


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$SOFTTARGETS_CACHE`` or ``~/.cache/softtargets``."""
    return Path(os.environ.get("SOFTTARGETS_CACHE", Path.home() / ".cache" / "softtargets"))


def digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1,797 samples, 10 classes, features ``(1, 8, 8)`` scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    features = (raw.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Dataset.from_arrays(
        features, raw.target, class_names=[str(c) for c in raw.target_names], name="digits"
    )


def mnist1d(num_samples: int = 10_000, seed: int = 42, cache: bool = True) -> Dataset:
    """MNIST-1D with ``num_samples`` signals of length 40 (the package's default settings).

    Generation takes about 0.2 ms per sample, so the result is cached as ``.npz`` under
    :func:`cache_dir`, keyed by the arguments. The package seeds NumPy's global generator; we save
    and restore it so that generating data does not change the caller's random stream.
    """
    if num_samples < 10:
        raise SoftTargetsError(
            f"mnist1d needs at least 10 samples (one per class), got {num_samples}"
        )
    key = hashlib.sha256(json.dumps([num_samples, seed, 1]).encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{num_samples}-{seed}-{key}.npz"
    if cache and path.exists():
        try:
            with np.load(path) as saved:
                x, y = saved["x"], saved["y"]
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a corrupt cache is regenerated, not trusted
            return mnist1d(num_samples, seed, cache)
    else:
        x, y = _generate_mnist1d(num_samples, seed)
        if cache:
            buffer = io.BytesIO()
            np.savez(buffer, x=x, y=y)
            atomic_write_bytes(path, buffer.getvalue())
    return Dataset.from_arrays(
        x, y, class_names=[str(c) for c in range(10)], name=f"mnist1d-{num_samples}"
    )


def _generate_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 1.0  # we split ourselves, with our own seeded, stratified splitter
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return raw["x"].astype(np.float32), raw["y"].astype(np.int64)


def gaussians(
    num_samples: int = 4000,
    num_classes: int = 10,
    dim: int = 20,
    clusters_per_class: int = 2,
    separation: float = 3.0,
    seed: int = 0,
) -> Dataset:
    """K classes, each an equal-weight mixture of ``clusters_per_class`` unit-variance Gaussians.

    Cluster centres are drawn from ``N(0, separation^2 / dim * I)``, so two centres lie about
    ``separation * sqrt(2)`` apart whatever ``dim`` is: a larger ``separation`` means easier data,
    and ``separation -> 0`` makes the classes indistinguishable. With more than one cluster per
    class the Bayes decision boundary is non-linear, so model width matters.

    Classes are equally likely, so the Bayes class probabilities are
    ``p(k | x) = sum_c exp(-|x - mu_kc|^2 / 2) / sum_{j,c} exp(-|x - mu_jc|^2 / 2)``; they are
    exposed as ``true_probs``.
    """
    if num_classes < 2 or clusters_per_class < 1 or dim < 1 or num_samples < num_classes:
        raise SoftTargetsError(
            "gaussians needs num_classes >= 2, clusters_per_class >= 1, dim >= 1 and at least one "
            "sample per class"
        )
    if separation < 0:
        raise SoftTargetsError(f"gaussians separation must be >= 0, got {separation}")
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, clusters_per_class, dim, generator=gen, dtype=torch.float64)
    centres *= separation / dim**0.5
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    cluster = torch.randint(0, clusters_per_class, (num_samples,), generator=gen)
    x = centres[labels, cluster] + torch.randn(num_samples, dim, generator=gen, dtype=torch.float64)
    true_probs = bayes_probabilities(x, centres)
    data = Dataset.from_arrays(
        x.float(),
        labels,
        class_names=[str(c) for c in range(num_classes)],
        name=f"gaussians-sep{separation:g}",
    )
    return replace(data, true_probs=true_probs.float())


def bayes_probabilities(x: torch.Tensor, centres: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``p(class | x)`` for equal-weight unit-variance mixtures: ``x (N, D)``, ``centres (K, C, D)``.

    Rows are done ``chunk`` at a time: the differences ``x - mu`` take ``K * C * D`` numbers per
    row (84 times the features at the defaults), which for 300,000 rows would be gigabytes.
    """
    parts = []
    for start in range(0, len(x), chunk):
        rows = x[start : start + chunk]
        sq_dist = ((rows[:, None, None, :] - centres[None]) ** 2).sum(-1)  # (chunk, K, C)
        log_joint = torch.logsumexp(-0.5 * sq_dist, dim=2)  # (chunk, K), constants cancel
        parts.append(torch.softmax(log_joint, dim=1))
    return torch.cat(parts) if parts else x.new_empty(0, centres.shape[0])


def margin_points(
    num_samples: int = 4000,
    dim: int = 10,
    margin: float = 0.1,
    hidden: int = 64,
    seed: int = 0,
    sphere: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The points of :func:`margin_task` and their scores: ``x`` (num_samples, dim) float64 and
    ``s(x) / std(s)`` (num_samples,), the fixed random network's score in units of its spread
    (positive: class 1; ``|score| >= margin`` for every point). ``sphere``: ``x`` uniform on the
    unit sphere instead of ``N(0, I)`` (the setting of Mandal, Lin and Srikant's theorem)."""
    if num_samples < 2 or dim < 1 or hidden < 1 or not 0 <= margin < 3:
        raise SoftTargetsError(
            "margin_task needs num_samples >= 2, dim >= 1, hidden >= 1 and 0 <= margin < 3"
        )
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(hidden, dim, generator=gen, dtype=torch.float64) / dim**0.5
    out = torch.randn(hidden, generator=gen, dtype=torch.float64)

    def draw(count: int) -> torch.Tensor:
        x = torch.randn(count, dim, generator=gen, dtype=torch.float64)
        return x / x.norm(dim=1, keepdim=True) if sphere else x

    raw = torch.relu(draw(20_000) @ weights.T) @ out
    centre, spread = float(raw.median()), float(raw.std())  # the median: balanced classes

    def score(x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x @ weights.T) @ out - centre) / spread

    kept: list[torch.Tensor] = []
    count = 0
    while count < num_samples:  # rejection: keep the points outside the margin band
        x = draw(4 * num_samples)
        x = x[score(x).abs() >= margin]
        kept.append(x)
        count += len(x)
    x = torch.cat(kept)[:num_samples]
    return x, score(x)


def margin_task(
    num_samples: int = 4000,
    dim: int = 10,
    margin: float = 0.1,
    hidden: int = 64,
    seed: int = 0,
) -> Dataset:
    """A realizable binary task with a controlled margin (Mandal, Lin, Srikant 2024's setting).

    A fixed random two-layer ReLU network ``s(x) = v . relu(W x)`` (``hidden`` units, seeded; no
    biases, so every unit bends the boundary through the origin's neighbourhood and a linear model
    gets only about 80-90% right)
    labels ``x ~ N(0, I_dim)`` by the sign of ``s(x)``; points with ``|s(x)| < margin x std(s)``
    are rejected, so every point lies at least ``margin`` (in units of the score's spread) from
    the boundary. Noise-free: a wide enough network reaches 100%; a smaller ``margin`` is a harder
    task. ``true_probs`` is the one-hot truth. The points and scores: :func:`margin_points`.
    """
    x, score = margin_points(num_samples, dim, margin, hidden, seed)
    labels = (score > 0).long()
    data = Dataset.from_arrays(
        x.float(), labels, class_names=["negative", "positive"], name=f"margin-task-{margin:g}"
    )
    return replace(data, true_probs=torch.nn.functional.one_hot(labels, 2).float())


BUILTIN = {"digits": digits, "mnist1d": mnist1d, "gaussians": gaussians, "margin_task": margin_task}


def _declared_bytes(name: str, options: dict[str, Any]) -> int:
    """What generating built-in dataset ``name`` with ``options`` allocates, about (float32:
    features, and for gaussians the Bayes probabilities of every row)."""
    defaults = {k: p.default for k, p in inspect.signature(BUILTIN[name]).parameters.items()}
    given = {**defaults, **options}
    rows = int(given.get("num_samples", 1797))
    width = {"mnist1d": 40, "digits": 64}.get(name, int(given.get("dim", 1)))
    if name == "gaussians":
        width += int(given["num_classes"]) * (1 + int(given["clusters_per_class"]))
    return 8 * rows * (width + 2)


def load_builtin(name: str, **options: Any) -> Dataset:
    """A built-in dataset by name, with keyword options for its generator."""
    if name not in BUILTIN:
        raise SoftTargetsError(
            f"unknown dataset {name!r}; built-in datasets are {', '.join(sorted(BUILTIN))}, or give "
            "a file path (.npz, .npy, .csv, MNIST IDX, CIFAR batch, image folder)"
        )

    check_options(BUILTIN[name], options, f"dataset {name!r}")
    check_budget(_declared_bytes(name, options), f"dataset {name!r} with {options}", "ask for less")
    return BUILTIN[name](**options)
