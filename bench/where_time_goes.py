"""Where a training step's time goes: per-phase wall time inside the real training loops.

    python bench/where_time_goes.py [--steps 280]

Two tables, microseconds per step (median over repeats of the mean over ``--steps`` steps):

  fit, one MLP 100-100 on MNIST-1D, batch 128: forward, loss, backward, optimizer, for hard
  labels and for distillation from stored logits (T=4, alpha=0.9). The loss row is the number
  that separates the two (``bench/epoch_cost.py``'s stored / hard ratio).

  fit_many, 16 MLPs 40-128-128-10 at batch 128: row gather, forward, loss, backward, optimizer,
  with the arithmetic rate of the stacked matmuls.

Phases are timed with ``time.perf_counter`` around the same calls the training loops make (no
profiler running: it inflates small ops several-fold). The loops are copies of the inner loops
of ``softtargets.training.fit.fit`` and ``softtargets.training.fit_many.fit_many``, kept minimal.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from softtargets.data.builtin import mnist1d
from softtargets.data.dataset import Dataset, split
from softtargets.store.label import label
from softtargets.training.common import make_optimizer
from softtargets.training.fit_many import Member, StackedTargets, _rows_by_step
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation, make_objective
from softtargets.training.stacked import StackedMLP, StackedOptimizer

PHASES_FIT = ("forward", "loss", "backward", "optimizer")
PHASES_MANY = ("gather", "forward", "loss", "backward", "optimizer")


class Stopwatch:
    """Accumulates wall time per phase: ``lap("name")`` charges the time since the last lap."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now


def fit_phases(train: Dataset, targets: Distillation | None, steps: int) -> dict[str, float]:
    """Microseconds per step of each phase of ``fit``'s inner loop."""
    model = build_model("mlp", train.feature_shape, 10, seed=0, hidden=[100, 100])
    objective = make_objective(targets, train, torch.device("cpu"))
    optimizer = make_optimizer(model, "adam", 1e-2, 0.0, 0.9)
    generator = torch.Generator().manual_seed(0)
    watch, done = Stopwatch(), 0
    while done < steps:
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order) - 127, 128):
            rows = order[start : start + 128]
            watch.start()
            logits = model(train.features.index_select(0, rows))
            watch.lap("forward")
            loss, grad = objective(logits, rows)
            watch.lap("loss")
            optimizer.zero_grad(set_to_none=True)
            if grad is None:
                loss.backward()
            else:  # the closed-form gradient, as fit() uses it
                logits.backward(grad)
            watch.lap("backward")
            optimizer.step()
            watch.lap("optimizer")
            done += 1
    return {p: watch.totals[p] / done * 1e6 for p in PHASES_FIT}


def fit_many_phases(train: Dataset, steps: int, count: int = 16) -> dict[str, float]:
    """Microseconds per step of each phase of ``fit_many``'s inner loop (hard labels)."""
    batch = 128
    net = StackedMLP(
        [
            build_model("mlp", train.feature_shape, 10, seed=i, hidden=[128, 128])
            for i in range(count)
        ]
    )
    optimizer = StackedOptimizer(list(net.parameters()), "adam", [0.0] * count, 0.9)
    targets = StackedTargets.for_members([Member(seed=i) for i in range(count)], train)
    features = train.features.reshape(len(train), -1)
    batch_features = features.new_empty(count * batch, features.shape[1])
    per_epoch = len(train) // batch
    weights = torch.full((count, batch), 1.0 / batch)
    watch, done = Stopwatch(), 0
    while done < steps:
        order = torch.stack([torch.randperm(len(train))[: per_epoch * batch] for _ in range(count)])
        data_rows = _rows_by_step(order, per_epoch)
        table_rows = _rows_by_step(order, per_epoch, offset=len(train))
        for s in range(per_epoch):
            watch.start()
            torch.index_select(features, 0, data_rows[s], out=batch_features)
            watch.lap("gather")
            logits = net.train_forward(batch_features.view(count, batch, -1))
            watch.lap("forward")
            _, grad = targets.loss(logits, table_rows[s], weights)
            watch.lap("loss")
            net.train_backward(grad)
            watch.lap("backward")
            optimizer.step([1e-3] * count, [True] * count)
            watch.lap("optimizer")
            done += 1
    return {p: watch.totals[p] / done * 1e6 for p in PHASES_MANY}


def matmul_flops_per_step(net_sizes: list[int], batch: int, count: int) -> int:
    """FLOPs of the stacked matmuls of one step: forward, weight gradients, and input gradients
    of every layer but the first."""
    flops = 0
    for i, (a, b) in enumerate(zip(net_sizes[:-1], net_sizes[1:], strict=True)):
        flops += 2 * batch * a * b * (2 if i == 0 else 3)
    return flops * count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=280, help="steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = mnist1d(5000)
    train = split(data, 0.1, 0.2).train
    teacher = build_model("cnn1d", data.feature_shape, 10, seed=0, channels=[64, 64, 64])
    distill = Distillation(label(teacher, data), temperature=4.0, alpha=0.9)

    hard, stored, many = defaultdict(list), defaultdict(list), defaultdict(list)
    fit_phases(train, None, 56), fit_phases(train, distill, 56), fit_many_phases(train, 27)
    for _ in range(args.repeats):  # interleaved, so that machine noise hits each alike
        for table, result in (
            (hard, fit_phases(train, None, args.steps)),
            (stored, fit_phases(train, distill, args.steps)),
            (many, fit_many_phases(train, args.steps)),
        ):
            for phase, value in result.items():
                table[phase].append(value)

    def median(table: dict[str, list[float]], phase: str) -> float:
        return statistics.median(table[phase])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per step")
    print(f"\nfit, mlp 100-100, batch 128   {'hard':>8} {'stored KD':>10}")
    for phase in PHASES_FIT:
        print(f"  {phase:<28}{median(hard, phase):>8.0f} {median(stored, phase):>10.0f}")
    totals = [sum(median(t, p) for p in PHASES_FIT) for t in (hard, stored)]
    print(f"  {'step':<28}{totals[0]:>8.0f} {totals[1]:>10.0f}   ratio {totals[1] / totals[0]:.3f}")

    print("\nfit_many, 16 x mlp 40-128-128-10, batch 128")
    for phase in PHASES_MANY:
        print(f"  {phase:<28}{median(many, phase):>8.0f}")
    total = sum(median(many, p) for p in PHASES_MANY)
    matmul_seconds = (median(many, "forward") + median(many, "backward")) * 1e-6
    rate = matmul_flops_per_step([40, 128, 128, 10], 128, 16) / matmul_seconds / 1e9
    print(f"  {'step':<28}{total:>8.0f}")
    print(f"  forward + backward run at {rate:.0f} GFLOP/s (matmuls plus ReLU, bias and copies)")


if __name__ == "__main__":
    main()
