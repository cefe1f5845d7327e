from __future__ import annotations

import numpy as np
import pytest
import torch

from softtargets.data.builtin import digits, gaussians, load_builtin, mnist1d
from softtargets.data.dataset import Dataset, split
from softtargets.errors import SoftTargetsError


def small(n: int = 40, k: int = 4) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset.from_arrays(
        torch.randn(n, 3, generator=g), torch.arange(n) % k, ids=torch.arange(100, 100 + n)
    )


def test_split_is_seeded_disjoint_stratified_and_complete() -> None:
    data = small(200, 4)
    a, b = split(data, 0.1, 0.2, seed=3), split(data, 0.1, 0.2, seed=3)
    assert torch.equal(a.test.ids, b.test.ids)
    parts = [set(a.train.ids.tolist()), set(a.val.ids.tolist()), set(a.test.ids.tolist())]
    assert sum(map(len, parts)) == 200 and len(set.union(*parts)) == 200
    assert torch.bincount(a.test.labels).tolist() == [10, 10, 10, 10]
    assert split(data, 0.1, 0.2, seed=4).test.ids.tolist() != a.test.ids.tolist()
    assert a.train.fingerprint == data.fingerprint  # subsets inherit the fingerprint


def test_rows_keep_their_ids_through_take() -> None:
    data = small()
    part = data.take([5, 2, 9])
    assert part.ids.tolist() == [105, 102, 109]
    torch.testing.assert_close(part.features[1], data.features[2])


def test_subset_by_fraction_classes_and_relabel() -> None:
    data = small(400, 4)
    tenth = data.subset(0.1, seed=1)
    assert len(tenth) == 40 and torch.bincount(tenth.labels).tolist() == [10, 10, 10, 10]
    without_3 = data.subset(classes=[0, 1, 2])
    assert 3 not in without_3.labels.tolist() and without_3.num_classes == 4
    pair = data.subset(classes=[3, 1], relabel=True)
    assert pair.num_classes == 2 and pair.class_names == ("3", "1")
    assert set(pair.labels.tolist()) == {0, 1}
    original = data.labels[torch.isin(data.ids, pair.ids)]
    assert ((original == 3) == (pair.labels == 0)).all()
    with pytest.raises(SoftTargetsError, match="exactly one"):
        data.subset(0.5, classes=[1])
    with pytest.raises(SoftTargetsError, match=r"classes \[7\] do not exist"):
        data.subset(classes=[7])


def test_label_noise_flips_the_stated_fraction_to_other_classes() -> None:
    data = small(20000, 5)
    noisy = data.with_label_noise(0.3, seed=0)
    flipped = (noisy.labels != data.labels).float().mean().item()
    assert abs(flipped - 0.3) < 0.015
    assert noisy.fingerprint == data.fingerprint
    # flipped labels are spread evenly over the other classes
    moved = noisy.labels[(data.labels == 0) & (noisy.labels != 0)]
    counts = torch.bincount(moved, minlength=5)[1:].float()
    assert counts.min() / counts.max() > 0.85
    assert torch.equal(noisy.labels, data.with_label_noise(0.3, seed=0).labels)


def test_from_arrays_rejects_bad_input() -> None:
    with pytest.raises(SoftTargetsError, match="one label per row"):
        Dataset.from_arrays(np.zeros((3, 2)), [0, 1])
    with pytest.raises(SoftTargetsError, match="row 1 holds NaN"):
        Dataset.from_arrays(np.array([[0.0], [np.nan]]), [0, 1])
    with pytest.raises(SoftTargetsError, match="unique"):
        Dataset.from_arrays(np.zeros((2, 2)), [0, 1], ids=[4, 4])
    with pytest.raises(SoftTargetsError, match="integer class indices"):
        Dataset.from_arrays(np.zeros((2, 2)), [0.5, 1.0])
    with pytest.raises(SoftTargetsError, match="sums to"):
        Dataset.from_arrays(np.zeros((2, 2)), [0, 1], soft_targets=[[0.5, 0.6], [0.5, 0.5]])


def test_digits_shape_and_range() -> None:
    data = digits()
    assert len(data) == 1797 and data.feature_shape == (1, 8, 8) and data.num_classes == 10
    assert 0.0 <= float(data.features.min()) and float(data.features.max()) <= 1.0


def test_mnist1d_is_seeded_cached_and_leaves_numpy_state_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOFTTARGETS_CACHE", str(tmp_path))
    np.random.seed(123)
    before = np.random.rand()
    np.random.seed(123)
    first = mnist1d(200, seed=1)
    assert np.random.rand() == before  # the generator's global seeding was undone
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    again = mnist1d(200, seed=1)  # from the cache
    assert first.fingerprint == again.fingerprint
    assert first.feature_shape == (40,) and torch.bincount(first.labels).tolist() == [20] * 10
    assert mnist1d(200, seed=2).fingerprint != first.fingerprint


def test_mnist1d_regenerates_a_corrupt_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOFTTARGETS_CACHE", str(tmp_path))
    good = mnist1d(100, seed=0)
    (path,) = tmp_path.glob("mnist1d-*.npz")
    path.write_bytes(b"not a zip file")
    assert mnist1d(100, seed=0).fingerprint == good.fingerprint


def test_gaussians_bayes_probabilities_are_exact() -> None:
    data = gaussians(num_samples=3000, num_classes=3, dim=2, clusters_per_class=2, separation=2.0)
    probs = data.true_probs
    torch.testing.assert_close(probs.sum(1), torch.ones(len(data)))
    # The Bayes classifier is the best possible: its accuracy beats a fitted logistic regression.
    from sklearn.linear_model import LogisticRegression

    bayes = (probs.argmax(1) == data.labels).float().mean().item()
    fitted = LogisticRegression().fit(data.features[:2000], data.labels[:2000])
    assert bayes > fitted.score(data.features[2000:], data.labels[2000:]) - 0.02
    # Labels are draws from p(y|x): the mean Bayes probability of the drawn label matches the
    # expected value sum_k p_k^2 (a calibration check of the exposed probabilities).
    drawn = probs[torch.arange(len(data)), data.labels].mean().item()
    expected = (probs**2).sum(1).mean().item()
    assert abs(drawn - expected) < 0.02


def test_gaussians_separation_controls_difficulty() -> None:
    accs = []
    for sep in (0.5, 2.0, 6.0):
        d = gaussians(num_samples=2000, num_classes=4, separation=sep, seed=1)
        accs.append((d.true_probs.argmax(1) == d.labels).float().mean().item())
    assert accs[0] < accs[1] < accs[2]
    assert accs[2] > 0.95 and accs[0] < 0.6


def test_unknown_builtin_and_option() -> None:
    with pytest.raises(SoftTargetsError, match="unknown dataset 'mnist2d'"):
        load_builtin("mnist2d")
    with pytest.raises(SoftTargetsError, match="unknown option 'seperation'"):
        load_builtin("gaussians", seperation=2)


def test_bayes_probabilities_in_chunks_equal_all_at_once() -> None:
    from softtargets.data.builtin import bayes_probabilities

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    centres = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        bayes_probabilities(x, centres, chunk=7), bayes_probabilities(x, centres, chunk=1000)
    )


def test_fingerprint_is_the_same_for_any_chunking_across_blocks(monkeypatch) -> None:
    import softtargets.data.fingerprint
    from softtargets.data.fingerprint import Fingerprinter

    monkeypatch.setattr(softtargets.data.fingerprint, "FINGERPRINT_BLOCK", 8)
    features, ids = torch.randn(30, 4), torch.arange(30)
    whole = Fingerprinter((4,))
    whole.update(features, ids)
    for size in (1, 3, 8, 13):
        pieces = Fingerprinter((4,))
        for start in range(0, 30, size):
            pieces.update(features[start : start + size], ids[start : start + size])
        assert pieces.hexdigest() == whole.hexdigest()
    assert len(whole.block_digests()) == 4  # 8 + 8 + 8 + 6 rows
    changed = features.clone()
    changed[29, 0] += 1
    other = Fingerprinter((4,))
    other.update(changed, ids)
    assert other.hexdigest() != whole.hexdigest()


def test_margin_task_is_balanced_noise_free_and_more_linear_at_a_larger_margin() -> None:
    from softtargets.data.builtin import margin_task

    easy, hard = margin_task(2000, margin=1.0), margin_task(2000, margin=0.0)
    assert torch.equal(margin_task(2000, margin=1.0).features, easy.features)  # seeded
    for data in (easy, hard):
        assert 0.45 < float(data.labels.float().mean()) < 0.55
        assert torch.equal(data.true_probs.argmax(1), data.labels)  # noise-free

    # a least-squares linear classifier: the boundary is curved, and the margin makes it easier
    def linear_accuracy(data) -> float:
        x = torch.cat([data.features, torch.ones(len(data), 1)], 1).double()
        w = torch.linalg.lstsq(x, (data.labels * 2 - 1).double()[:, None]).solution
        return float(((x @ w).squeeze(1) > 0).long().eq(data.labels).double().mean())

    assert linear_accuracy(hard) < linear_accuracy(easy) < 0.99
