"""Feature distillation: the student's intermediate features learn the teacher's (FitNets,
attention transfer), beside the logit loss.

A :class:`FeaturePair` names a student module and a teacher module by dotted path (as
``model.get_submodule`` reads it: ``"3"`` is the fourth layer of an ``nn.Sequential``) and a loss:

* ``"mse"``: mean squared error between the student's features, through an adapter, and the
  teacher's (Romero et al., FitNets, 2015);
* ``"cosine"``: 1 - cosine similarity per row, same adapter;
* ``"attention"``: attention transfer (Zagoruyko and Komodakis, 2017): the mean over channels of
  the squared features, flattened and L2-normalised per row, compared by mean squared error; it
  needs no adapter (any channel counts) but the same spatial size.

The adapter maps the student's channels to the teacher's and is learned with the student: a
``Linear`` for ``(B, C)`` features, a 1x1 ``Conv1d``/``Conv2d`` for ``(B, C, L)``/``(B, C, H, W)``,
nothing when the shapes already match. The teacher runs on every batch (features are not
stored), under ``inference_mode``. ``fit(student, data, FeatureDistillation(...))`` trains on
``logit loss + weight x sum of the pairs' weighted losses``, where the logit loss is hard-label
cross-entropy, or a :class:`~softtargets.training.objectives.Distillation`-style soft term against the same
online teacher (``temperature``, ``alpha``, ``method``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.errors import SoftTargetsError
from softtargets.losses.methods import check_method, split_warmup
from softtargets.losses.reference import method_loss

FeatureLossName = Literal["mse", "cosine", "attention"]


FEATURE_LOSSES = ("mse", "cosine", "attention")


@dataclass(frozen=True)
class FeaturePair:
    """One student module's output to learn one teacher module's output."""

    student: str
    teacher: str
    loss: FeatureLossName = "mse"
    weight: float = 1.0


@dataclass(frozen=True)
class FeatureDistillation:
    """Targets for ``fit``: feature pairs plus a logit loss, the teacher run on every batch.

    Attributes:
        teacher: the teacher module (its parameters are not trained).
        pairs: :class:`FeaturePair` s, or ``(student_path, teacher_path)`` tuples (MSE).
        weight: the weight of the feature losses against the logit loss.
        temperature, alpha, method, options: the logit loss, as
            :class:`~softtargets.training.objectives.Distillation`'s (``alpha = 0``: hard labels only).
    """

    teacher: nn.Module
    pairs: Sequence[FeaturePair | tuple[str, str]]
    weight: float = 1.0
    temperature: float = 4.0
    alpha: float = 0.9
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)


def penultimate(model: nn.Module, which: str = "model") -> str:
    """The dotted path of the module whose output feeds ``model``'s last ``Linear`` layer (the
    features a linear classifier reads): FitNets' hint, by default, for the models of
    :mod:`softtargets.training.models` and any ``nn.Sequential`` ending in a ``Linear``."""
    names = [name for name, _ in model.named_children()]
    last = [
        i for i, (_, child) in enumerate(model.named_children()) if isinstance(child, nn.Linear)
    ]
    if not isinstance(model, nn.Sequential) or not last or last[-1] == 0:
        raise SoftTargetsError(
            f"cannot tell which layer of the {which} ({type(model).__name__}) feeds its "
            "classifier; name it (method option student_layer= / teacher_layer=)"
        )
    return names[last[-1] - 1]


def _module(model: nn.Module, path: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SoftTargetsError(
            f"the {which} has no module {path!r}; its modules are {', '.join(names[:12])}"
            + (" ..." if len(names) > 12 else "")
        ) from None


def _adapter(student: Tensor, teacher: Tensor) -> nn.Module:
    """The learned map from the student's feature channels to the teacher's (or none)."""
    if student.shape == teacher.shape:
        return nn.Identity()
    if student.ndim != teacher.ndim or student.shape[2:] != teacher.shape[2:]:
        raise SoftTargetsError(
            f"student features {tuple(student.shape[1:])} and teacher features "
            f"{tuple(teacher.shape[1:])} differ beyond their channels; pair modules whose "
            "outputs have the same spatial size"
        )
    cin, cout = student.shape[1], teacher.shape[1]
    layers = {2: lambda: nn.Linear(cin, cout), 3: lambda: nn.Conv1d(cin, cout, 1),
              4: lambda: nn.Conv2d(cin, cout, 1)}  # fmt: skip
    if student.ndim not in layers:
        raise SoftTargetsError(f"features of {student.ndim} dimensions have no adapter here")
    return layers[student.ndim]()


def _attention(features: Tensor) -> Tensor:
    """``(B, C, ...)`` -> ``(B, positions)``: channel-mean of squares, L2-normalised per row."""
    if features.ndim < 3:
        raise SoftTargetsError("attention transfer needs (B, C, L) or (B, C, H, W) features")
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


def pair_loss(kind: str, student: Tensor, teacher: Tensor) -> Tensor:
    """One pair's loss, batch mean (student already through its adapter, except attention)."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    if kind == "attention":
        student_map, teacher_map = _attention(student), _attention(teacher)
        if student_map.shape != teacher_map.shape:
            raise SoftTargetsError("attention transfer pairs features of the same spatial size")
        return (student_map - teacher_map).pow(2).mean()
    raise SoftTargetsError(f"unknown feature loss {kind!r}; use {', '.join(FEATURE_LOSSES)}")


class FeatureObjective(nn.Module):
    """The trainer's side of a :class:`FeatureDistillation`: forward hooks on both models, the
    adapters (parameters, learned with the student) and the loss of one batch."""

    def __init__(self, spec: FeatureDistillation, student: nn.Module, sample: Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.pairs = [p if isinstance(p, FeaturePair) else FeaturePair(*p) for p in spec.pairs]
        if not self.pairs:
            raise SoftTargetsError("FeatureDistillation needs at least one (student, teacher) pair")
        for pair in self.pairs:
            if pair.loss not in FEATURE_LOSSES:
                raise SoftTargetsError(
                    f"unknown feature loss {pair.loss!r}; use {', '.join(FEATURE_LOSSES)}"
                )
        self.options, self.warmup = split_warmup(check_method(spec.method, spec.options))
        self.teacher = spec.teacher.eval()
        self._seen: dict[str, Tensor] = {}
        self._hooks = []
        for i, pair in enumerate(self.pairs):
            for which, model, path in (
                ("s", student, pair.student),
                ("t", spec.teacher, pair.teacher),
            ):
                module = _module(model, path, "student" if which == "s" else "teacher")
                self._hooks.append(module.register_forward_hook(self._keep(f"{which}{i}")))
        with torch.no_grad():  # one pass of each model: the features' shapes build the adapters
            was_training = student.training
            student.eval()
            student(sample)
            student.train(was_training)
            self.teacher(sample.to(next(spec.teacher.parameters()).device))
        self.adapters = nn.ModuleList(
            _adapter(self._seen[f"s{i}"], self._seen[f"t{i}"].to(self._seen[f"s{i}"].device))
            if pair.loss != "attention"
            else nn.Identity()
            for i, pair in enumerate(self.pairs)
        )
        self.to(sample.device)

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            self._seen[name] = output

        return hook

    @contextmanager
    def hooks_removed(self) -> Iterator[None]:
        """A block after which this objective's hooks are off the student and the teacher."""
        try:
            yield
        finally:
            for handle in self._hooks:
                handle.remove()

    def loss(self, logits: Tensor, inputs: Tensor, labels: Tensor, ramp: float = 1.0) -> Tensor:
        """The batch's loss; the student's forward on ``inputs`` has just run (its features are
        held by the hooks). ``ramp``: the logit loss's warm-up factor of the epoch."""
        student_features = [self._seen[f"s{i}"] for i in range(len(self.pairs))]
        with torch.inference_mode():
            teacher_logits = self.teacher(inputs).float()
        # inference tensors cannot enter autograd: plain copies of what the teacher gave
        teacher_logits = teacher_logits.clone()
        teacher_features = [self._seen[f"t{i}"].clone() for i in range(len(self.pairs))]
        spec = self.spec
        value = method_loss(
            spec.method, self.options, logits, teacher_logits, labels, spec.temperature,
            spec.alpha, ramp,
        ) if spec.alpha > 0 else F.cross_entropy(logits, labels)  # fmt: skip
        for pair, adapter, s, t in zip(
            self.pairs, self.adapters, student_features, teacher_features, strict=True
        ):
            mapped = s if pair.loss == "attention" else adapter(s)
            value = value + spec.weight * pair.weight * pair_loss(pair.loss, mapped, t)
        return value
