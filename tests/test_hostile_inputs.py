"""Inputs built to hang or exhaust the machine: special files named as data, YAML aliases that
expand to gigabytes, JSON nested past Python's recursion limit in softtargets' own files. Each
must be one line (a SoftTargetsError), at once, within a small memory budget."""

from __future__ import annotations

import json
import os
import resource
import threading

import numpy as np
import pytest

from softtargets.config import DistillConfig, load_config
from softtargets.data.files import load_file
from softtargets.errors import SoftTargetsError
from softtargets.files import append_jsonl, parse_json, parse_yaml, read_jsonl
from softtargets.run.folder import MANIFEST, RunFolder

LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one_line(call, match: str) -> str:
    with pytest.raises(SoftTargetsError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_fifo_named_as_data_is_refused_at_once(tmp_path) -> None:
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(
        target=lambda: done.append(_one_line(lambda: load_file(fifo), "not a regular file")),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=20)  # a reader that opened the FIFO would block here for ever
    assert done, "load_file blocked on a FIFO"


def test_dev_zero_linked_as_data_is_refused(tmp_path) -> None:
    for name in ("zero.csv", "train-images-idx3-ubyte", "zero.npy"):
        (tmp_path / name).symlink_to("/dev/zero")
        _one_line(lambda name=name: load_file(tmp_path / name), "not a regular file")


def test_a_fifo_in_an_image_folder_is_refused(tmp_path) -> None:
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / "0.png")
    os.mkfifo(tmp_path / "a" / "1.png")
    _one_line(lambda: load_file(tmp_path), "not a regular file")


def test_yaml_aliases_are_refused_before_they_expand(tmp_path) -> None:
    config = tmp_path / "laughs.yaml"
    config.write_text(
        f"teacher:\n  name: mlp\n  options:\n    x: {{{LAUGHS.replace(chr(10), ', ')}}}\n"
    )
    assert len(config.read_bytes()) < 1000  # 9^9 strings, some 3 GB, if expanded
    before = _peak_mb()
    _one_line(lambda: load_config(DistillConfig, config), "aliases")
    _one_line(lambda: parse_yaml(LAUGHS, "an option"), "aliases")
    assert _peak_mb() - before < 200


@pytest.mark.parametrize("depth", [70, 100_000])
def test_deeply_nested_json_in_our_files_is_one_line(tmp_path, depth) -> None:
    nested = "[" * depth + "]" * depth
    _one_line(lambda: parse_json(nested, "x.json"), "nested")
    # a run folder's manifest and a records file, tampered with
    run = tmp_path / "run"
    with RunFolder.open(run) as folder:
        folder.append("results.jsonl", {"ok": 1})
    (run / "results.jsonl").write_text(json.dumps({"ok": 1}) + "\n" + '{"a": ' + nested + "}\n")
    _one_line(lambda: read_jsonl(run / "results.jsonl"), "line 2")
    (run / MANIFEST).write_text('{"format": "softtargets.run", "files": ' + nested + "}")
    with pytest.raises(SoftTargetsError, match="corrupt") as caught:
        with RunFolder.open(run):
            pass
    assert "\n" not in str(caught.value)


def test_a_config_that_is_a_device_or_too_large_is_refused(tmp_path) -> None:
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    _one_line(lambda: load_config(DistillConfig, tmp_path / "zero.yaml"), "not a regular file")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as handle:
        handle.truncate(65 << 20)  # sparse: no disk used
    _one_line(lambda: load_config(DistillConfig, big), "larger than")


def test_records_still_append_and_read_after_the_budget_checks(tmp_path) -> None:
    path = tmp_path / "history.jsonl"
    for epoch in range(3):
        append_jsonl(path, {"epoch": epoch, "nested": {"a": [1, {"b": 2}]}})
    assert [r["epoch"] for r in read_jsonl(path)] == [0, 1, 2]
