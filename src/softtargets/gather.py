"""``softtargets report``: every study under ``runs/`` in one Markdown and one HTML report.

The report is rebuilt from the files the studies wrote (``results.json``, ``section.md``, the
figures): nothing is retrained, and every verdict is the one computed from the measured data.
The HTML is self-contained: figures are embedded as base64 PNGs.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from softtargets.errors import SoftTargetsError
from softtargets.report import markdown_table
from softtargets.runfolder import RunFolder

STUDY_GLOB = "study-*/results.json"


def find_studies(runs: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, results.json) of every finished study under ``runs``, in the studies' order."""
    from softtargets.studies import STUDIES

    found = []
    needed = ("study", "title", "verdict", "config")
    for path in sorted(runs.glob(STUDY_GLOB)):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SoftTargetsError(f"{path} is not valid JSON; re-run that study") from None
        missing = [k for k in needed if not isinstance(result, dict) or k not in result]
        if missing or not (path.parent / "section.md").is_file():
            what = f"no {missing[0]!r}" if missing else "no section.md beside it"
            raise SoftTargetsError(f"{path} has {what}; re-run that study")
        found.append((path.parent, result))
    order = list(STUDIES)
    found.sort(key=lambda item: order.index(item[1]["study"]) if item[1]["study"] in order else 99)
    return found


def build_report(runs: str | Path = "runs", out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out`` (default: ``runs``)."""
    runs = Path(runs)
    out = Path(out) if out is not None else runs
    studies = find_studies(runs)
    if not studies:
        raise SoftTargetsError(
            f"no studies found under {runs}/ (looked for {STUDY_GLOB}); run `softtargets study NAME` "
            "first"
        )
    table = markdown_table(
        ["study", "claim", "verdict (95%)", "evidence"],
        [
            [
                f"[{r['study']}](#{_anchor(r['title'])})",
                r["verdict"]["claim"],
                f"**{r['verdict']['label']}**"
                + (" (quick run)" if r["config"].get("quick") else ""),
                r["verdict"]["evidence"],
            ]
            for _, r in studies
        ],
    )
    sections = []
    for directory, _ in studies:
        text = (directory / "section.md").read_text()
        # figure links are relative to the study directory; make them relative to the report
        rel = Path(_relative(directory, out))
        text = re.sub(
            r"!\[([^\]]*)\]\(([^)]+)\)",
            lambda m, rel=rel: f"![{m[1]}]({(rel / m[2]).as_posix()})",
            text,
        )
        sections.append(text)
    markdown = "\n".join(
        [
            "# What soft targets do: measured",
            "",
            "Each claim is judged from its own measurements: **supported** when the 95% confidence "
            "interval of the effect lies above zero, **not supported** when it lies below, "
            "**inconclusive** when it contains zero.",
            "",
            table,
            "",
            multiple_comparisons(len(studies), sum(
                r["verdict"]["label"] != "inconclusive" for _, r in studies
            )),  # fmt: skip
            "",
            *sections,
        ]
    )
    # runs/ holds the study folders too (shared=True); report.md and report.html are the only
    # files written here, and a report.md that softtargets did not write is never replaced.
    with RunFolder.open(out, shared=True) as folder:
        md_path = folder.write_text("report.md", markdown)
        html_path = folder.write_text("report.html", to_html(markdown, out))
    return md_path, html_path


def multiple_comparisons(tests: int, decided: int) -> str:
    """The report's note on reading several 95% verdicts together."""
    return (
        f"**Reading {tests} verdicts together.** Each verdict is a separate two-sided test at "
        f"the 5% level, so even if soft targets did nothing, about {0.05 * tests:.1f} of "
        f"{tests} would be expected to come out decided by chance ({decided} came out "
        "supported or not supported here). Each study's primary statistic was fixed in its "
        "module docstring before its results existed; the other comparisons in a section are "
        f"secondary. To hold the chance of any false verdict at 5%, read each interval at "
        f"{100 - 5 / max(tests, 1):.2f}% (Bonferroni): a verdict whose interval barely "
        "excludes 0 may not survive that."
    )


def _relative(directory: Path, out: Path) -> str:
    try:
        return str(directory.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(directory.resolve())


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\[(.+?)\]\((#[^)]+)\)", r'<a href="\2">\1</a>', text)


def to_html(markdown: str, base: Path) -> str:
    """HTML for the Markdown subset the reports use (headings, paragraphs, tables, images)."""
    body, table = [], []

    def flush_table() -> None:
        if not table:
            return
        head, *rest = [
            [c.strip() for c in row.strip("|").split("|")] for row in table if "---" not in row
        ]
        body.append(
            "<table><thead><tr>"
            + "".join(f"<th>{_inline(c)}</th>" for c in head)
            + "</tr></thead><tbody>"
            + "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rest
            )
            + "</tbody></table>"
        )
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        image = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if image:
            path = base / image[2]
            data = base64.b64encode(path.read_bytes()).decode() if path.exists() else ""
            body.append(
                f'<figure><img alt="{html.escape(image[1])}" '
                f'src="data:image/png;base64,{data}"></figure>'
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            title = line[level:].strip()
            body.append(f'<h{level} id="{_anchor(title)}">{_inline(title)}</h{level}>')
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
        "td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>softtargets report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
