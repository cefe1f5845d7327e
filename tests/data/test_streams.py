"""Streamed data (a torch Dataset of (x, label, id) through a DataLoader) trains, evaluates and
labels as in-memory data does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from softtargets.data.builtin import gaussians
from softtargets.data.dataset import split
from softtargets.data.streams import ArrayRows, ImageFolderRows, TensorRows
from softtargets.errors import SoftTargetsError
from softtargets.store.label import label
from softtargets.store.store import SoftTargetStore
from softtargets.training.fit import fit
from softtargets.training.metrics import evaluate
from softtargets.training.models import build_model
from softtargets.training.objectives import Distillation


@pytest.fixture(scope="module")
def parts():
    return split(gaussians(num_samples=400, num_classes=3, dim=6, separation=3.0), 0.2, 0.2)


def student(seed: int = 0) -> nn.Module:
    return build_model("mlp", (6,), 3, seed=seed, hidden=[12])


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_hard_labels_streamed_equal_in_memory(parts) -> None:
    common = dict(epochs=3, batch_size=32, lr=1e-2, seed=4, schedule="cosine")
    memory = fit(student(), parts.train, val=parts.val, test=parts.test, **common)
    streamed = fit(
        student(), TensorRows(parts.train), val=TensorRows(parts.val), test=parts.test, **common
    )
    # the DataLoader draws the same seeded permutation each epoch: the same batches, same steps
    torch.testing.assert_close(weights(streamed.model), weights(memory.model))
    assert [r["val_accuracy"] for r in streamed.history] == [
        r["val_accuracy"] for r in memory.history
    ]
    assert streamed.best_epoch == memory.best_epoch


def test_store_distillation_streamed_equals_in_memory(parts) -> None:
    teacher = fit(student(9), parts.train, epochs=3, lr=1e-2).model
    store = label(teacher, parts.train)
    common = dict(epochs=2, batch_size=32, lr=1e-2)
    targets = Distillation(store, 4.0, 0.7)
    memory = fit(student(), parts.train, targets, **common)
    streamed = fit(student(), TensorRows(parts.train), targets, **common)
    torch.testing.assert_close(weights(streamed.model), weights(memory.model), rtol=1e-4, atol=1e-5)
    # without augmentation the online teacher gives the stored logits
    online = fit(student(), TensorRows(parts.train), Distillation(teacher, 4.0, 0.7), **common)
    torch.testing.assert_close(weights(online.model), weights(memory.model), rtol=1e-4, atol=1e-5)


class Recorder(nn.Module):
    """A teacher that remembers what it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_model("mlp", (6,), 3, seed=1, hidden=[4])
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.inner(x)


def test_the_online_teacher_sees_the_augmented_batch(parts) -> None:
    teacher = Recorder()
    shift = TensorRows(parts.train, transform=lambda x: x + 100.0)
    fit(student(), shift, Distillation(teacher, 2.0, 1.0), epochs=1, batch_size=64)
    seen = torch.cat(teacher.seen)
    assert len(seen) == len(parts.train)
    assert float(seen.min()) > 50  # every input the teacher saw had been transformed
    assert not teacher.training  # run in eval mode


def test_label_of_a_stream_equals_label_in_memory() -> None:
    data = gaussians(num_samples=300, num_classes=3, dim=6)  # whole: a split inherits its
    teacher = student(3)  # parent's fingerprint, which rows streamed alone cannot reproduce
    memory = label(teacher, data)
    streamed = label(teacher, TensorRows(data), batch_size=50)
    torch.testing.assert_close(streamed.logits, memory.logits)
    assert torch.equal(streamed.ids, memory.ids)
    assert streamed.data_fingerprint == memory.data_fingerprint
    assert streamed.labels_fingerprint == memory.labels_fingerprint
    streamed.check(data, teacher, labels=True)  # accepted for the in-memory data


def test_evaluate_a_stream_equals_in_memory(parts) -> None:
    model, teacher = student(1), student(2)
    store = label(teacher, parts.test)
    for reference in (None, teacher, store):
        a = evaluate(model, parts.test, reference)
        b = evaluate(model, TensorRows(parts.test), reference, batch_size=7)
        assert a == pytest.approx(b)


def test_memory_mapped_rows(tmp_path, parts) -> None:
    x, y = parts.train.features.numpy(), parts.train.labels.numpy() + 1  # labels 1..3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    rows = ArrayRows(tmp_path / "x.npy", tmp_path / "y.npy")
    assert isinstance(rows.features, np.memmap) and rows.class_names == ("1", "2", "3")
    assert torch.equal(rows[5][0], parts.train.features[5]) and rows[5][1] == int(y[5]) - 1
    result = fit(student(), rows, epochs=2, batch_size=64, lr=1e-2)
    memory = fit(student(), parts.train, epochs=2, batch_size=64, lr=1e-2)
    torch.testing.assert_close(weights(result.model), weights(memory.model))


def test_image_folder_rows_with_augmentation(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    flip = ImageFolderRows(tmp_path, transform=lambda x: torch.flip(x, dims=[2]))
    plain = ImageFolderRows(tmp_path)
    assert flip.class_names == ("cats", "dogs") and len(flip) == 12
    assert torch.equal(flip[7][0], torch.flip(plain[7][0], dims=[2])) and flip[7][1:] == (1, 7)
    model = build_model("cnn2d", (3, 5, 4), 2, seed=0, channels=[4], hidden=8)
    result = fit(model, flip, val=plain, epochs=2, batch_size=4, lr=1e-2)
    assert len(result.history) == 2 and "val_accuracy" in result.history[0]
    assert set(evaluate(model, plain)) >= {"accuracy", "errors", "nll"}


def test_streamed_misuse_is_a_clear_error(parts) -> None:
    rows = TensorRows(parts.train)
    with pytest.raises(SoftTargetsError, match="validation fraction needs in-memory"):
        fit(student(), rows, val=0.2, epochs=1)
    with pytest.raises(SoftTargetsError, match="probability matrices need in-memory"):
        fit(student(), rows, torch.full((len(rows), 3), 1 / 3), epochs=1)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return torch.zeros(6), 0

    with pytest.raises(SoftTargetsError, match="items must be \\(x, label, id\\)"):
        fit(student(), Pairs(), epochs=1)
    with pytest.raises(SoftTargetsError, match="outputs shape"):
        fit(build_model("mlp", (6,), 5, seed=0), rows, epochs=1)
    other = SoftTargetStore(torch.zeros(3, 4), torch.arange(3), "t", "d", ("a", "b", "c", "d"))
    with pytest.raises(SoftTargetsError, match="teacher has 4 classes"):
        fit(student(), rows, Distillation(other), epochs=1)


def test_worker_processes_give_the_same_fit(parts) -> None:
    common = dict(epochs=2, batch_size=32, lr=1e-2, seed=1)
    alone = fit(student(), TensorRows(parts.train), **common)
    workers = fit(student(), TensorRows(parts.train), num_workers=1, **common)
    torch.testing.assert_close(weights(workers.model), weights(alone.model))
