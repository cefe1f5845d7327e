"""Every report of a run or a study, in one place: the tables, the paired differences, the
distillation run's ``report.md``, a study's section and the gathered ``report.md`` /
``report.html`` of all studies (figures: :mod:`softtargets.run.figures`).

Every number over seeds is a mean with its 95% confidence interval; differences are paired by
seed.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softtargets.config import DistillConfig
from softtargets.errors import SoftTargetsError
from softtargets.files import parse_json, read_small_text
from softtargets.run.deployment import deployment_markdown
from softtargets.run.figures import plot_epoch_curves
from softtargets.run.folder import RunFolder, config_key, fit_records
from softtargets.run.html import _anchor, read_image, to_html
from softtargets.run.stats import (
    Estimate,
    Verdict,
    mean_ci,
    multiple_comparisons,
    paired_difference,
    paper_size,
    protocol_line,
)
from softtargets.training.selection import FitResult


def of_total(count: float, total: int) -> str:
    """An error count with its denominator: ``"59 of 2,000"``."""
    return f"{count:,.0f} of {total:,}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


STUDY_GLOB = "study-*/results.json"


def find_studies(runs: Path, order: Sequence[str] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, results.json) of every finished study under ``runs``, in ``order`` (study
    names; the others after them, by folder name)."""
    found = []
    needed = ("study", "title", "verdict", "config")
    for path in sorted(runs.glob(STUDY_GLOB)):
        try:
            result = parse_json(read_small_text(path, "results.json"), str(path))
        except SoftTargetsError as err:
            raise SoftTargetsError(f"{err}; re-run that study") from None
        missing = [k for k in needed if not isinstance(result, dict) or k not in result]
        if missing or not (path.parent / "section.md").is_file():
            what = f"no {missing[0]!r}" if missing else "no section.md beside it"
            raise SoftTargetsError(f"{path} has {what}; re-run that study")
        verdict = result["verdict"]
        shaped = (
            isinstance(result["study"], str)
            and isinstance(result["title"], str)
            and isinstance(result["config"], dict)
            and isinstance(verdict, dict)
            and all(isinstance(verdict.get(k), str) for k in ("claim", "label", "evidence"))
        )
        if not shaped:
            raise SoftTargetsError(
                f"{path}: its study, title, config or verdict (claim, label, evidence) is not "
                "what a study writes; re-run that study"
            )
        found.append((path.parent, result))
    order = list(order)
    rank = {name: i for i, name in enumerate(order)}
    found.sort(key=lambda item: rank.get(item[1]["study"], len(order)))
    return found


def build_report(
    runs: str | Path = "runs", out: str | Path | None = None, order: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out`` (default: ``runs``), the studies in
    ``order`` (the command passes the studies' own order)."""
    runs = Path(runs)
    out = Path(out) if out is not None else runs
    studies = find_studies(runs, order)
    if not studies:
        raise SoftTargetsError(
            f"no studies found under {runs}/ (looked for {STUDY_GLOB}); run `softtargets study NAME` "
            "first"
        )
    table = markdown_table(
        ["study", "claim", "paper's size", "verdict (95%)", "evidence"],
        [
            [
                f"[{r['study']}](#{_anchor(r['title'])})",
                r["verdict"]["claim"],
                paper_size(r.get("reported")),
                f"**{r['verdict']['label']}**"
                + (" (quick run)" if r["config"].get("quick") else ""),
                r["verdict"]["evidence"],
            ]
            for _, r in studies
        ],
    )
    sections, images = [], {}
    for directory, _ in studies:
        section = directory / "section.md"
        try:
            text = section.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SoftTargetsError(f"{section} cannot be read ({err}); re-run that study") from None
        # figure links are relative to the study directory; make them relative to the report.
        # Only images read_image vets are kept: a section cannot embed a file outside its folder.
        rel = Path(_relative(directory, out))

        def figure(match: re.Match[str], directory: Path = directory, rel: Path = rel) -> str:
            data = read_image(directory, match[2])
            if data is None:
                return ""
            images[(rel / match[2]).as_posix()] = data
            return f"![{match[1]}]({(rel / match[2]).as_posix()})"

        sections.append(re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", figure, text))
    markdown = "\n".join(
        [
            "# What soft targets do: measured",
            "",
            protocol_line(r for _, r in studies),
            "",
            VERDICT_RULES,
            "",
            table,
            "",
            multiple_comparisons(
                len(studies), sum(r["verdict"]["label"] != "inconclusive" for _, r in studies)
            ),  # fmt: skip
            "",
            *sections,
        ]
    )
    # runs/ holds the study folders too (shared=True); report.md and report.html are the only
    # files written here, and a report.md that softtargets did not write is never replaced.
    with RunFolder.open(out, shared=True) as folder:
        md_path = folder.write_text("report.md", markdown)
        html_path = folder.write_text("report.html", to_html(markdown, images))
    return md_path, html_path


VERDICT_RULES = (
    "Each claim is judged from its own measurements against the size the literature reports, "
    "declared before the results (studies/PROTOCOLS.md): **contradicted** when the 95% interval "
    "of the effect lies below zero; **absent** when the effect is equivalent to zero within the "
    "study's smallest effect of interest (two one-sided tests at 5%); **reproduced** when the "
    "interval lies above zero and reaches the paper's size; **weaker than reported** when it "
    "lies above zero but below it; **present** when it lies above zero and no paper states a "
    "size; **inconclusive** otherwise."
)


def _relative(directory: Path, out: Path) -> str:
    try:
        return str(directory.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(directory.resolve())


def test_accuracy(result: FitResult) -> float:
    """Test accuracy of the validation-selected epoch."""
    return float(result.selected.get("test_accuracy", float("nan")))


def grouped(
    rows: Iterable[dict[str, Any]], keys: Sequence[str], value: str
) -> dict[tuple, list[float]]:
    """``value`` of each row, grouped by the tuple of ``keys`` (in order of first appearance),
    each group sorted by seed so that groups can be paired."""
    groups: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append((row.get("seed", 0), float(row[value])))
    return {k: [v for _, v in sorted(pairs)] for k, pairs in groups.items()}


def curves(
    rows: Iterable[dict[str, Any]], line: str, x: str, value: str, x_scale: float = 1.0
) -> dict[str, dict[float, list[float]]]:
    """``{line value: {x value * x_scale: [value per seed]}}``, the input of :func:`plot_lines`."""
    out: dict[str, dict[float, list[float]]] = {}
    for (x_value, name), values in grouped(rows, [x, line], value).items():
        out.setdefault(str(name), {})[x_value * x_scale] = values
    return out


def summary_rows(
    rows: list[dict[str, Any]],
    keys: Sequence[str],
    value: str,
    label: str,
    scale: float = 100.0,
    digits: int = 2,
) -> list[dict[str, Any]]:
    """One row per group: the keys, the number of runs and ``mean ± 95% CI`` of ``value``."""
    out = []
    for key, values in grouped(rows, keys, value).items():
        out.append(
            {
                **dict(zip(keys, key, strict=True)),
                "runs": len(values),
                label: mean_ci(values).format(scale, digits),
            }
        )
    return out


def difference(
    rows: list[dict[str, Any]], keys: Sequence[str], value: str, better: tuple, worse: tuple
) -> Estimate:
    """Paired (by seed) difference ``better - worse`` of ``value`` between two groups."""
    groups = grouped(rows, keys, value)
    return paired_difference(groups[better], groups[worse])


def method_label(method: str) -> str:
    """How tables and logs name a student's targets: hard labels, Hinton's soft targets (KD) or
    another method's."""
    return {"hard": "hard labels", "kd": "teacher soft targets"}.get(
        method, f"teacher, {method.upper()}"
    )


def distill_rows(outcome: DistillOutcome) -> list[list[str]]:
    """Rows of the results table: model, targets, runs, test accuracy (%), test errors."""
    t = outcome.teacher
    rows = [
        [
            "teacher",
            "hard labels",
            "1",
            f"{t['test_accuracy'] * 100:.2f}",
            of_total(t["test_errors"], outcome.test_rows),
        ]
    ]
    for method in dict.fromkeys(["hard", "kd", *(r["method"] for r in outcome.results)]):
        acc, err = outcome.accuracies(method), outcome.errors(method)
        if acc:
            rows.append(
                [
                    "student",
                    method_label(method),
                    str(len(acc)),
                    mean_ci(acc).format(100),
                    f"{mean_ci(err).format(1, 1)} of {outcome.test_rows:,}",
                ]
            )
    return rows


def method_differences(outcome: DistillOutcome) -> list[str]:
    """For each method other than hard labels and KD: its paired test-accuracy difference from
    hard labels and from KD (95% CIs over the seeds both have)."""
    lines = []
    methods = dict.fromkeys(r["method"] for r in outcome.results)
    for method in methods:
        if method in ("hard", "kd"):
            continue
        parts = []
        for base, base_name in (("hard", "hard labels"), ("kd", "KD")):
            pair = _paired(outcome, method, base)
            if pair is not None:
                parts.append(f"minus {base_name} {pair}")
        lines.append(f"{method.upper()}: " + ("; ".join(parts) or "n/a (needs >= 2 seeds)"))
    return lines


def _paired(outcome: DistillOutcome, method: str, base: str) -> str | None:
    mine = {r["seed"]: r["test_accuracy"] for r in outcome.results if r["method"] == method}
    theirs = {r["seed"]: r["test_accuracy"] for r in outcome.results if r["method"] == base}
    seeds = sorted(set(mine) & set(theirs))
    if len(seeds) < 2:
        return None
    diff = paired_difference([mine[s] for s in seeds], [theirs[s] for s in seeds])
    return (
        f"{diff.format(100)} points [{diff.low * 100:+.2f}, {diff.high * 100:+.2f}], {diff.n} seeds"
    )


def soft_minus_hard(outcome: DistillOutcome) -> str:
    hard, soft = outcome.accuracies("hard"), outcome.accuracies("kd")
    if len(hard) != len(soft) or len(hard) < 2:
        return "n/a (needs >= 2 seeds of each)"
    diff = paired_difference(soft, hard)
    return (
        f"{diff.format(100)} points (95% CI {diff.low * 100:+.2f} to {diff.high * 100:+.2f}, "
        f"paired over {diff.n} seeds)"
    )


def _methods_paragraph(outcome: DistillOutcome) -> str:
    lines = method_differences(outcome)
    if not lines:
        return ""
    return "\n\nOther methods, paired over seeds (test accuracy, 95% CI):\n\n" + "\n".join(
        f"- {line}" for line in lines
    )


def write_report(outcome: DistillOutcome, config: DistillConfig, folder: RunFolder) -> Path:
    """Redraw ``accuracy.png`` and ``report.md`` from the run folder's files."""
    out = outcome.out_dir
    key = config_key(config)
    history = [
        r
        for r in fit_records(folder, "history.jsonl")
        if r["role"] == "student" and r["key"] == key
    ]
    names = {
        "hard": "student, hard labels",
        "kd": f"student, soft targets (T={config.temperature:g}, alpha={config.alpha:g})",
    }
    for r in history:
        r["curve"] = names.get(r["method"], r["method"])
    plot_epoch_curves(
        history,
        folder.path("accuracy.png"),
        group="curve",
        reference={"teacher (selected epoch)": outcome.teacher["test_accuracy"]},
        title=f"{config.data.name}: test accuracy per epoch",
    )
    s = outcome.results[0] if outcome.results else {}
    table = markdown_table(
        ["model", "targets", "runs", "test accuracy (%)", "test errors"], distill_rows(outcome)
    )
    text = f"""# Distillation run: {out.name}

Data: `{config.data.name}`{_streamed(config)}. {_teacher_sentence(outcome, config)}
Student: `{config.student.name}` {config.student.options} ({s.get("parameters", 0):,} parameters,
{s.get("flops", 0):,} FLOPs per sample). Soft targets: T = {config.temperature:g},
alpha = {config.alpha:g}.

{table}

Soft minus hard, test accuracy: {soft_minus_hard(outcome)}.{_methods_paragraph(outcome)}

Means over seeds with 95% Student-t confidence intervals. Each model's weights are those of its
best *validation* epoch; the test set is only evaluated, never used to choose anything.

![test accuracy per epoch](accuracy.png)
{_deployment_section(outcome)}
Files: `config.yaml` (resolved config), `history.jsonl` (every epoch), `results.jsonl` (every
fit), `store.safetensors` (teacher logits), `teacher.safetensors` (teacher weights),
`student-METHOD-seedS.safetensors` (every student), `student.safetensors` and `student.json` (the
run's student, chosen on validation: serve it with `softtargets predict --model {out.name}`, ship
it with `softtargets export --model {out.name} --format onnx`).
Wall time of this invocation: {outcome.seconds:.1f} s.
"""
    return folder.write_text("report.md", text)


def _streamed(config: DistillConfig) -> str:
    """How the rows were read, when not simply in memory."""
    if not config.data.stream:
        return ""
    if config.data.augment:
        return (
            ", streamed from disk, training rows augmented (random crop and horizontal flip); "
            "the soft-target students' teacher ran online on every augmented batch (the store "
            "holds the un-augmented rows' logits)"
        )
    return ", streamed from disk; the students learned from the stored logits"


def _teacher_sentence(outcome: DistillOutcome, config: DistillConfig) -> str:
    """Who the teacher was: a model, or (``--store``) only its stored logits."""
    t = outcome.teacher
    if config.store is not None:
        return (
            f"Teacher: the logits stored in `{config.store}` (no teacher model in this run; "
            "its test accuracy is that of the stored logits)."
        )
    pretrained = " (pretrained weights)" if t.get("pretrained") else ""
    return (
        f"Teacher: `{config.teacher.name}` {config.teacher.options}{pretrained}\n"
        f"({t['parameters']:,} parameters, {t['flops']:,} FLOPs per sample)."
    )


def _deployment_section(outcome: DistillOutcome) -> str:
    """The deployment table: what the distilled student costs to run beside the teacher."""
    if not outcome.deployment:
        return ""
    return f"""
## What distillation bought

The run's student (best validation accuracy of all its students) beside the teacher, both on
this machine's CPU. Latency is the median over repeats, measured side by side in one process;
accuracy intervals are 95% Wilson intervals over the {outcome.test_rows:,} test rows.

{deployment_markdown(outcome.deployment)}
"""


@dataclass
class StudyOutput:
    """What a study returns."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    figures: list[Path]
    verdict: Verdict
    notes: str = ""
    seeds: list[int] | None = None  # when the study used other seeds than the config's


def rows_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def section_markdown(title: str, output: StudyOutput, facts: dict[str, Any]) -> str:
    """The study's report section: claim, verdict, summary table, figures, notes, provenance."""
    v = output.verdict
    lines = [
        f"## {title}",
        "",
        f"**Claim:** {v.claim}",
        "",
        f"**Verdict: {v.label}** — {v.evidence}.",
        "",
    ]
    if output.summary:
        header: list[str] = []
        for row in output.summary:
            header += [k for k in row if k not in header]
        lines += [
            markdown_table(header, [[row.get(h, "") for h in header] for row in output.summary]),
            "",
        ]
    lines += [f"![{f.stem}]({f.name})" for f in output.figures] + [""]
    if output.notes:
        lines += [output.notes.strip(), ""]
    protocol = f"protocol version {facts['protocol']}; " if "protocol" in facts else ""
    lines += [
        f"Seeds {facts['seeds']}; {facts['seconds']} s; {protocol}command: `{facts['command']}`.",
        "",
    ]
    return "\n".join(lines)


@dataclass
class DistillOutcome:
    """Results of one run: the teacher's test metrics and one record per (method, seed)."""

    out_dir: Path
    teacher: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    test_rows: int = 0
    deployment: list[dict[str, Any]] = field(default_factory=list)

    def accuracies(self, method: str) -> list[float]:
        return [
            r["test_accuracy"]
            for r in sorted(self.results, key=lambda r: r["seed"])
            if r["method"] == method
        ]

    def errors(self, method: str) -> list[float]:
        return [
            r["test_errors"]
            for r in sorted(self.results, key=lambda r: r["seed"])
            if r["method"] == method
        ]
