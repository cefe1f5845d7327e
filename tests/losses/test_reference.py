"""Losses against independently written float64 formulas, finite differences and Hinton's limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softtargets.errors import SoftTargetsError
from softtargets.losses.closed import method_value_and_grad
from softtargets.losses.reference import DistillationLoss, distillation_loss, soft_cross_entropy


def softmax64(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reference_distillation(
    z: np.ndarray, v: np.ndarray, y: np.ndarray, t: float, alpha: float
) -> float:
    """Hinton's loss written out element by element in float64 (independent of losses.py)."""
    total = 0.0
    for zi, vi, yi in zip(z, v, y, strict=True):
        q = softmax64(zi[None], t)[0]  # student, softened
        p = softmax64(vi[None], t)[0]  # teacher, softened
        kl = sum(p[k] * (np.log(p[k]) - np.log(q[k])) for k in range(len(p)) if p[k] > 0)
        ce = -np.log(softmax64(zi[None])[0][yi])
        total += alpha * t * t * kl + (1 - alpha) * ce
    return total / len(z)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    v = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    return z, v, y


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_distillation_loss_matches_reference(batch, t: float, alpha: float) -> None:
    z, v, y = batch
    got = float(distillation_loss(z, v, y, t, alpha))
    want = reference_distillation(z.numpy(), v.numpy(), y.numpy(), t, alpha)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_soft_cross_entropy_matches_reference_with_weights(batch) -> None:
    z, v, _ = batch
    targets = torch.softmax(v, 1)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.0], dtype=torch.float64)
    p = softmax64(z.numpy())
    per_row = -(targets.numpy() * np.log(p)).sum(1)
    want = (per_row * weights.numpy()).sum() / weights.numpy().sum()
    assert float(soft_cross_entropy(z, targets, weights)) == pytest.approx(want, rel=1e-12)
    assert float(soft_cross_entropy(z, targets, reduction="sum")) == pytest.approx(per_row.sum())


def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy(batch) -> None:
    z, _, y = batch
    hard = torch.nn.functional.one_hot(y, 5).double()
    torch.testing.assert_close(soft_cross_entropy(z, hard), torch.nn.functional.cross_entropy(z, y))


def test_gradients_match_finite_differences(batch) -> None:
    z, v, y = batch
    z = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, v, y, 3.0, 0.7), (z,))
    w = torch.rand(6, dtype=torch.float64)
    targets = torch.softmax(v, 1)
    assert torch.autograd.gradcheck(lambda s: soft_cross_entropy(s, targets, w), (z,))


@pytest.mark.parametrize("t", [1.0, 2.5, 10.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_soft_term_gradient_is_alpha_t_times_q_minus_p(batch, t: float, alpha: float) -> None:
    # With alpha weighting only the soft part (labels' term removed by differencing), the gradient
    # of one row with respect to student logit z_i is alpha * T * (q_i - p_i), q the student's and
    # p the teacher's softened distribution: the 1/T of the tempered softmax times T^2.
    z, v, y = batch
    z = z.clone().requires_grad_(True)
    loss = distillation_loss(z, v, y, t, alpha, reduction="sum") - (1 - alpha) * (
        torch.nn.functional.cross_entropy(z, y, reduction="sum")
    )
    (grad,) = torch.autograd.grad(loss, z)
    q, p = softmax64(z.detach().numpy(), t), softmax64(v.numpy(), t)
    np.testing.assert_allclose(grad.numpy(), alpha * t * (q - p), atol=1e-12)


def test_high_temperature_limit_is_logit_matching() -> None:
    # Hinton eq. 3: for zero-mean logits and T >> |z|, T^2 * dKL/dz_i -> (z_i - v_i) / K.
    g = torch.Generator().manual_seed(1)
    k = 10
    z = torch.randn(4, k, generator=g, dtype=torch.float64)
    v = torch.randn(4, k, generator=g, dtype=torch.float64)
    z, v = z - z.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(distillation_loss(z, v, None, 1e4, 1.0, "sum"), z)
    np.testing.assert_allclose(grad.numpy(), (z - v).detach().numpy() / k, rtol=1e-3, atol=1e-5)
    # ... and at T = 1 it is far from that limit, so the check above can fail.
    (grad1,) = torch.autograd.grad(distillation_loss(z, v, None, 1.0, 1.0, "sum"), z)
    assert not np.allclose(grad1.numpy(), (z - v).detach().numpy() / k, rtol=0, atol=1e-2)


@pytest.mark.parametrize("t", [1.0, 10.0, 100.0])
def test_finite_for_extreme_logits(t: float) -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    v = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, -3.0]])
    loss = distillation_loss(z, v, torch.tensor([0, 1]), t, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_errors_are_clear() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(SoftTargetsError, match="teacher logits"):
        distillation_loss(z, torch.zeros(2, 4), None, 2.0, 1.0)
    with pytest.raises(SoftTargetsError, match="needs labels"):
        distillation_loss(z, z, None, 2.0, 0.5)
    with pytest.raises(SoftTargetsError, match="alpha"):
        distillation_loss(z, z, None, 2.0, 1.5)
    with pytest.raises(SoftTargetsError, match="temperature"):
        DistillationLoss(temperature=0)


@pytest.mark.parametrize("t", [1.0, 2.5, 3.0, 4.0, 6.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("classes", [6, 100])  # fit tables the teacher's side / reads it per batch
def test_the_one_closed_form_of_hintons_loss_matches_autograd(
    t: float, alpha: float, classes
) -> None:
    """The closed form every trainer uses for KD (fit in memory and streamed, fit_many) is
    Hinton's loss, value and gradient, against the autograd reference, per step."""
    from softtargets.losses.closed import MethodTable, method_step

    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(30, classes, generator=g) * 4
    labels = torch.randint(0, classes, (30,), generator=g)
    rows = torch.tensor([4, 17, 0, 29, 4])
    z = (torch.randn(5, classes, generator=g) * 3).requires_grad_(True)
    want = distillation_loss(z, teacher[rows], labels[rows], t, alpha)
    (want_grad,) = torch.autograd.grad(want, z)
    per_batch = method_value_and_grad("kd", {}, z.detach(), teacher[rows], labels[rows], t, alpha)
    table = MethodTable("kd", {}, lambda r: teacher[r], labels, t, classes)
    tabled = method_step("kd", {}, z.detach(), table.rows(rows), t, alpha)
    for value, grad in (per_batch, tabled):
        # the value is T^2 (sum p log p - sum p log q): two large float32 sums, a small difference
        assert float(value) == pytest.approx(float(want.detach()), rel=3e-5, abs=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(per_batch[1], tabled[1])  # tabled or not: the same arithmetic


def test_soft_cross_entropy_and_grad_is_the_loss_and_its_autograd_gradient() -> None:
    from softtargets.losses.reference import soft_cross_entropy_and_grad

    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), 1)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    want = soft_cross_entropy(z, p, w, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, z)
    value, grad = soft_cross_entropy_and_grad(z.detach(), p, w)
    assert float(value) == pytest.approx(float(want), rel=1e-12)
    torch.testing.assert_close(grad, want_grad)
