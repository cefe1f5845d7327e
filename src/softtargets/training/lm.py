"""Training a causal language model on token blocks, with next-token labels and, optionally, a
teacher at every position: its full logits run online, or a per-position top-k store.

Every position is a row of the methods' loss (:func:`~softtargets.losses.chunked.chunked_distillation_loss`:
the student's output projection and the loss in chunks, so memory does not grow with the
vocabulary). The student must give its final hidden states (``hidden(ids) -> (B, L, D)``) and
its projection (``output_weight (V, D)``), as :class:`~softtargets.training.gpt.GPT` does.
Validation reports next-token cross-entropy and bits per token (per byte, for the byte-level
tokenizer); the weights kept are those of the best validation epoch.

Under torchrun a fit is data-parallel: every process takes its share of each batch's blocks and
the gradients are averaged, each weighted by its share of the batch's counted positions (all, or
the examples' completions), so a step is the one-process step (to float rounding) and every
process ends with the same weights. Validation is shared out the same way. ``checkpoint=PATH``
saves the whole state after every epoch (:mod:`softtargets.training.checkpoint`): a fit killed at
any point continues from the last epoch saved and ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from softtargets import distributed
from softtargets.data.sequences import Blocks
from softtargets.errors import SoftTargetsError
from softtargets.losses.chunked import KeptRows, chunked_distillation_loss
from softtargets.store.store import fingerprint_module
from softtargets.store.tokens import TokenStore
from softtargets.training import checkpoint as checkpoints


@dataclass
class LMResult:
    """What :func:`fit_lm` returns: the student (best validation epoch's weights), one record per
    epoch, the selected epoch, and the wall time."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


@torch.no_grad()
def next_token_loss(model: nn.Module, blocks: Blocks, batch_blocks: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over the positions of ``blocks`` that
    count (every one, or an example's completion; :meth:`Blocks.mask`). Under torchrun each
    process measures its share of the blocks and the sums are added."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss, positions)
    mine = distributed.my_slice(len(blocks))
    for start in range(mine.start, mine.stop, batch_blocks):
        which = slice(start, min(start + batch_blocks, mine.stop))
        tokens = blocks.batch(which).to(device)
        logits = model(tokens[:, :-1]).float()
        losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
        )
        mask = blocks.mask(which)
        if mask is not None:
            losses = losses[mask.reshape(-1).to(device)]
        sums[0] += losses.sum().double()
        sums[1] += losses.numel()
    model.train(was_training)
    total, count = distributed.sum_(sums).tolist()
    return total / count


def _teacher_rows(
    teacher: TokenStore | nn.Module | None,
    tokens: Tensor,
    rows: Tensor,
    temperature: float,
    vocab: int,
) -> Any:
    """``teacher(positions) -> logits or KeptRows`` for one batch of blocks ``tokens``: stored
    rows, an online teacher's logits of the batch, or (no teacher, alpha 0) zeros."""
    device = tokens.device
    if teacher is None:  # weighted 0: labels only
        return lambda part: torch.zeros(len(part), vocab, device=device)
    if isinstance(teacher, TokenStore):  # the store lives on the CPU; its rows go to the batch
        return lambda part: KeptRows(
            *(t.to(device) for t in teacher.kept(rows[part.cpu()], temperature))
        )
    with torch.no_grad():
        logits = teacher(tokens[:, :-1]).float()
    if logits.shape[-1] != vocab:
        raise SoftTargetsError(
            f"the teacher's vocabulary is {logits.shape[-1]}, the student's {vocab}: they must "
            "share a tokenizer"
        )
    return lambda part: logits.reshape(-1, vocab)[part]


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    tokens: Tensor,
    prompt: int | Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> Tensor:
    """``tokens (B, L + 1)`` with every token after the first ``prompt`` replaced by ``model``'s
    own samples (at ``temperature``), drawn one position at a time from the prompt on; ``prompt``
    is one length for every row or ``(B,)`` lengths, one per row (prompt / completion examples:
    a row keeps its own tokens up to its prompt's end). A model with
    ``extend(ids, cache) -> (logits, cache)`` (``gpt``) runs each new token alone against its
    key-value cache; any other runs the whole sequence again for every token."""
    was_training = model.training
    model.eval()
    lengths = torch.as_tensor(prompt, device=tokens.device).expand(len(tokens))[:, None]
    start = int(lengths.min())
    sequence = tokens[:, :start]
    extend = getattr(model, "extend", None)
    if extend is not None:
        logits, cache = extend(sequence)
    else:
        logits, cache = model(sequence), None
    for drawn_so_far in range(tokens.shape[1] - start):
        probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
        # drawn on the CPU, where the seeded generator lives
        drawn = torch.multinomial(probs.cpu(), 1, generator=generator).to(sequence.device)
        at = sequence.shape[1]  # rows whose prompt is longer keep their own token here
        drawn = torch.where(lengths > at, tokens[:, at : at + 1], drawn)
        sequence = torch.cat([sequence, drawn], 1)
        if drawn_so_far + 1 == tokens.shape[1] - start:
            break  # the last token: nothing follows it
        if extend is not None:
            logits, cache = extend(drawn, cache)
        else:
            logits = model(sequence)
    model.train(was_training)
    return sequence


def fit_lm(
    student: nn.Module,
    train: Blocks,
    val: Blocks,
    teacher: TokenStore | nn.Module | None = None,
    *,
    method: str = "kd",
    temperature: float = 1.0,
    alpha: float = 0.5,
    epochs: int = 5,
    batch_blocks: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    chunk: int = 1024,
    on_policy: float = 0.0,
    progress: Any = None,
    description: str = "training",
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1,
) -> LMResult:
    """Train ``student`` on ``train``'s blocks: ``alpha x method + (1 - alpha) x next-token
    cross-entropy`` at every position (``teacher=None``: cross-entropy only), AdamW with a cosine
    schedule, ``batch_blocks`` blocks a step; selected on validation cross-entropy.

    Blocks with spans (prompt / completion examples, :attr:`Blocks.spans`) train and validate on
    their completions only.

    ``on_policy`` (GKD's lambda, Agarwal et al. 2024): the fraction of steps on which the student
    first samples the rest of each block from its prompt (an example's, or a text block's first
    half), and learns the teacher's distribution (the method alone, alpha = 1) at the positions
    it sampled; the teacher runs online on the student's own tokens, so it must be the model,
    not a store.

    ``progress``: a ``rich.progress.Progress`` to report steps to, as ``description``;
    ``device``: where the student (and an online teacher) train; a store stays on the CPU and
    sends each batch's rows; ``checkpoint``: a file to save the fit's state to every
    ``checkpoint_every`` epochs (and after the last) and to continue from (refused if it belongs
    to another fit)."""
    if not 0.0 <= on_policy <= 1.0:
        raise SoftTargetsError(f"on_policy is a fraction of steps from 0 to 1, got {on_policy}")
    if on_policy and not isinstance(teacher, nn.Module):
        raise SoftTargetsError(
            "on-policy distillation runs the teacher on the student's own samples, so it needs "
            "the teacher model, not a store"
        )
    if not hasattr(student, "hidden") or not hasattr(student, "output_weight"):
        raise SoftTargetsError(
            "the student must give hidden(ids) and output_weight, as softtargets' gpt does"
        )
    if isinstance(teacher, TokenStore):
        if teacher.vocab_size != train.vocab_size:
            raise SoftTargetsError(
                f"the store's vocabulary is {teacher.vocab_size}, the blocks' {train.vocab_size}"
            )
    if teacher is None:
        alpha = 0.0
    started = time.perf_counter()
    key, saved = "", None
    if checkpoint is not None:  # what it belongs to (hashed only then: a large teacher takes time)
        key = checkpoints.fit_key(
            method=method, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr, seed=seed,
            batch_blocks=batch_blocks, on_policy=on_policy, student=fingerprint_module(student),
            train=train.fingerprint, val=val.fingerprint, teacher=_describe(teacher),
        )  # fmt: skip
        saved = checkpoints.load(checkpoint, key, epochs)
    generator = torch.Generator().manual_seed(seed)  # batch order and on-policy steps: shared
    # what each process samples on its own blocks
    sampler = torch.Generator().manual_seed(seed + 1 + distributed.rank())
    torch.manual_seed(seed + distributed.rank())  # dropout differs between the processes
    student.to(device)
    if isinstance(teacher, nn.Module):
        teacher.to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    per_epoch = math.ceil(len(train) / batch_blocks)
    steps = epochs * per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    result = LMResult(student)
    best, best_state, first_epoch = math.inf, None, 1
    generators = {"order": generator, "sampler": sampler}
    if saved is not None:  # continue where the checkpoint left off
        student.load_state_dict(saved.model)
        optimizer.load_state_dict(saved.optimizer)
        schedule.load_state_dict(saved.progress["schedule"])
        checkpoints.set_rng_states(saved.rng, generators, torch.device(device))
        if distributed.rank():  # rank 0's states were saved: the others draw apart again
            sampler.manual_seed(
                int(torch.randint(2**62, (), generator=sampler)) + distributed.rank()
            )
            torch.manual_seed(int(torch.randint(2**62, ())) + distributed.rank())
        result.history, result.best_epoch = saved.progress["history"], saved.progress["best_epoch"]
        best = math.inf if saved.progress["best"] is None else saved.progress["best"]
        best_state, first_epoch = saved.best, saved.epoch + 1
    # a store's blocks, in its order (:meth:`TokenStore.rows_of` finds their rows)
    store_row = (
        {int(b): i for i, b in enumerate(teacher.block_ids.tolist())}
        if isinstance(teacher, TokenStore)
        else {}
    )
    if store_row and (missing := sum(b not in store_row for b in train.block_ids.tolist())):
        raise SoftTargetsError(
            f"the store has no rows for {missing} of the {len(train)} training blocks: it was "
            "labelled for other blocks; label these"
        )
    task = progress.add_task(description, total=steps) if progress is not None else None
    if task is not None:
        progress.update(task, advance=(first_epoch - 1) * per_epoch)
    for epoch in range(first_epoch, epochs + 1):
        student.train()
        order = torch.randperm(len(train), generator=generator)
        losses = []
        for start in range(0, len(train), batch_blocks):
            batch = order[start : start + batch_blocks]
            share = distributed.my_slice(len(batch))
            picked = batch[share.start : share.stop]  # this process's blocks of the batch
            sampled = on_policy and float(torch.rand((), generator=generator)) < on_policy
            optimizer.zero_grad(set_to_none=True)
            if len(picked):
                loss = _batch_loss(
                    student, train, picked, teacher, store_row, sampled, sampler,
                    method=method, temperature=temperature, alpha=alpha, chunk=chunk,
                    device=device,
                )  # fmt: skip
                # weighted by this process's share of the batch's counted positions: the
                # averaged gradient is the gradient of the batch's mean loss
                part = _counted(train, picked, sampled) / _counted(train, batch, sampled)
                (loss * part * distributed.world_size()).backward()
                losses.append(float(loss.detach()))
            else:  # fewer blocks than processes: this one adds nothing to the average
                for parameter in student.parameters():
                    parameter.grad = torch.zeros_like(parameter)
            distributed.average_gradients(student)
            optimizer.step()
            schedule.step()
            if task is not None:
                progress.update(task, advance=1)
        val_loss = next_token_loss(student, val)
        record = {
            "epoch": epoch,
            "train_loss": sum(losses) / max(len(losses), 1),
            "val_loss": val_loss,
            "val_bits_per_token": val_loss / math.log(2),
        }
        result.history.append(record)
        if val_loss < best:
            best, best_state, result.best_epoch = (
                val_loss,
                copy.deepcopy(student.state_dict()),
                epoch,
            )
        due = epoch % max(checkpoint_every, 1) == 0 or epoch == epochs
        if checkpoint is not None and due and distributed.rank() == 0:
            checkpoints.save(checkpoint, checkpoints.FitState(
                key=key, epoch=epoch, model=student.state_dict(), optimizer=optimizer.state_dict(),
                best=best_state, rng=checkpoints.rng_states(generators, torch.device(device)),
                progress={"history": result.history, "best_epoch": result.best_epoch,
                          "best": best if math.isfinite(best) else None,
                          "schedule": schedule.state_dict()},
            ))  # fmt: skip
    if task is not None:
        progress.remove_task(task)
    if best_state is not None:
        student.load_state_dict(best_state)
    result.seconds = time.perf_counter() - started
    return result


def _batch_loss(
    student: nn.Module,
    train: Blocks,
    picked: Tensor,
    teacher: TokenStore | nn.Module | None,
    store_row: dict[int, int],
    sampled: bool,
    sampler: torch.Generator,
    *,
    method: str,
    temperature: float,
    alpha: float,
    chunk: int,
    device: str | torch.device,
) -> Tensor:
    """The loss of the blocks ``picked`` (indices into ``train``): on a ``sampled`` (on-policy)
    step, on the student's own continuations of their first halves."""
    length = train.block_length
    tokens = train.batch(picked).to(device)
    mask = train.mask(picked)  # (B, L) an example's completion, or None: every position
    if sampled:  # the student's own continuations of the prompts (a text block's first half)
        first = _first_sampled(train, picked)
        tokens = sample_continuations(student, tokens, first.squeeze(1).to(device) + 1, sampler)
        mask = torch.arange(length)[None, :] >= first  # targets the student sampled
    if mask is not None:
        mask = mask.reshape(-1).to(device)
    if isinstance(teacher, TokenStore):  # the store's rows of these blocks' positions
        blocks = torch.tensor([store_row[int(b)] for b in train.block_ids[picked]])
        rows = teacher.rows_of(blocks).reshape(-1)  # -1 where it keeps none (never asked)
    else:
        rows = torch.empty(0, dtype=torch.long)
    hidden = student.hidden(tokens[:, :-1])
    return chunked_distillation_loss(
        hidden.reshape(-1, hidden.shape[-1]), student.output_weight, tokens[:, 1:].reshape(-1),
        _teacher_rows(teacher, tokens, rows, temperature, train.vocab_size),
        mask=mask, method=method, temperature=temperature, alpha=1.0 if sampled else alpha,
        chunk=chunk,
    )  # fmt: skip


def _first_sampled(blocks: Blocks, which: Tensor) -> Tensor:
    """``(k, 1)``: the first position an on-policy step samples the target of, in the blocks
    ``which``: an example's completion, or a text block's second half."""
    if blocks.spans is not None:
        return blocks.spans[which][:, :1]
    return torch.full((len(which), 1), max(1, blocks.block_length // 2) - 1)


def _counted(blocks: Blocks, which: Tensor, sampled: bool) -> int:
    """How many positions of the blocks ``which`` a step's loss averages over."""
    if sampled:
        return int((blocks.block_length - _first_sampled(blocks, which)).sum())
    mask = blocks.mask(which)
    return len(which) * blocks.block_length if mask is None else int(mask.sum())


def _describe(teacher: TokenStore | nn.Module | None) -> Any:
    """What identifies a fit's teacher in its checkpoint key."""
    if isinstance(teacher, TokenStore):
        return ["store", teacher.teacher_fingerprint, teacher.blocks_fingerprint, teacher.top]
    return fingerprint_module(teacher) if isinstance(teacher, nn.Module) else None
