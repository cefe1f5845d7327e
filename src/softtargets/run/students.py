"""The distilled model the user came for: every student's weights kept, the best one named, and any
saved model loaded back to serve (``predict``) or ship (``export``).

A run folder keeps ``student-METHOD-seedS.safetensors`` per student, and ``student.safetensors``
with ``student.json`` for the run's *student*: the one with the best validation accuracy across
methods and seeds (validation NLL breaks a tie; a language model's: the lowest validation loss).
The test set never chooses it. The JSON says
how to rebuild the model (its builder or import path and options, or a Hugging Face config), what
it reads (input shape, classes) and what it came from (the data's and teacher's fingerprints).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import Tensor, nn

from softtargets.config import DistillConfig
from softtargets.data.dataset import Dataset
from softtargets.errors import SoftTargetsError
from softtargets.files import parse_json, read_small_text
from softtargets.run.data import tokenizer_folder
from softtargets.run.folder import RunFolder
from softtargets.training.hf import describe_hf, rebuild_hf
from softtargets.training.imported import portable
from softtargets.training.models import build_model
from softtargets.training.weights import load_into

#: the run's named student, and the format tag of every saved model's JSON
BEST = "student"
FORMAT = "softtargets-model"


def student_file(method: str, seed: int) -> str:
    """The run folder's weights file of the student trained with ``method`` and ``seed``."""
    return f"student-{method}-seed{seed}.safetensors"


def save_student(folder: RunFolder, state: dict[str, Tensor], record: dict[str, Any]) -> None:
    """Write one student's weights (``state``, on the CPU) and name the file in its ``record``."""
    name = student_file(record["method"], record["seed"])
    folder.write_bytes(name, save(state, metadata={"key": record["key"]}))
    record["weights"] = name


def name_best(
    folder: RunFolder,
    config: DistillConfig,
    data: Dataset,
    student: nn.Module,
    results: list[dict[str, Any]],
    teacher_key: str,
) -> dict[str, Any] | None:
    """Copy the validation-best student of ``results`` to ``student.safetensors`` and describe it
    in ``student.json``; returns that description (``None`` when no student has saved weights).

    ``student`` is one of the run's student models (any seed): it tells how an ``hf:`` model is
    configured.
    """
    saved = _saved(folder, results)
    if not saved:
        return None
    best = max(saved, key=lambda r: (r.get("val_accuracy", 0.0), -r.get("val_nll", math.inf)))
    return _write_best(folder, config, student, best, {
        **({"text": text_reading(config)} if config.data.text_column else {}),
        "in_shape": list(data.feature_shape),
        "class_names": list(data.class_names),
        "val_accuracy": best.get("val_accuracy"),
        "test_accuracy": best["test_accuracy"],
        "selected": f"best validation accuracy of {len(saved)} students "
        f"({', '.join(sorted({r['method'] for r in saved}))}); the test set chose nothing",
        "fingerprints": {"data": data.fingerprint, "teacher": teacher_key, "students": best["key"]},
    })  # fmt: skip


def name_best_language_model(
    folder: RunFolder,
    config: DistillConfig,
    student: nn.Module,
    results: list[dict[str, Any]],
    reading: dict[str, Any],
) -> dict[str, Any] | None:
    """:func:`name_best` for a language-model run: the student of the lowest validation loss,
    described with how it reads text (``reading``: block length, vocabulary, tokenizer, unit)."""
    saved = _saved(folder, results)
    if not saved:
        return None
    best = min(saved, key=lambda r: r["val_loss"])
    return _write_best(folder, config, student, best, {
        "language_model": reading,
        "in_shape": [reading["block_length"]],
        "num_classes": reading["vocab_size"],
        "val_bits_per_token": best["val_bits_per_token"],
        "test_bits_per_token": best["test_bits_per_token"],
        "selected": f"lowest validation loss of {len(saved)} students "
        f"({', '.join(sorted({r['method'] for r in saved}))}); the test set chose nothing",
        "fingerprints": {"students": best["key"]},
    })  # fmt: skip


def _saved(folder: RunFolder, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("weights") and (folder.root / r["weights"]).is_file()]


def _write_best(
    folder: RunFolder,
    config: DistillConfig,
    student: nn.Module,
    best: dict[str, Any],
    described: dict[str, Any],
) -> dict[str, Any]:
    """Copy ``best``'s weights to ``student.safetensors`` and write ``student.json``: how to
    rebuild the model, then ``described`` (what it reads and how it was chosen)."""
    folder.write_bytes(f"{BEST}.safetensors", (folder.root / best["weights"]).read_bytes())
    options = dict(config.student.options)
    if hasattr(student, "context"):  # a gpt's context defaults to the run's block length
        options.setdefault("context", student.context)
    meta = {
        "format": FORMAT,
        "version": 1,
        "model": {"name": portable(config.student.name), "options": options},
        **({"hf": describe_hf(student)} if describe_hf(student) else {}),
        "weights": f"{BEST}.safetensors",
        "method": best["method"],
        "seed": best["seed"],
        "temperature": config.temperature,
        "alpha": config.alpha,
        **described,
    }
    folder.write_text(f"{BEST}.json", json.dumps(meta, indent=1) + "\n")
    return meta


def text_reading(config: DistillConfig) -> dict[str, Any]:
    """How a text model's rows are read: its tokenizer's folder (absolute), column and length."""
    return {
        "tokenizer": str(Path(tokenizer_folder(config)).resolve()),
        "text_column": config.data.text_column,
        "max_length": config.data.max_length,
    }


@dataclass
class SavedModel:
    """A saved model loaded back: the module (eval mode, CPU), its description and where it is."""

    model: nn.Module
    meta: dict[str, Any]
    weights: Path

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["in_shape"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names", []))

    @property
    def language_model(self) -> dict[str, Any] | None:
        """How a language model reads text (block length, vocabulary, tokenizer); else None."""
        return self.meta.get("language_model")


def find_saved(path: str | Path) -> Path:
    """The JSON description of the model ``path`` names: a run folder (its named student), a
    model's ``.json``, or its ``.safetensors`` (the ``.json`` beside it)."""
    path = Path(path)
    if path.is_dir():
        described = path / f"{BEST}.json"
        if not described.is_file():
            raise SoftTargetsError(
                f"{path} holds no model softtargets saved: no student.json (a distill run's "
                "student; a run made before students were kept: run distill there again) and no "
                "model.json (fit-proportions)"
            )
        return described
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise SoftTargetsError(
            f"{path} does not exist; give a run folder, a student .json or its .safetensors"
        )
    return path


def load_saved(path: str | Path) -> SavedModel:
    """Rebuild a saved model with its weights; every way this fails is one line."""
    described = find_saved(path)
    meta = parse_json(read_small_text(described), str(described))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SoftTargetsError(f"{described} is not a model softtargets saved")
    try:
        name, options = meta["model"]["name"], dict(meta["model"]["options"])
        in_shape = [int(d) for d in meta["in_shape"]]
        # a classifier's classes by name; a language model's vocabulary by its size
        classes = len(meta["class_names"]) if "class_names" in meta else int(meta["num_classes"])
        weights = described.parent / str(meta["weights"])
    except (KeyError, TypeError, ValueError) as err:
        raise SoftTargetsError(f"{described} is damaged: {type(err).__name__} {err}") from None
    if "/" in str(meta["weights"]) or not weights.is_file():
        raise SoftTargetsError(f"{described} names weights {weights} that are not beside it")
    if "hf" in meta:  # rebuilt from the saved config: the source folder is not needed
        model = rebuild_hf(meta["hf"])
    else:
        model = build_model(name, in_shape, classes, seed=0, **options)
    load_into(model, weights, "student")
    model.eval()
    return SavedModel(model, meta, weights)
