"""The epoch bookkeeping every trainer shares: learning-rate schedules, epoch records, divergence,
early stopping and the best validation epoch.

:func:`softtargets.training.fit.fit` (one model) and :func:`softtargets.training.fit_many.fit_many` (``M``
stacked models) differ only in how a batch is fetched and a step computed; both keep their
epochs with :class:`Selection` (``fit`` as one member) and their learning rates with
:class:`LearningRates`, so the rules below exist once:

* the learning rate of step ``s`` of ``S`` is ``lr * lr_factor(schedule, s, S)``;
* an epoch's record is ``epoch, train_loss, lr`` (the rate of its last step), then
  ``val_accuracy, val_nll``, ``test_accuracy, test_nll`` when given, then ``seconds``;
* a non-finite training loss, or one that exploded (over :data:`EXPLODED` times its first epoch's or :data:`LOSS_CEILING`), ends that model's training (``diverged``);
* the best epoch has the highest validation accuracy, ties broken by the lower validation NLL;
  ``patience`` epochs without a better one end training (``stopped_early``);
* without validation data (or ``restore_best=False``, or after divergence) the model keeps its
  last epoch's weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from softtargets.errors import SoftTargetsError
from softtargets.files import append_jsonl

#: a training loss this many times its first epoch's, or over the ceiling, has exploded: features
#: of 1e38 train to a loss of 1e37 that is finite but meaningless (a classifier starts near log K;
#: even Hinton's T^2-scaled term stays far below the ceiling)
EXPLODED, LOSS_CEILING = 1e4, 1e8


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model (weights of ``best_epoch`` when selected on validation).
        history: one record per epoch (``epoch``, ``train_loss``, ``lr``, ``val_accuracy``,
            ``val_nll``, ``test_accuracy``, ``test_nll``, ``seconds``; missing parts omitted).
        best_epoch: the epoch whose weights ``model`` holds (1-based).
        stopped_early: whether early stopping ended training.
        diverged: whether the training loss became NaN or inf or exploded (training stops there).
        seconds: wall time of the whole fit.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    diverged: bool = False
    seconds: float = 0.0

    @property
    def selected(self) -> dict[str, Any]:
        """The history record of ``best_epoch``."""
        return self.history[self.best_epoch - 1] if self.history else {}


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total_steps``."""
    if schedule == "none":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    if schedule == "step":  # x0.1 at half and at three quarters of training
        progress = step / max(total_steps, 1)
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    raise SoftTargetsError(f"unknown schedule {schedule!r}; choose none, cosine or step")


class LearningRates:
    """Each member's learning rate step by step, by its own schedule and number of steps."""

    def __init__(self, base: Sequence[float], schedule: str, total_steps: Sequence[int]) -> None:
        lr_factor(schedule, 0, 1)  # an unknown schedule fails here, before any training
        self.base, self.schedule, self.total_steps = list(base), schedule, list(total_steps)
        self.taken = [0] * len(self.base)  # optimizer steps each member has taken

    def for_step(self, active: Sequence[bool]) -> list[float]:
        """The rates of this step; members that are ``active`` move on by one step."""
        rates = [
            base * lr_factor(self.schedule, taken, total)
            for base, taken, total in zip(self.base, self.taken, self.total_steps, strict=True)
        ]
        self.taken = [taken + on for taken, on in zip(self.taken, active, strict=True)]
        return rates

    def state(self) -> list[int]:
        """What a checkpoint keeps: the steps each member has taken."""
        return list(self.taken)

    def restore(self, taken: Sequence[int]) -> None:
        self.taken = [int(t) for t in taken]

    def last(self, m: int) -> float:
        """Member ``m``'s rate at its last step (what an epoch's record holds)."""
        return self.base[m] * lr_factor(self.schedule, self.taken[m] - 1, self.total_steps[m])


Scores = tuple[Sequence[float], Sequence[float]] | None  # (accuracy per member, NLL per member)


class Selection:
    """Per member: the epoch records, divergence, early stopping and the best validation epoch.

    ``results[m]`` is member ``m``'s :class:`~softtargets.training.selection.FitResult`; ``running[m]`` says
    whether it still trains (it has neither diverged nor stopped early).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        patience: int | None,
        log_path: str | Path | None = None,
        log_extras: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        self.results = [FitResult(model=model) for model in models]
        self.patience, self.log_path = patience, log_path
        self.log_extras = list(log_extras) if log_extras is not None else [None] * len(models)
        self.running = [True] * len(models)
        self.best_score = [(-math.inf, -math.inf)] * len(models)
        self.stale = [0] * len(models)

    def end_epoch(
        self,
        epoch: int,
        train_loss: Sequence[float],
        scores: tuple[Scores, Scores],
        seconds: float,
        rates: LearningRates,
    ) -> list[int]:
        """Record the epoch for every running member (and append it to the log); returns the
        members whose validation score is their best so far (their weights should be kept)."""
        (val, test), improved = scores, []
        for m, result in enumerate(self.results):
            if not self.running[m]:
                continue
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": train_loss[m],
                "lr": float(rates.last(m)),
            }
            if val is not None:
                record["val_accuracy"], record["val_nll"] = val[0][m], val[1][m]
            if test is not None:
                record["test_accuracy"], record["test_nll"] = test[0][m], test[1][m]
            record["seconds"] = seconds
            result.history.append(record)
            if self.log_path is not None:
                append_jsonl(self.log_path, {**(self.log_extras[m] or {}), **record})
            first = result.history[0]["train_loss"]
            loss = train_loss[m]
            if not math.isfinite(loss) or loss > min(EXPLODED * max(first, 1.0), LOSS_CEILING):
                result.diverged, self.running[m] = True, False
            elif val is not None:
                score = (record["val_accuracy"], -record["val_nll"])
                if score > self.best_score[m]:
                    self.best_score[m], result.best_epoch, self.stale[m] = score, epoch, 0
                    improved.append(m)
                else:
                    self.stale[m] += 1
                    if self.patience is not None and self.stale[m] >= self.patience:
                        result.stopped_early, self.running[m] = True, False
        return improved

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON-able): every member's records and standing."""
        return {
            "results": [
                {
                    "history": r.history,
                    "best_epoch": r.best_epoch,
                    "stopped_early": r.stopped_early,
                    "diverged": r.diverged,
                }
                for r in self.results
            ],
            "running": self.running,
            "best_score": [list(score) for score in self.best_score],
            "stale": self.stale,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from what :meth:`state` returned."""
        for result, saved in zip(self.results, state["results"], strict=True):
            result.history = list(saved["history"])
            result.best_epoch = int(saved["best_epoch"])
            result.stopped_early, result.diverged = saved["stopped_early"], saved["diverged"]
        self.running = list(state["running"])
        self.best_score = [tuple(score) for score in state["best_score"]]
        self.stale = list(state["stale"])

    def finish(self, restore_best: bool) -> list[bool]:
        """Whether each member ends with its best epoch's weights (which the trainer then
        restores); the others keep their last epoch's, and that epoch becomes their selected one."""
        restore = []
        for result in self.results:
            keep_best = restore_best and result.best_epoch > 0 and not result.diverged
            if not keep_best:
                result.best_epoch = len(result.history)
            restore.append(keep_best)
        return restore
