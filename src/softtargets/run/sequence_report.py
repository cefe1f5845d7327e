"""The report of a language-model run: bits per token (per byte, byte-level) over seeds, each method against next-token
cross-entropy (the classifier's report is :mod:`softtargets.run.report`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softtargets.config import DistillConfig
from softtargets.run.deployment import language_model_markdown
from softtargets.run.folder import RunFolder
from softtargets.run.report import markdown_table
from softtargets.run.stats import mean_ci, paired_difference


@dataclass
class SequenceOutcome:
    """Results of one language-model run: the teacher's record, one record per (method, seed)
    with losses in nats and bits per token (per byte: the tokenizer is byte-level), and the
    store's size."""

    out_dir: Path
    teacher: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    store_bytes_per_token: float | None = None  # None: no store, the teacher ran online
    seconds: float = 0.0
    unit: str = "byte"  # what a token is: a byte (built-in tokenizer) or a subword token
    #: what the split dealt out whole: a file, or a prompt / completion example
    split_unit: str = "file"
    #: the teacher beside the named student (:func:`~softtargets.run.deployment.language_model_rows`)
    deployment: list[dict[str, Any]] = field(default_factory=list)

    def bits(self, method: str) -> list[float]:
        return [
            r["test_bits_per_token"]
            for r in sorted(self.results, key=lambda r: r["seed"])
            if r["method"] == method
        ]


def sequence_rows(outcome: SequenceOutcome) -> list[list[str]]:
    """The language-model table: each model's test bits per byte (mean and 95% interval over
    seeds) and, for each distillation method, its paired difference from next-token CE."""
    teacher = outcome.teacher
    rows = (
        [["teacher", "next tokens", "1", f"{teacher['test_bits_per_token']:.3f}", "",
          f"{teacher['parameters']:,}"]]
        if "test_bits_per_token" in teacher
        else [["teacher", f"stored logits ({teacher.get('store', '')})", "", "", "", ""]]
    )  # fmt: skip
    hard = outcome.bits("hard")
    for method in dict.fromkeys(r["method"] for r in outcome.results):
        values = outcome.bits(method)
        parameters = next(r["parameters"] for r in outcome.results if r["method"] == method)
        versus = (
            paired_difference(values, hard).format(1, 3)
            if method != "hard" and len(values) == len(hard) > 1
            else ""
        )
        rows.append(["student", "next-token CE" if method == "hard" else method,
                     str(len(values)), mean_ci(values).format(1, 3), versus,
                     f"{parameters:,}"])  # fmt: skip
    return rows


def sequence_header(unit: str) -> list[str]:
    return ["model", "targets", "runs", f"test bits per {unit}", "minus next-token CE",
            "parameters"]  # fmt: skip


def _completions(outcome: SequenceOutcome) -> str:
    if outcome.split_unit != "example":
        return ""
    return " (one block each; the losses and bits count the completion's tokens only)"


def _teacher(config: DistillConfig) -> str:
    if config.store is not None:
        return f"the stored logits of `{config.store}` (labelled in another run)"
    return f"`{config.teacher.name}` {config.teacher.options}"


def _source(config: DistillConfig) -> str:
    if not config.on_policy and not config.store_top and config.store is None:
        return "from the teacher run online on every batch (no store)"
    if not config.on_policy:
        return "from the teacher's store"
    return (
        f"from the teacher run online, on-policy on {config.on_policy:.0%} of steps (the student "
        "samples the second half of each block and learns the teacher's distribution there, "
        "alpha = 1)"
    )


def _store(outcome: SequenceOutcome, config: DistillConfig, temperatures: str) -> str:
    if outcome.store_bytes_per_token is None:
        return "--store-top 0: its full logits at every position, none stored"
    return (
        f"its top-{config.store_top} store: {outcome.store_bytes_per_token:.1f} bytes per token, "
        f"the rest's mass kept at T = {temperatures}"
    )


def _deployment(outcome: SequenceOutcome) -> str:
    """The named student beside its teacher, or nothing (a run from another run's store)."""
    if not outcome.deployment:
        return ""
    return f"""## What the student costs to run

{language_model_markdown(outcome.deployment, outcome.unit)}

Latencies on this machine's CPU, medians of repeats with the two models alternating (the ratio is
the figure to read); the student is the run's named one, its bits those of its own test run.

"""


def write_sequence_report(
    outcome: SequenceOutcome, config: DistillConfig, folder: RunFolder
) -> Path:
    """``report.md`` of a language-model run."""
    temperatures = ", ".join(f"{t:g}" for t in (config.store_temperatures or [config.temperature]))
    text = f"""# Distillation run (language model): {outcome.out_dir.name}

Data: `{config.data.name}`, {"byte-level" if outcome.unit == "byte" else "subword"} tokens in blocks of {config.data.block_length}, split by
{outcome.split_unit}{_completions(outcome)}. Teacher: {_teacher(config)}. Student: `{config.student.name}`
{config.student.options}. Distillation at every position: alpha = {config.alpha:g} x the method
at T = {config.temperature:g} + (1 - alpha) x next-token cross-entropy, {_source(config)}
({_store(outcome, config, temperatures)}).

{markdown_table(sequence_header(outcome.unit), sequence_rows(outcome))}

Bits per {outcome.unit} on the held-out {outcome.split_unit}s (lower is better): means over seeds with 95% Student-t
intervals; differences are paired by seed (students of one seed start from the same weights).
Each model's weights are those of its best *validation* epoch; the test {outcome.split_unit}s choose nothing.

{_deployment(outcome)}Files: `config.yaml`, `results.jsonl` (every fit), `teacher.safetensors`, `store.safetensors`
(per position: top-k logits, packed token ids, the rest's log-sum-exp per temperature),
`student-METHOD-seedS.safetensors`, and the run's student (lowest validation loss) as
`student.safetensors` with `student.json`, for `softtargets predict` and `export`. Wall time of
this invocation: {outcome.seconds:.1f} s.
"""
    return folder.write_text("report.md", text)
