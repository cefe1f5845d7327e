"""Every performance figure of softtargets, measured side by side in one run.

    python bench/run_all.py [--quick] [--only FIGURE ...]

Prints a table and writes bench/results/latest.json (with ``--only``, the other figures already
there are kept, each with the date it was measured). Each figure is a ratio (or a size) measured
within this one process, with the variants interleaved and the median of several repeats taken,
because these machines are noisy: absolute seconds from different runs are not comparable.

| figure | what | goal |
| --- | --- | --- |
| vectorised_speedup | 16 MLP students (40-128-128-10, MNIST-1D) one after another / all at once | >= 4 |
| stored_vs_hard_epoch | distillation epoch from stored logits / hard-label epoch | <= 1.10 |
| online_vs_stored_epoch | epoch running the teacher online (DataLoader) / from stored logits | - |
| matmul_fraction | FLOP/s of a 512-wide MLP's training step (batch 256) / this machine's matmul FLOP/s | >= 0.5 |
| demo_seconds | wall time of `softtargets demo` (a fresh process, data cache warm) | < 60 |
| study_seconds | wall time of each study's default run, and of all of them | < 600 each, < 1800 in all |
| stored_vs_hard_epoch_k1000 | stored-logit / hard-label epoch at K = 1,000 | <= 1.15 |
| distill_memory_over_store | peak RSS of a stored-logit epoch beyond the loaded store, in store sizes (100k x 1,000) | <= 0.5 |
| topk_store_fraction_k1000 | file bytes of a top-32 store / the full store, K = 1,000 | <= 0.06 |
| stream_vs_memory_epoch | an epoch of ``fit`` through a DataLoader (``TensorRows``) / in memory | <= 1.5 |
| stream_peak_mb | peak anonymous RSS of a streamed epoch over a memory-mapped .npy, for two N | flat in N |
| label_peak_mb_in_k | peak memory of labelling 20,000 rows to disk at K = 10 and 10,000 | flat in K |
| fit_many_hard_mb_k1000 | peak RSS increase of ``fit_many``, 16 x mlp 40-32-1000, 20k rows, hard labels | <= 100 MB |
| label_peak_mb | peak memory of labelling N rows streamed to disk, for two N | flat in N |
| resume_overhead | a fit checkpointing after every epoch / without | <= 1.05 |
| methods_epoch_ratio | each distillation method's stored-logit epoch / hard-label epoch | <= 1.3 each |
| ddp_speedup_2proc | rows/s of an epoch on 2 torchrun processes / on 1 | >= 1.6 |
| lm_loss_memory_ratio, lm_loss_time_ratio | the chunked language-model loss / the naive one | <= 0.2, <= 1.2 |
| lm_store_bytes_per_token | a per-position top-32 store at V = 128,000 | <= 100 |
| lm_label_peak_mb | peak memory of labelling N blocks' per-position store to a file, for two N | flat in N |
| lm_resume_overhead | a language-model fit checkpointing after every epoch / without | <= 1.05 |
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lm_loss  # noqa: E402
from epoch_cost import epoch_seconds, online_epoch_seconds  # noqa: E402
from softtargets.data.builtin import mnist1d
from softtargets.data.dataset import Dataset, split
from softtargets.files import atomic_write_text
from softtargets.store.label import label
from softtargets.training.fit import fit
from softtargets.training.fit_many import Member, fit_many
from softtargets.training.models import build_model, forward_flops
from softtargets.training.objectives import Distillation


def vectorised_speedup(train: Dataset, val: Dataset, repeats: int, epochs: int) -> dict[str, Any]:
    def models() -> list[torch.nn.Module]:
        return [
            build_model("mlp", train.feature_shape, 10, seed=i, hidden=[128, 128])
            for i in range(16)
        ]

    serial, stacked, epoch_ratios = [], [], []
    for i, model in enumerate(models()[:2]):  # warm-up, not timed: first calls allocate, JIT-load
        fit(model, train, epochs=1, seed=i, device="cpu")
    fit_many(models()[:2], train, epochs=1, device="cpu")
    for _ in range(repeats):
        start = time.perf_counter()
        alone = [
            fit(model, train, val=val, epochs=epochs, seed=i, device="cpu")
            for i, model in enumerate(models())
        ]
        serial.append(time.perf_counter() - start)
        start = time.perf_counter()
        together = fit_many(
            models(),
            train,
            [Member(seed=i) for i in range(16)],
            val=val,
            epochs=epochs,
            device="cpu",
        )
        stacked.append(time.perf_counter() - start)
        # steady state: one epoch (with validation) of all 16, without the fixed setup costs
        serial_epoch = statistics.median(
            sum(r.history[e]["seconds"] for r in alone) for e in range(epochs)
        )
        epoch_ratios.append(
            serial_epoch / statistics.median(r["seconds"] for r in together[0].history)
        )
    ratios = [a / b for a, b in zip(serial, stacked, strict=True)]
    return {
        "value": statistics.median(ratios),
        "goal": ">= 4",
        "detail": f"16 x mlp 40-128-128-10, {epochs} epochs of {len(train)} rows: one after "
        f"another {statistics.median(serial):.2f} s, at once "
        f"{statistics.median(stacked):.2f} s; per epoch (no setup) "
        f"{statistics.median(epoch_ratios):.2f}x",
    }


def epoch_ratios(data: Dataset, train: Dataset, repeats: int) -> tuple[dict, dict]:
    teacher = build_model("cnn1d", data.feature_shape, 10, seed=0, channels=[64, 64, 64])
    store = label(teacher, data)
    distill = Distillation(store, temperature=4.0, alpha=0.9)
    flops = forward_flops(teacher, data.feature_shape) / forward_flops(
        build_model("mlp", data.feature_shape, 10, hidden=[100, 100]), data.feature_shape
    )
    a, b = [], []
    for r in range(repeats):

        def student(seed: int = r) -> torch.nn.Module:
            return build_model("mlp", data.feature_shape, 10, seed=seed, hidden=[100, 100])

        hard = epoch_seconds(student(), train, None)
        stored = epoch_seconds(student(), train, distill)
        online = online_epoch_seconds(student(), teacher, train, 4.0, 0.9)
        a.append(stored / hard)
        b.append(online / stored)
    return (
        {
            "value": statistics.median(a),
            "goal": "<= 1.10",
            "detail": "mlp 100-100 student, MNIST-1D, batch 128, T=4, alpha=0.9",
        },
        {
            "value": statistics.median(b),
            "goal": "-",
            "detail": f"teacher cnn1d 64-64-64 = {flops:.0f}x the student's FLOPs",
        },
    )


def resume_overhead(train: Dataset, repeats: int) -> dict[str, Any]:
    """Whole-fit time with a checkpoint after every epoch / without, for the demo's teacher
    (cnn1d 64-64-64, the largest state a run saves) and student (mlp 100-100), interleaved."""
    values = {}
    for name, builder in (
        ("teacher cnn1d", lambda seed: build_model("cnn1d", train.feature_shape, 10, seed=seed,
                                                   channels=[64, 64, 64])),
        ("student mlp", lambda seed: build_model("mlp", train.feature_shape, 10, seed=seed,
                                                 hidden=[100, 100])),
    ):  # fmt: skip
        ratios = []
        for r in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                common = dict(epochs=3, lr=1e-2, device="cpu")
                plain = fit(builder(r), train, **common).seconds
                saved = fit(builder(r), train, checkpoint=f"{tmp}/fit.ckpt", **common).seconds
            ratios.append(saved / plain)
        values[name] = round(statistics.median(ratios), 3)
    return {
        "value": values,
        "goal": "<= 1.05",
        "detail": "fit of 3 epochs on MNIST-1D's training rows with a checkpoint (safetensors + "
        "JSON, atomic) after every epoch / without; median over repeats",
    }


DDP_CHILD = """
import statistics, sys, torch
torch.set_num_threads(1)
from softtargets import distributed
from softtargets.data.dataset import Dataset
from softtargets.training.models import build_model
from softtargets.training.fit import fit
distributed.setup()
gen = torch.Generator().manual_seed(0)
data = Dataset.from_arrays(torch.randn(16_384, 256, generator=gen), torch.arange(16_384) % 10)
model = build_model("mlp", (256,), 10, seed=0, hidden=[1024, 1024])
result = fit(model, data, epochs=3, batch_size=1024, lr=1e-3, device="cpu")
if distributed.is_main():
    print(len(data) / statistics.median(h["seconds"] for h in result.history))
"""


def ddp_speedup_2proc(repeats: int) -> dict[str, Any]:
    """Rows a second of one training epoch, 2 processes x 1 thread (torchrun, gloo) / 1 x 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ratios, one_rates, two_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ddp_child.py"
        script.write_text(DDP_CHILD)
        for _ in range(repeats):
            one = float(
                subprocess.run(
                    [sys.executable, str(script)],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()[-1]
            )
            launch = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                str(script),
            ]
            two = float(subprocess.run(launch, env=env, check=True, capture_output=True,
                                       text=True).stdout.split()[-1])  # fmt: skip
            ratios.append(two / one)
            one_rates.append(one)
            two_rates.append(two)
    return {
        "value": statistics.median(ratios),
        "goal": ">= 1.6",
        "detail": "mlp 256-1024-1024-10, 16,384 rows, batch 1,024 (512 a process), Adam: rows/s "
        f"of an epoch, {statistics.median(two_rates):,.0f} on 2 processes x 1 thread vs "
        f"{statistics.median(one_rates):,.0f} on 1 x 1",
    }


def methods_epoch_ratio(data: Dataset, train: Dataset, repeats: int) -> dict[str, Any]:
    """Each distillation method's stored-logit epoch / the hard-label epoch, same student."""
    from softtargets.losses.methods import LOGIT_METHODS

    teacher = build_model("cnn1d", data.feature_shape, 10, seed=0, channels=[64, 64, 64])
    store = label(teacher, data)
    variants = {m: (m, {}) for m in LOGIT_METHODS}
    variants.update({f"{m}+standardize": (m, {"standardize": True}) for m in ("kd", "dkd")})
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):

        def student(seed: int = r) -> torch.nn.Module:
            return build_model("mlp", data.feature_shape, 10, seed=seed, hidden=[100, 100])

        hard = epoch_seconds(student(), train, None)
        for name, (method, options) in variants.items():
            targets = Distillation(store, 4.0, 0.9, method=method, options=options)
            ratios[name].append(epoch_seconds(student(), train, targets) / hard)
    return {
        "value": {m: round(statistics.median(v), 2) for m, v in ratios.items()},
        "goal": "<= 1.3 each",
        "detail": "mlp 100-100 student, MNIST-1D, batch 128, T=4, alpha=0.9; every method a "
        "closed-form gradient, kd included (losses.closed, one form for every trainer; the "
        "teacher's side tabled once per row)",
    }


def matmul_fraction(repeats: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    width, batch, steps = 512, 256, 40
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_arrays(
        torch.randn(batch * steps, width, generator=gen),
        torch.randint(0, 10, (batch * steps,), generator=gen),
    )
    model = build_model("mlp", (width,), 10, seed=0, hidden=[width, width, width])
    counter = FlopCounterMode(display=False)
    with counter:  # forward and backward of one training step
        loss = torch.nn.functional.cross_entropy(model(data.features[:batch]), data.labels[:batch])
        loss.backward()
    step_flops = counter.get_total_flops()
    a = torch.randn(1024, 1024, generator=gen)
    b = torch.randn(1024, 1024, generator=gen)
    fractions, achieved, peak = [], [], []
    for _ in range(repeats):
        step_seconds = epoch_seconds(model, data, None, epochs=2, batch_size=batch) / steps
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        matmul = 2 * 1024**3 * 20 / (time.perf_counter() - start)
        achieved.append(step_flops / step_seconds)
        peak.append(matmul)
        fractions.append(achieved[-1] / matmul)
    return {
        "value": statistics.median(fractions),
        "goal": ">= 0.5",
        "detail": f"mlp {width}-{width}-{width}-10, batch {batch}, float32: "
        f"{statistics.median(achieved) / 1e9:.0f} GFLOP/s of "
        f"{statistics.median(peak) / 1e9:.0f} (1024x1024 matmul)",
    }


def demo_seconds() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "softtargets", "demo", "--out", f"{tmp}/demo"],
            check=True,
            capture_output=True,
        )
        return {
            "value": time.perf_counter() - start,
            "goal": "< 60",
            "detail": "softtargets demo in a fresh process",
        }


def study_seconds(quick: bool) -> dict[str, Any]:
    try:
        from softtargets.studies import STUDIES
    except ImportError:
        return {"value": None, "goal": "< 600 each", "detail": "no studies in this version"}
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in STUDIES:
            start = time.perf_counter()
            command = [sys.executable, "-m", "softtargets", "study", name, "--out", f"{tmp}/{name}"]
            subprocess.run(
                command + (["--quick"] if quick else []), check=True, capture_output=True
            )
            seconds[name] = round(time.perf_counter() - start, 1)
    seconds["total"] = round(sum(seconds.values()), 1)
    return {
        "value": seconds,
        "goal": "< 600 each, < 1800 in all",
        "detail": "default runs" if not quick else "--quick runs",
    }


def run_child(script: str, *args: Any) -> float:
    """Run ``script`` in a fresh Python (memory figures need a process of their own) and return
    the number it prints."""
    out = subprocess.run(
        [sys.executable, "-c", script, *(str(a) for a in args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return round(float(out.stdout.strip()), 3)


LABEL_CHILD = """
import sys, torch
from softtargets.training.models import build_model
from softtargets.store.write import label_to_file
rows, chunk = int(sys.argv[1]), 65536
k = int(sys.argv[3]) if len(sys.argv) > 3 else 10
teacher = build_model("mlp", (40,), k, seed=0, hidden=[64])
def batches():
    gen = torch.Generator().manual_seed(0)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        yield torch.randn(n, 40, generator=gen), torch.arange(start, start + n)
label_to_file(teacher, batches(), rows, sys.argv[2], [str(c) for c in range(k)])
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would report its parent's peak
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


def label_peak_mb(sizes: list[int]) -> dict[str, Any]:
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            peaks[f"{rows:,} rows"] = round(run_child(LABEL_CHILD, str(rows), f"{tmp}/s"), 1)
    return {
        "value": peaks,
        "goal": "flat in rows",
        "detail": "streamed in 65,536-row chunks, mlp 40-64-10 teacher, peak RSS of the process",
    }


FIT_MANY_HARD_CHILD = """
import torch
from softtargets.data.dataset import Dataset
from softtargets.training.models import build_model
from softtargets.training.fit_many import Member, fit_many
def status(key):  # kB -> MB, from the kernel's own counters
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) / 1024
rows, k = 20_000, 1000
gen = torch.Generator().manual_seed(0)
data = Dataset.from_arrays(torch.randn(rows, 40, generator=gen), torch.arange(rows) % k)
models = [build_model("mlp", (40,), k, seed=i, hidden=[32]) for i in range(16)]
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
fit_many(models, data, [Member(seed=i) for i in range(16)], epochs=1)
print(status("VmHWM:") - before)
"""


def fit_many_hard_mb_k1000() -> dict[str, Any]:
    return {
        "value": round(run_child(FIT_MANY_HARD_CHILD), 1),
        "goal": "<= 100",
        "detail": "peak RSS during fit_many minus RSS before (MB; Linux VmHWM reset by "
        "clear_refs), 16 x mlp 40-32-1000, 20k rows, hard labels",
    }


def many_class_data(rows: int, k: int) -> tuple[Dataset, Any]:
    """Random features, labels and teacher logits for ``k`` classes (timing and memory only)."""
    from softtargets.store.store import SoftTargetStore

    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_arrays(
        torch.randn(rows, 40, generator=gen), torch.arange(rows) % k, name=f"random-{k}"
    )
    logits = 3 * torch.randn(rows, k, generator=gen)
    store = SoftTargetStore(logits, data.ids.clone(), "t" * 16, data.fingerprint, data.class_names)
    return data, store


def stored_vs_hard_epoch_k1000(repeats: int) -> dict[str, Any]:
    data, store = many_class_data(10_000, 1000)
    distill = Distillation(store, temperature=4.0, alpha=0.9)
    ratios, setups = [], []
    for r in range(repeats):

        def student(seed: int = r) -> torch.nn.Module:
            return build_model("mlp", data.feature_shape, 1000, seed=seed, hidden=[100, 100])

        hard = epoch_seconds(student(), data, None)
        start = time.perf_counter()
        result = fit(student(), data, distill, epochs=3, lr=1e-2, device="cpu")
        stored = statistics.median(h["seconds"] for h in result.history)
        setups.append(time.perf_counter() - start - sum(h["seconds"] for h in result.history))
        ratios.append(stored / hard)
    return {
        "value": statistics.median(ratios),
        "goal": "<= 1.15",
        "detail": "mlp 40-100-100-1000, 10k rows, batch 128, T=4, alpha=0.9: stored-logit "
        f"epoch / hard-label epoch; setup inside fit {statistics.median(setups):.2f} s",
    }


DISTILL_MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from anon_peak import AnonPeak
from run_all import many_class_data
from softtargets.training.models import build_model
from softtargets.store.store import SoftTargetStore
from softtargets.training.objectives import Distillation
from softtargets.training.fit import fit
data, store = many_class_data(100_000, 1000)
store.save(sys.argv[1])
del store
store = SoftTargetStore.load(sys.argv[1], data=data)  # as a user would: from the file
student = build_model("mlp", (40,), 1000, seed=0, hidden=[100])
with AnonPeak() as peak:  # the loaded store's pages are the file's (safetensors maps it)
    fit(student, data, Distillation(store, 4.0, 0.9), epochs=1, batch_size=256, lr=1e-2)
print(peak.bytes / store.logits.numel() / store.logits.element_size())
"""


def distill_memory_over_store() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        value = run_child(DISTILL_MEMORY_CHILD, f"{tmp}/store.safetensors", HERE)
    return {
        "value": round(value, 3),
        "goal": "<= 0.5 (1.5 with the loaded store)",
        "detail": "peak anonymous memory (sampled every 5 ms) during one stored-logit epoch "
        "beyond the loaded store, in store sizes; 100k rows x K = 1,000 (381 MB), mlp "
        "40-100-1000; the store's own pages are the file's (safetensors maps it)",
    }


def topk_store_fraction_k1000() -> dict[str, Any]:
    data, store = many_class_data(2_000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        full = store.save(f"{tmp}/full.safetensors").stat().st_size
        top = store.top_k(32).save(f"{tmp}/top.safetensors").stat().st_size
    return {
        "value": round(top / full, 4),
        "goal": "<= 0.06",
        "detail": "file bytes of a top-32 store / the full store, K = 1,000, float32 logits "
        "(int16 class indices, one float32 tail a row)",
    }


def stream_vs_memory_epoch(train: Dataset, repeats: int) -> dict[str, Any]:
    """An epoch of ``fit`` on streamed data (``TensorRows`` through a DataLoader) / in memory."""
    from epoch_cost import epoch_seconds
    from softtargets.data.streams import TensorRows

    ratios = []
    for r in range(repeats):

        def student(seed: int = r) -> torch.nn.Module:
            return build_model("mlp", train.feature_shape, 10, seed=seed, hidden=[100, 100])

        memory = epoch_seconds(student(), train, None)
        ratios.append(epoch_seconds(student(), TensorRows(train), None) / memory)
    return {
        "value": statistics.median(ratios),
        "goal": "<= 1.5",
        "detail": "mlp 100-100, MNIST-1D, batch 128, hard labels: DataLoader epoch / in-memory",
    }


STREAM_CHILD = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[3])
from anon_peak import AnonPeak
from softtargets.training.models import build_model
from softtargets.data.streams import ArrayRows
from softtargets.training.fit import fit
rows, folder = int(sys.argv[1]), sys.argv[2]
x = np.lib.format.open_memmap(f"{folder}/x.npy", "w+", np.float32, (rows, 40))
for start in range(0, rows, 1 << 18):  # written in chunks: never all in memory
    n = min(1 << 18, rows - start)
    x[start : start + n] = np.random.default_rng(start).standard_normal((n, 40), np.float32)
x.flush()
del x
np.save(f"{folder}/y.npy", np.arange(rows) % 10)
with AnonPeak(0.01) as peak:  # mapped file pages are the page cache's, reclaimable
    data = ArrayRows(f"{folder}/x.npy", f"{folder}/y.npy")
    fit(build_model("mlp", (40,), 10, seed=0, hidden=[32]), data, epochs=1, batch_size=1024)
print(peak.total / 2**20)
"""


def stream_peak_mb(sizes: list[int]) -> dict[str, Any]:
    peaks = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            peaks[f"{rows:,} rows"] = round(run_child(STREAM_CHILD, str(rows), tmp, HERE), 1)
    return {
        "value": peaks,
        "goal": "flat in rows",
        "detail": "one streamed epoch over a memory-mapped .npy (40 float32 features), mlp "
        "40-32-10, batch 1024; peak anonymous RSS (MB, sampled every 10 ms)",
    }


def label_peak_mb_in_k(rows: int = 20_000) -> dict[str, Any]:
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (10, 10_000):
            peaks[f"K = {k:,}"] = round(run_child(LABEL_CHILD, str(rows), f"{tmp}/s", str(k)), 1)
    return {
        "value": peaks,
        "goal": "flat in K",
        "detail": f"label_to_file of {rows:,} rows in 65,536-row chunks, mlp 40-64-K teacher, "
        "peak RSS of the process",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="softtargets performance figures")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    parser.add_argument(
        "--only",
        action="append",
        metavar="FIGURE",
        help="measure only this figure (repeatable); the others in latest.json are kept, each "
        "with the date it was measured and whether that run was --quick",
    )
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    # name -> how to measure it (a pair of names for the two ratios measured together)
    figures: dict[str | tuple[str, str], Any] = {
        "vectorised_speedup": lambda: vectorised_speedup(parts.train, parts.val, repeats, 3),
        ("stored_vs_hard_epoch", "online_vs_stored_epoch"): lambda: epoch_ratios(
            data, parts.train, repeats + 2
        ),
        "matmul_fraction": lambda: matmul_fraction(repeats),
        "demo_seconds": demo_seconds,
        "study_seconds": lambda: study_seconds(args.quick),
        "label_peak_mb": lambda: label_peak_mb(
            [100_000, 1_000_000] if not args.quick else [20_000, 100_000]
        ),
        "label_peak_mb_in_k": label_peak_mb_in_k,
        "fit_many_hard_mb_k1000": fit_many_hard_mb_k1000,
        "stored_vs_hard_epoch_k1000": lambda: stored_vs_hard_epoch_k1000(repeats),
        "distill_memory_over_store": distill_memory_over_store,
        "topk_store_fraction_k1000": topk_store_fraction_k1000,
        "stream_vs_memory_epoch": lambda: stream_vs_memory_epoch(parts.train, repeats + 2),
        "resume_overhead": lambda: resume_overhead(parts.train, repeats),
        "methods_epoch_ratio": lambda: methods_epoch_ratio(data, parts.train, repeats),
        "ddp_speedup_2proc": lambda: ddp_speedup_2proc(3 if not args.quick else 1),
        "stream_peak_mb": lambda: stream_peak_mb(
            [1_000_000, 4_000_000] if not args.quick else [100_000, 400_000]
        ),
        "lm_label_peak_mb": lm_loss.label_peak_mb,
        "lm_resume_overhead": lm_loss.resume_overhead,
        ("lm_loss_memory_ratio", "lm_loss_time_ratio", "lm_store_bytes_per_token"): lambda: tuple(
            lm_loss.measure(args.quick).values()
        ),
    }
    names = {n for key in figures for n in (key if isinstance(key, tuple) else (key,))}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        parser.error(
            f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}"
        )
    # the figures' data, once the names are known good (the lambdas read it when called)
    data = mnist1d(5000)
    parts = split(data, 0.1, 0.2)
    date = time.strftime("%Y-%m-%d %H:%M")
    results: dict[str, Any] = {}
    for key, measure in figures.items():
        keys = key if isinstance(key, tuple) else (key,)
        if args.only and not set(keys) & set(args.only):
            continue
        values = measure()
        for name, value in zip(keys, values if isinstance(key, tuple) else (values,), strict=True):
            results[name] = {**value, "measured": date, "quick": args.quick}
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(f"machine: {machine}")
    print(f"{'figure':<24} {'value':>26}  {'goal':<12} detail")
    for name, r in results.items():
        value = r["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else json.dumps(value)
        print(f"{name:<24} {shown:>26}  {r['goal']:<12} {r['detail']}")
    path = HERE / "results" / "latest.json"
    if args.only and path.exists():  # keep the figures not measured now, with their dates
        earlier = json.loads(path.read_text())
        kept = {
            name: {"measured": earlier["date"], "quick": earlier["quick"], **value}
            for name, value in earlier["results"].items()
        }
        results = {**kept, **results}
    payload = {
        "machine": machine,
        "date": date,
        "quick": args.quick,
        "results": results,
    }
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
