from __future__ import annotations

import pytest
import torch

from softtargets.errors import SoftTargetsError
from softtargets.training.models import build_model, count_parameters, forward_flops


@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [
        ("mlp", (40,), {"hidden": [16, 8]}),
        ("mlp", (1, 8, 8), {}),
        ("cnn1d", (40,), {}),
        ("cnn1d", (2, 40), {"channels": [4]}),
        ("cnn2d", (1, 8, 8), {}),
        ("cnn2d", (3, 32, 32), {}),
    ],
)
def test_models_map_inputs_to_logits(name: str, shape: tuple, options: dict) -> None:
    model = build_model(name, shape, 7, seed=0, **options)
    assert model(torch.zeros(5, *shape)).shape == (5, 7)


def test_seed_fixes_initial_weights_without_touching_global_rng() -> None:
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = build_model("mlp", (4,), 3, seed=1)
    assert torch.rand(1) == before
    b = build_model("mlp", (4,), 3, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_unknown_model_or_option() -> None:
    with pytest.raises(SoftTargetsError, match="unknown model 'resnet'"):
        build_model("resnet", (4,), 3)
    with pytest.raises(SoftTargetsError, match="unknown option 'chanels' for model 'cnn1d'"):
        build_model("cnn1d", (40,), 3, chanels=[3])
    with pytest.raises(SoftTargetsError, match="cnn2d needs"):
        build_model("cnn2d", (40,), 3)


def test_flops_and_parameters_of_an_mlp() -> None:
    model = build_model("mlp", (40,), 10, hidden=[100, 100])
    assert count_parameters(model) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert forward_flops(model, (40,)) == 2 * (40 * 100 + 100 * 100 + 100 * 10)
