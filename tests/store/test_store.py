from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from softtargets.data.dataset import Dataset
from softtargets.data.targets import soften
from softtargets.errors import SoftTargetsError
from softtargets.store.label import label
from softtargets.store.store import SoftTargetStore, fingerprint_module
from softtargets.training.models import build_model


@pytest.fixture
def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset.from_arrays(
        torch.randn(50, 6, generator=g), torch.arange(50) % 3, ids=torch.arange(1000, 1050)
    )


@pytest.fixture
def teacher(data: Dataset) -> torch.nn.Module:
    return build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8])


def test_store_round_trip_and_any_temperature(tmp_path, data, teacher) -> None:
    store = label(teacher, data, batch_size=7)
    path = store.save(tmp_path / "store.safetensors")
    assert set(load_file(str(path))) == {"logits", "ids"}  # a plain safetensors file
    loaded = SoftTargetStore.load(path, data=data, teacher=teacher)
    torch.testing.assert_close(loaded.logits, teacher(data.features).detach())
    for t in (1.0, 4.0, 20.0):
        torch.testing.assert_close(
            loaded.soften(t, data), soften(teacher(data.features).detach(), t)
        )
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away


def test_lookup_serves_any_subset_or_shuffle(data, teacher) -> None:
    store = label(teacher, data)
    part = data.take(torch.tensor([40, 3, 17]))
    torch.testing.assert_close(store.logits_for(part), teacher(part.features).detach())
    torch.testing.assert_close(store.logits_for(torch.tensor([1040, 1003])), store.logits[[40, 3]])
    with pytest.raises(SoftTargetsError, match="not in this store .first: 5"):
        store.logits_for(torch.tensor([1003, 5]))


def test_stale_store_is_refused(tmp_path, data, teacher) -> None:
    path = label(teacher, data).save(tmp_path / "s.safetensors")
    other_teacher = build_model("mlp", data.feature_shape, 3, seed=1, hidden=[8])
    with pytest.raises(SoftTargetsError, match="made by teacher .* but the given teacher"):
        SoftTargetStore.load(path, teacher=other_teacher)
    changed = Dataset.from_arrays(data.features + 1, data.labels, ids=data.ids)
    with pytest.raises(SoftTargetsError, match="made for data .* label this data"):
        SoftTargetStore.load(path, data=changed)


def test_corrupt_or_foreign_files_are_refused(tmp_path, data, teacher) -> None:
    path = label(teacher, data).save(tmp_path / "s.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SoftTargetsError, match="not a readable store") as info:
        SoftTargetStore.load(path)
    assert "\n" not in str(info.value)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SoftTargetsError, match="not a softtargets store"):
        SoftTargetStore.load(tmp_path / "other.safetensors")
    with pytest.raises(SoftTargetsError, match="no store at"):
        SoftTargetStore.load(tmp_path / "missing.safetensors")


def test_teacher_with_other_classes_is_refused(data) -> None:
    wrong = build_model("mlp", data.feature_shape, 5, seed=0)
    with pytest.raises(
        SoftTargetsError, match="teacher outputs .5,. logits per row but the data has 3"
    ):
        label(wrong, data)


def test_float16_store_halves_the_logits(tmp_path, data, teacher) -> None:
    store = label(teacher, data, dtype=torch.float16)
    assert store.logits.dtype == torch.float16
    loaded = SoftTargetStore.load(store.save(tmp_path / "h.safetensors"))
    torch.testing.assert_close(
        loaded.logits_for(data), teacher(data.features).detach(), rtol=2e-3, atol=2e-3
    )


def test_fingerprint_changes_with_any_weight(teacher) -> None:
    before = fingerprint_module(teacher)
    with torch.no_grad():
        next(teacher.parameters())[0, 0] += 1e-6
    assert fingerprint_module(teacher) != before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streamed_store_equals_in_memory_store(tmp_path, data, teacher, dtype) -> None:
    from softtargets.store.write import label_to_file

    chunks = ((data.features[i : i + 7], data.ids[i : i + 7]) for i in range(0, len(data), 7))
    path = label_to_file(
        teacher, chunks, len(data), tmp_path / "s.safetensors", data.class_names, dtype=dtype
    )
    streamed = SoftTargetStore.load(path, data=data, teacher=teacher)  # fingerprints agree
    in_memory = label(teacher, data, dtype=dtype)
    torch.testing.assert_close(streamed.logits, in_memory.logits)
    assert torch.equal(streamed.ids, data.ids)
    assert set(load_file(str(path))) == {"logits", "ids"}


def test_streamed_store_checks_row_count(tmp_path, data, teacher) -> None:
    from softtargets.store.write import label_to_file

    chunks = [(data.features[:10], data.ids[:10])]
    with pytest.raises(SoftTargetsError, match="held 10 rows, not num_rows=50"):
        label_to_file(teacher, chunks, 50, tmp_path / "s.safetensors", data.class_names)
    assert not (tmp_path / "s.safetensors").exists()  # nothing half-written is left


def test_a_memory_mapped_store_equals_the_loaded_one_and_trains(tmp_path) -> None:
    import numpy as np

    from softtargets.training.fit import fit
    from softtargets.training.objectives import Distillation

    # 50k rows x 100 classes: more rows than one 16 MB chunk of the store's checks (41,943)
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_arrays(torch.randn(50_000, 4, generator=gen), torch.arange(50_000) % 100)
    logits = 3 * torch.randn(50_000, 100, generator=gen)
    store = SoftTargetStore(logits, data.ids.clone(), "t" * 16, data.fingerprint, data.class_names)
    path = store.save(tmp_path / "big.safetensors")
    written = path.read_bytes()
    mapped = SoftTargetStore.load(path, data=data, mmap=True)
    assert (
        isinstance(mapped.logits.numpy().base, np.memmap) or mapped.logits.numpy().base is not None
    )
    assert torch.equal(mapped.logits, logits) and torch.equal(mapped.ids, store.ids)
    part = data.take(torch.arange(0, 50_000, 97))
    model = build_model("mlp", (4,), 100, seed=0, hidden=[8])
    common = dict(epochs=1, batch_size=64, lr=1e-2)
    a = fit(model, part, Distillation(mapped, 2.0, 0.5), **common)
    b = fit(
        build_model("mlp", (4,), 100, seed=0, hidden=[8]),
        part,
        Distillation(store, 2.0, 0.5),
        **common,
    )
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in a.model.parameters()]),
        torch.cat([p.flatten() for p in b.model.parameters()]),
    )
    assert path.read_bytes() == written  # mapped copy-on-write: the file is never written


def test_a_memory_mapped_store_refuses_bad_files(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(SoftTargetsError, match="not a"):
        SoftTargetStore.load(path, mmap=True)


def test_a_top_k_store_keeps_the_kept_classes_exact_and_is_small(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_arrays(torch.randn(300, 4, generator=gen), torch.arange(300) % 1000,
                               class_names=[str(k) for k in range(1000)])  # fmt: skip
    logits = 3 * torch.randn(300, 1000, generator=gen)
    full = SoftTargetStore(logits, data.ids.clone(), "t" * 16, data.fingerprint, data.class_names)
    top = full.top_k(32)
    assert top.num_classes == 1000 and top.kept == 32 and top.top_indices.dtype == torch.int16
    # at T = 1 the kept classes' probabilities and the rest's total are the teacher's
    p_full, p_top = full.soften(1.0), top.soften(1.0)
    kept = top.top_indices.long()
    torch.testing.assert_close(p_top.gather(1, kept), p_full.gather(1, kept))
    rest_full, rest_top = (p.scatter(1, kept, 0.0).sum(1) for p in (p_full, p_top))
    torch.testing.assert_close(rest_top, rest_full)
    assert torch.equal(top.top_k(5).top_indices, full.top_k(5).top_indices)
    # on disk: at most 6% of the full store (float16 logits, int16 indices, float32 tail)
    half = replace_logits(top, top.logits.half())
    saved = half.save(tmp_path / "top.safetensors").stat().st_size
    assert saved / full.save(tmp_path / "full.safetensors").stat().st_size <= 0.06
    loaded = SoftTargetStore.load(tmp_path / "top.safetensors", data=data)
    torch.testing.assert_close(loaded.logits_for(data), half.logits_for(data))
    with pytest.raises(SoftTargetsError, match="top_k must be from 1 to 999"):
        full.top_k(1000)


def replace_logits(store: SoftTargetStore, logits: torch.Tensor) -> SoftTargetStore:
    from dataclasses import replace

    return replace(store, logits=logits)


def test_distillation_from_a_top_k_store_equals_its_dense_logits(data, teacher) -> None:
    from softtargets.training.fit import fit
    from softtargets.training.objectives import Distillation

    top = label(teacher, data, top_k=2)  # 3 classes: one spread over the tail
    dense = top.logits_for(data)
    common = dict(epochs=2, batch_size=16, lr=1e-2)
    a = fit(build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8]), data,
            Distillation(top, 2.0, 0.5), **common)  # fmt: skip
    b = fit(build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8]), data,
            Distillation(dense, 2.0, 0.5), **common)  # fmt: skip
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in a.model.parameters()]),
        torch.cat([p.flatten() for p in b.model.parameters()]),
    )


def test_label_to_file_runs_the_teacher_in_pieces_for_many_classes(tmp_path) -> None:
    from softtargets.store.write import label_to_file

    gen = torch.Generator().manual_seed(0)
    k = 50_000  # 5 rows make a piece (limits.CHUNK_NUMBERS): the one 200-row batch takes 40
    data = Dataset.from_arrays(torch.randn(200, 4, generator=gen), torch.arange(200) % 3,
                               class_names=[str(c) for c in range(k)])  # fmt: skip
    teacher = build_model("mlp", (4,), k, seed=0, hidden=[4])
    path = label_to_file(teacher, [(data.features, data.ids)], 200, tmp_path / "s.safetensors",
                         data.class_names)  # fmt: skip
    streamed = SoftTargetStore.load(path, data=data)
    torch.testing.assert_close(streamed.logits, label(teacher, data).logits)


def _bucket_loss_float64(z, kept, classes, tail, labels, t, alpha):
    """Written out independently: KL over k + 1 buckets in float64, plus the hard term."""
    z, kept, tail = z.double(), kept.double(), tail.double()
    n, k_all = z.shape
    k = kept.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        q = torch.softmax(z[i] / t, 0)
        mask = torch.ones(k_all, dtype=torch.bool)
        mask[classes[i]] = False
        q_buckets = torch.cat([q[classes[i]], q[mask].sum()[None]])
        # the teacher's K - k other logits, equal, with logsumexp tail[i]
        others = torch.full(
            (k_all - k,), float(tail[i] - torch.log(torch.tensor(float(k_all - k))))
        )
        v = torch.cat([kept[i], others.double()]) / t
        p = torch.softmax(v, 0)
        p_buckets = torch.cat([p[:k], p[k:].sum()[None]])
        soft = t * t * (p_buckets * (p_buckets.log() - q_buckets.log())).sum()
        hard = -torch.log_softmax(z[i], 0)[labels[i]]
        total = total + alpha * soft + (1 - alpha) * hard
    return total / n


@pytest.mark.parametrize("t", [1.0, 3.0])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_bucket_loss_matches_its_formula_and_finite_differences(t, alpha) -> None:
    from softtargets.losses.reference import bucket_distillation_loss

    gen = torch.Generator().manual_seed(3)
    full = 3 * torch.randn(6, 12, generator=gen)
    top = full.topk(4, dim=1)
    tail = torch.logsumexp(full.scatter(1, top.indices, float("-inf")), dim=1)
    labels = torch.randint(0, 12, (6,), generator=gen)
    z = torch.randn(6, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    got = bucket_distillation_loss(
        z.detach().float(), top.values, top.indices, tail, labels, t, alpha
    )
    want = _bucket_loss_float64(z.detach(), top.values, top.indices, tail, labels, t, alpha)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert torch.autograd.gradcheck(
        lambda x: bucket_distillation_loss(
            x, top.values.double(), top.indices, tail.double(), labels, t, alpha
        ),  # fmt: skip
        (z,),
    )


def test_one_class_left_out_makes_bucket_and_uniform_the_same_loss() -> None:
    from softtargets.losses.reference import bucket_distillation_loss, distillation_loss

    gen = torch.Generator().manual_seed(4)
    full = 2 * torch.randn(5, 7, generator=gen)
    top = full.topk(6, dim=1)
    tail = torch.logsumexp(full.scatter(1, top.indices, float("-inf")), dim=1)
    z, labels = torch.randn(5, 7, generator=gen), torch.randint(0, 7, (5,), generator=gen)
    got = bucket_distillation_loss(z, top.values, top.indices, tail, labels, 2.0, 0.7)
    assert float(got) == pytest.approx(
        float(distillation_loss(z, full, labels, 2.0, 0.7)), rel=1e-5
    )


def test_fit_takes_a_bucket_tail_in_memory_and_streamed_alike(data, teacher) -> None:
    from softtargets.data.streams import TensorRows
    from softtargets.training.fit import fit
    from softtargets.training.fit_many import Member, fit_many
    from softtargets.training.objectives import Distillation

    top = label(teacher, data, top_k=1)
    common = dict(epochs=2, batch_size=16, lr=1e-2)
    targets = Distillation(top, 2.0, 0.5, tail="bucket")
    memory = fit(build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8]), data, targets,
                 **common)  # fmt: skip
    streamed = fit(build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8]), TensorRows(data),
                   targets, **common)  # fmt: skip
    uniform = fit(build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8]), data,
                  Distillation(top, 2.0, 0.5), **common)  # fmt: skip
    assert [r["train_loss"] for r in streamed.history] == pytest.approx(
        [r["train_loss"] for r in memory.history], rel=1e-5
    )
    # with two of three classes in the tail the two readings are different losses
    assert memory.history[0]["train_loss"] != pytest.approx(uniform.history[0]["train_loss"])
    with pytest.raises(SoftTargetsError, match="tail='bucket' reads a top-k store"):
        fit(teacher, data, Distillation(label(teacher, data), 2.0, tail="bucket"), epochs=1)
    with pytest.raises(SoftTargetsError, match="unknown tail 'other'"):
        fit(teacher, data, Distillation(top, 2.0, tail="other"), epochs=1)
    # fit_many takes the bucket tail too (fit's own objective for that member): fit's training
    together = fit_many([build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8])], data,
                        [Member(seed=0, targets=targets)], **common)  # fmt: skip
    assert [r["train_loss"] for r in together[0].history] == pytest.approx(
        [r["train_loss"] for r in memory.history], rel=1e-4
    )


def test_a_store_labelled_in_shards_is_the_store_of_one_process(tmp_path, monkeypatch) -> None:
    import softtargets.data.fingerprint
    from softtargets.store.write import finish_shards, label_to_file, shard_rows

    monkeypatch.setattr(softtargets.data.fingerprint, "FINGERPRINT_BLOCK", 8)  # 50 rows: 7 blocks
    gen = torch.Generator().manual_seed(5)
    data = Dataset.from_arrays(
        torch.randn(50, 6, generator=gen), torch.arange(50) % 3, ids=torch.arange(500, 550)
    )
    teacher = build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8])
    path, count = tmp_path / "store.safetensors", 3
    assert [len(shard_rows(50, i, count)) for i in range(count)] == [16, 16, 18]
    for index in (2, 0):  # any order; the processes may also run at once
        rows = shard_rows(50, index, count)
        label_to_file(teacher, [(data.features[rows.start : rows.stop], data.ids[rows.start : rows.stop])],
                      50, path, data.class_names, shard=(index, count))  # fmt: skip
    with pytest.raises(SoftTargetsError, match="shard 1 of 3 .* is not written yet"):
        finish_shards(path, count)
    rows = shard_rows(50, 1, count)
    with pytest.raises(SoftTargetsError, match="held 4 rows, not the 16 rows of shard 1 of 3"):
        label_to_file(teacher, [(data.features[16:20], data.ids[16:20])], 50, path,
                      data.class_names, shard=(1, count))  # fmt: skip
    label_to_file(teacher, [(data.features[16:32], data.ids[16:32])], 50, path, data.class_names,
                  shard=(1, count))  # fmt: skip
    finish_shards(path, count)
    store = SoftTargetStore.load(path, data=data, teacher=teacher)  # the same data fingerprint
    whole = label(teacher, data)
    assert store.data_fingerprint == whole.data_fingerprint == data.fingerprint
    torch.testing.assert_close(store.logits, whole.logits)
    assert torch.equal(store.ids, whole.ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.safetensors"]  # notes removed
    foreign = tmp_path / "other.safetensors.partial"
    foreign.write_text("mine")
    with pytest.raises(SoftTargetsError, match="is not a shard file of this store"):
        label_to_file(teacher, [(data.features[:16], data.ids[:16])], 50,
                      tmp_path / "other.safetensors", data.class_names, shard=(0, count))  # fmt: skip
    assert foreign.read_text() == "mine"


def test_an_ensemble_store_averages_its_teachers_by_id(data) -> None:
    from softtargets.store.label import ensemble
    from softtargets.training.fit import fit
    from softtargets.training.objectives import Distillation

    a = label(build_model("mlp", data.feature_shape, 3, seed=0, hidden=[8]), data)
    b = label(build_model("mlp", data.feature_shape, 3, seed=1, hidden=[8]), data)
    order = torch.randperm(len(b), generator=torch.Generator().manual_seed(0))
    b_shuffled = SoftTargetStore(b.logits[order], b.ids[order], b.teacher_fingerprint,
                                 b.data_fingerprint, b.class_names)  # fmt: skip
    mean_p = (a.soften(1.0) + b.soften(1.0)) / 2
    probs = ensemble([a, b_shuffled])  # rows matched by id, not position
    torch.testing.assert_close(probs.soften(1.0), mean_p)
    torch.testing.assert_close(ensemble([a, b], "logits").logits, (a.logits + b.logits) / 2)
    torch.testing.assert_close(ensemble([a, b], weights=[1, 0]).soften(1.0), a.soften(1.0))
    weighted = ensemble([a, b], weights=[3, 1]).soften(1.0)
    torch.testing.assert_close(weighted, 0.75 * a.soften(1.0) + 0.25 * b.soften(1.0))
    assert probs.teacher_fingerprint not in (a.teacher_fingerprint, b.teacher_fingerprint)
    result = fit(build_model("mlp", data.feature_shape, 3, seed=2, hidden=[8]), data,
                 Distillation(probs, 2.0, 0.5), epochs=2)  # fmt: skip
    assert len(result.history) == 2
    with pytest.raises(SoftTargetsError, match="weights must be 2 finite numbers"):
        ensemble([a, b], weights=[0, 0])
    with pytest.raises(SoftTargetsError, match="unknown combine 'median'"):
        ensemble([a, b], "median")
    other = Dataset.from_arrays(data.features, data.labels, ids=data.ids,
                                class_names=["x", "y", "z"])  # fmt: skip
    c = label(build_model("mlp", data.feature_shape, 3, seed=3, hidden=[8]), other)
    with pytest.raises(SoftTargetsError, match="store 1 has classes"):
        ensemble([a, c])


def test_a_stores_finiteness_is_checked_once_until_it_changes() -> None:
    """``fit_many`` resolves a store per member: a checked store is not read again, but one
    changed in place since (its tensor's version counter moved) is checked afresh."""
    store = SoftTargetStore(torch.randn(5, 3), torch.arange(5), "t", "d", ("a", "b", "c"))
    store.check_finite()
    state = store._finite_state
    store.check_finite()
    assert store._finite_state == state
    store.logits[2, 1] = float("nan")
    with pytest.raises(SoftTargetsError, match="teacher logits: row 2 holds NaN or inf"):
        store.check_finite()
