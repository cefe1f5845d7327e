"""Does a student learn as well from a top-k store as from the full one?

A 100-class task (``gaussians``: 100 classes of two clusters each), one MLP teacher, its logits
stored in full and as top-k stores (k = 1, 5, 32). The classes a row did not keep enter the loss
in one of two ways (``Distillation(tail=...)``): spread uniformly (``SoftTargetStore.dense``) or as
one "other" bucket (``losses.bucket_distillation_loss``). Small MLP students distil from each
(T = 4, alpha = 0.9) and from hard labels, over several seeds, selected on validation: the
uniform arms trained together (``fit_many``), the bucket arms one by one (``fit``; the two trainers
give equal results, ``tests/test_vectorised.py``). The test accuracy is reported as mean +- 95% CI,
and each arm against the full store as a paired difference (same seeds). Also printed: each
store's file size as a fraction of the full one.

Usage: python bench/topk_vs_full.py [--seeds 5] [--samples 20000] [--epochs 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from softtargets.data.builtin import gaussians
from softtargets.data.dataset import split
from softtargets.run.stats import mean_ci, paired_difference
from softtargets.store.label import label
from softtargets.training.fit import fit
from softtargets.training.fit_many import Member, fit_many
from softtargets.training.metrics import evaluate
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    started = time.perf_counter()
    data = gaussians(num_samples=args.samples, num_classes=100, dim=20, separation=4.0)
    parts = split(data, 0.1, 0.2, seed=0)
    teacher = build_model("mlp", data.feature_shape, 100, seed=0, hidden=[256, 256])
    fit(teacher, parts.train, val=parts.val, epochs=40, optimizer="adamw", weight_decay=1e-2,
        lr=3e-3)  # fmt: skip
    full = label(teacher, data)
    stores = {"full": full, **{f"top-{k}": full.top_k(k) for k in (32, 5, 1)}}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {
            n: s.save(Path(tmp) / f"{n}.safetensors").stat().st_size for n, s in stores.items()
        }
    variants = {"hard labels": None, **{n: Distillation(s, 4.0, 0.9) for n, s in stores.items()}}
    members, names = [], []
    for name, targets in variants.items():
        for seed in range(args.seeds):
            members.append(Member(seed=seed, targets=targets))
            names.append(name)
    models = [
        build_model("mlp", data.feature_shape, 100, seed=m.seed, hidden=[32]) for m in members
    ]
    results = fit_many(models, parts.train, members, val=parts.val, epochs=args.epochs, lr=1e-2)
    accuracy: dict[str, list[float]] = {n: [] for n in variants}
    for name, result in zip(names, results, strict=True):
        accuracy[name].append(evaluate(result.model, parts.test)["accuracy"])
    for name, store in stores.items():
        if name == "full":
            continue
        bucket = Distillation(store, 4.0, 0.9, tail="bucket")
        accuracy[f"{name} bucket"] = [
            evaluate(
                fit(build_model("mlp", data.feature_shape, 100, seed=seed, hidden=[32]),
                    parts.train, bucket, val=parts.val, epochs=args.epochs, lr=1e-2).model,
                parts.test,
            )["accuracy"]
            for seed in range(args.seeds)
        ]  # fmt: skip
    teacher_accuracy = evaluate(teacher, parts.test)["accuracy"]
    print(f"gaussians: 100 classes, {len(parts.train)} train / {len(parts.test)} test rows; "
          f"teacher mlp 256-256 {teacher_accuracy:.2%}; students mlp 32, {args.seeds} seeds")  # fmt: skip
    print(
        f"{'targets':<15} {'file / full':>11}  {'test accuracy (%)':>18}  {'minus full (points)':>22}"
    )
    for name, values in accuracy.items():
        stored = name.removesuffix(" bucket")
        size = f"{sizes[stored] / sizes['full']:.3f}" if stored in sizes else "-"
        versus = "-"
        if name != "full":
            diff = paired_difference(values, accuracy["full"])
            versus = f"{diff.format(100)} [{diff.low * 100:+.2f}, {diff.high * 100:+.2f}]"
        print(f"{name:<15} {size:>11}  {mean_ci(values).format(100):>18}  {versus:>22}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
