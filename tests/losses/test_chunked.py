"""The chunked loss equals the naive one (full logits, the autograd reference) in value and in
the gradients of the hidden states and of the projection, with a mask, for every token method."""

from __future__ import annotations

import pytest
import torch

from softtargets.errors import SoftTargetsError
from softtargets.losses.chunked import chunked_distillation_loss
from softtargets.losses.reference import method_loss

TOKEN_METHODS = ["kd", "rkl", "jsd", "tv"]


def _problem(n: int = 37, width: int = 6, vocab: int = 150, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) > 0.3
    return hidden, weight, teacher, labels, mask


@pytest.mark.parametrize("method", TOKEN_METHODS)
@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 0.7), (4.0, 0.5)])
def test_the_chunked_loss_is_the_naive_loss(method, temperature, alpha) -> None:
    hidden, weight, teacher, labels, mask = _problem()
    value = chunked_distillation_loss(
        hidden, weight, labels, lambda rows: teacher[rows], mask=mask, method=method,
        temperature=temperature, alpha=alpha, chunk=5,
    )  # fmt: skip
    value.backward()
    chunked_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    keep = mask.nonzero().squeeze(1)
    naive = method_loss(
        method, {}, (hidden @ weight.T)[keep], teacher[keep], labels[keep], temperature, alpha
    )
    naive.backward()
    torch.testing.assert_close(value.double(), naive, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked_grads[0], hidden.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(chunked_grads[1], weight.grad, rtol=1e-4, atol=1e-7)
    assert chunked_grads[0][~mask].abs().max() == 0  # masked positions get no gradient


def test_the_chunk_size_does_not_change_the_result() -> None:
    hidden, weight, teacher, labels, mask = _problem(seed=1)
    values = [
        chunked_distillation_loss(
            hidden,
            weight,
            labels,
            lambda r: teacher[r],
            mask=mask,
            temperature=2.0,
            alpha=0.5,
            chunk=c,
        )  # fmt: skip
        for c in (1, 7, 1000)
    ]
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], values[2])


def test_a_mask_that_hides_everything_and_shapes_that_do_not_fit_are_one_line() -> None:
    hidden, weight, teacher, labels, _ = _problem()
    with pytest.raises(SoftTargetsError, match="hides every position"):
        chunked_distillation_loss(hidden, weight, labels, lambda r: teacher[r],
                                  mask=torch.zeros(len(labels), dtype=torch.bool))  # fmt: skip
    with pytest.raises(SoftTargetsError, match="do not fit"):
        chunked_distillation_loss(hidden, weight[:, :3], labels, lambda r: teacher[r])


@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.9)])
def test_a_top_k_teacher_is_the_bucket_loss_exactly(temperature, alpha) -> None:
    import math

    from softtargets.losses.chunked import KeptRows
    from softtargets.losses.reference import bucket_distillation_loss

    hidden, weight, teacher, labels, _ = _problem(n=23, vocab=40, seed=2)
    top = teacher.topk(5, dim=1)
    rest = torch.logsumexp(teacher.scatter(1, top.indices, float("-inf")), dim=1)  # at T = 1
    others = math.log(40 - 5)
    # the reference reads the rest as K - k equal logits; its log-sum-exp at T is this
    rest_at_t = others + (rest - others) / temperature

    def kept(rows: torch.Tensor) -> KeptRows:
        return KeptRows(top.values[rows], top.indices[rows], rest_at_t[rows])

    value = chunked_distillation_loss(hidden, weight, labels, kept, temperature=temperature,
                                      alpha=alpha, chunk=4)  # fmt: skip
    value.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = bucket_distillation_loss(
        hidden @ weight.T, top.values, top.indices, rest, labels, temperature, alpha
    )
    reference.backward()
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-7)
