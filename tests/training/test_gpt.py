"""The built-in causal transformer: shapes, causality, tied output, the model resolver."""

from __future__ import annotations

import pytest
import torch

from softtargets.errors import SoftTargetsError
from softtargets.training.gpt import gpt
from softtargets.training.models import build_model


def test_logits_of_a_position_depend_only_on_the_tokens_before_it() -> None:
    torch.manual_seed(0)
    model = gpt(258, layers=2, heads=2, width=16, context=32).eval()
    ids = torch.randint(0, 258, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 258)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 258
    again = model(changed)
    torch.testing.assert_close(again[:, :7], logits[:, :7])  # causal: the past is unchanged
    assert not torch.allclose(again[:, 7:], logits[:, 7:])
    # the output projection is the token embedding: hidden states times it are the logits
    torch.testing.assert_close(model.hidden(ids) @ model.output_weight.T, logits)


def test_gpt_by_name_and_its_limits() -> None:
    model = build_model("gpt", (64,), 258, seed=0, layers=1, heads=2, width=8)
    assert model(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 64, 258)
    with pytest.raises(SoftTargetsError, match="multiple of heads"):
        gpt(258, heads=3, width=8)
    with pytest.raises(SoftTargetsError, match="exceed its context"):
        gpt(258, width=8, heads=2, context=4)(torch.zeros(1, 5, dtype=torch.long))


def test_extending_a_key_value_cache_gives_the_whole_sequences_logits() -> None:
    torch.manual_seed(0)
    model = gpt(50, layers=2, heads=2, width=16, context=24).eval()
    ids = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        whole = model(ids)
        first, cache = model.extend(ids[:, :7])  # a prompt, one token, then several at once
        one, cache = model.extend(ids[:, 7:8], cache)
        rest, cache = model.extend(ids[:, 8:], cache)
    torch.testing.assert_close(torch.cat([first, one, rest], 1), whole, atol=1e-5, rtol=1e-5)
    assert cache[0][0].shape == (3, 2, 20, 8)  # (B, heads, positions, width / heads)
    with pytest.raises(SoftTargetsError, match="25 tokens exceed its context of 24"):
        model.extend(ids[:, :5], cache)


def test_sampling_with_the_cache_draws_what_the_whole_sequence_draws() -> None:
    from softtargets.training.lm import sample_continuations

    class Uncached(torch.nn.Module):  # the same model without extend: the fallback path
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(ids)

    torch.manual_seed(0)
    model = gpt(50, layers=1, heads=2, width=16, context=24)
    tokens = torch.randint(0, 50, (4, 17))
    cached = sample_continuations(model, tokens, 8, torch.Generator().manual_seed(1))
    uncached = sample_continuations(Uncached(model), tokens, 8, torch.Generator().manual_seed(1))
    assert torch.equal(cached[:, :8], tokens[:, :8]) and cached.shape == tokens.shape
    # the draws agree wherever the two paths' probabilities do (they differ by rounding only)
    assert (cached == uncached).float().mean() > 0.95
