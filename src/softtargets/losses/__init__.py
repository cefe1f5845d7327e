"""The losses wing: every formula of soft targets and distillation.

| module | holds |
| --- | --- |
| :mod:`~softtargets.losses.reference` | the one registry of distillation methods (torch-free) |
| :mod:`~softtargets.losses.reference` | every loss as autograd differentiates it (the references) |
| :mod:`~softtargets.losses.closed` | every method's value and gradient in closed form (what trains) |
| :mod:`~softtargets.training.metrics` | (beside it, in training) accuracy, NLL, ECE, agreement |

This package only re-exports, lazily, so that importing the torch-free registry does not import
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "soft_cross_entropy": "reference",
    "soft_cross_entropy_and_grad": "reference",
    "kl_at_temperature": "reference",
    "distillation_loss": "reference",
    "bucket_distillation_loss": "reference",
    "DistillationLoss": "reference",
    "kd_loss": "reference",
    "dkd_loss": "reference",
    "dist_loss": "reference",
    "jsd_loss": "reference",
    "reverse_kl_loss": "reference",
    "total_variation_loss": "reference",
    "method_loss": "reference",
    "method_value_and_grad": "closed",
    "METHODS": "methods",
    "Method": "methods",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softtargets.losses.reference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"softtargets.losses.reference.{_EXPORTS[name]}"), name)
