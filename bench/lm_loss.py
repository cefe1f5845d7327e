"""Language-model distillation figures: the chunked loss's memory and time against the naive
one, and the bytes a per-position top-k store takes per token.

    python bench/lm_loss.py              # N = 8,192 positions, hidden 512, V = 32,000 (and 128,000
                                         # at N = 2,048: the naive loss there needs about 20 GB)

Memory is each loss's own peak (VmHWM of a fresh process minus its resident memory before the
loss); time is the median of repeats measured side by side in one process, the two alternating.
Prints one JSON object; ``run_all.py`` stores it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from softtargets.data.sequences import ByteTokenizer, pack_blocks, read_corpus, stdlib_files
from softtargets.losses.chunked import chunked_distillation_loss
from softtargets.losses.reference import method_loss
from softtargets.store.tokens import CODE_BITS, TokenStore, pack_bits
from softtargets.training.gpt import gpt
from softtargets.training.lm import fit_lm

HERE = str(Path(__file__).resolve().parent)

CHILD = """
import sys, torch
from softtargets.losses.chunked import chunked_distillation_loss
from softtargets.losses.reference import method_loss
kind, n, d, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
chunk = max(64, n // 16)
torch.manual_seed(0)
hidden = torch.randn(n, d, requires_grad=True)
weight = (torch.randn(v, d) * 0.02).requires_grad_()
t_hidden, t_weight = torch.randn(n, d), torch.randn(v, d) * 0.02
labels = torch.randint(0, v, (n,))
def resident():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = resident()
if kind == "naive":  # full logits, the teacher's too, log-softmax and KL by autograd
    loss = method_loss("kd", {}, hidden @ weight.T, t_hidden @ t_weight.T, labels, 2.0, 0.5)
else:  # chunks of N / 16 positions; the teacher's projection per chunk too
    loss = chunked_distillation_loss(hidden, weight, labels, lambda r: t_hidden[r] @ t_weight.T,
                                     temperature=2.0, alpha=0.5, chunk=chunk)
loss.backward()
print((peak() - before) / 1024)
"""


def peak_mb(kind: str, n: int, d: int, v: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(n), str(d), str(v)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(out.stdout.strip())


def seconds(n: int, d: int, v: int, repeats: int = 3) -> dict[str, float]:
    torch.manual_seed(0)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) * 0.02).requires_grad_()
    t_hidden, t_weight = torch.randn(n, d), torch.randn(v, d) * 0.02
    labels = torch.randint(0, v, (n,))

    def naive() -> None:
        loss = method_loss("kd", {}, hidden @ weight.T, t_hidden @ t_weight.T, labels, 2.0, 0.5)
        loss.backward()

    def chunked() -> None:
        loss = chunked_distillation_loss(
            hidden, weight, labels, lambda r: t_hidden[r] @ t_weight.T, temperature=2.0,
            alpha=0.5, chunk=max(64, n // 16),
        )  # fmt: skip
        loss.backward()

    times: dict[str, list[float]] = {"naive": [], "chunked": []}
    for repeat in range(repeats + 1):
        for name, run in (("naive", naive), ("chunked", chunked))[:: 1 if repeat % 2 else -1]:
            tic = time.perf_counter()
            run()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - tic)
            hidden.grad = weight.grad = None
    return {name: statistics.median(values) for name, values in times.items()}


def store_bytes_per_token(
    vocab: int = 128_000, top: int = 32, block: int = 256, blocks: int = 1000, runs: int = 10
) -> float:
    """The per-position store's size at ``vocab`` and ``top`` (its layout, computed) for a
    training split of ``blocks`` blocks whose ids fall in ``runs`` runs (files split apart)."""
    n = blocks * block
    bits = max(1, (vocab - 1).bit_length())
    ids = torch.cat([torch.arange(r * 2 * blocks, r * 2 * blocks + blocks // runs)
                     for r in range(runs)])  # fmt: skip
    store = TokenStore(
        ids, block, vocab, top, (1.0,), CODE_BITS, torch.full((blocks,), 0.1), bits,
        pack_bits(torch.randint(0, vocab, (n, top)), bits),
        pack_bits(torch.randint(0, 1 << CODE_BITS, (n, top)), CODE_BITS), torch.zeros(n).half(),
        torch.zeros(n, 1).half(), "b", "t",
    )  # fmt: skip
    return store.bytes_per_token


LABEL_CHILD = """
import sys, tempfile, torch
sys.path.insert(0, sys.argv[3])
from anon_peak import AnonPeak
from softtargets.data.sequences import blocks_of
from softtargets.store.tokens import label_tokens
from softtargets.training.gpt import gpt
where, count = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
tokens = torch.randint(0, 258, (count, 129), dtype=torch.int16)  # 258 bytes a block
blocks = blocks_of(tokens, torch.zeros(count, dtype=torch.long), ("f",), 258)
teacher = gpt(258, layers=1, heads=2, width=16, context=128)
with tempfile.TemporaryDirectory() as tmp:
    path = f"{tmp}/store.safetensors" if where == "file" else None
    with AnonPeak() as peak:  # a mapped store's pages are the file's, not anonymous memory
        store = label_tokens(teacher, blocks, top=32, path=path)
    print(peak.bytes / 2**20, len(store) * store.bytes_per_token / 2**20)
"""


def label_peak_mb(counts: tuple[int, ...] = (2_000, 8_000)) -> dict[str, Any]:
    """Peak anonymous memory of :func:`label_tokens` over ``count`` blocks of 128 (V = 258,
    top-32), the store written to a file as it is labelled or kept in memory, each run in a
    fresh process."""
    value = {}
    for count in counts:
        for where in ("file", "memory"):
            out = subprocess.run(
                [sys.executable, "-c", LABEL_CHILD, where, str(count), HERE],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            peak, size = (float(x) for x in out.stdout.split())
            value[f"{count:,} blocks, {where}"] = round(peak, 1)
        value[f"{count:,} blocks, store MB"] = round(size, 1)
    return {
        "value": value,
        "goal": "flat in N to a file",
        "detail": "peak anonymous RSS (MB, sampled every 5 ms) of label_tokens over N blocks of "
        "128 random tokens (V = 258, top-32, 1-layer gpt, batches of 8 blocks), the store "
        "written to a file as it is labelled, or kept in memory; a fresh process each",
    }


def resume_overhead(repeats: int = 6, blocks: int = 200) -> dict[str, Any]:
    """Whole ``fit_lm`` time with a checkpoint after every epoch / without, for the language-model
    demo's teacher (gpt, 4 layers, width 128: 13.5 MB of weights and AdamW state a checkpoint),
    interleaved."""
    corpus = pack_blocks(read_corpus(stdlib_files(8)), 128, ByteTokenizer().vocab_size)
    train, val = corpus.take(torch.arange(blocks)), corpus.take(torch.arange(blocks, blocks + 40))
    ratios = []
    for r in range(repeats):
        timed = {}
        for checkpointed in (False, True) if r % 2 == 0 else (True, False):  # either goes first
            torch.manual_seed(r)
            model = gpt(258, layers=4, width=128, context=128)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                fit_lm(model, train, val, None, epochs=3, seed=r,
                       checkpoint=f"{tmp}/fit.ckpt" if checkpointed else None)  # fmt: skip
                timed[checkpointed] = time.perf_counter() - start
        ratios.append(timed[True] / timed[False])
    return {
        "value": round(statistics.median(ratios), 3),
        "goal": "<= 1.05",
        "detail": f"fit_lm of 3 epochs, gpt 4 x 128 on {blocks} blocks of 128 bytes of the "
        "standard library's sources, a checkpoint after every epoch / none; median of "
        f"{repeats}",
    }


def measure(quick: bool = False) -> dict[str, Any]:
    n, d = (2048, 256) if quick else (8192, 512)
    sizes = [(n, 32_000), (max(n // 4, 512), 128_000)]
    memory = {
        f"N={rows:,}, V={v:,}": round(peak_mb("chunked", rows, d, v) / peak_mb("naive", rows, d, v), 3)
        for rows, v in sizes
    }  # fmt: skip
    timed = seconds(n, d, 32_000)
    return {
        "lm_loss_memory_ratio": {
            "value": memory,
            "goal": "<= 0.2",
            "detail": f"peak memory of the chunked loss / the naive one (full logits, KL by "
            f"autograd), hidden {d}, chunks of N / 16 positions, each in a fresh process",
        },
        "lm_loss_time_ratio": {
            "value": round(timed["chunked"] / timed["naive"], 3),
            "goal": "<= 1.2",
            "detail": f"N={n:,}, hidden {d}, V=32,000: chunked {timed['chunked']:.2f} s, naive "
            f"{timed['naive']:.2f} s (medians, side by side)",
        },
        "lm_store_bytes_per_token": {
            "value": round(store_bytes_per_token(), 4),
            "goal": "<= 100",
            "detail": "V = 128,000, k = 32, 1,000 blocks of 256 in 10 runs of ids: 17-bit ids "
            f"(68 bytes), {CODE_BITS}-bit codes ({4 * CODE_BITS}), a float16 maximum (2) and "
            "rest per temperature (2), block ids as runs (16 bytes a run), a float32 code "
            "step per block (4 bytes a block)",
        },
    }


if __name__ == "__main__":
    print(json.dumps(measure("--quick" in sys.argv), indent=2))
