"""Serve and ship a saved model: class probabilities for a file's rows (``predict``), and the model
in a deployable format (``export``), checked against PyTorch on real rows.

| format | file | read back with |
| --- | --- | --- |
| ``safetensors`` | ``NAME.safetensors`` and ``NAME.json`` | ``softtargets predict``, :func:`load_saved` |
| ``pt2`` | ``NAME.pt2`` (``torch.export``, batch dimension dynamic; a language model's sequence length too) | ``torch.export.load(f).module()`` |
| ``onnx`` | ``NAME.onnx`` (the ``onnx`` extra; opset of the dynamo exporter) | ``onnxruntime.InferenceSession`` |

Every export is loaded back and run on the check rows (the run's test rows, or the rows of
``--data``); the largest absolute difference of its logits from PyTorch's is returned and reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softtargets.data.dataset import Dataset
from softtargets.data.files import load_data
from softtargets.data.sequences import Blocks, ByteTokenizer, blocks_in_memory
from softtargets.data.text import load_text
from softtargets.errors import SoftTargetsError, first_line
from softtargets.extras import require
from softtargets.run.sequence_data import SavedTokenizer, corpus_pieces
from softtargets.run.students import SavedModel, load_saved
from softtargets.store.label import predict_logits
from softtargets.training.lm import next_token_loss, sample_continuations

FORMATS = ("safetensors", "pt2", "onnx")


def text_reader(saved: SavedModel) -> ByteTokenizer | SavedTokenizer:
    """The tokenizer a saved language model reads text with (the built-in byte-level one, or
    the tokenizer folder it was trained with)."""
    assert saved.language_model is not None
    folder = saved.language_model.get("tokenizer")
    return ByteTokenizer() if folder is None else SavedTokenizer(folder)


def text_blocks(saved: SavedModel, path: str | Path, reader: Any = None) -> Blocks:
    """A text file in the saved language model's blocks (its block length; the tail shorter than
    a block dropped), or a ``.jsonl`` file's prompt / completion examples, a block each; a file
    shorter than a block is one line. ``reader``: its :func:`text_reader`, when the caller holds
    it (a tokenizer folder is read once for many files)."""
    assert saved.language_model is not None
    length = int(saved.language_model["block_length"])
    pieces = list(corpus_pieces([Path(path)], reader or text_reader(saved), length))
    if not sum(len(piece.windows) for piece in pieces):
        raise SoftTargetsError(
            f"{path} is shorter than one block of {length} tokens; give more text"
        )
    return blocks_in_memory(pieces, length, int(saved.language_model["vocab_size"]))


def score_text(saved: SavedModel, path: str | Path, reader: Any = None) -> tuple[int, float]:
    """``(tokens, bits per token)``: the saved language model's next-token loss on a text file,
    or on the completions of a file of examples (``reader`` as :func:`text_blocks` takes it)."""
    blocks = text_blocks(saved, path, reader)
    return blocks.positions, next_token_loss(saved.model, blocks) / math.log(2)


def generate_text(
    saved: SavedModel, prompt: str, tokens: int, temperature: float = 1.0, seed: int = 0
) -> str:
    """The prompt and ``tokens`` new tokens after it from the saved language model, sampled at
    ``temperature`` (seeded), decoded; the prompt and the tokens must fit the model's context."""
    if tokens < 1 or temperature <= 0:
        raise SoftTargetsError("--tokens must be at least 1 and --temperature above 0")
    reader = text_reader(saved)
    ids = reader.encode(prompt) if prompt else [reader.eos_id]  # no prompt: a document's start
    context = int(getattr(saved.model, "context", saved.language_model["block_length"]))
    if len(ids) + tokens > context:
        raise SoftTargetsError(
            f"the prompt ({len(ids)} tokens) and --tokens {tokens} exceed the model's context of "
            f"{context} tokens; ask for fewer tokens or give a shorter prompt"
        )
    start = torch.tensor([*ids, *[0] * tokens])[None, :]
    drawn = sample_continuations(
        saved.model, start, len(ids), torch.Generator().manual_seed(seed), temperature
    )
    return reader.decode(drawn[0].tolist())  # as a whole: a subword decoder spaces its tokens


def read_rows(saved: SavedModel, path: str | Path, label_column: str | None = None) -> Dataset:
    """The rows of ``path`` as the saved model reads them (a text model's through its tokenizer);
    labels are optional: these are rows to predict."""
    text = saved.meta.get("text")
    if text:
        return load_text(
            path,
            text["tokenizer"],
            text["text_column"],
            label_column,
            int(text["max_length"]),
            labelled=False,
        )
    return load_data(str(path), label_column, labelled=False)


def check_rows(saved: SavedModel, data: Dataset, source: str) -> None:
    """Refuse rows of another shape than the model reads, in one line."""
    if tuple(data.feature_shape) != saved.in_shape:
        raise SoftTargetsError(
            f"{source} has rows of shape {tuple(data.feature_shape)}, but the model reads "
            f"{saved.in_shape}; give data of the form it was trained on"
        )


def predict_probabilities(saved: SavedModel, data: Dataset, source: str) -> Tensor:
    """``(N, K)`` class probabilities of ``data``'s rows, in the model's class order."""
    check_rows(saved, data, source)
    logits = predict_logits(saved.model, data.features, 1024, torch.device("cpu"))
    return logits.float().softmax(1)


@dataclass
class Exported:
    """An exported file and how far its logits are from PyTorch's on the check rows."""

    path: Path
    payload: bytes
    max_abs_difference: float
    rows: int


def export_model(saved: SavedModel, fmt: str, rows: Tensor, name: str = "student") -> Exported:
    """``saved`` in format ``fmt`` (:data:`FORMATS`) as bytes, checked on ``rows``
    ``(N, *in_shape)``; nothing is written to the caller's folders (a private temporary is)."""
    if fmt not in FORMATS:
        raise SoftTargetsError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = saved.model.eval()
    # a view (a block's inputs sliced from its ids) would be traced with its strides, and the
    # exported program would then fail on plain tensors of another length
    rows = rows.contiguous()
    with torch.no_grad():
        expected = model(rows).float()
    expected = getattr(expected, "logits", expected)
    exporters: dict[str, Callable[[Path], Callable[[Tensor], Tensor]]] = {
        "safetensors": lambda path: _safetensors(saved, path),
        "pt2": lambda path: _pt2(model, rows, path),
        "onnx": lambda path: _onnx(model, rows, path),
    }
    with tempfile.TemporaryDirectory(prefix="softtargets-export-") as folder, _quiet():
        path = Path(folder) / f"{name}.{fmt}"
        run = exporters[fmt](path)
        got = run(rows).float()
        payload = path.read_bytes()
    difference = float((got - expected).abs().max()) if len(rows) else 0.0
    return Exported(Path(f"{name}.{fmt}"), payload, difference, len(rows))


def _safetensors(saved: SavedModel, path: Path) -> Callable[[Tensor], Tensor]:
    path.write_bytes(saved.weights.read_bytes())
    meta = {**saved.meta, "weights": path.name}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    again = load_saved(path).model
    return lambda x: _no_grad(again, x)


def _pt2(model: torch.nn.Module, rows: Tensor, path: Path) -> Callable[[Tensor], Tensor]:
    example = rows[:2] if len(rows) >= 2 else torch.cat([rows, rows])[:2]
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic(rows))
    except Exception as err:
        raise SoftTargetsError(
            f"torch.export cannot trace this model: {first_line(err, limit=200)}"
        ) from None
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()  # the file just written, our own
    return lambda x: _no_grad(loaded, x)


def _onnx(model: torch.nn.Module, rows: Tensor, path: Path) -> Callable[[Tensor], Tensor]:
    require("onnxscript", "onnx")  # torch's exporter needs it
    onnxruntime = require("onnxruntime", "onnx")
    example = rows[:2] if len(rows) >= 2 else torch.cat([rows, rows])[:2]
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["rows"],
            output_names=["logits"],
            dynamic_shapes=_dynamic(rows),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as err:
        raise SoftTargetsError(
            f"the ONNX exporter cannot export this model: {first_line(err, limit=200)}"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        # token ids stay integers; features are float32
        given = x.numpy() if not torch.is_floating_point(x) else x.numpy().astype(np.float32)
        (out,) = session.run(["logits"], {"rows": given})
        return torch.from_numpy(out)

    return run


def _dynamic(rows: Tensor) -> tuple[dict[int, Any], ...]:
    """The exported input's free dimensions: the batch; for a language model's token ids also
    the sequence length (up to its context)."""
    if torch.is_floating_point(rows):
        return ({0: torch.export.Dim.AUTO},)
    return ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' chatter (torchvision's absence, their own deprecations) is not the user's
    concern: their warnings and log lines are held back while they run."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _no_grad(model: torch.nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)
