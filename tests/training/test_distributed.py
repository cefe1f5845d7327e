"""Several processes: 2 CPU processes started by torchrun (gloo) train as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from softtargets import distributed
from softtargets.errors import SoftTargetsError

CHILD = """
import json, sys, torch
from softtargets import distributed
from softtargets.data.dataset import split
from softtargets.data.builtin import gaussians
from softtargets.training.features import FeatureDistillation
from softtargets.training.models import build_model
from softtargets.data.streams import TensorRows
from softtargets.store.label import label
from softtargets.training.objectives import Distillation
from softtargets.training.batches import _MemoryBatches
from softtargets.training.fit import fit
distributed.setup()
parts = split(gaussians(num_samples=600, num_classes=3, dim=6, separation=3.0), 0.2, 0.2)
teacher = fit(build_model("mlp", (6,), 3, seed=9, hidden=[32]), parts.train, epochs=3).model
stored = Distillation(label(teacher, parts.train), 4.0, 0.7)
# feature distillation: the adapter (16 -> 32 units) is trained beside the model, averaged too
features = FeatureDistillation(teacher, [("1", "1")], weight=1.0, temperature=4.0, alpha=0.7)
runs = {"hard": (None, parts.train), "stored logits": (stored, parts.train),
        "streamed": (stored, TensorRows(parts.train)), "features": (features, parts.train)}
out = {}
for name, (target, train) in runs.items():
    for seed in range(3 if name in ("hard", "stored logits") else 1):
        model = build_model("mlp", (6,), 3, seed=seed, hidden=[16])
        # batch 50 of 360 rows: the last batch (10 rows) is dealt out unevenly too
        r = fit(model, train, target, val=parts.val, test=parts.test, epochs=5, lr=1e-2,
                batch_size=50, seed=seed)
        out[f"{name} {seed}"] = {
            "weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
            "test": r.selected["test_accuracy"],
            "loss": [h["train_loss"] for h in r.history],
        }
batches = _MemoryBatches(parts.train, torch.arange(len(parts.train)), None, 50,
                         torch.Generator().manual_seed(0), torch.device("cpu"))
seen = [int(x) for _, rows, count, _ in batches for x in rows[:count]]
everyone = distributed.gather_to_main(seen)
if distributed.is_main():
    json.dump({"fits": out, "rows": everyone, "world": distributed.world_size()},
              open(sys.argv[1], "w"))
"""


def run_child(tmp_path, processes: int) -> dict:
    out = tmp_path / f"{processes}.json"
    command = [sys.executable, "-c", CHILD, str(out)]
    if processes > 1:
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", str(script), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_train_as_one_and_see_every_row_once(tmp_path) -> None:
    one, two = run_child(tmp_path, 1), run_child(tmp_path, 2)
    assert two["world"] == 2 and one["world"] == 1
    rank0, rank1 = (set(rows) for rows in two["rows"])
    assert not rank0 & rank1 and len(rank0 | rank1) == 360 == sum(map(len, two["rows"]))
    for name, fit_one in one["fits"].items():
        fit_two = two["fits"][name]
        # the same global batches and gradients, reduced in another order: rounding only
        torch.testing.assert_close(
            torch.tensor(fit_two["weights"]), torch.tensor(fit_one["weights"]), rtol=1e-4, atol=1e-5
        )
        assert fit_two["loss"] == pytest.approx(fit_one["loss"], rel=1e-4)
        assert abs(fit_two["test"] - fit_one["test"]) <= 0.01, name


def test_a_launch_without_its_rendezvous_gives_one_line(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SoftTargetsError, match="RANK, MASTER_ADDR, MASTER_PORT is not set"):
        distributed.setup()
    assert not distributed.active() and distributed.rank() == 0


def test_one_process_helpers_answer_as_one() -> None:
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_to_main({"a": 1}) == [{"a": 1}]
    assert list(distributed.my_share(3)) == [0, 1, 2]
    assert float(distributed.sum_(torch.tensor(2.0))) == 2.0


LABEL_CHILD = """
import sys
import softtargets.data.fingerprint
softtargets.data.fingerprint.FINGERPRINT_BLOCK = 64  # 300 rows: 5 blocks, shards of 2 and 3
from softtargets import distributed
from softtargets.data.builtin import gaussians
from softtargets.training.models import build_model
from softtargets.data.streams import TensorRows
from softtargets.store.write import label_dataset_to_file
distributed.setup()
data = gaussians(num_samples=300, num_classes=4, dim=5, separation=2.0)
teacher = build_model("mlp", (5,), 4, seed=0, hidden=[8])
label_dataset_to_file(teacher, data, sys.argv[1], batch_size=50)
label_dataset_to_file(teacher, TensorRows(data), sys.argv[2], batch_size=50)
"""


def test_labelling_on_two_processes_makes_the_one_process_store(tmp_path, monkeypatch) -> None:
    import softtargets.data.fingerprint
    from softtargets.data.builtin import gaussians
    from softtargets.store.label import label
    from softtargets.store.store import SoftTargetStore
    from softtargets.training.models import build_model

    script = tmp_path / "label.py"
    script.write_text(LABEL_CHILD)
    paths = [tmp_path / "memory.safetensors", tmp_path / "streamed.safetensors"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), *map(str, paths)],  # fmt: skip
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setattr(softtargets.data.fingerprint, "FINGERPRINT_BLOCK", 64)
    data = gaussians(num_samples=300, num_classes=4, dim=5, separation=2.0)
    teacher = build_model("mlp", (5,), 4, seed=0, hidden=[8])
    whole = label(teacher, data)
    for path in paths:
        store = SoftTargetStore.load(path, data=data, teacher=teacher)  # same fingerprints
        assert torch.equal(store.ids, whole.ids)
        torch.testing.assert_close(store.logits, whole.logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label.py", *(p.name for p in paths)]


def test_the_demo_on_two_processes_writes_the_run_one_process_writes(tmp_path) -> None:
    from softtargets.files import read_jsonl

    def demo(out, *extra: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "softtargets", "demo", "--quick", "--out", str(out), *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    demo(tmp_path / "one")
    demo(tmp_path / "two", "--nproc", "2")

    def fits(out) -> dict:
        return {(r["role"], r["method"], r["seed"]): r for r in read_jsonl(out / "results.jsonl")}

    one, two = fits(tmp_path / "one"), fits(tmp_path / "two")
    assert one.keys() == two.keys()  # every student once, written by rank 0 alone
    for name in one:  # the teacher trained with DDP differs by rounding only
        assert abs(one[name]["test_accuracy"] - two[name]["test_accuracy"]) <= 0.02, name
    epochs = [(r["role"], r["method"], r["seed"], r["epoch"]) for r in read_jsonl(tmp_path / "two" / "history.jsonl")]  # fmt: skip
    assert len(epochs) == len(set(epochs)) == len(read_jsonl(tmp_path / "one" / "history.jsonl"))
    manifest = json.loads((tmp_path / "two" / ".softtargets-run.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in (tmp_path / "two").iterdir()
                                               if not p.name.startswith("."))  # fmt: skip
    # started on 2 processes, resumed on 1: the missing fit is trained, the rest kept
    lines = (tmp_path / "two" / "results.jsonl").read_text().splitlines()
    (tmp_path / "two" / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    demo(tmp_path / "two")
    assert fits(tmp_path / "two").keys() == one.keys()


def test_a_study_on_two_processes_gives_the_one_process_rows(tmp_path) -> None:
    def study(out, *extra: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "softtargets", "study", "temperature", "--quick", "--out",
             str(out), *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads((out / "results.json").read_text())

    # both studies share the teacher in tmp_path/teachers (trained by the first, reloaded by the
    # second); the students are spread over the processes, each whole on one: the same rows
    one, two = study(tmp_path / "one"), study(tmp_path / "two", "--nproc", "2")
    assert two["rows"] == one["rows"] and two["verdict"] == one["verdict"]


def test_shares_of_streamed_batches_cover_every_row_once_with_fillers_weighted_zero() -> None:
    from softtargets.data.streams import _ShuffledShare, share_weight

    n, batch, world = 61, 20, 3  # the last global batch holds 1 row: two processes get a filler
    seen, weights = [], {}
    for rank in range(world):
        sampler = _ShuffledShare(n, torch.Generator().manual_seed(0), batch, rank, world)
        for index, rows in enumerate(sampler):
            count, weight = share_weight(n, batch, index, rank, world)
            assert len(rows) == max(count, 1)
            seen += rows[:count]
            weights[index] = weights.get(index, 0.0) + weight
    assert sorted(seen) == list(range(n))
    assert all(total == pytest.approx(world) for total in weights.values())  # DDP averages by N
