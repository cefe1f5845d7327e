"""TODO: run/html.py."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


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
