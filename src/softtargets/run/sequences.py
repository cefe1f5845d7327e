"""The main job on text: a causal language-model teacher, its per-position store, and students.

:func:`~softtargets.run.distill.run_distillation` runs this when the data is text packed into
token blocks (``DataConfig.block_length``, ``--block-length``): every position of a block is a row,
its next token the label, so the job's stages are the classifier's with a sequence dimension —
inside the same locked run folder, with the same records, keys and resume:

| file | holds |
| --- | --- |
| ``teacher.safetensors`` | the teacher's weights, keyed by the data and teacher settings |
| ``store.safetensors`` | per position: the teacher's top-k logits, bit-packed token ids, the rest's log-sum-exp at each store temperature (:class:`~softtargets.store.tokens.TokenStore`) |
| ``student-METHOD-seedS.safetensors`` | each student (``hard``: next-token cross-entropy only) |
| ``results.jsonl`` | one line per finished fit: validation and test loss in nats and bits per token |
| ``report.md`` | bits per token (per byte, byte-level) with 95% intervals over seeds, and each method minus cross-entropy |

Every fit saves its state in the folder after each epoch (``checkpoint_every``), so a run killed
mid-fit continues that fit where it stopped; finished fits are kept. Under torchrun (``--nproc``)
the teacher trains data-parallel, labelling is shared out by blocks, and the students are spread
over the processes, each fit whole on one; rank 0 writes every file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softtargets import distributed
from softtargets.config import DistillConfig, ModelConfig, sequence_training
from softtargets.data.sequences import Blocks
from softtargets.errors import SoftTargetsError, first_line
from softtargets.run.data import tokenizer_folder
from softtargets.run.deployment import language_model_rows
from softtargets.run.folder import RunFolder, config_key, fit_records, settings_key
from softtargets.run.sequence_data import BITS, SequenceSplits
from softtargets.run.students import BEST, name_best_language_model, save_student
from softtargets.run.teacher import (
    checkpoint_name,
    is_pretrained,
    name_student_checkpoints,
    pretrained_weights,
)
from softtargets.store.tokens import TokenStore, label_tokens
from softtargets.training.checkpoint import saved_epoch
from softtargets.training.common import resolve_device
from softtargets.training.lm import fit_lm, next_token_loss
from softtargets.training.models import build_model, count_parameters
from softtargets.training.weights import cpu_state, file_fingerprint, load_into


def build_lm(model: ModelConfig, blocks: Blocks, seed: int, role: str) -> nn.Module:
    """A language model of ``model``'s settings for ``blocks`` (the context defaults to the
    block length), checked to map ``(B, L)`` ids to ``(B, L, V)`` logits."""
    options = dict(model.options)
    if model.name == "gpt":
        options.setdefault("context", blocks.block_length)
    built = build_model(model.name, (blocks.block_length,), blocks.vocab_size, seed=seed, **options)
    wanted = (1, blocks.block_length, blocks.vocab_size)
    try:
        with torch.no_grad():
            logits = built(blocks.batch(slice(0, 1))[:, :-1])
    except Exception as err:  # a model of another kind fails deep inside torch: say what it is
        raise SoftTargetsError(
            f"{role} {model.name} fails on (1, {blocks.block_length}) token ids "
            f"({first_line(err)}); a language model maps them to {wanted} logits"
        ) from err
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if shape != wanted:
        raise SoftTargetsError(
            f"{role} {model.name} maps (1, {blocks.block_length}) token ids to {shape}; a "
            f"language model gives {wanted} logits over the tokenizer's vocabulary"
        )
    return built


def _measure(model: nn.Module, splits: SequenceSplits, val: float | None = None) -> dict[str, Any]:
    """Validation and test next-token loss of ``model``, in nats and bits per token (``val``:
    the validation loss when the fit already measured it)."""
    model.eval()
    if val is None:
        val = next_token_loss(model, splits.val) if len(splits.val) else float("nan")
    test = next_token_loss(model, splits.test) if len(splits.test) else float("nan")
    return {
        "val_loss": val,
        "val_bits_per_token": val / BITS,
        "test_loss": test,
        "test_bits_per_token": test / BITS,
        "test_tokens": splits.test.positions,
        "parameters": count_parameters(model),
    }


def _fit(model: nn.Module, splits: SequenceSplits, config: DistillConfig, role: str,
         teacher: Any, method: str, seed: int, folder: RunFolder, key: str,
         log: Callable[[str], None],
         progress: Any = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Train one language model (its best validation epoch kept, its state saved in ``folder``
    as it goes, under the fit's ``key``) and measure it."""
    training = config.teacher_training if role == "teacher" else config.student_training
    every = training.checkpoint_every
    checkpoint = folder.path(checkpoint_name((key, role, method, seed))) if every else None
    if checkpoint is not None and (done := saved_epoch(checkpoint)):
        fit = "teacher" if role == "teacher" else f"student {method}, seed {seed}"
        log(f"{fit}: continuing after epoch {done} (its checkpoint)")
    result = fit_lm(
        model, splits.train, splits.val, teacher, method=method if teacher is not None else "kd",
        temperature=config.temperature, alpha=config.alpha if teacher is not None else 0.0,
        epochs=training.epochs, batch_blocks=training.batch_size, lr=training.lr, seed=seed,
        on_policy=config.on_policy if role == "student" and teacher is not None else 0.0,
        progress=progress, description=role if role == "teacher" else f"{method}, seed {seed}",
        device=resolve_device(config.device), checkpoint=checkpoint, checkpoint_every=every,
    )  # fmt: skip
    record = {"role": role, "method": method, "seed": seed, "best_epoch": result.best_epoch,
              **_measure(model, splits, min(r["val_loss"] for r in result.history)),
              "seconds": round(result.seconds, 1)}  # fmt: skip
    return model, record


def store_temperatures(config: DistillConfig) -> tuple[float, ...]:
    """The temperatures the store keeps the rest's mass at; the run's must be one of them (at
    any other, the rest's share of the probability is unknown)."""
    temperatures = tuple(config.store_temperatures or [config.temperature])
    if config.temperature not in temperatures:
        raise SoftTargetsError(
            f"the store keeps the rest's mass at T = {', '.join(f'{t:g}' for t in temperatures)}, "
            f"not at the run's T = {config.temperature:g}: add it to --store-temperatures"
        )
    return temperatures


@dataclass
class SequenceSource:
    """What the students learn from, made while checking: the teacher model (built, not yet
    trained), or another run's store (``--store``), whichever the config names."""

    teacher: nn.Module | None = None
    store: TokenStore | None = None


def check_sequence_job(config: DistillConfig, train: Blocks) -> SequenceSource:
    """Check everything before anything is written: the store's settings, and both models built
    once on ``train``'s blocks: each must map ``(B, L)`` ids to ``(B, L, V)`` logits over the
    tokenizer's vocabulary, and the student must give its hidden states and output projection
    (its loss runs in chunks of positions). Returns the teacher or store it made, for the run."""
    store_temperatures(config)
    for role in ("teacher", "student"):
        given, default = getattr(config, f"{role}_training"), sequence_training(role)
        fixed = [f for f in type(given).model_fields if f not in ("epochs", "batch_size", "lr",
                 "checkpoint_every") and getattr(given, f) != getattr(default, f)]  # fmt: skip
        if fixed:
            raise SoftTargetsError(
                f"language-model runs train with AdamW (weight decay 0.01), a cosine schedule "
                f"and fp32, and read only epochs, batch size and rate: leave out the {role}'s "
                f"{fixed[0].replace('_', ' ')} ({getattr(given, fixed[0])!r})"
            )
    if config.store is not None:  # label once, distil many: another run's store of these blocks
        if config.on_policy:
            raise SoftTargetsError(
                "on-policy distillation runs the teacher on the student's own samples, so it "
                "needs the teacher model, not --store; leave one of them out"
            )
        stored = TokenStore.load(config.store, train)  # refuses other blocks or vocabulary
        if not any(math.isclose(t, config.temperature) for t in stored.temperatures):
            raise SoftTargetsError(
                f"{config.store} keeps the rest's mass at T = "
                f"{', '.join(f'{t:g}' for t in stored.temperatures)}, not at --temperature "
                f"{config.temperature:g}: distil at one of those, or label again"
            )
        _check_student(config, build_lm(config.student, train, 0, "student"), train)
        return SequenceSource(store=stored)
    if config.store_top >= train.vocab_size:
        raise SoftTargetsError(
            f"--store-top {config.store_top} keeps the whole vocabulary of {train.vocab_size} "
            "tokens; give a smaller number"
        )
    teacher = build_lm(config.teacher, train, config.first_seed, "teacher")
    _check_student(config, build_lm(config.student, train, 0, "student"), train)
    return SequenceSource(teacher=teacher)


def _check_student(config: DistillConfig, student: nn.Module, train: Blocks) -> None:
    """The student's loss forms its logits chunk by chunk as ``hidden(ids) @ output_weight.T``:
    it must give both, and its own logits must be exactly that (no final scale or soft cap)."""
    if not hasattr(student, "hidden") or not hasattr(student, "output_weight"):
        raise SoftTargetsError(
            f"student {config.student.name} must give hidden(ids) and output_weight (its output "
            "projection), as gpt does, so that its loss runs in chunks; use --student gpt"
        )
    ids = train.batch(slice(0, 1))[:, :-1]
    was_training = student.training
    student.eval()  # dropout would make the two passes differ
    with torch.no_grad():
        logits = student(ids).float()
        formed = (student.hidden(ids) @ student.output_weight.T).float()
    student.train(was_training)
    if not torch.allclose(logits, formed, atol=1e-4, rtol=1e-3):
        raise SoftTargetsError(
            f"student {config.student.name}'s logits are not hidden(ids) @ output_weight.T (a "
            "final scale or soft cap?), so its chunked loss would train another function; it "
            "can teach, not learn here"
        )


def run_sequences(
    folder: RunFolder,
    config: DistillConfig,
    splits: SequenceSplits,
    source: SequenceSource,
    log: Callable[[str], None],
    progress: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], TokenStore | None]:
    """The job's stages on token blocks, in the open run ``folder``: the teacher (reloaded when
    its key matches), the store (reloaded when it fits the blocks and settings), and every
    pending student; returns the teacher's record, the students' and the store."""
    train = splits.train
    log(
        f"data: {config.data.name}, {splits.files} {splits.split_unit}s, {len(train)} train / "
        f"{len(splits.val)} validation / {len(splits.test)} test blocks of "
        f"{train.block_length} tokens ({'byte-level' if splits.unit == 'byte' else 'subword'})"
    )
    if source.store is not None:
        store = source.store
        log(f"store: {config.store} ({store.bytes_per_token:.1f} bytes per token), no teacher run")
        teacher_record = {"role": "teacher", "method": "teacher", "store": str(config.store),
                          "key": f"store-{store.teacher_fingerprint[:12]}"}  # fmt: skip
        return teacher_record, _students(folder, config, splits, None, store, log, progress), store
    weights = pretrained_weights(config)  # keyed by their content, not their path
    teacher_key = settings_key(
        {
            "settings": config_key(config, teacher_only=True),
            "data": train.fingerprint,
            **({"weights": file_fingerprint(weights)} if weights else {}),
        }  # fmt: skip
    )
    if folder.key("teacher") not in (None, teacher_key):
        raise SoftTargetsError(
            f"{folder.root} holds a teacher made with other data or teacher settings; pass "
            "--overwrite to replace it or --out to write elsewhere"
        )
    every = fit_records(folder, "results.jsonl", unique=True)
    teacher = source.teacher
    assert teacher is not None  # check_sequence_job builds one unless there is a store
    reloaded = folder.load_weights("teacher.safetensors", teacher, teacher_key)
    teacher_record = next(
        (r for r in every if r["role"] == "teacher" and r["key"] == teacher_key), None
    )
    pretrained = is_pretrained(config)
    if (not reloaded or teacher_record is None) and pretrained:
        if config.teacher.weights is not None:  # (an hf: folder's weights came with it)
            load_into(teacher, config.teacher.weights, "teacher")
        log(f"teacher: pretrained weights from {config.teacher.weights or config.teacher.name}")
        teacher_record = {"role": "teacher", "method": "teacher", "seed": config.first_seed,
                          "pretrained": True, **_measure(teacher, splits)}  # fmt: skip
    elif not reloaded or teacher_record is None:
        log(f"teacher {config.teacher.name}: training on {len(train)} blocks")
        teacher, teacher_record = _fit(teacher, splits, config, "teacher", None, "teacher",
                                       config.first_seed, folder, teacher_key, log, progress)  # fmt: skip
    if not reloaded or "key" not in teacher_record:
        teacher_record["key"] = teacher_key
        folder.save_weights("teacher.safetensors", teacher, teacher_key)
        folder.set_key("teacher", teacher_key)
        folder.append("results.jsonl", teacher_record)
        folder.remove(checkpoint_name((teacher_key, "teacher", "teacher", config.first_seed)))
    else:
        log("teacher: reloaded from a previous run")
    teacher.to(resolve_device(config.device)).eval()  # it labels, and teaches online
    log(f"teacher: test {teacher_record['test_bits_per_token']:.3f} bits per {splits.unit}")
    # --store-top 0: no store, the teacher runs online (a corpus whose store would not fit)
    store = _store(folder, config, teacher, train, reloaded, log) if config.store_top else None
    if store is None:
        log("store: none (--store-top 0); the teacher runs on every batch")
    return teacher_record, _students(folder, config, splits, teacher, store, log, progress), store


def _students(
    folder: RunFolder,
    config: DistillConfig,
    splits: SequenceSplits,
    teacher: nn.Module | None,
    store: TokenStore | None,
    log: Callable[[str], None],
    progress: Any,
) -> list[dict[str, Any]]:
    """Every pending student of the run (finished ones kept), their records returned; a store
    from elsewhere keys them by its teacher's fingerprint."""
    train = splits.train
    key = config_key(config)
    if config.store is not None:
        assert store is not None  # another run's store: the students' only source
        key = settings_key({"settings": key, "store": store.teacher_fingerprint})
    every = fit_records(folder, "results.jsonl", unique=True)
    results = [r for r in every if r["role"] == "student" and r["key"] == key]
    done = {(r["method"], r["seed"]) for r in results}
    seeds = range(config.first_seed, config.first_seed + config.seeds)
    methods = ["hard", *config.methods]
    pending = [(m, s) for s in seeds for m in methods if (m, s) not in done]
    if len(pending) < len(methods) * len(seeds):
        log(f"students: {len(methods) * len(seeds) - len(pending)} fits kept from a previous run")
    name_student_checkpoints(folder, config.student_training.checkpoint_every, key, pending)

    def fit_each(mine: list[tuple[str, int]]) -> list[tuple[dict[str, Any], Any]]:
        """Fit this process's students; rank 0 saves its own as they finish, the others hand
        their weights back."""
        finished = []
        for method, seed in mine:
            student = build_lm(config.student, train, seed, "student")
            log(f"student {method}, seed {seed}")
            # the store, unless there is none (--store-top 0) or the students learn on-policy:
            # then the teacher itself, run on each batch (on-policy: on the students' samples)
            source: Any = store if store is not None and not config.on_policy else teacher
            source = None if method == "hard" else source
            student, record = _fit(student, splits, config, "student", source, method, seed,
                                   folder, key, log, progress)  # fmt: skip
            record["key"] = key
            if method != "hard" and config.on_policy:
                record["on_policy"] = config.on_policy
            finished.append((record, None if folder.writer else cpu_state(student)))
            if folder.writer:
                _keep_student(folder, record, cpu_state(student))
        return finished

    gathered = distributed.spread(pending, fit_each) or []  # rank 0's; None elsewhere
    for theirs in gathered[1:]:  # rank 0 kept its own as they finished
        for record, state in theirs:
            _keep_student(folder, record, state)
    results += [record for mine in gathered for record, _ in mine]
    return [r for r in results if r["seed"] in seeds]


def _keep_student(folder: RunFolder, record: dict[str, Any], state: dict[str, Any]) -> None:
    """Save a finished student's weights and record, and drop its checkpoint."""
    save_student(folder, state, record)
    folder.append("results.jsonl", record)
    folder.remove(checkpoint_name((record["key"], "student", record["method"], record["seed"])))


def _store(
    folder: RunFolder,
    config: DistillConfig,
    teacher: nn.Module,
    train: Blocks,
    reloaded: bool,
    log: Callable[[str], None],
) -> TokenStore:
    """The teacher's per-position store of the training blocks: reloaded when it was written for
    these blocks, this teacher, ``store_top`` and the store temperatures, else labelled again."""
    temperatures = store_temperatures(config)
    path = folder.path("store.safetensors")
    if reloaded and path.exists():
        try:
            store = TokenStore.load(path, train)
            if store.top == config.store_top and store.temperatures == temperatures:
                log(f"store: reloaded ({store.bytes_per_token:.1f} bytes per token)")
                return store
        except SoftTargetsError as err:
            log(f"store: {err}; labelling again")
    # written batch by batch as it is labelled and read back mapped: the store may outgrow memory
    store = label_tokens(teacher, train, top=config.store_top, temperatures=temperatures, path=path)
    log(f"store: top-{store.top}, {store.bytes_per_token:.1f} bytes per token")
    return store


def name_best_student(
    folder: RunFolder,
    config: DistillConfig,
    splits: SequenceSplits,
    teacher: dict[str, Any],
    teacher_model: nn.Module | None,
    students: list[dict[str, Any]],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Name the run's student (the lowest validation loss: ``student.safetensors`` and
    ``student.json``, which say how it reads text) for ``predict`` and ``export``, and measure
    it beside the teacher (:func:`~softtargets.run.deployment.language_model_rows`; none when
    the run learned from another run's store; ``teacher_model``: the run's teacher)."""
    if not folder.writer:
        return []
    reading = {
        "block_length": splits.train.block_length,
        "vocab_size": splits.train.vocab_size,
        # a subword unit: the tokenizer folder the run read with (see text_tokenizer)
        "tokenizer": None
        if splits.unit == "byte"
        else str(Path(tokenizer_folder(config)).resolve()),
        "unit": splits.unit,
    }
    model = build_lm(config.student, splits.train, 0, "student")
    best = name_best_language_model(folder, config, model, students, reading)
    if best is None:
        return []
    log(
        f"student: {best['method']}, seed {best['seed']} (lowest validation loss) saved as "
        f"{folder.root / BEST}.safetensors"
    )
    weights = folder.root / "teacher.safetensors"
    if teacher_model is None or not weights.is_file() or not len(splits.test):
        return []
    load_into(model, folder.root / f"{BEST}.safetensors", "student")
    sizes = {"teacher": weights.stat().st_size,
             "student": (folder.root / f"{BEST}.safetensors").stat().st_size}  # fmt: skip
    bits = {"teacher": teacher["test_bits_per_token"], "student": best["test_bits_per_token"]}
    blocks = splits.test.batch(slice(0, 256))[:, :-1]
    return language_model_rows(teacher_model, model, bits, sizes, blocks)
