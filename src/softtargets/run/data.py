"""The run's data: loaded (in memory, streamed or tokenized), split into train / validation /
test, and what the run keys and reports about it.

In memory, the data is a :class:`~softtargets.data.dataset.Dataset` and its parts are datasets.
Streamed (``--stream``: an image folder or a memory-mapped ``.npy``), it is a
:class:`~softtargets.data.stream_parts.StreamedData` (its rows read once for the fingerprints)
and its parts are :class:`~softtargets.data.stream_parts.StreamPart` s, the training part
augmented with ``--augment``; the same labels and seed give the same parts either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softtargets.config import DistillConfig
from softtargets.data.dataset import Dataset, Splits, align_classes, split
from softtargets.data.files import load_data
from softtargets.data.stream_parts import (
    StreamedData,
    crop_and_flip,
    describe_stream,
    open_stream,
    stream_splits,
)
from softtargets.data.text import load_text
from softtargets.errors import SoftTargetsError
from softtargets.training.hf import config_folder, is_hf_name

#: a run's whole data: in memory, or streamed
RunData = Dataset | StreamedData


def rows_of(data: RunData) -> Any:
    """What ``fit``, ``evaluate`` and ``label`` take for the whole data: the dataset itself, or
    the streamed rows."""
    return data.rows if isinstance(data, StreamedData) else data


def load_splits(config: DistillConfig) -> tuple[RunData, Splits]:
    """The data of ``config`` and its train / validation / test parts.

    With ``data.test`` (a separate test file, such as MNIST's ``t10k``) the data file is split into
    training and validation rows only, and the test rows are that file's, with its classes matched
    to the data's by name. With ``data.stream`` the parts are streamed (see the module).
    """
    data_cfg = config.data
    if data_cfg.stream:
        return _streamed_splits(config)
    if data_cfg.augment:
        raise SoftTargetsError(
            "--augment transforms rows as they are read: it needs --stream (images read lazily)"
        )
    if data_cfg.text_column is not None:
        folder = tokenizer_folder(config)

        def read(path: str) -> Dataset:
            return load_text(
                path, folder, data_cfg.text_column, data_cfg.label_column, data_cfg.max_length
            )
    else:

        def read(path: str) -> Dataset:
            return load_data(path, data_cfg.label_column)

    data = (
        load_data(data_cfg.name, data_cfg.label_column, **data_cfg.options)
        if data_cfg.options
        else read(data_cfg.name)
    )
    test = None
    if data_cfg.test is not None:
        test = align_classes(read(data_cfg.test), data, data_cfg.test)
    if data_cfg.classes is not None:
        data = data.subset(classes=data_cfg.classes, relabel=True)
        test = None if test is None else test.subset(classes=data_cfg.classes, relabel=True)
    if test is None:
        parts = split(data, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.split_seed)
    else:
        train_val = split(data, data_cfg.val_fraction, 0.0, data_cfg.split_seed)
        parts = Splits(train_val.train, train_val.val, test)
    if data_cfg.label_noise > 0:
        # Training and validation labels are noisy alike (a real noisy dataset has no clean
        # validation set); the test labels stay clean, to measure what was learned.
        rate, seed = data_cfg.label_noise, data_cfg.split_seed
        parts = Splits(
            parts.train.with_label_noise(rate, seed),
            parts.val.with_label_noise(rate, seed + 1),
            parts.test,
        )
    return data, parts


def _streamed_splits(config: DistillConfig) -> tuple[StreamedData, Splits]:
    """``--stream``: the data read lazily, split by position, the training part augmented."""
    data_cfg = config.data
    refused = [
        flag
        for flag, given in (
            ("--test-data", data_cfg.test is not None),
            ("--text-column", data_cfg.text_column is not None),
            ("data.classes", data_cfg.classes is not None),
            ("data.label_noise", data_cfg.label_noise > 0),
            ("dataset options", bool(data_cfg.options)),
        )
        if given
    ]
    if refused:
        raise SoftTargetsError(f"{refused[0]} is not read with --stream; leave one of them out")
    base = open_stream(data_cfg.name, data_cfg.label_column)
    whole = describe_stream(base, Path(data_cfg.name).name)
    augment = crop_and_flip(whole.feature_shape) if data_cfg.augment else None
    train, val, test = stream_splits(
        whole, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.split_seed, augment
    )
    return whole, Splits(train, val, test)  # type: ignore[arg-type]


def tokenizer_folder(config: DistillConfig) -> str:
    """Where text data's tokenizer is saved: ``data.tokenizer``, else the ``hf:``/``hf-config:``
    teacher's folder, else the student's."""
    if config.data.tokenizer is not None:
        return config.data.tokenizer
    for model in (config.teacher, config.student):
        if is_hf_name(model.name):
            folder = config_folder(model.name)  # checked first: no config, no model
            return str(folder if folder.is_dir() else folder.parent)
    raise SoftTargetsError(
        "text data needs a tokenizer: give --tokenizer FOLDER, or an hf: teacher or student "
        "whose folder holds one"
    )
