"""softtargets: train classifiers on soft targets and distil knowledge from teachers.

The public API, in one place::

    from softtargets import Distillation, fit, label, build_model, split, mnist1d

Names are imported from their wing on first use (PEP 562), so ``import softtargets`` and the
command line's ``--help`` do not pay for importing torch. The wings (README, "Layout"):
``data`` -> ``losses`` / ``store`` -> ``training`` -> ``run`` -> ``studies`` -> ``cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    # data: containers, splits, built-in data, files, streams, soft targets
    "Dataset": "data.dataset",
    "Splits": "data.dataset",
    "split": "data.dataset",
    "holdout": "data.dataset",
    "encode_labels": "data.dataset",
    "digits": "data.builtin",
    "mnist1d": "data.builtin",
    "gaussians": "data.builtin",
    "margin_task": "data.builtin",
    "load_data": "data.files",
    "TensorRows": "data.streams",
    "ArrayRows": "data.streams",
    "ImageFolderRows": "data.streams",
    "soften": "data.targets",
    "smooth": "data.targets",
    "mix": "data.targets",
    "from_counts": "data.targets",
    "validate": "data.targets",
    "aggregate": "data.counts",
    # data: text for language models
    "ByteTokenizer": "data.sequences",
    "Blocks": "data.sequences",
    "read_corpus": "data.sequences",
    "pack_blocks": "data.sequences",
    "pack_to_file": "data.sequences",
    "split_by_file": "data.sequences",
    "stdlib_files": "data.sequences",
    # losses: the formulas and the method registry
    "soft_cross_entropy": "losses.reference",
    "kl_at_temperature": "losses.reference",
    "distillation_loss": "losses.reference",
    "bucket_distillation_loss": "losses.reference",
    "DistillationLoss": "losses.reference",
    "method_loss": "losses.reference",
    "method_value_and_grad": "losses.closed",
    "METHODS": "losses.methods",
    "Method": "losses.methods",
    "chunked_distillation_loss": "losses.chunked",
    # store: a teacher's logits by sample id
    "SoftTargetStore": "store.store",
    "label": "store.label",
    "ensemble": "store.label",
    "predict_logits": "store.label",
    "label_to_file": "store.write",
    "label_dataset_to_file": "store.write",
    "TokenStore": "store.tokens",
    "label_tokens": "store.tokens",
    # training
    "fit": "training.fit",
    "fit_many": "training.fit_many",
    "Member": "training.fit_many",
    "FitResult": "training.selection",
    "evaluate": "training.metrics",
    "Distillation": "training.objectives",
    "FeatureDistillation": "training.features",
    "FeaturePair": "training.features",
    "build_model": "training.models",
    "count_parameters": "training.models",
    "SoftLabelClassifier": "training.sklearn",
    "gpt": "training.gpt",
    "fit_lm": "training.lm",
    "next_token_loss": "training.lm",
    "sample_continuations": "training.lm",
    # run: the main job, run folders, reports
    "run_distillation": "run.distill",
    "run_teacher": "run.teacher",
    "RunFolder": "run.folder",
    "build_report": "run.report",
    "mean_ci": "run.stats",
    "paired_difference": "run.stats",
    "fit_proportions": "run.proportions",
    "load_saved": "run.students",
    # config and errors
    "TrainConfig": "config",
    "DistillConfig": "config",
    "StudyConfig": "config",
    "demo_config": "config",
    "load_config": "config",
    "SoftTargetsError": "errors",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'softtargets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"softtargets.{_API[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
