"""The theorem's two-layer student: its hand-written gradient, stacking, and the width readout."""

from __future__ import annotations

import math

import pytest
import torch

from softtargets.errors import SoftTargetsError
from softtargets.training.two_layer import (
    _segment_matrix,
    smallest_width,
    train_two_layer,
)


def _data(n: int = 64, dim: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    score = x[:, 0] - 0.5 * x[:, 1] ** 2
    return x, score


def _autograd_step(x, target, seed, widths, lr):
    """One gradient-descent step of the same loss, by autograd, for comparison."""
    outputs = _segment_matrix(widths)
    weights = torch.randn(
        x.shape[1], outputs.shape[0], generator=torch.Generator().manual_seed(seed)
    )
    weights.requires_grad_()
    logits = torch.relu(x @ weights) @ outputs
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target[:, None].expand_as(logits), reduction="none"
    ).mean(0)
    loss.sum().backward()
    return (weights - lr * weights.grad).detach(), loss.detach()


def test_the_written_out_gradient_is_autograds_and_the_loss_is_the_kl() -> None:
    x, score = _data()
    soft = torch.sigmoid(score / 0.25)
    widths = [2, 4, 8]
    # one step: the loss averaged over steps is the loss at the initial weights
    result = train_two_layer(x, soft[None], [3], widths, steps=1, lr=0.5, val_features=x,
                             val_labels=(score > 0).long())  # fmt: skip
    _, loss = _autograd_step(x, soft, 3, widths, 0.5)
    entropy = -(soft * soft.log() + (1 - soft) * (1 - soft).log()).mean()
    assert torch.allclose(result.mean_train_loss[0], loss - entropy, atol=1e-5)
    # the final loss is the loss after the step autograd takes
    stepped, _ = _autograd_step(x, soft, 3, widths, 0.5)
    logits = torch.relu(x @ stepped) @ _segment_matrix(widths)
    after = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            logits, soft[:, None].expand_as(logits), reduction="none"
        ).mean(0)
        - entropy
    )
    assert torch.allclose(result.final_train_loss[0], after, atol=1e-5)


def test_stacked_widths_and_chunks_train_as_if_alone(monkeypatch) -> None:
    x, score = _data()
    hard = (score > 0).float()
    together = train_two_layer(x, torch.stack([hard, hard]), [0, 1], [2, 8], steps=20, lr=4.0,
                               val_features=x, val_labels=hard.long())  # fmt: skip
    import softtargets.training.two_layer as two_layer

    monkeypatch.setattr(two_layer, "CACHE_ELEMENTS", 1)  # one row per chunk
    alone = train_two_layer(x, torch.stack([hard, hard]), [0, 1], [2, 8], steps=20, lr=4.0,
                            val_features=x, val_labels=hard.long())  # fmt: skip
    assert torch.allclose(together.mean_train_loss, alone.mean_train_loss, atol=1e-6)
    assert torch.equal(together.val_accuracy, alone.val_accuracy)
    # seeds differ, so the two rows do too: the seed reaches the initial weights
    assert not torch.equal(together.mean_train_loss[0], together.mean_train_loss[1])


def test_gradient_descent_fits_a_realizable_task_better_when_wider() -> None:
    x, score = _data(n=200)
    hard = (score > 0).float()
    result = train_two_layer(x, hard[None], [0], [2, 64], steps=300, lr=8.0, val_features=x,
                             val_labels=hard.long())  # fmt: skip
    narrow, wide = result.final_train_loss[0].tolist()
    # wider fits better, and the loss fell over the steps (the last below the average)
    assert wide < 0.5 * narrow and wide < result.mean_train_loss[0, 1]


def test_smallest_width_interpolates_in_log_width_and_censors() -> None:
    widths = [2, 4, 8]
    assert smallest_width([0.9, 0.96, 0.99], widths, 0.9) == 2.0
    # halfway from 0.90 at 4 to 0.98 at 8 in accuracy: halfway in log width, sqrt(32)
    assert smallest_width([0.8, 0.90, 0.98], widths, 0.94) == pytest.approx(math.sqrt(32))
    assert smallest_width([0.8, 0.85, 0.9], widths, 0.95) == math.inf


def test_odd_widths_and_mismatched_targets_are_refused() -> None:
    x, score = _data()
    with pytest.raises(SoftTargetsError, match="even numbers"):
        train_two_layer(x, score[None], [0], [3], steps=1, lr=1, val_features=x,
                        val_labels=(score > 0).long())  # fmt: skip
    with pytest.raises(SoftTargetsError, match="one seed per target row"):
        train_two_layer(x, score[None], [0, 1], [2], steps=1, lr=1, val_features=x,
                        val_labels=(score > 0).long())  # fmt: skip
