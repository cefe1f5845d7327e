"""Prompt / completion examples for language models: a JSON Lines file of
``{"prompt": ..., "completion": ...}`` objects (the format TRL's trainers read), one block each.

An example becomes the ids of its prompt, then of its completion and ``<eos>``, cut to one block
of ``block_length + 1`` and padded; only the positions that predict the completion (its tokens and
the ``<eos>``) count in a loss, so the student is neither trained nor measured on the prompt or the
padding. A position ``j`` predicts token ``j + 1``, so with a prompt of ``P`` tokens the span is
``[P - 1, P + C)``, ``C`` the completion's tokens with ``<eos>``, cut at the block's end.

The examples are the unit of the split (:func:`~softtargets.data.sequences.split_by_file` on
one name per example, ``FILE:LINE``): an example is never in two parts.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from softtargets.data.sequences import Piece
from softtargets.errors import SoftTargetsError

#: the suffix of a file of prompt / completion examples
EXAMPLES_SUFFIX = ".jsonl"

FORMAT = 'one JSON object a line, {"prompt": "...", "completion": "..."}'


def is_examples_file(path: str | Path) -> bool:
    return Path(path).suffix == EXAMPLES_SUFFIX


def example_pieces(path: str | Path, tokenizer: Any, block_length: int) -> Iterator[Piece]:
    """One :class:`~softtargets.data.sequences.Piece` per example of the JSON Lines file
    ``path``, read a line at a time (a file larger than memory is fine with a token file): its
    window ``(1, block_length + 1)`` and span ``(1, 2)``. Blank lines are skipped; a line that is
    not an example, or whose prompt leaves no completion token in a block, is one line naming it."""
    pad = getattr(tokenizer, "pad_id", tokenizer.eos_id)
    for number, line in _lines(path):
        prompt, completion = _example(line, f"{path}:{number}")
        prompt_ids = tokenizer.encode(prompt)
        ids = [*prompt_ids, *tokenizer.encode(completion), tokenizer.eos_id]
        first = max(len(prompt_ids) - 1, 0)  # a completion's first token needs one before it
        if first >= block_length:
            raise SoftTargetsError(
                f"{path}:{number}: the prompt is {len(prompt_ids)} tokens, so no completion token "
                f"fits a block of {block_length}; give a longer --block-length or a shorter prompt"
            )
        window = torch.full((1, block_length + 1), pad, dtype=torch.long)
        kept = ids[: block_length + 1]
        window[0, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        span = torch.tensor([[first, min(len(ids) - 1, block_length)]], dtype=torch.long)
        yield Piece(f"{path}:{number}", window, len(ids), span)


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a regular UTF-8 file, blank lines skipped."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise SoftTargetsError(f"{path}: cannot read it ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise SoftTargetsError(f"{path} is not a regular file; give a file of examples ({FORMAT})")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SoftTargetsError(f"{path}:{number}: not UTF-8 text; give {FORMAT}") from None
            if line.strip():
                yield number, line


def _example(line: str, where: str) -> tuple[str, str]:
    """``(prompt, completion)`` of one line; anything else is one line naming it."""
    try:
        given = json.loads(line)
    except json.JSONDecodeError as err:
        raise SoftTargetsError(f"{where}: not JSON ({err.msg}); give {FORMAT}") from None
    if not isinstance(given, dict):
        raise SoftTargetsError(f"{where}: a {type(given).__name__}, not an object; give {FORMAT}")
    parts = [given.get(key) for key in ("prompt", "completion")]
    if not all(isinstance(part, str) for part in parts):
        kinds = ", ".join(f"{k}: {type(given.get(k)).__name__}" for k in ("prompt", "completion"))
        raise SoftTargetsError(f"{where}: needs two strings ({kinds}); give {FORMAT}")
    return parts[0], parts[1]
