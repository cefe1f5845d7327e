"""The ``softtargets`` command's flags and how they become a config.

The typer options shared by the commands (data, models, seeds, the two trainings' fields, ...),
the ``key=value`` parsers of ``--teacher-option`` / ``--method-option``, and
:func:`build_distill_config`, where every command turns a YAML file and its flags into one
checked :class:`~softtargets.config.DistillConfig`. :mod:`softtargets.cli.app` holds the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from softtargets.config import DistillConfig
from softtargets.errors import SoftTargetsError
from softtargets.files import parse_yaml
from softtargets.losses.methods import METHODS


def parse_options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """``["channels=[64,64]", "dropout=0.1"]`` -> ``{"channels": [64, 64], "dropout": 0.1}``."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SoftTargetsError(f"{what} option {pair!r} must look like key=value")
        options[key.strip()] = parse_yaml(value, f"{what} option {pair!r}")
    return options


def parse_method_options(pairs: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``--method-option`` values: ``dkd:beta=8`` for one method, or ``beta=8`` for every given
    method that takes ``beta`` (an option no given method takes is an error)."""
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        method, sep, rest = pair.partition(":")
        if sep and "=" not in method:
            targets = [method]
        else:
            targets, rest = [m for m in methods if pair.partition("=")[0].strip() in
                             (METHODS[m].accepted if m in METHODS else ())], pair  # fmt: skip
            if not targets:
                raise SoftTargetsError(
                    f"method option {pair!r}: none of the methods {methods} takes it; write "
                    "METHOD:key=value or see the README's methods table"
                )
        for target in targets:
            options.setdefault(target, {}).update(parse_options([rest], f"{target} method"))
    return options


# ---------------------------------------------------------------------- shared options
# Flags default to None ("not given": the config file's or the built-in value applies); the
# built-in default is shown in each flag's help, read from the config models themselves.
DEFAULTS = DistillConfig()


def _default(role: str, name: str) -> str:
    value = getattr(getattr(DEFAULTS, f"{role}_training"), name)
    return f" \\[default: {value}]"


Out = Annotated[
    Path | None,
    typer.Option(
        "--out", help="Run folder: new, empty, or one softtargets made \\[default: runs/<command>]."
    ),
]


ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML config; flags given here override it.")
]


Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Built-in name (digits, gaussians, margin_task, mnist1d) or a file (.npz .npy .csv "
        f"IDX CIFAR folder) \\[default: {DEFAULTS.data.name}].",
    ),
]


TestData = Annotated[
    str | None,
    typer.Option(
        "--test-data",
        help="A separate test file (e.g. MNIST's t10k); the --data file is then split into "
        "training and validation rows only.",
    ),
]


ValFraction = Annotated[
    float | None,
    typer.Option(
        "--val-fraction",
        help=f"Fraction of rows for validation \\[default: {DEFAULTS.data.val_fraction}].",
    ),
]


TestFraction = Annotated[
    float | None,
    typer.Option(
        "--test-fraction",
        help=f"Fraction of rows for testing \\[default: {DEFAULTS.data.test_fraction}].",
    ),
]


LabelColumn = Annotated[
    str | None,
    typer.Option("--label-column", help="Label column of a CSV (name) or .npy (number)."),
]


Stream = Annotated[
    bool | None,
    typer.Option(
        "--stream",
        help="Read --data lazily: an image folder (images opened as needed), a memory-mapped "
        ".npy (labels in its last column, or --label-column 0), or text with --block-length "
        "(tokenised once into a token file, read as batches need it).",
    ),
]


Augment = Annotated[
    bool | None,
    typer.Option(
        "--augment",
        help="With --stream: random crop (padding 1/8 of the side) and horizontal flip of the "
        "training images; the students' teacher then runs online on every augmented batch.",
    ),
]


Workers = Annotated[
    int | None, typer.Option("--workers", help="DataLoader processes reading streamed rows.")
]


TextColumn = Annotated[
    str | None,
    typer.Option(
        "--text-column",
        help="Text data: the column of a .csv/.jsonl --data file that holds the text (tokenized "
        "with the hf: model's tokenizer, or --tokenizer's).",
    ),
]


MaxLength = Annotated[
    int | None, typer.Option("--max-length", help="Text data: tokens per row [default: 128].")
]


BlockLength = Annotated[
    int | None,
    typer.Option(
        "--block-length",
        help="Language modelling: --data is text (stdlib, a text file or a folder of them), "
        "packed into blocks of this many tokens (byte-level, or --tokenizer's / an hf: model's) "
        "and distilled at every position; or a .jsonl of prompt / completion examples (or chat "
        "messages), a block each, distilled on the completions.",
    ),
]


StoreTop = Annotated[
    int | None,
    typer.Option(
        "--store-top",
        help="Language models: the teacher's top-k logits kept per position; 0 keeps no store "
        "and runs the teacher on every batch [default: 32].",
    ),
]


OnPolicy = Annotated[
    float | None,
    typer.Option(
        "--on-policy",
        help="Language models: the fraction of steps on which a distilled student samples the "
        "second half of each block and learns the teacher's distribution on its own tokens "
        "(GKD's lambda; the teacher runs online) [default: 0].",
    ),
]


StoreTemperatures = Annotated[
    str | None,
    typer.Option(
        "--store-temperatures",
        help="Language models: temperatures the store keeps the rest's mass at, e.g. 1,2,4 "
        "(distilling at them is exact) [default: the run's --temperature].",
    ),
]


def parse_temperatures(text: str | None) -> list[float] | None:
    """``"1,2,4"`` -> ``[1.0, 2.0, 4.0]``; a value that is not a positive number is one line."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 for v in values):
        raise SoftTargetsError(
            f"--store-temperatures takes positive numbers separated by commas, e.g. 1,2,4; got {text!r}"
        )
    return values


Tokenizer = Annotated[
    Path | None,
    typer.Option("--tokenizer", help="Text data: a local folder holding a saved tokenizer."),
]


Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Remove the files an earlier run wrote in --out (only those) first."
    ),
]


MODEL_FORMS = "mlp, cnn1d, cnn2d, package.module:callable, path/file.py:callable, hf:PATH"

TeacherName = Annotated[
    str | None,
    typer.Option(
        "--teacher",
        help=f"Teacher model: {MODEL_FORMS} (softtargets models explains them) "
        f"\\[default: {DEFAULTS.teacher.name}].",
    ),
]


TeacherWeights = Annotated[
    Path | None,
    typer.Option(
        "--teacher-weights",
        help="Pretrained teacher weights, loaded instead of training: .safetensors, or .pt/.pth "
        "read with torch.load(weights_only=True) (never unpickled).",
    ),
]


TeacherOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--teacher-option",
        help="Teacher builder option key=value (repeatable), e.g. channels=[64,64] "
        f"\\[default: {DEFAULTS.teacher.options}]; see `softtargets models`.",
    ),
]


Seeds = Annotated[
    int | None,
    typer.Option("--seeds", help=f"Student seeds (>= 3 for a CI) \\[default: {DEFAULTS.seeds}]."),
]


Nproc = Annotated[
    int,
    typer.Option(
        "--nproc",
        min=1,
        help="Processes on this machine: relaunches the command under torchrun (the teacher "
        "trains with DDP, the students are spread over the processes).",
    ),
]


Device = Annotated[
    str | None,
    typer.Option(
        "--device", help="auto (cuda if available), cpu, cuda, cuda:N, mps \\[default: auto]."
    ),
]


def _training_options(role: str, prefix: str) -> dict[str, Any]:
    """The typer options for one role's TrainConfig fields (``--{prefix}lr``, ...)."""
    return {
        "epochs": Annotated[
            int | None,
            typer.Option(
                f"--{prefix}epochs", help=f"{role.capitalize()} epochs{_default(role, 'epochs')}."
            ),
        ],
        "lr": Annotated[
            float | None,
            typer.Option(
                f"--{prefix}lr", help=f"{role.capitalize()} learning rate{_default(role, 'lr')}."
            ),
        ],
        "optimizer": Annotated[
            str | None,
            typer.Option(
                f"--{prefix}optimizer",
                help=f"{role.capitalize()} optimizer: sgd, adam, adamw{_default(role, 'optimizer')}.",
            ),
        ],
        "batch_size": Annotated[
            int | None,
            typer.Option(
                f"--{prefix}batch-size",
                help=f"{role.capitalize()} batch size{_default(role, 'batch_size')}.",
            ),
        ],
        "weight_decay": Annotated[
            float | None,
            typer.Option(
                f"--{prefix}weight-decay",
                help=f"{role.capitalize()} weight decay{_default(role, 'weight_decay')}.",
            ),
        ],
        "patience": Annotated[
            int | None,
            typer.Option(
                f"--{prefix}patience",
                help=f"Stop {role.lower()} training after this many epochs without a better "
                f"validation accuracy{_default(role, 'patience')}.",
            ),
        ],
        "precision": Annotated[
            str | None,
            typer.Option(
                f"--{prefix}precision",
                help=f"{role.capitalize()} forward pass in fp32, bf16 or fp16 (autocast; the "
                f"loss stays fp32){_default(role, 'precision')}.",
            ),
        ],
        "compile": Annotated[
            bool | None,
            typer.Option(
                f"--{prefix}compile/--{prefix}no-compile",
                help=f"Train the {role.lower()} through torch.compile{_default(role, 'compile')}.",
            ),
        ],
    }


_TEACHER = _training_options("teacher", "teacher-")


_STUDENT = _training_options("student", "")


_TEACHER_COMMAND = _training_options("teacher", "")  # the teacher command trains only a teacher


TRAINING_FIELDS = tuple(_TEACHER)


TeacherEpochs = _TEACHER["epochs"]


TeacherLr = _TEACHER["lr"]


TeacherOptimizer = _TEACHER["optimizer"]


TeacherBatchSize = _TEACHER["batch_size"]


TeacherWeightDecay = _TEACHER["weight_decay"]


TeacherPatience = _TEACHER["patience"]


StudentEpochs = _STUDENT["epochs"]


StudentLr = _STUDENT["lr"]


StudentOptimizer = _STUDENT["optimizer"]


StudentBatchSize = _STUDENT["batch_size"]


StudentWeightDecay = _STUDENT["weight_decay"]


StudentPatience = _STUDENT["patience"]


OnlyEpochs = _TEACHER_COMMAND["epochs"]


OnlyLr = _TEACHER_COMMAND["lr"]


OnlyOptimizer = _TEACHER_COMMAND["optimizer"]


OnlyBatchSize = _TEACHER_COMMAND["batch_size"]


OnlyWeightDecay = _TEACHER_COMMAND["weight_decay"]


OnlyPatience = _TEACHER_COMMAND["patience"]


TeacherPrecision, TeacherCompile = _TEACHER["precision"], _TEACHER["compile"]


StudentPrecision, StudentCompile = _STUDENT["precision"], _STUDENT["compile"]


OnlyPrecision, OnlyCompile = _TEACHER_COMMAND["precision"], _TEACHER_COMMAND["compile"]


def build_distill_config(config_file: Path | None, base: Any = None, **flags: Any) -> Any:
    """A :class:`DistillConfig` from ``base`` (default: the built-in one) or a YAML file, then the
    flags that were given. Flags named ``teacher_<field>`` / ``student_<field>`` set the two
    trainings' fields; ``val_fraction``, ``test_fraction``, ``test_data`` and ``label_column``
    set the data's. Every command builds its config here, so every flag is checked the same way.
    """
    from softtargets.config import (
        SEQUENCE_STUDENT,
        SEQUENCE_TEACHER,
        load_yaml,
        parse_config,
        sequence_training,
    )

    source = str(config_file) if config_file else "flags"
    if config_file:
        config = parse_config(DistillConfig, load_yaml(config_file), source)
    else:
        config = base if base is not None else DistillConfig()
    updates = {k: v for k, v in flags.items() if v is not None and v != []}
    merged = config.model_dump()
    data = merged["data"]
    if "data" in updates:
        data.update(name=updates.pop("data"), options={})
    if "tokenizer" in updates:
        updates["tokenizer"] = str(updates["tokenizer"])
    for flag, field in (
        ("label_column", "label_column"),
        ("text_column", "text_column"),
        ("stream", "stream"),
        ("augment", "augment"),
        ("workers", "workers"),
        ("max_length", "max_length"),
        ("block_length", "block_length"),
        ("tokenizer", "tokenizer"),
        ("val_fraction", "val_fraction"),
        ("test_fraction", "test_fraction"),
        ("test_data", "test"),
    ):
        if flag in updates:
            data[field] = updates.pop(flag)
    defaults = DistillConfig()
    for role, (name, options) in (("teacher", SEQUENCE_TEACHER), ("student", SEQUENCE_STUDENT)):
        # language modelling with the classifier's default model: the language-model default,
        # before the role's options apply to it
        if data.get("block_length") and merged[role]["name"] == getattr(defaults, role).name:
            merged[role] = {"name": name, "options": dict(options), "weights": None}
        training = f"{role}_training"  # and its training, before the flags change it
        if (
            data.get("block_length")
            and merged[training] == getattr(defaults, training).model_dump()
        ):
            merged[training] = sequence_training(role).model_dump()
    for role in ("teacher", "student"):
        if role in updates:
            merged[role] = {"name": updates.pop(role), "options": {}, "weights": None}
        if f"{role}_weights" in updates:
            merged[role]["weights"] = str(updates.pop(f"{role}_weights"))
        if f"{role}_option" in updates:
            merged[role]["options"].update(parse_options(updates.pop(f"{role}_option"), role))
        for field in TRAINING_FIELDS:
            if f"{role}_{field}" in updates:
                merged[f"{role}_training"][field] = updates.pop(f"{role}_{field}")
    merged.update(updates)
    return parse_config(DistillConfig, merged, source)
