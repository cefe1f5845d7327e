"""Text classification data: a CSV or JSON-lines file with a text column and a label column,
tokenized with a Hugging Face tokenizer saved in a local folder (the ``hf`` extra).

Each row becomes ``max_length`` token ids, truncated and padded with the tokenizer's pad id, held
as float32 features ``(N, max_length)`` like every other feature (ids below 2^24 are exact);
:class:`~softtargets.training.hf.HFClassifier` turns them back into ids and an attention mask.
Labels follow the same rule as every loader: class names or whole numbers.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from softtargets.config import check_budget
from softtargets.data.dataset import Dataset, encode_labels
from softtargets.errors import SoftTargetsError, first_line
from softtargets.extras import require
from softtargets.files import json_objects, read_small_text

TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
#: the files a saved tokenizer leaves in its folder (one of them is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
#: token ids are held in float32 features: exact below 2^24
MAX_VOCABULARY = 1 << 24


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in a local folder (``tokenizer.json`` and its config), never downloaded."""
    transformers = require("transformers", "hf")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SoftTargetsError(f"tokenizer folder {path} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from a model's config alone: every word
        # unknown, and a model trained on nothing
        raise SoftTargetsError(
            f"{path} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); save one there with "
            "tokenizer.save_pretrained(PATH), or give --tokenizer FOLDER"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise SoftTargetsError(
            f"{path} holds no tokenizer that can be read ({first_line(err, typed=False)}); save "
            "one there with "
            "tokenizer.save_pretrained(PATH)"
        ) from None
    if tokenizer.pad_token_id is None:
        raise SoftTargetsError(
            f"the tokenizer in {path} has no pad token; set one (tokenizer.pad_token = ...) and "
            "save it again"
        )
    if len(tokenizer) > MAX_VOCABULARY:
        raise SoftTargetsError(f"the tokenizer in {path} has over 2^24 tokens")
    return tokenizer


def read_text_rows(path: Path, text_column: str, label_column: str | None) -> list[dict[str, str]]:
    """The rows of a CSV (with a header) or JSON-lines file, as dicts of strings."""
    text = read_small_text(path, "text data file")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        fix = "give one JSON object a line"
        rows = [row for _, row in json_objects(text.splitlines(), str(path), fix)]
    if not rows:
        raise SoftTargetsError(f"{path} holds no rows")
    for column in [text_column] + ([label_column] if label_column else []):
        missing = next((i for i, r in enumerate(rows) if column not in r), None)
        if missing is not None:
            raise SoftTargetsError(
                f"{path}: row {missing + 1} has no {column!r}; columns are {sorted(rows[0])}"
            )
    return rows


def load_text(
    path: str | Path,
    tokenizer_folder: str | Path,
    text_column: str = "text",
    label_column: str | None = "label",
    max_length: int = 128,
    labelled: bool = True,
) -> Dataset:
    """Token ids ``(N, max_length)`` of a text file's rows with their labels (see the module)."""
    path = Path(path)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise SoftTargetsError(f"{path}: text data is a .csv or .jsonl file")
    if max_length < 1:
        raise SoftTargetsError(f"--max-length must be at least 1, got {max_length}")
    tokenizer = load_tokenizer(tokenizer_folder)
    label_column = label_column or "label"
    rows = read_text_rows(path, text_column, label_column if labelled else None)
    check_budget(4 * len(rows) * max_length, f"{len(rows):,} rows of {max_length} tokens")
    texts = [str(r[text_column]) for r in rows]
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="np"
    )
    ids = np.asarray(encoded["input_ids"], dtype=np.float32)
    if not labelled or label_column not in rows[0]:
        if labelled:
            raise SoftTargetsError(f"{path}: no label column {label_column!r}")
        zeros = np.zeros(len(rows), dtype=np.int64)
        return Dataset.from_arrays(ids, zeros, class_names=["?"], name=path.stem)
    raw = [str(r[label_column]).strip() for r in rows]
    if all(v.lstrip("-").isdigit() for v in raw):
        labels, names = encode_labels(np.array([int(v) for v in raw]))
    else:
        labels, names = encode_labels(raw)
    return Dataset.from_arrays(ids, labels, class_names=names, name=path.stem)
