"""What distillation bought, measured: the teacher beside the run's named student (a language
model's: per token, with its test bits per token).

Per model: parameters, weights file size, forward FLOPs per row, CPU latency per row at batch 1
and at batch 256, test accuracy with its 95% Wilson interval (the test set's own uncertainty for
one model), and agreement with the teacher. Latencies are medians of repeats measured side by side
in one process, the two models alternating, so a noisy machine slows both alike; the ratio is the
figure to read.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from softtargets.run.stats import wilson_interval
from softtargets.training.models import count_parameters, forward_flops

BATCHES = (1, 256)
#: repeats per batch size, and the wall time after which fewer are taken (a big teacher)
REPEATS, TIME_LIMIT = 25, 2.0


def latencies(models: dict[str, nn.Module], rows: Tensor) -> dict[str, dict[int, float]]:
    """Median seconds per row of each model at each of :data:`BATCHES`, ``rows`` ``(n, *shape)``
    cycled to the batch size; the models alternate within every repeat."""
    out: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch in BATCHES:
        x = rows[torch.arange(batch) % len(rows)].cpu()
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():  # warm-up: first calls allocate and pick kernels
                model(x)
                model(x)
            started = time.perf_counter()
            for repeat in range(REPEATS):
                order = list(models.items())
                for name, model in order if repeat % 2 == 0 else order[::-1]:
                    tic = time.perf_counter()
                    model(x)
                    times[name].append((time.perf_counter() - tic) / batch)
                if time.perf_counter() - started > TIME_LIMIT and repeat >= 4:
                    break
        for name in models:
            out[name][batch] = statistics.median(times[name])
    return out


def deployment_rows(
    teacher: nn.Module,
    student: nn.Module,
    teacher_record: dict[str, Any],
    student_record: dict[str, Any],
    file_bytes: dict[str, int],
    rows: Tensor,
) -> list[dict[str, Any]]:
    """One dict per model (``teacher``, ``student``) with the module doc's columns; both models
    are measured on the CPU, in eval mode, on ``rows`` ``(n, *shape)`` (the test rows)."""
    models = {"teacher": teacher.cpu().eval(), "student": student.cpu().eval()}
    timed = latencies(models, rows)
    records = {"teacher": teacher_record, "student": student_record}
    shape = tuple(rows.shape[1:])
    table = []
    for name, model in models.items():
        record = records[name]
        total = int(record["test_rows"])
        correct = total - int(round(record["test_errors"]))
        low, high = wilson_interval(correct, total)
        table.append(
            {
                "model": name,
                "parameters": count_parameters(model),
                "file_bytes": file_bytes[name],
                "flops": forward_flops(model, shape),
                "seconds_per_row_batch1": timed[name][1],
                "seconds_per_row_batch256": timed[name][256],
                "test_accuracy": record["test_accuracy"],
                "test_accuracy_low": low,
                "test_accuracy_high": high,
                "agreement": 1.0 if name == "teacher" else record.get("test_agreement"),
            }
        )
    return table


def language_model_rows(
    teacher: nn.Module,
    student: nn.Module,
    bits: dict[str, float],
    file_bytes: dict[str, int],
    blocks: Tensor,
) -> list[dict[str, Any]]:
    """:func:`deployment_rows` for language models: per model its parameters, weights file,
    CPU latency per token (blocks ``(n, L)`` of ids at batch 1 and 256, :func:`latencies`) and
    test ``bits`` per token."""
    models = {"teacher": teacher.cpu().eval(), "student": student.cpu().eval()}
    timed = latencies(models, blocks)
    length = blocks.shape[1]
    return [
        {"model": name, "parameters": count_parameters(model), "file_bytes": file_bytes[name],
         "seconds_per_token_batch1": timed[name][1] / length,
         "seconds_per_token_batch256": timed[name][256] / length, "test_bits": bits[name]}
        for name, model in models.items()
    ]  # fmt: skip


def language_model_markdown(table: list[dict[str, Any]], unit: str) -> str:
    """:func:`language_model_rows` as markdown, with the student-to-teacher ratios."""
    lines = [
        f"| model | parameters | file | latency per token, 1 block | per token, 256 blocks | "
        f"test bits per {unit} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {_size(r['file_bytes'])} | "
            f"{_time(r['seconds_per_token_batch1'])} | {_time(r['seconds_per_token_batch256'])} | "
            f"{r['test_bits']:.3f} |"
        )
    t, s = table
    lines.append(
        f"| student / teacher | {ratio_text(s['parameters'], t['parameters'])} | "
        f"{ratio_text(s['file_bytes'], t['file_bytes'])} | "
        f"{ratio_text(s['seconds_per_token_batch1'], t['seconds_per_token_batch1'])} | "
        f"{ratio_text(s['seconds_per_token_batch256'], t['seconds_per_token_batch256'])} | "
        f"{s['test_bits'] - t['test_bits']:+.3f} |"
    )
    return "\n".join(lines)


def deployment_markdown(table: list[dict[str, Any]]) -> str:
    """The table as markdown, with the student-to-teacher ratios as a last row."""
    header = (
        "| model | parameters | file | FLOPs per row | latency per row, batch 1 | "
        "latency per row, batch 256 | test accuracy (95% CI) | agrees with teacher |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [header]
    for r in table:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.2%}"
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {_size(r['file_bytes'])} | {r['flops']:,} | "
            f"{_time(r['seconds_per_row_batch1'])} | {_time(r['seconds_per_row_batch256'])} | "
            f"{r['test_accuracy']:.2%} ({r['test_accuracy_low']:.2%} to "
            f"{r['test_accuracy_high']:.2%}) | {agreement} |"
        )
    if len(table) == 2:
        t, s = table
        lines.append(
            f"| student / teacher | {ratio_text(s['parameters'], t['parameters'])} | "
            f"{ratio_text(s['file_bytes'], t['file_bytes'])} | {ratio_text(s['flops'], t['flops'])} | "
            f"{ratio_text(s['seconds_per_row_batch1'], t['seconds_per_row_batch1'])} | "
            f"{ratio_text(s['seconds_per_row_batch256'], t['seconds_per_row_batch256'])} | "
            f"{(s['test_accuracy'] - t['test_accuracy']) * 100:+.2f} points | |"
        )
    return "\n".join(lines)


def ratio_text(a: float, b: float) -> str:
    """``a / b`` as ``"0.34x"``, with two significant digits below 0.1 (``"0.0031x"``)."""
    if not b:
        return "-"
    ratio = a / b
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1024:,.1f} KB" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):,.1f} MB"


def _time(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.2f} ms"
