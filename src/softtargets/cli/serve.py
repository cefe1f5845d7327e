"""The ``predict`` and ``export`` commands: serve a saved model's class probabilities for a file's
rows, and ship it as safetensors, a ``torch.export`` program or ONNX. :mod:`softtargets.cli.app`
registers them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from softtargets.cli.console import console, friendly_errors
from softtargets.errors import SoftTargetsError

if TYPE_CHECKING:  # the command line imports torch only when a command runs
    from torch import Tensor

    from softtargets.run.students import SavedModel

ModelPath = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="A distill run folder (its best student), a student .json/.safetensors, or a "
        "fit-proportions folder.",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace --out if it exists (it is refused else).")
]


def _refuse_existing(out: Path | None, overwrite: bool) -> None:
    if out is not None and (out.exists() or out.is_symlink()):
        if out.is_dir() and not out.is_symlink():
            raise SoftTargetsError(f"{out} is a folder; give a file name for --out")
        if not overwrite:
            raise SoftTargetsError(
                f"{out} exists; pass --overwrite to replace it or choose another --out"
            )


@friendly_errors
def predict(
    model_dir: Annotated[
        Path | None, typer.Argument(help="(fit-proportions form) the model folder.")
    ] = None,
    file: Annotated[Path | None, typer.Argument(help="(fit-proportions form) the CSV.")] = None,
    model: ModelPath = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Rows to predict: CSV, .npz, .npy or an image folder."),
    ] = None,
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="The CSV's label column, if any.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write here (default: stdout).")] = None,
    overwrite: Overwrite = False,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Language models: continue this text ('' for none)."),
    ] = None,
    tokens: Annotated[
        int, typer.Option("--tokens", help="Language models: how many tokens to write.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Language models: sampling temperature.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Language models: sampling seed.")] = 0,
) -> None:
    """Class probabilities for every row, as CSV (row, then one column per class).

    predict --model RUN_OR_FILE --data FILE serves a distilled student; predict MODEL_DIR FILE
    serves a fit-proportions model (as before). A language model's --data (text files) gives
    each file's bits per token (per byte, byte-level) as CSV; --prompt TEXT writes a continuation.
    """
    model = model or model_dir
    data = data or file
    if model is None or (data is None and prompt is None):
        raise SoftTargetsError("give --model RUN_OR_FILE and --data FILE")
    _refuse_existing(out, overwrite)
    if (model / "model.json").is_file():  # a fit-proportions model
        from softtargets.run.proportions import predict_file

        if data is None:
            raise SoftTargetsError("give --data FILE: a fit-proportions model reads rows")
        classes, probs = predict_file(model, data)
    else:
        from softtargets.run.export import predict_probabilities, read_rows
        from softtargets.run.students import load_saved

        saved = load_saved(model)
        if prompt is not None:  # a language model writes text
            _write(_continue(saved, prompt, tokens, temperature, seed), out, "a continuation")
            return
        if saved.language_model is not None:  # and scores it
            _write(_score(saved, data), out, "bits per token")
            return
        rows = read_rows(saved, data, label_column)
        classes, probs = saved.class_names, predict_probabilities(saved, rows, str(data)).numpy()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", *classes])
    for i, row in enumerate(probs):
        writer.writerow([i, *(f"{p:.8g}" for p in row)])
    _write(buffer.getvalue(), out, f"{len(probs)} rows")


def _continue(saved: SavedModel, prompt: str, tokens: int, temperature: float, seed: int) -> str:
    from softtargets.run.export import generate_text

    if saved.language_model is None:
        raise SoftTargetsError("this model is a classifier; --prompt is for language models")
    return generate_text(saved, prompt, tokens, temperature, seed) + "\n"


def _score(saved: SavedModel, data: Path) -> str:
    """CSV: each text file of ``data`` (a file or a folder's files), its tokens and bits per
    token under the saved language model."""
    from softtargets.run.export import score_text, text_reader
    from softtargets.run.sequence_data import text_files

    unit = "byte" if saved.language_model and saved.language_model["unit"] == "byte" else "token"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "tokens", f"bits_per_{unit}"])
    reader = text_reader(saved)  # a tokenizer folder is read once, not per file
    for path in text_files(data):
        count, bits = score_text(saved, path, reader)
        writer.writerow([str(path), count, f"{bits:.6g}"])
    return buffer.getvalue()


def _write(text: str, out: Path | None, what: str) -> None:
    from softtargets.files import atomic_write_text

    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        console.print(f"wrote {what} to {out}", highlight=False)


@friendly_errors
def export(
    model: ModelPath = None,
    format: Annotated[
        str, typer.Option("--format", help="safetensors, pt2 (torch.export) or onnx.")
    ] = "pt2",
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Rows to check the export on (default: the run's test rows)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write (default: student.FORMAT in the run folder)."),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Export a saved student and check it against PyTorch on real rows (max |difference|)."""
    from softtargets.run.export import FORMATS, export_model
    from softtargets.run.folder import RunFolder
    from softtargets.run.students import load_saved

    if format not in FORMATS:
        raise SoftTargetsError(f"unknown --format {format!r}; choose one of {', '.join(FORMATS)}")
    if model is None:
        raise SoftTargetsError("give --model RUN_OR_FILE (a distill run folder or a student .json)")
    saved = load_saved(model)
    run = model if model.is_dir() else None
    if out is None and run is None:
        raise SoftTargetsError("give --out FILE: the model is not in a run folder")
    if out is not None:
        _refuse_existing(out, overwrite)
        if format == "safetensors":  # its description goes beside it: never over a user's file
            _refuse_existing(out.with_suffix(".json"), overwrite)
    rows = _check_rows(saved, run, data)
    exported = export_model(saved, format, rows)
    if out is None:
        assert run is not None  # checked above: no --out means a run folder
        with RunFolder.open(run) as folder:
            written = folder.write_bytes(exported.path.name, exported.payload)
            if format == "safetensors":
                folder.write_text(exported.path.with_suffix(".json").name, _meta_of(saved, written))
    else:
        from softtargets.files import atomic_write_bytes, atomic_write_text

        written = out
        atomic_write_bytes(out, exported.payload)
        if format == "safetensors":
            atomic_write_text(out.with_suffix(".json"), _meta_of(saved, out))
    console.print(
        f"wrote {written} ({len(exported.payload):,} bytes); on {exported.rows} check rows its "
        f"logits differ from PyTorch's by at most {exported.max_abs_difference:.3g}",
        highlight=False,
    )


def _meta_of(saved: SavedModel, weights: Path) -> str:
    """A safetensors export's JSON: the saved model's, naming the exported weights."""
    return json.dumps({**saved.meta, "weights": weights.name}, indent=1) + "\n"


def _check_rows(saved: SavedModel, run: Path | None, data: Path | None) -> Tensor:
    """The rows an export is checked on: ``--data``'s, else the run's test rows."""
    from softtargets.run.export import check_rows, read_rows

    if saved.language_model is not None:
        return _language_model_rows(saved, run, data)
    if data is not None:
        rows = read_rows(saved, data)
        check_rows(saved, rows, str(data))
        return rows.features
    if run is None or not (run / "config.yaml").is_file():
        raise SoftTargetsError("give --data FILE: rows to check the export on")
    from softtargets.config import DistillConfig, load_config
    from softtargets.data.stream_parts import first_rows
    from softtargets.run.data import load_splits

    _, splits = load_splits(load_config(DistillConfig, run / "config.yaml"))
    check_rows(saved, splits.test, "the run's test rows")
    return first_rows(splits.test, len(splits.test))  # in memory or streamed


def _language_model_rows(saved: SavedModel, run: Path | None, data: Path | None) -> Tensor:
    """A language model's check rows: ``(N, L)`` ids of ``--data``'s text, else of the run's
    held-out files (at most 16 blocks)."""
    from softtargets.run.export import text_blocks

    if data is not None:
        return text_blocks(saved, data).batch(slice(0, 16))[:, :-1]
    if run is None or not (run / "config.yaml").is_file():
        raise SoftTargetsError("give --data FILE: text to check the export on")
    from softtargets.config import DistillConfig, load_config
    from softtargets.run.sequence_data import load_sequence_splits

    test = load_sequence_splits(load_config(DistillConfig, run / "config.yaml")).test
    return test.batch(slice(0, 16))[:, :-1]
