"""Each distillation method against its formula written out here in float64, element by element,
and against finite differences of itself."""

from __future__ import annotations

import math

import pytest
import torch

from softtargets.errors import SoftTargetsError
from softtargets.losses.reference import (
    dist_loss,
    dkd_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    standardize,
    total_variation_loss,
)


def softmax(row: list[float], t: float) -> list[float]:
    top = max(row)
    e = [math.exp((v - top) / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def zscore(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / den


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(5, 6, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(5, 6, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 6, (5,), generator=g)
    return student, teacher, labels


@pytest.mark.parametrize("standardized", [False, True])
def test_kd_matches_its_formula(batch, standardized) -> None:
    s, t, _ = batch
    prep = zscore if standardized else (lambda r: r)
    want = sum(16 * kl(softmax(prep(tr), 4), softmax(prep(sr), 4))
               for sr, tr in zip(s.tolist(), t.tolist(), strict=True)) / 5  # fmt: skip
    assert float(kd_loss(s, t, 4.0, standardize=standardized)) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("standardized", [False, True])
def test_dkd_matches_its_formula(batch, standardized) -> None:
    s, t, y = batch
    prep = zscore if standardized else (lambda r: r)
    total = 0.0
    for sr, tr, label in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        ps, pt = softmax(prep(sr), 2.0), softmax(prep(tr), 2.0)
        tckd = kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
        others = [k for k in range(6) if k != label]
        ns = [ps[k] / sum(ps[j] for j in others) for k in others]
        nt = [pt[k] / sum(pt[j] for j in others) for k in others]
        total += 4.0 * (0.5 * tckd + 3.0 * kl(nt, ns))
    got = dkd_loss(s, t, y, temperature=2.0, alpha=0.5, beta=3.0, standardize=standardized)
    assert float(got) == pytest.approx(total / 5, rel=1e-9)


def test_dkd_with_alpha_beta_one_is_not_kd_but_its_parts_add_up(batch) -> None:
    # KL(p_T || p_S) = TCKD + (1 - p_T,y) NCKD (Zhao et al., eq. 3): with beta = 1 - p_T,y the
    # decoupled loss is Hinton's again, row by row
    s, t, y = batch
    for i in range(5):
        p_ty = float(torch.softmax(t[i] / 2.0, 0)[y[i]])
        decoupled = dkd_loss(s[i : i + 1], t[i : i + 1], y[i : i + 1], 2.0, 1.0, 1.0 - p_ty)
        assert float(decoupled) == pytest.approx(float(kd_loss(s[i : i + 1], t[i : i + 1], 2.0)))


def test_dist_matches_its_formula(batch) -> None:
    s, t, _ = batch
    ys = [softmax(r, 3.0) for r in s.tolist()]
    yt = [softmax(r, 3.0) for r in t.tolist()]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt, strict=True)) / 5
    columns = lambda rows: [list(c) for c in zip(*rows, strict=True)]  # noqa: E731
    intra = 1 - sum(pearson(a, b) for a, b in zip(columns(ys), columns(yt), strict=True)) / 6
    want = 9.0 * (2.0 * inter + 0.5 * intra)
    got = dist_loss(s, t, temperature=3.0, beta=2.0, gamma=0.5)
    assert float(got) == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_its_formula_and_is_symmetric_at_one_half(batch, beta) -> None:
    s, t, _ = batch
    total = 0.0
    for sr, tr in zip(s.tolist(), t.tolist(), strict=True):
        ps, pt = softmax(sr, 2.0), softmax(tr, 2.0)
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=True)]
        total += beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    assert float(jsd_loss(s, t, beta, 2.0)) == pytest.approx(total / 5, rel=1e-9)
    if beta == 0.5:
        assert float(jsd_loss(t, s, beta, 2.0)) == pytest.approx(total / 5, rel=1e-9)
        assert total / 5 <= math.log(2)


def test_reverse_kl_and_total_variation_match_their_formulas(batch) -> None:
    s, t, _ = batch
    rows = list(zip(s.tolist(), t.tolist(), strict=True))
    rkl = sum(4.0 * kl(softmax(sr, 2.0), softmax(tr, 2.0)) for sr, tr in rows) / 5
    tv = sum(0.5 * sum(abs(a - b) for a, b in zip(softmax(tr, 2.0), softmax(sr, 2.0), strict=True))
             for sr, tr in rows) / 5  # fmt: skip
    assert float(reverse_kl_loss(s, t, 2.0)) == pytest.approx(rkl, rel=1e-9)
    assert float(total_variation_loss(s, t, 2.0)) == pytest.approx(tv, rel=1e-9)


METHODS = {
    "kd": lambda s, t, y: kd_loss(s, t, 3.0),
    "kd standardized": lambda s, t, y: kd_loss(s, t, 3.0, standardize=True),
    "dkd": lambda s, t, y: dkd_loss(s, t, y, 3.0, 1.0, 8.0),
    "dkd standardized": lambda s, t, y: dkd_loss(s, t, y, 3.0, 1.0, 8.0, standardize=True),
    "dist": lambda s, t, y: dist_loss(s, t, 2.0, 1.0, 1.0),
    "jsd": lambda s, t, y: jsd_loss(s, t, 0.3, 2.0),
    "rkl": lambda s, t, y: reverse_kl_loss(s, t, 2.0),
    "tv": lambda s, t, y: total_variation_loss(s, t, 2.0),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_gradients_match_finite_differences(batch, name) -> None:
    s, t, y = batch
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: METHODS[name](x, t, y), (s,))


@pytest.mark.parametrize("name", ["kd", "kd standardized", "dkd", "dist", "jsd", "rkl", "tv"])
def test_a_student_equal_to_its_teacher_has_zero_loss(batch, name) -> None:
    _, t, y = batch
    assert float(METHODS[name](t.clone(), t, y)) == pytest.approx(0.0, abs=1e-9)


def test_standardize_removes_scale_and_shift() -> None:
    # seeded: the eps of 1e-7 beside the std moves a row by up to ~1e-7 / std, so an unseeded
    # draw with a small std failed the default tolerance now and then
    z = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(standardize(3 * z + 5), standardize(z), rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_options_are_one_line_errors(batch) -> None:
    s, t, y = batch
    with pytest.raises(SoftTargetsError, match="same classes"):
        kd_loss(s, t[:, :4])
    with pytest.raises(SoftTargetsError, match="jsd beta must be in"):
        jsd_loss(s, t, beta=1.0)
    with pytest.raises(SoftTargetsError, match="at least 2 rows"):
        dist_loss(s[:1], t[:1])


@pytest.fixture(scope="module")
def task():
    from softtargets.data.builtin import gaussians
    from softtargets.data.dataset import split
    from softtargets.store.label import label
    from softtargets.training.fit import fit
    from softtargets.training.models import build_model

    parts = split(gaussians(num_samples=600, num_classes=4, dim=6, separation=2.5), 0.2, 0.2)
    teacher = fit(build_model("mlp", (6,), 4, seed=9, hidden=[32]), parts.train, epochs=10,
                  lr=1e-2).model  # fmt: skip
    return parts, label(teacher, parts.train)


def _student():
    from softtargets.training.models import build_model

    return build_model("mlp", (6,), 4, seed=0, hidden=[16])


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_one_kd_serves_memory_streams_and_stacks(task) -> None:
    """Hinton's loss is one closed form: fit in memory (its teacher side tabled), fit on streamed
    data (computed per batch) and fit_many (stacked) train the same weights."""
    from softtargets.data.streams import TensorRows
    from softtargets.training.fit import fit
    from softtargets.training.fit_many import Member, fit_many
    from softtargets.training.objectives import Distillation

    parts, store = task
    common = dict(epochs=3, lr=1e-2, batch_size=32)
    memory = fit(_student(), parts.train, Distillation(store, 4.0, 0.7), **common)
    streamed = fit(_student(), TensorRows(parts.train), Distillation(store, 4.0, 0.7), **common)
    (stacked,) = fit_many([_student()], parts.train, [Member(0, Distillation(store, 4.0, 0.7))],
                          **common)  # fmt: skip
    for other in (streamed, stacked):
        torch.testing.assert_close(_weights(other.model), _weights(memory.model), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("kd", {"standardize": True}),
        ("dkd", {"beta": 2.0}),
        ("dist", {}),
        ("jsd", {}),
        ("rkl", {}),
        ("tv", {}),
    ],  # fmt: skip
)
def test_every_method_trains_from_a_store_in_memory_and_streamed(task, method, options) -> None:
    from softtargets.data.streams import TensorRows
    from softtargets.training.fit import fit
    from softtargets.training.metrics import evaluate
    from softtargets.training.objectives import Distillation

    parts, store = task
    targets = Distillation(store, 2.0, 0.8, method=method, options=options)
    common = dict(epochs=8, lr=1e-2, batch_size=32)
    memory = fit(_student(), parts.train, targets, **common)
    streamed = fit(_student(), TensorRows(parts.train), targets, **common)
    # the same batches in the same order: the same training either way
    torch.testing.assert_close(_weights(streamed.model), _weights(memory.model), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    assert memory.history[-1]["train_loss"] < memory.history[0]["train_loss"]
    assert evaluate(memory.model, parts.test)["accuracy"] > 0.5  # 4 classes: chance is 0.25


def test_unknown_methods_and_options_are_one_line_errors(task) -> None:
    from softtargets.training.fit import fit
    from softtargets.training.fit_many import Member, fit_many
    from softtargets.training.objectives import Distillation

    parts, store = task
    with pytest.raises(SoftTargetsError, match="unknown method 'fitnets'; use one of kd, dkd"):
        fit(_student(), parts.train, Distillation(store, method="fitnets"), epochs=1)
    with pytest.raises(SoftTargetsError, match="unknown option 'gamma' for method 'dkd'"):
        fit(_student(), parts.train, Distillation(store, method="dkd", options={"gamma": 1}),
            epochs=1)  # fmt: skip
    with pytest.raises(SoftTargetsError, match="unknown method 'fitnets'"):
        fit_many([_student()], parts.train, [Member(0, Distillation(store, method="fitnets"))],
                 epochs=1)  # fmt: skip


def test_fit_many_trains_every_method_as_fit_does(task) -> None:
    """Methods outside the stacked closed form (and the bucket tail) ride along in ``fit_many``
    with ``fit``'s own objective: each member equals ``fit`` alone, beside closed-form members."""
    from softtargets.training.fit import fit
    from softtargets.training.fit_many import Member, fit_many
    from softtargets.training.objectives import Distillation

    parts, store = task
    half = torch.arange(0, len(parts.train), 2)  # a member with fewer rows finishes early
    members = [
        Member(0, Distillation(store, 2.0, 0.8)),
        Member(1, Distillation(store, 4.0, 0.7, method="dkd", options={"beta": 2.0})),
        Member(2, Distillation(store, 1.0, 1.0, method="dist")),
        Member(3, Distillation(store, 2.0, 0.9, method="jsd"), rows=half),
        Member(4, Distillation(store.top_k(2), 2.0, 1.0, tail="bucket")),
        Member(5),
        Member(6, Distillation(store, 2.0, 0.8, method="rkl")),  # closed form in fit
        Member(7, Distillation(store, 2.0, 0.8, method="tv")),
    ]
    common = dict(epochs=3, lr=1e-2, batch_size=32, val=parts.val)
    together = fit_many([_student() for _ in members], parts.train, members, **common)
    for member, result in zip(members, together, strict=True):
        rows = parts.train if member.rows is None else parts.train.take(member.rows)
        alone = fit(_student(), rows, member.targets, seed=member.seed, **common)
        torch.testing.assert_close(_weights(result.model), _weights(alone.model), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
        for a, b in zip(result.history, alone.history, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("kd", {}),
        ("kd", {"standardize": True}),
        ("dkd", {"beta": 2.0}),
        ("dist", {}),
        ("jsd", {"beta": 0.3}),
        ("rkl", {}),
        ("tv", {}),
    ],  # fmt: skip
)
def test_a_stack_of_batches_gives_each_batchs_own_loss(name, options) -> None:
    """``(M, B, K)`` with a temperature and a weight per batch: ``fit_many``'s one call for the
    members of one method equals one call per member."""
    from softtargets.losses.reference import method_loss

    g = torch.Generator().manual_seed(3)
    student = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 6, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 5, (3, 6), generator=g)
    temperatures, weights = [1.0, 2.0, 4.0], [1.0, 0.9, 0.5]
    stacked = method_loss(name, options, student, teacher, labels,
                          torch.tensor(temperatures), torch.tensor(weights))  # fmt: skip
    assert stacked.shape == (3,)
    for m in range(3):
        alone = method_loss(name, options, student[m], teacher[m], labels[m], temperatures[m],
                            weights[m])  # fmt: skip
        torch.testing.assert_close(stacked[m], alone)


CLOSED_FORM_CASES = [
    ("kd", {}), ("kd", {"standardize": True}),
    ("dkd", {}), ("dkd", {"alpha": 0.5, "beta": 2.0, "standardize": True}),
    ("dist", {}), ("dist", {"beta": 2.0, "gamma": 0.5}), ("dist", {"beta": 0.0}),
    ("jsd", {}), ("jsd", {"beta": 0.2}),
    ("rkl", {}), ("tv", {}),
]  # fmt: skip


def test_every_registered_method_has_its_closed_form_checked() -> None:
    from softtargets.losses.methods import LOGIT_METHODS

    assert {name for name, _ in CLOSED_FORM_CASES} == set(LOGIT_METHODS)


@pytest.mark.parametrize(("name", "options"), CLOSED_FORM_CASES)
@pytest.mark.parametrize(("weight", "ramp"), [(1.0, 1.0), (0.7, 1.0), (0.7, 0.25)])
@pytest.mark.parametrize(("classes", "temperature"), [(6, 2.0), (100, 2.0), (100, 2.5)])
def test_closed_form_gradients_equal_autograds(
    batch, name, options, weight, ramp, classes, temperature
) -> None:
    """``fit`` trains every method without autograd: the same value and gradient as autograd
    through :func:`method_loss` (float64), during a warm-up (``ramp``) too; with few classes and
    with many (where a whole T takes softmax(z) from softmax(z / T)'s exponentials)."""
    from softtargets.losses.closed import method_value_and_grad
    from softtargets.losses.reference import method_loss

    s, t, y = batch
    if classes != s.shape[1]:
        g = torch.Generator().manual_seed(17)
        s = torch.randn(5, classes, generator=g, dtype=torch.float64) * 2
        t = torch.randn(5, classes, generator=g, dtype=torch.float64) * 3
        y = torch.randint(0, classes, (5,), generator=g)
    value, grad = method_value_and_grad(name, options, s, t, y, temperature, weight, ramp)
    z = s.clone().requires_grad_(True)
    want = method_loss(name, options, z, t, y, temperature, weight, ramp)
    (want_grad,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(value, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), CLOSED_FORM_CASES)
@pytest.mark.parametrize("classes", [5, 100])
def test_closed_form_gradients_of_a_stack_equal_autograds(name, options, classes) -> None:
    """``fit_many``'s one call for the members of a method: ``(M, B, K)`` with a temperature
    and a weight per member, against autograd of the summed member means."""
    from softtargets.losses.closed import method_value_and_grad
    from softtargets.losses.reference import method_loss

    g = torch.Generator().manual_seed(11)
    s = torch.randn(3, 6, classes, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 6, classes, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, classes, (3, 6), generator=g)
    temperatures = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.9, 0.5], dtype=torch.float64)
    ramps = torch.tensor([0.5, 1.0, 0.1], dtype=torch.float64)
    value, grad = method_value_and_grad(name, options, s, t, y, temperatures, weights, ramps)
    z = s.clone().requires_grad_(True)
    want = method_loss(name, options, z, t, y, temperatures, weights, ramps)
    (want_grad,) = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(value, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)


def test_dkd_closed_form_survives_a_certain_teacher() -> None:
    """A teacher with all its mass on the label (``1 - p_y`` underflows at T = 1) gives finite
    DKD values and gradients, as autograd does."""
    from softtargets.losses.closed import method_value_and_grad
    from softtargets.losses.reference import dkd_loss

    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[200.0, 0.0, 0.0], [0.0, 150.0, -150.0]])
    labels = torch.tensor([0, 1])
    value, grad = method_value_and_grad("dkd", {}, student, teacher, labels, 1.0, 1.0)
    z = student.clone().requires_grad_(True)
    want = dkd_loss(z, teacher, labels, temperature=1.0)
    (want_grad,) = torch.autograd.grad(want, z)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("classes", [5, 70])  # a table of every row's teacher side; per batch
@pytest.mark.parametrize(
    ("name", "options"), [("dkd", {"beta": 2.0}), ("dist", {}), ("kd", {"standardize": True})]
)
def test_fits_objective_is_the_closed_form_of_its_rows(classes, name, options) -> None:
    """``fit``'s objective for a method (its teacher side computed once for every row with few
    classes, from each batch with many) gives :func:`method_value_and_grad` of the batch's rows."""
    from softtargets.data.dataset import Dataset
    from softtargets.losses.closed import TABLE_CLASSES, method_value_and_grad
    from softtargets.training.objectives import Distillation, make_objective

    assert 5 <= TABLE_CLASSES < 70
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(40) % classes
    data = Dataset.from_arrays(torch.randn(40, 3, generator=g), labels, class_names=[
        str(k) for k in range(classes)])  # fmt: skip
    teacher = torch.randn(40, classes, generator=g) * 3
    targets = Distillation(teacher, 2.0, 0.8, method=name, options=options)
    objective = make_objective(targets, data, torch.device("cpu"))
    rows = torch.tensor([3, 7, 1, 30, 12, 0])
    student = torch.randn(6, classes, generator=g)
    value, grad = objective(student, rows)
    want_value, want_grad = method_value_and_grad(
        name, options, student, teacher[rows], labels[rows], 2.0, 0.8
    )
    torch.testing.assert_close(value, want_value)
    torch.testing.assert_close(grad, want_grad)


def test_a_warmup_ramps_the_soft_term_in_fit_fit_many_and_streamed(task) -> None:
    """``warmup`` (any method's option): the soft term at ``alpha x min(epoch / warmup, 1)``.
    A 1-epoch warm-up is no warm-up, to the bit; a longer one trains differently, and ``fit_many``
    and streamed data give ``fit``'s weights."""
    from softtargets.data.streams import TensorRows
    from softtargets.training.fit import fit
    from softtargets.training.fit_many import Member, fit_many
    from softtargets.training.objectives import Distillation

    parts, store = task
    common = dict(epochs=4, lr=1e-2, batch_size=32)

    def dkd(**extra):
        return Distillation(store, 2.0, 0.8, method="dkd", options={"beta": 2.0, **extra})

    plain = fit(_student(), parts.train, dkd(), **common)
    one = fit(_student(), parts.train, dkd(warmup=1), **common)
    warmed = fit(_student(), parts.train, dkd(warmup=3), **common)
    assert torch.equal(_weights(one.model), _weights(plain.model))
    assert not torch.allclose(_weights(warmed.model), _weights(plain.model), atol=1e-4)
    # epoch 1 of the warm-up weighs the soft term by 1/3: a smaller loss than without it
    assert warmed.history[0]["train_loss"] < plain.history[0]["train_loss"]
    streamed = fit(_student(), TensorRows(parts.train), dkd(warmup=3), **common)
    (many,) = fit_many([_student()], parts.train, [Member(0, dkd(warmup=3))], **common)
    for other in (streamed, many):
        torch.testing.assert_close(_weights(other.model), _weights(warmed.model), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("warmup", [-1, 2.5, "ten", True])
def test_a_bad_warmup_is_a_one_line_error(task, warmup) -> None:
    from softtargets.training.fit import fit
    from softtargets.training.objectives import Distillation

    parts, store = task
    targets = Distillation(store, method="jsd", options={"warmup": warmup})
    with pytest.raises(SoftTargetsError, match="warmup must be a whole number of epochs >= 0"):
        fit(_student(), parts.train, targets, epochs=1)
