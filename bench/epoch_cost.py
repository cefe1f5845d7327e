"""What does distilling from stored logits cost, per epoch, compared with the alternatives?

Prints two ratios, each measured side by side in this one process (the repeats are interleaved so
that machine noise hits every variant alike; the median over repeats is reported):

  (a) stored / hard:   an epoch of distillation reading stored teacher logits, divided by an epoch
                       of plain hard-label training of the same student. Goal <= 1.10.
  (b) online / stored: an epoch of ``fit``'s online distillation (the data streamed through a
                       DataLoader, the teacher run on every batch, as augmentation needs),
                       divided by (a)'s numerator. The teacher costs >= 10x the student's FLOPs.

Usage: python bench/epoch_cost.py [--repeats 7] [--samples 5000]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from softtargets.data.builtin import mnist1d
from softtargets.data.dataset import split
from softtargets.data.streams import TensorRows
from softtargets.store.label import label
from softtargets.training.fit import fit
from softtargets.training.models import build_model, forward_flops
from softtargets.training.objectives import Distillation


def epoch_seconds(model, data, targets, epochs: int = 3, batch_size: int = 128) -> float:
    """Median wall time of one training epoch (fit's own per-epoch timer, no validation)."""
    result = fit(model, data, targets, epochs=epochs, lr=1e-2, batch_size=batch_size, device="cpu")
    return statistics.median(r["seconds"] for r in result.history)


def online_epoch_seconds(student, teacher, data, temperature, alpha, epochs: int = 3) -> float:
    """``fit``'s online distillation: the data streamed through a DataLoader (``TensorRows``) and
    the teacher run on every batch under ``inference_mode``."""
    targets = Distillation(teacher, temperature, alpha)
    return epoch_seconds(student, TensorRows(data), targets, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args()

    data = mnist1d(args.samples)
    train = split(data, 0.1, 0.2).train
    teacher = build_model("cnn1d", data.feature_shape, 10, seed=0, channels=[64, 64, 64])
    store = label(teacher, data)
    t_flops = forward_flops(teacher, data.feature_shape)
    s_flops = forward_flops(
        build_model("mlp", data.feature_shape, 10, hidden=[100, 100]), data.feature_shape
    )
    distill = Distillation(store, temperature=4.0, alpha=0.9)

    ratios_a, ratios_b, hard_s, stored_s, online_s = [], [], [], [], []

    def student(seed: int) -> torch.nn.Module:
        return build_model("mlp", data.feature_shape, 10, seed=seed, hidden=[100, 100])

    for repeat in range(args.repeats):
        hard = epoch_seconds(student(repeat), train, None)
        stored = epoch_seconds(student(repeat), train, distill)
        online = online_epoch_seconds(student(repeat), teacher, train, 4.0, 0.9)
        ratios_a.append(stored / hard)
        ratios_b.append(online / stored)
        hard_s.append(hard), stored_s.append(stored), online_s.append(online)

    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU")
    print(
        f"data: MNIST-1D, {len(train)} training rows, batch 128; student mlp 100-100 "
        f"({s_flops:,} FLOPs/sample), teacher cnn1d 64-64-64 ({t_flops:,} FLOPs/sample, "
        f"{t_flops / s_flops:.1f}x the student)"
    )
    print(
        f"epoch seconds (median of {args.repeats}): hard {statistics.median(hard_s):.4f}, "
        f"stored logits {statistics.median(stored_s):.4f}, online teacher "
        f"{statistics.median(online_s):.4f}"
    )
    print(f"(a) stored / hard  = {statistics.median(ratios_a):.3f}  (goal <= 1.10)")
    print(f"(b) online / stored = {statistics.median(ratios_b):.2f}")


if __name__ == "__main__":
    main()
