"""Label once, distil many times (FKD's workflow): run a trained teacher over the data once and
write its store, for ``softtargets distill --store FILE`` to train students from anywhere,
without the teacher.

The teacher must already be trained: ``--teacher-weights FILE`` or an ``hf:PATH`` folder
(``softtargets teacher`` trains one and stores its logits in its run folder). The store keeps
every row of the data (train, validation and test alike, by id) and is keyed by the teacher's
weights and the data's content, so a student run on other data refuses it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from softtargets import distributed
from softtargets.config import DistillConfig
from softtargets.data.sequences import Blocks
from softtargets.errors import SoftTargetsError
from softtargets.files import check_writable
from softtargets.run.data import rows_of
from softtargets.run.folder import check_out_of_inputs
from softtargets.run.sequence_data import (
    is_sequence_job,
    load_sequence_splits,
    reads_from_token_file,
    text_tokenizer,
    with_sequence_models,
)
from softtargets.run.sequences import build_lm
from softtargets.run.teacher import is_pretrained, prepare
from softtargets.store.label import label
from softtargets.store.store import SoftTargetStore
from softtargets.store.tokens import check_top, label_tokens
from softtargets.store.write import label_dataset_to_file
from softtargets.training.common import resolve_device
from softtargets.training.weights import load_into


@dataclass
class Labelled:
    """What ``label`` wrote: the store's path, rows, classes and logits kept per row."""

    path: Path
    rows: int
    classes: int
    kept: int
    bytes: int


def run_label(
    config: DistillConfig,
    out: str | Path,
    *,
    top_k: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Labelled:
    """Write the store of ``config``'s teacher over ``config``'s data to ``out`` (a file).

    Full stores are streamed to the file in chunks and, under torchrun, sharded over the
    processes; a top-k store is reduced in memory on one process (``k`` of ``K`` logits and the
    rest's log-sum-exp per row). On text in token blocks (``--block-length``) the store is a
    :class:`~softtargets.store.tokens.TokenStore` of the training blocks' positions (``top_k``,
    default ``config.store_top``, at ``config.store_temperatures``), labelled and written batch by
    batch and, under torchrun, shared out by blocks.
    """
    out = Path(out)
    if not is_pretrained(config):
        raise SoftTargetsError(
            "label runs a trained teacher: give --teacher-weights FILE (or an hf:PATH teacher); "
            "softtargets teacher trains one and stores its logits"
        )
    if out.suffix != ".safetensors":
        raise SoftTargetsError(f"--out {out}: a store is a .safetensors file")
    if out.is_dir() or ((out.exists() or out.is_symlink()) and not overwrite):
        raise SoftTargetsError(
            f"{out} exists; pass --overwrite to replace it or choose another --out"
        )
    check_out_of_inputs(out, [config.data.name, config.data.test])
    if is_sequence_job(config):
        return _label_sequences(config, out, top_k, log)
    prepared = prepare(config)
    teacher, data = prepared.teacher, prepared.data
    assert teacher is not None  # prepare builds the teacher when there is no --store
    teacher.to(prepared.device).eval()
    if top_k is not None and not 1 <= top_k < data.num_classes:
        raise SoftTargetsError(
            f"--top-k must be from 1 to {data.num_classes - 1} (the data has {data.num_classes} "
            "classes); leave it out for every logit"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out)  # never through a link planted where the store goes
    dtype = torch.float16 if config.store_dtype == "float16" else torch.float32
    info = {"teacher": config.teacher.model_dump(), "data": config.data.name}
    log(f"labelling {len(data)} rows of {data.name} with teacher {config.teacher.name}")
    rows = rows_of(data)  # the dataset itself, or its streamed rows
    if top_k is None:
        label_dataset_to_file(teacher, rows, out, dtype=dtype, device=prepared.device, info=info)
    elif distributed.is_main():
        label(teacher, rows, dtype=dtype, device=prepared.device, info=info, top_k=top_k).save(out)
    distributed.barrier()
    store = SoftTargetStore.load(out, data=data, teacher=teacher, mmap=True)
    return Labelled(out, len(store), store.num_classes, store.kept, out.stat().st_size)


def _label_sequences(
    config: DistillConfig, out: Path, top_k: int | None, log: Callable[[str], None]
) -> Labelled:
    """``run_label`` on token blocks: every position of the training blocks, top-k per position
    (the blocks ``distill --store`` trains on; it checks them against the store). The store is
    written as it is labelled; with ``--stream``, or a corpus beyond the memory budget, the corpus
    is read from a token file beside ``out`` for the while (removed after), so neither has to
    fit in memory."""
    config = with_sequence_models(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out)  # never through a link planted where the store goes
    tokenizer = text_tokenizer(config)  # read once: for --top-k, then for the corpus
    check_top(config.store_top if top_k is None else top_k, tokenizer.vocab_size)
    if not reads_from_token_file(config):
        train = load_sequence_splits(config, tokenizer=tokenizer).train
        return _label_blocks(config, train, out, top_k, log)
    # a fresh softtargets temporary's name (rank 0's, for every process): ours to remove
    token_file = out.parent / distributed.share_from_main(
        f".{out.name}.softtargets-{os.getpid()}-tokens.tmp"
    )
    log(f"reading the corpus from a token file, {token_file.name}, while labelling")
    try:
        train = load_sequence_splits(config, token_file, tokenizer).train
        return _label_blocks(config, train, out, top_k, log)
    finally:
        distributed.barrier()  # every process is done with the token file
        if distributed.is_main():
            token_file.unlink(missing_ok=True)


def _label_blocks(
    config: DistillConfig,
    train: Blocks,
    out: Path,
    top_k: int | None,
    log: Callable[[str], None],
) -> Labelled:
    """Label the training blocks ``train`` into the store at ``out``."""
    # the store serves distillation at each of these (default: the config's temperature)
    temperatures = tuple(config.store_temperatures or [config.temperature])
    top = config.store_top if top_k is None else top_k
    teacher = build_lm(config.teacher, train, config.first_seed, "teacher")
    if config.teacher.weights is not None:  # (an hf: folder's weights came with it)
        load_into(teacher, config.teacher.weights, "teacher")
    teacher.to(resolve_device(config.device)).eval()
    log(
        f"labelling {train.positions:,} positions ({len(train)} blocks of "
        f"{train.block_length}) with teacher {config.teacher.name}, top-{top}"
    )
    # written batch by batch as it is labelled (rank 0 writes every process's rows)
    store = label_tokens(teacher, train, top=top, temperatures=temperatures, path=out)
    return Labelled(out, len(store), train.vocab_size, top, out.stat().st_size)
