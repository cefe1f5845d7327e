"""Every default, preset and numeric limit of softtargets, once, and the typed configs that
carry them.

The configs (:class:`TrainConfig`, :class:`DistillConfig`, :class:`StudyConfig`) are read from
YAML and checked strictly: every model forbids unknown keys, so a typo such as ``tempreature: 4``
is an error that names the key, never a silently ignored setting. ``fit`` and ``fit_many`` take
their defaults from :data:`TRAINING`; the demo, the studies' teachers and the quick miniature are
the presets below. Torch-free, so that the command line's ``--help`` starts at once.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from softtargets.errors import SoftTargetsError
from softtargets.files import parse_yaml, read_small_text

#: Temperatures softtargets accepts. Beyond them the losses leave float32's range: z / T overflows
#: for tiny T, and the T^2 factor of Hinton's loss multiplies a KL that rounds to 0 for huge T.
#: Hinton et al. use 1 to 20; T = 1e4 is already the logit-matching limit.
TEMPERATURE_RANGE = (1e-2, 1e4)


#: A chunked loop over rows (checking, labelling, per-row constants) takes about this many numbers
#: at a time (1 MB of float32). Small on purpose: glibc's malloc keeps freed blocks of several MB
#: in whichever arena they came from, and with another thread running (a progress bar's) a loop of
#: 16 MB temporaries over a 381 MB store left up to +700 MB resident; with 1 MB ones, none
#: (bench/run_all.py's distill_memory_over_store samples from a thread of its own).
CHUNK_NUMBERS = 1 << 18


#: What one input may ask to allocate, by default half the machine's memory; the environment
#: variable SOFTTARGETS_MEMORY_BUDGET_MB sets another. Every loader checks a file's declared size
#: against it before reading, so a few bytes cannot ask for gigabytes.
MEMORY_BUDGET_FRACTION = 0.5
#: the most pixels an image may have (PIL's own bomb check is 89M with a warning; 16M is a
#: 4,000 x 4,000 image, 192 MB as float32 RGB)
MAX_IMAGE_PIXELS = 16_000_000


def memory_budget() -> int:
    """Bytes one input may allocate: ``$SOFTTARGETS_MEMORY_BUDGET_MB``, else half the RAM."""
    given = os.environ.get("SOFTTARGETS_MEMORY_BUDGET_MB")
    if given:
        try:
            return int(float(given) * (1 << 20))
        except ValueError:
            raise SoftTargetsError(
                f"SOFTTARGETS_MEMORY_BUDGET_MB={given!r} is not a number of megabytes"
            ) from None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GB
        ram = 8 << 30
    return int(ram * MEMORY_BUDGET_FRACTION)


def check_budget(nbytes: int, what: str, fix: str = "read it streamed") -> None:
    """Refuse, in one line, an input that would allocate more than :func:`memory_budget`."""
    budget = memory_budget()
    if nbytes > budget:
        raise SoftTargetsError(
            f"{what} would take {nbytes / (1 << 20):,.0f} MB, over the memory budget of "
            f"{budget / (1 << 20):,.0f} MB; {fix} or raise SOFTTARGETS_MEMORY_BUDGET_MB"
        )


def chunk_rows(numbers_per_row: int) -> int:
    """Rows per chunk for rows of ``numbers_per_row`` numbers (at least one)."""
    return max(1, CHUNK_NUMBERS // max(numbers_per_row, 1))


def accepted_options(builder: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the keyword parameters ``builder`` accepts, minus ``skip``."""
    params = inspect.signature(builder).parameters.values()
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip
    ]


#: options that are probabilities in [0, 1); every other whole-number option of a builder is a
#: count or a size (>= 1), but these, which may be 0
FRACTION_OPTIONS = ("dropout",)
ZERO_OK_OPTIONS = ("seed",)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(name: str, value: Any, annotation: str, what: str) -> None:
    """One option's value against the builder's annotation (``int``, ``float``, ``bool``, a
    sequence of ``int``): its type, finiteness and range, one line otherwise."""

    def bad(expected: str) -> SoftTargetsError:
        return SoftTargetsError(f"option {name}={value!r} for {what}: expected {expected}")

    least = 0 if name in ZERO_OK_OPTIONS else 1
    if "Sequence[int]" in annotation or "list[int]" in annotation:
        if not isinstance(value, list | tuple):
            raise bad("a list of whole numbers, e.g. [64, 64]")
        for item in value:
            if not _whole(item) or item < 1:
                raise bad(f"whole numbers >= 1 in the list (got {item!r})")
    elif annotation in ("int", "int | None"):
        if not (_whole(value) or (value is None and "None" in annotation)):
            raise bad("a whole number")
        if value is not None and value < least:
            raise bad(f"a whole number >= {least}")
    elif annotation == "float":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise bad("a finite number")
        if name in FRACTION_OPTIONS and not 0 <= value < 1:
            raise bad("a fraction in [0, 1)")
    elif annotation == "bool" and not isinstance(value, bool):
        raise bad("true or false")


def check_options(
    builder: Callable[..., Any], options: dict[str, Any], what: str, skip: tuple[str, ...] = ()
) -> None:
    """Raise if ``options`` holds a key that ``builder`` does not take, or a value that is not of
    the type its annotation names (a count a whole number >= 1, a dropout a fraction, ...)."""
    valid = accepted_options(builder, skip)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SoftTargetsError(
            f"unknown option {unknown[0]!r} for {what}; valid options: {', '.join(valid) or 'none'}"
        )
    parameters = inspect.signature(builder).parameters
    for name, value in options.items():
        _check_value(name, value, str(parameters[name].annotation), what)


class Strict(BaseModel):
    # allow_inf_nan=False: a temperature of .inf or a learning rate of NaN is refused here, before
    # any training, not found out after a teacher has trained for minutes.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Strict):
    """Which data, and how it is split. Test rows are only ever used for reporting."""

    name: str = Field("mnist1d", description="a built-in dataset name or a file path")
    options: dict[str, Any] = Field(default_factory=dict, description="built-in generator options")
    label_column: str | None = Field(None, description="label column for CSV / .npy files")
    test: str | None = Field(
        None,
        description="a separate test file (e.g. MNIST's t10k); then the data file is split "
        "into training and validation rows only",
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    classes: list[int] | None = Field(
        None, description="keep only these classes, renumbered 0..len-1 (e.g. a digit pair)"
    )
    label_noise: float = Field(
        0.0, ge=0.0, le=1.0, description="symmetric noise on the training and validation labels"
    )
    stream: bool = Field(
        False, description="read the data lazily (image folders, .npy memory-mapped)"
    )
    augment: bool = Field(
        False,
        description="streamed images: random crop and flip of the training rows (the students' "
        "teacher then runs online on every augmented batch)",
    )
    workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes (streamed)")
    text_column: str | None = Field(
        None, description="text data: the column of a .csv/.jsonl file holding the text"
    )
    max_length: int = Field(128, ge=1, le=1 << 16, description="text data: tokens per row")
    tokenizer: str | None = Field(
        None,
        description="text data: a local folder with a saved tokenizer (default: the hf: "
        "teacher's or student's folder)",
    )
    block_length: int | None = Field(
        None, ge=1, le=1 << 16,
        description="language modelling: the data is text (stdlib, a text file or a folder of "
        "them) in blocks of this many tokens (byte-level unless a tokenizer is given)",
    )  # fmt: skip


class ModelConfig(Strict):
    """A model by name with keyword options for its builder: a built-in (``mlp``, ``cnn1d``,
    ``cnn2d``), an import path (``package.module:callable``, ``path/file.py:callable``) or a local
    Hugging Face folder (``hf:PATH``, ``hf-config:PATH``); see ``softtargets models``."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(
        None,
        description="pretrained weights (.safetensors, or .pt/.pth read with weights_only=True) "
        "loaded instead of training; teacher only",
    )


class TrainConfig(Strict):
    """Arguments of :func:`softtargets.training.fit.fit`."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["none", "cosine", "step"] = "cosine"
    patience: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast type of the forward pass (the loss stays float32)"
    )
    compile: bool = Field(False, description="train through torch.compile(model)")
    checkpoint_every: int = Field(
        1, ge=0, description="epochs between checkpoints in the run folder (0: none)"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="smooth the hard labels by eps (a teacher, hard students)"
    )

    def fit_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~softtargets.training.fit.fit` (its checkpoint path and targets
        aside)."""
        options = self.model_dump()
        del options["checkpoint_every"], options["label_smoothing"]
        return options

    def stacked_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~softtargets.training.fit_many.fit_many`, which trains in fp32
        without compiling: other settings are refused rather than ignored."""
        options = self.fit_options()
        if options.pop("precision") != "fp32" or options.pop("compile"):
            raise SoftTargetsError(
                "MLP students are trained together (fit_many), in fp32 and without compile; set "
                "the student's precision to fp32 and compile to false"
            )
        return options


#: the most student seeds a run or study takes (a typo of 10**9 is refused, not allocated)
MAX_SEEDS = 1000

#: ``fit``'s and ``fit_many``'s defaults: a :class:`TrainConfig` as it comes
TRAINING = TrainConfig()
#: Hinton's temperature and the soft term's weight, unless a run says otherwise
TEMPERATURE, ALPHA = 4.0, 0.9
#: MNIST-1D rows of the demo and the studies (its standard size), and of the quick miniature
STANDARD_SAMPLES, QUICK_SAMPLES = 5000, 500
#: the quick miniature (tests, ``--quick``): the same code path, a few seconds long
QUICK_EPOCHS, QUICK_SEEDS, QUICK_WIDTH, QUICK_TEACHERS = 3, 2, 8, 2

#: the teacher a built-in dataset gets (the demo's and the studies'): a model that knows the
#: data's structure (convolutions for signals and images), regularised; an MLP for the rest
TEACHERS: dict[str, tuple[str, dict[str, Any]]] = {
    "mnist1d": ("cnn1d", {"channels": [64, 64, 64], "dropout": 0.3}),
    "digits": ("cnn2d", {"channels": [32, 64], "dropout": 0.3}),
}
OTHER_TEACHER: tuple[str, dict[str, Any]] = ("mlp", {"hidden": [256, 256], "dropout": 0.3})

#: how many of the standard library's sources the built-in corpus ``stdlib`` takes by default:
#: about 1,400 blocks of 128 bytes, a run of minutes on two cores
STDLIB_FILES = 8

#: language modelling (``block_length`` set) with the default models: a 4-layer causal
#: transformer teaching a 1-layer one (``gpt``; the context is the block length)
SEQUENCE_TEACHER: tuple[str, dict[str, Any]] = ("gpt", {"layers": 4, "heads": 4, "width": 128})
SEQUENCE_STUDENT: tuple[str, dict[str, Any]] = ("gpt", {"layers": 1, "heads": 4, "width": 128})


def teacher_model(data: str) -> ModelConfig:
    """The teacher recipe's model for built-in dataset ``data`` (an MLP for any other data)."""
    name, options = TEACHERS.get(data, OTHER_TEACHER)
    return ModelConfig(name=name, options=copy.deepcopy(options))


def teacher_training() -> TrainConfig:
    """The teacher recipe's training: AdamW with weight decay, 40 epochs."""
    return TrainConfig(epochs=40, optimizer="adamw", weight_decay=0.05)


def student_training() -> TrainConfig:
    """The students' training. Soft targets need more steps than hard labels to be matched (they
    say more per case), and tolerate a larger learning rate: 100 epochs at 1e-2 let both kinds of
    target converge."""
    return TrainConfig(epochs=100, lr=1e-2)


def sequence_training(role: str) -> TrainConfig:
    """A language-model run's training of ``role`` (``teacher`` or ``student``): blocks of text
    16 at a time at 3e-3 (AdamW with weight decay 0.01, cosine), the teacher 20 epochs, the
    students 6 (the demo's settings: a run of minutes on two cores). Of its fields, language-model
    runs read epochs, batch size and rate; the others must stay as here."""
    epochs = 20 if role == "teacher" else 6
    return TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, optimizer="adamw", weight_decay=0.01)


def quick_teacher(model: ModelConfig, training: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """The miniature of a teacher recipe: every layer :data:`QUICK_WIDTH` wide, trained
    :data:`QUICK_EPOCHS` epochs."""
    options = {
        k: ([QUICK_WIDTH] * len(v) if isinstance(v, list) else v) for k, v in model.options.items()
    }
    return ModelConfig(name=model.name, options=options), training.model_copy(
        update={"epochs": QUICK_EPOCHS}
    )


class DistillConfig(Strict):
    """One distillation experiment: a teacher, then a student with hard and with soft targets.

    The defaults are the demo's (``softtargets demo``): MNIST-1D at its standard size, a
    regularised CNN teacher and an MLP student; see the README for why.
    """

    data: DataConfig = Field(
        default_factory=lambda: DataConfig(
            name="mnist1d", options={"num_samples": STANDARD_SAMPLES}
        )
    )
    teacher: ModelConfig = Field(default_factory=lambda: teacher_model("mnist1d"))
    teacher_training: TrainConfig = Field(default_factory=teacher_training)
    student: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name="mlp", options={"hidden": [100, 100]})
    )
    student_training: TrainConfig = Field(default_factory=student_training)
    temperature: float = Field(TEMPERATURE, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    alpha: float = Field(ALPHA, ge=0, le=1)
    methods: list[str] = Field(
        default_factory=lambda: ["kd"],
        min_length=1,
        description="distillation methods compared with hard labels on the same teacher and "
        "seeds (softtargets methods lists them)",
    )
    method_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="each method's own options, e.g. {dkd: {beta: 8}}"
    )
    seeds: int = Field(5, ge=1, le=MAX_SEEDS)
    first_seed: int = 0
    store_dtype: Literal["float32", "float16"] = "float32"
    store_top: int = Field(
        32, ge=0, description="language models: the teacher's top-k logits kept per position "
        "(0: no store, the teacher runs online on every batch)",
    )  # fmt: skip
    on_policy: float = Field(
        0.0, ge=0.0, le=1.0,
        description="language models: the fraction of steps on which a distilled student samples "
        "each block's second half and learns the teacher's distribution there (GKD's lambda)",
    )  # fmt: skip
    store_temperatures: list[float] | None = Field(
        None,
        description="language models: the temperatures the store keeps the rest's mass at, so "
        "that distilling at them is exact (default: the run's temperature)",
    )
    store: str | None = Field(
        None,
        description="train the students from this existing store (softtargets label), without "
        "a teacher; it must have been made for this data",
    )
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)

    @field_validator("methods")
    @classmethod
    def _methods_once(cls, value: list[str]) -> list[str]:
        # the names themselves are the method registry's (softtargets.losses.reference), checked
        # against it when a run starts (run.teacher.prepare), before anything is written
        if len(set(value)) != len(value):
            raise ValueError("a method is named twice")
        return value


def check_device_name(value: str) -> str:
    """``value`` if it names a device softtargets can use (its availability is checked later)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError("the device must be auto, cpu, cuda, cuda:N or mps")
    return value


def explain(error: ValidationError, source: str) -> SoftTargetsError:
    """One line naming the first offending key of a pydantic validation error."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return SoftTargetsError(f"{source}: unknown key {where!r}; check its spelling (see --help)")
    message = first["msg"].removeprefix("Value error, ")
    return SoftTargetsError(f"{source}: {where}: {message} (got {first.get('input')!r})")


def parse_config(model: type[Strict], values: dict[str, Any], source: str = "config") -> Any:
    """Validate ``values`` against ``model``; raise a one-line :class:`SoftTargetsError` if bad."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise explain(err, source) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, with a clear error for a missing or malformed file."""
    path = Path(path)
    values = parse_yaml(read_small_text(path, "config file"), str(path)) or {}
    if not isinstance(values, dict):
        raise SoftTargetsError(f"{path}: the config must be a mapping of keys to values")
    return values


def load_config(model: type[Strict], path: str | Path) -> Any:
    return parse_config(model, load_yaml(path), str(path))


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what ``runs/<name>/config.yaml`` holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def demo_config(quick: bool = False) -> DistillConfig:
    """The demo: MNIST-1D at its standard size, a CNN teacher, an MLP student.

    Why this pairing: on MNIST-1D a small CNN is far better than an MLP of similar cost (its
    convolutions know that a digit may be shifted), so there is knowledge to transfer; the MLP
    student overfits the 3,500 training signals with hard labels, which is where soft targets help
    most. ``quick`` shrinks every step (data, epochs, seeds) for tests; the code path is the same.
    """
    config = DistillConfig()
    if quick:
        config.data.options["num_samples"] = QUICK_SAMPLES
        config.teacher, config.teacher_training = quick_teacher(
            config.teacher, config.teacher_training
        )
        config.student_training.epochs = QUICK_EPOCHS
        config.seeds = QUICK_SEEDS
    return config


class StudyConfig(Strict):
    """Settings common to every study."""

    data: str = Field("mnist1d", description="built-in dataset name or file")
    test_data: str | None = Field(
        None, description="a separate test file for the data file (then split into train/val)"
    )
    seeds: int = Field(3, ge=1, le=MAX_SEEDS, description="student seeds per teacher")
    teachers: int = Field(
        3,
        ge=1,
        le=20,
        description="independently trained teachers, each on its own split: the unit of "
        "replication of every verdict",
    )
    quick: bool = Field(False, description="a miniature of the same code path (for tests)")
    temperature: float = Field(
        TEMPERATURE,
        ge=TEMPERATURE_RANGE[0],
        le=TEMPERATURE_RANGE[1],
        description="temperature of the soft targets",
    )
    student_hidden: list[int] = Field(default_factory=lambda: [100, 100])
    student_training: TrainConfig = Field(default_factory=student_training)
    teacher: ModelConfig | None = Field(
        None, description="your teacher (any model form, weights optional) instead of the preset"
    )
    student: ModelConfig | None = Field(
        None, description="your student (any model form) instead of the MLP of student_hidden"
    )
    store: str | None = Field(
        None, description="your stored teacher logits (softtargets label) instead of a teacher"
    )

    def resolved(self) -> StudyConfig:
        """The quick miniature, if asked for: smaller data, students, epochs, seeds."""
        if not self.quick:
            return self
        quick = self.model_copy(deep=True)
        quick.seeds = min(self.seeds, QUICK_SEEDS)
        quick.teachers = min(self.teachers, QUICK_TEACHERS)
        quick.student_hidden = [2 * QUICK_WIDTH]
        quick.student_training = student_training().model_copy(update={"epochs": QUICK_EPOCHS})
        return quick
