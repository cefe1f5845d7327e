"""The distillation methods: one registry, one :class:`Method` record per method.

A record names everything a method is: its options, its row formula and paper (for ``--help``,
``softtargets methods`` and the README's table), its autograd reference
(:mod:`softtargets.losses.reference`) and its closed form in two sides
(:mod:`softtargets.losses.closed`): the teacher's, computed once per row, and the student's step.
The formulas are named by import path (``module:function``, as torchtune names its components),
so this module imports no torch: configs and the command line read the names without paying for
it. Adding a method is one :class:`Method` entry here plus its three formulas.

Every method also takes ``warmup`` (epochs over which the soft term's weight rises linearly to
``alpha``, DKD's recipe): the trainers' option, not the loss's (:func:`split_warmup`).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from softtargets.errors import SoftTargetsError

_REFERENCE = "softtargets.losses.reference"
_CLOSED = "softtargets.losses.closed"


@functools.cache
def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    """A distillation method.

    Attributes:
        name: what configs, ``--method`` and the records call it.
        per_row: its loss per row, as the README's table writes it.
        paper: where it comes from.
        options: the options its loss takes (``warmup`` is added for every method).
        reference: ``module:function`` of its loss differentiated by autograd, ``(..., B, K)``
            student and teacher logits (and labels when ``uses_labels``) -> batch means.
        teacher_side, student_step: ``module:function`` of its closed form's two sides (see
            :mod:`softtargets.losses.closed`); empty for a feature method.
        uses_labels: the loss reads the labels (DKD splits off the target class).
        squared: the loss carries the ``T^2`` factor (else a constant ``factor``).
        factor: a constant factor of the loss.
        features: pairs features rather than logits (``fitnet``): trained one student at a time
            against the teacher run online (:mod:`softtargets.training.features`).
    """

    name: str
    per_row: str
    paper: str
    options: tuple[str, ...]
    reference: str = ""
    teacher_side: str = ""
    student_step: str = ""
    uses_labels: bool = False
    squared: bool = True
    factor: float = 1.0
    features: bool = False

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every option the method takes: its own and ``warmup``."""
        return (*self.options, "warmup")

    @property
    def loss(self) -> Callable[..., Any]:
        """The autograd reference (imported on first use)."""
        return _resolve(self.reference)

    @property
    def teacher(self) -> Callable[..., Any]:
        """The closed form's teacher side."""
        return _resolve(self.teacher_side)

    @property
    def step(self) -> Callable[..., Any]:
        """The closed form's student step."""
        return _resolve(self.student_step)


def _logit_method(name: str, per_row: str, paper: str, options: tuple[str, ...], *,
                  reference: str, side: str, step: str, **more: Any) -> Method:  # fmt: skip
    return Method(name, per_row, paper, options, f"{_REFERENCE}:{reference}",
                  f"{_CLOSED}:{side}", f"{_CLOSED}:{step}", **more)  # fmt: skip


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _logit_method("kd", "T^2 KL(p_T || p_S)", "Hinton et al. 2015", ("standardize",),
                      reference="kd_loss", side="plain_teacher", step="kd_step"),
        _logit_method("dkd", "T^2 (alpha TCKD + beta NCKD)", "Zhao et al. CVPR 2022",
                      ("alpha", "beta", "standardize"), reference="dkd_loss",
                      side="dkd_teacher", step="dkd_step", uses_labels=True),
        _logit_method("dist", "tau^2 (beta inter + gamma intra) (a batch statistic)",
                      "Huang et al. NeurIPS 2022", ("beta", "gamma"), reference="dist_loss",
                      side="dist_teacher", step="dist_step"),
        _logit_method("jsd", "beta KL(p_T || m) + (1 - beta) KL(p_S || m)",
                      "Agarwal et al. ICLR 2024 (GKD)", ("beta",), reference="jsd_loss",
                      side="jsd_teacher", step="jsd_step", squared=False),
        _logit_method("rkl", "T^2 KL(p_S || p_T)", "reverse KL", (),
                      reference="reverse_kl_loss", side="plain_teacher", step="rkl_step"),
        _logit_method("tv", "1/2 sum_k |p_T - p_S|", "total variation", (),
                      reference="total_variation_loss", side="tv_teacher", step="tv_step",
                      squared=False, factor=0.5),
        Method("fitnet", "KD + weight x hint(student features, teacher features)",
               "Romero et al. ICLR 2015", ("student_layer", "teacher_layer", "loss", "weight"),
               features=True),
    )
}  # fmt: skip

#: the methods whose loss reads logits alone (every trainer takes them, stacked too)
LOGIT_METHODS = tuple(name for name, m in METHODS.items() if not m.features)


#: what each method option's value is: a finite number, true/false, a name, or whole epochs
OPTION_KINDS = {
    "alpha": "number", "beta": "number", "gamma": "number", "weight": "number",
    "standardize": "flag", "student_layer": "name", "teacher_layer": "name", "loss": "name",
}  # fmt: skip


def _check_option(method: str, key: str, value: Any) -> None:
    kind = OPTION_KINDS.get(key)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "number" and not (number and math.isfinite(value) and value >= 0):
        raise SoftTargetsError(f"{method}:{key}={value!r}: expected a finite number >= 0")
    if kind == "flag" and not isinstance(value, bool):
        raise SoftTargetsError(f"{method}:{key}={value!r}: expected true or false")
    if kind == "name" and not (value is None or isinstance(value, str)):
        raise SoftTargetsError(f"{method}:{key}={value!r}: expected a name")


def check_method(name: str, options: dict[str, Any] | None, *, features: bool = False) -> dict:
    """``options`` of method ``name`` as a plain dict; one line for an unknown method or option
    or a bad warm-up. ``features``: feature methods (``fitnet``, a run's) are known too."""
    known = [n for n, m in METHODS.items() if features or not m.features]
    if name not in known:
        raise SoftTargetsError(f"unknown method {name!r}; use one of {', '.join(known)}")
    options = dict(options or {})
    allowed = METHODS[name].accepted
    for key in options:
        if key not in allowed:
            raise SoftTargetsError(
                f"unknown option {key!r} for method {name!r}; it takes: {', '.join(allowed)}"
            )
    for key, value in options.items():
        _check_option(name, key, value)
    if "warmup" in options:
        check_warmup(options["warmup"])
    return options


def check_run_methods(methods: list[str], method_options: dict[str, dict[str, Any]]) -> None:
    """A run's ``methods`` and ``method_options`` (a config's), each known to the registry."""
    for name in methods:
        check_method(name, None, features=True)
    for name, options in method_options.items():
        check_method(name, options, features=True)


def check_warmup(warmup: object) -> int:
    """A warm-up's length: a whole number of epochs >= 0, refused with one line otherwise."""
    whole = isinstance(warmup, int | float) and not isinstance(warmup, bool)
    if not whole or warmup < 0 or float(warmup) != int(warmup):  # type: ignore[operator,arg-type]
        raise SoftTargetsError(f"warmup must be a whole number of epochs >= 0, got {warmup!r}")
    return int(warmup)  # type: ignore[arg-type]


def check_warmup_fits(warmup: int, epochs: int) -> None:
    """A warm-up no longer than the training: past it, the soft term would never reach alpha while
    the run is still reported as a soft student."""
    if warmup > epochs:
        raise SoftTargetsError(
            f"warmup={warmup} is longer than the {epochs} epochs of training; the soft term would "
            f"never reach its weight: use warmup <= {epochs}"
        )


def split_warmup(options: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """``(the loss's options, warm-up epochs)``: ``warmup`` is the trainers' option (a whole
    number of epochs >= 0), refused with one line otherwise."""
    options = dict(options)
    return options, check_warmup(options.pop("warmup", 0))


def warmup_ramp(epoch: int, warmup: int) -> float:
    """The soft term's factor at ``epoch`` (from 1) with a linear warm-up over ``warmup`` epochs:
    ``min(epoch / warmup, 1)``, as Zhao et al.'s DKD code (the cross-entropy's weight is fixed);
    1 without one."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)
