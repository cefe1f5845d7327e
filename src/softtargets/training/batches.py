"""A fit's batches: in-memory data batched by a seeded index permutation (no ``DataLoader``), or a
streamed dataset through one; each carries its objective (:mod:`softtargets.training.objectives`)
and deals its rows out to the processes under torchrun."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from softtargets import distributed
from softtargets.data import streams
from softtargets.data.dataset import Dataset
from softtargets.training.objectives import Targets, make_objective


class _MemoryBatches:
    """In-memory data: each epoch a seeded permutation of the training rows, batched by index
    (no ``DataLoader``: for small models its per-batch overhead would cost more than the model)."""

    def __init__(
        self,
        data: Dataset,
        rows: Tensor,
        targets: Targets,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.loss = make_objective(targets, data, device)  # loss(logits, rows)
        self.features, self.rows, self.batch_size = data.features.to(device), rows, batch_size
        self.generator, self.device = generator, device

    def __len__(self) -> int:
        return len(self.rows)

    def generators(self) -> dict[str, torch.Generator]:
        """The generators that decide the batch order (a checkpoint saves their states)."""
        return {"order": self.generator}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int, float]]:
        """``(inputs (b, ...), rows (b,), b, weight)`` per batch; ``rows`` is what :attr:`loss`
        takes.

        Every process draws the same order; under several processes each global batch of ``B``
        rows is dealt out row by row (process ``r`` of ``N`` takes rows ``r, r + N, ...``), so
        the processes together see the batches one process would. ``weight = b N / B`` turns each
        process's batch mean into its share of the global batch mean once DDP averages the
        gradients; a process left without a row (a last batch of fewer than ``N``) takes one row
        with weight 0, since every process must take every step.
        """
        order = self.rows[torch.randperm(len(self.rows), generator=self.generator)]
        order = order.to(self.device)
        rank, world = distributed.rank(), distributed.world_size()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = batch[rank::world]
            count, weight = len(rows), len(rows) * world / len(batch)
            if count == 0:
                rows, weight = batch[:1], 0.0
            yield self.features.index_select(0, rows), rows, count, weight


class _StreamBatches:
    """Streamed data (a ``torch.utils.data.Dataset`` of ``(x, label, id)``): a seeded, shuffling
    ``DataLoader``; targets are looked up by id in a store or computed by an online teacher."""

    def __init__(
        self,
        data: TorchDataset,
        targets: Targets,
        batch_size: int,
        seed: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        self.loss = make_objective(targets, data, device)  # loss(logits, (labels, ids, x))
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.loader = streams.loader(
            data, batch_size, device, shuffle=True, seed=seed, num_workers=num_workers,
            rank=self.rank, world=self.world,
        )  # fmt: skip
        self.data, self.device, self.batch_size = data, device, batch_size

    def __len__(self) -> int:
        return len(self.data)

    def generators(self) -> dict[str, torch.Generator]:
        """The sampler's order and the loader's worker seeds (a checkpoint saves their states)."""
        found = {"workers": self.loader.generator}
        for sampler in (self.loader.batch_sampler, self.loader.sampler):
            if hasattr(sampler, "generator"):
                found["order"] = sampler.generator
        return found

    def __iter__(self) -> Iterator[tuple[Tensor, tuple[Tensor, Tensor, Tensor], int, float]]:
        """``(inputs, (labels, ids, inputs), b, weight)`` per batch (weights as in
        :class:`_MemoryBatches`, for several processes)."""
        for index, (x, labels, ids) in enumerate(streams.batches_of(self.loader, self.device)):
            count, weight = len(labels), 1.0
            if self.world > 1:
                count, weight = streams.share_weight(
                    len(self.data), self.batch_size, index, self.rank, self.world
                )
            yield x, (labels, ids, x), count, weight
