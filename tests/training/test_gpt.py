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
