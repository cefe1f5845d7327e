"""Markdown to one self-contained HTML page (the subset the reports use), and the one reader of
the images a page embeds.

An image is embedded only when :func:`read_image` finds it a regular PNG file inside its study's
own folder, reached without a link and under :data:`MAX_IMAGE_BYTES`: a section that names any
other path (``/etc/shadow``, ``/dev/zero``, a link out of the folder) gets a one-line warning and
no image, so a shared or tampered study folder cannot make a report disclose a file.
"""

from __future__ import annotations

import base64
import html
import os
import re
import stat
import warnings
from pathlib import Path

from softtargets.files import SoftTargetsWarning

#: the largest image a report embeds (a study's figures are a few hundred KB)
MAX_IMAGE_BYTES = 20 << 20
_PNG = b"\x89PNG\r\n\x1a\n"


def read_image(folder: Path, name: str) -> bytes | None:
    """The bytes of image ``name`` (relative to ``folder``), or ``None`` with a one-line warning
    unless it is a PNG file inside ``folder``, every part of its path a real folder or file (no
    link), a regular file under :data:`MAX_IMAGE_BYTES`."""
    parts = Path(name).parts
    where = folder
    problem = None
    if not parts or Path(name).is_absolute() or ".." in parts:
        problem = "is not a file inside the study's folder"
    else:
        for part in parts:
            where = where / part
            try:
                info = os.lstat(where)
            except OSError:
                problem = "does not exist"
                break
            if stat.S_ISLNK(info.st_mode):
                problem = "is reached through a link"
                break
        else:
            if not stat.S_ISREG(info.st_mode):
                problem = "is not a regular file"
            elif info.st_size > MAX_IMAGE_BYTES:
                problem = f"is larger than {MAX_IMAGE_BYTES >> 20} MB"
    if problem is None:
        with open(where, "rb") as handle:
            data = handle.read(MAX_IMAGE_BYTES + 1)
        if not data.startswith(_PNG) or len(data) > MAX_IMAGE_BYTES:
            problem = "is not a PNG image"
        else:
            return data
    warnings.warn(
        f"{folder / name} {problem}; the report leaves that image out",
        SoftTargetsWarning,
        stacklevel=2,
    )
    return None


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\[(.+?)\]\((#[^)]+)\)", r'<a href="\2">\1</a>', text)


def to_html(markdown: str, images: dict[str, bytes]) -> str:
    """HTML for the Markdown subset the reports use (headings, paragraphs, tables, images);
    ``images`` holds the bytes of each image link, read by :func:`read_image` (a link without
    them is left out)."""
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
            if image[2] not in images:
                continue
            data = base64.b64encode(images[image[2]]).decode()
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
