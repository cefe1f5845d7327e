"""Label once, distil many times (FKD's workflow): run a trained teacher over the data once and
write its store, for ``softtargets distill --store FILE`` to train students from anywhere,
without the teacher.

The teacher must already be trained: ``--teacher-weights FILE`` or an ``hf:PATH`` folder
(``softtargets teacher`` trains one and stores its logits in its run folder). The store keeps
every row of the data (train, validation and test alike, by id) and is keyed by the teacher's
weights and the data's content, so a student run on other data refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from softtargets import distributed
from softtargets.config import DistillConfig
from softtargets.errors import SoftTargetsError
from softtargets.files import check_writable
from softtargets.run.data import rows_of
from softtargets.run.folder import check_out_of_inputs
from softtargets.run.teacher import is_pretrained, prepare
from softtargets.store.label import label
from softtargets.store.store import SoftTargetStore
from softtargets.store.write import label_dataset_to_file


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
    rest's log-sum-exp per row).
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
