"""Prompt / completion examples for language models: a JSON Lines file of
``{"prompt": ..., "completion": ...}`` objects (the format TRL's trainers read), or of
conversations ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the
assistant's (written by the tokenizer's chat template: a Hugging Face tokenizer that has one),
one block each.

An example becomes the ids of its prompt, then of its completion and ``<eos>`` (a conversation's
completion is its last message as the template closes it, without another ``<eos>``), cut to one
block of ``block_length + 1`` and padded; only the positions that predict the completion count in
a loss, so the student is neither trained nor measured on the prompt or the padding. A position
``j`` predicts token ``j + 1``, so with a prompt of ``P`` tokens the span is ``[P - 1, P + C)``,
``C`` the completion's tokens, cut at the block's end.

The examples are the unit of the split (:func:`~softtargets.data.sequences.split_by_file` on
one name per example, ``FILE:LINE``): an example is never in two parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from softtargets.data.sequences import Piece
from softtargets.errors import SoftTargetsError
from softtargets.files import json_objects, text_lines

#: the suffix of a file of prompt / completion examples
EXAMPLES_SUFFIX = ".jsonl"

FORMAT = (
    'one JSON object a line, {"prompt": "...", "completion": "..."} or {"messages": [{"role": '
    '"user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
)


def is_examples_file(path: str | Path) -> bool:
    return Path(path).suffix == EXAMPLES_SUFFIX


def example_pieces(path: str | Path, tokenizer: Any, block_length: int) -> Iterator[Piece]:
    """One :class:`~softtargets.data.sequences.Piece` per example of the JSON Lines file
    ``path``, read a line at a time (a file larger than memory is fine with a token file): its
    window ``(1, block_length + 1)`` and span ``(1, 2)``. Blank lines are skipped; a line that is
    not an example, or whose prompt leaves no completion token in a block, is one line naming it."""
    pad = getattr(tokenizer, "pad_id", tokenizer.eos_id)
    fix = f"give {FORMAT}"
    number = 0
    lines = text_lines(path, "file of examples", fix)
    for number, given in json_objects(lines, str(path), fix):
        prompt, completion, closed = _example(given, f"{path}:{number}", tokenizer)
        prompt_ids = tokenizer.encode(prompt)
        ids = [*prompt_ids, *tokenizer.encode(completion), *([] if closed else [tokenizer.eos_id])]
        first = max(len(prompt_ids) - 1, 0)  # a completion's first token needs one before it
        stop = min(len(ids) - 1, block_length)
        if first >= block_length:
            raise SoftTargetsError(
                f"{path}:{number}: the prompt is {len(prompt_ids)} tokens, so no completion token "
                f"fits a block of {block_length}; give a longer --block-length or a shorter prompt"
            )
        if stop <= first:
            raise SoftTargetsError(f"{path}:{number}: the completion is empty; nothing to learn")
        window = torch.full((1, block_length + 1), pad, dtype=torch.long)
        kept = ids[: block_length + 1]
        window[0, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        span = torch.tensor([[first, stop]], dtype=torch.long)
        yield Piece(f"{path}:{number}", window, len(ids), span)
    if not number:
        raise SoftTargetsError(f"{path} holds no examples; {fix}")


def _example(given: dict[str, Any], where: str, tokenizer: Any) -> tuple[str, str, bool]:
    """``(prompt, completion, closed)`` text of one line's object (``closed``: the chat template
    ended the completion, so no ``<eos>`` follows); anything else is one line naming it."""
    if "messages" in given:
        return (*_conversation(given["messages"], where, tokenizer), True)
    parts = [given.get(key) for key in ("prompt", "completion")]
    if not all(isinstance(part, str) for part in parts):
        kinds = ", ".join(f"{k}: {type(given.get(k)).__name__}" for k in ("prompt", "completion"))
        raise SoftTargetsError(f"{where}: needs two strings ({kinds}); give {FORMAT}")
    return parts[0], parts[1], False


def _conversation(messages: Any, where: str, tokenizer: Any) -> tuple[str, str]:
    """A conversation's ``(prompt, completion)`` text by the tokenizer's chat template."""
    if not (
        isinstance(messages, list)
        and len(messages) >= 2
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )  # fmt: skip
    ):
        raise SoftTargetsError(
            f"{where}: messages must be two or more {{role, content}} objects of strings"
        )
    if messages[-1]["role"] != "assistant":
        raise SoftTargetsError(
            f"{where}: the last message is the {messages[-1]['role']}'s; the completion learnt is "
            "the assistant's last message"
        )
    chat = getattr(tokenizer, "chat", None)
    if chat is None:
        raise SoftTargetsError(
            f"{where}: a conversation needs a tokenizer with a chat template; give --tokenizer "
            "FOLDER (a Hugging Face tokenizer that has one), or prompt / completion examples"
        )
    try:
        return chat([{"role": m["role"], "content": m["content"]} for m in messages])
    except SoftTargetsError as err:
        raise SoftTargetsError(f"{where}: {err}") from None
