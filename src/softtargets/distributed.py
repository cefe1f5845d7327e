"""Several processes: what ``torchrun`` gives each one, and the few collective steps softtargets
takes (``gloo`` on the CPU, ``nccl`` on CUDA).

Under ``torchrun --nproc-per-node N ...`` every process runs the same program. :func:`setup`
joins the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...);
outside torchrun it does nothing and every helper answers as for one process, so the same code
runs either way. Only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from softtargets.errors import SoftTargetsError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | None = None, timeout_s: float = 300.0) -> None:
    """Join the process group torchrun set up for this process (idempotent; nothing outside
    torchrun). ``gloo`` for the CPU, ``nccl`` for CUDA (each rank on ``cuda:LOCAL_RANK``)."""
    if not launched() or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SoftTargetsError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; start "
            "the processes with torchrun (see README: Several processes or machines)"
        )
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:  # a rendezvous that never completes, a bad address
        raise SoftTargetsError(
            f"could not join the {os.environ['WORLD_SIZE']} processes at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
            f"({str(err).splitlines()[0]}); check that every process was started with the same "
            "--rdzv-endpoint and --nnodes"
        ) from None
    # A process that exits with its group alive can abort ("terminate called without an active
    # exception": gloo's threads outlive the interpreter), now and then, failing a run that
    # finished. Leave the group properly instead, once every process has reached its end.
    atexit.register(teardown)


def teardown(timeout_s: float = 60.0) -> None:
    """Leave the process group: wait (at most ``timeout_s``) for every process to reach this
    point, then destroy the group. Registered at exit by :func:`setup`; idempotent."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # another process failed or left: its error is the one to report
        pass
    dist.destroy_process_group()


_alone = 0  # depth of alone() blocks


def active() -> bool:
    """Whether this process is one of several in a process group (and not inside
    :func:`alone`)."""
    return (
        not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


@contextmanager
def alone() -> Iterator[None]:
    """Inside this block the process works on its own (a sweep's fits, each whole on one rank):
    ``fit`` neither wraps the model in DDP nor deals out batches."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def group_rank() -> int:
    """This process's rank in the group, even inside :func:`alone`."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 of the process group (even inside :func:`alone`): the one process that writes the
    run's files and prints."""
    return group_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def sum_(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the processes (in place; itself for one process)."""
    if active():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters of ``module`` on every process (in place), as DDP does for the model
    it wraps: for modules trained beside it (feature distillation's adapters)."""
    if active():
        with torch.no_grad():
            for parameter in module.parameters():
                dist.broadcast(parameter.data, src=0)


def average_gradients(module: torch.nn.Module) -> None:
    """Each gradient of ``module`` averaged over the processes (in place), as DDP averages the
    gradients of the model it wraps."""
    if active():
        for parameter in module.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad.div_(world_size())


def gather_to_main(item: Any) -> list[Any] | None:
    """Every process's ``item``, in rank order, on rank 0 (``None`` elsewhere)."""
    if not active():
        return [item]
    items: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(item, items, dst=0)
    return items


def gather_to_all(item: Any) -> list[Any]:
    """Every process's ``item``, in rank order, on every process."""
    if not active():
        return [item]
    items: list[Any] = [None] * world_size()
    dist.all_gather_object(items, item)
    return items


def on_main(work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, ``None`` on the others; bad input found there (a
    :class:`SoftTargetsError`) stops every process with its one line, instead of leaving the
    others waiting for rank 0 until the group's timeout."""
    result, error = None, None
    if is_main():
        try:
            result = work()
        except SoftTargetsError as err:
            error = str(err)
    error = share_from_main(error)
    if error is not None:
        raise SoftTargetsError(error)
    return result


def share_from_main(item: Any) -> Any:
    """Rank 0's ``item`` on every process."""
    if not active():
        return item
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def my_slice(count: int) -> range:
    """This process's contiguous share of ``count`` rows (rank ``r`` of ``N`` takes
    ``[count r / N, count (r + 1) / N)``): how a batch or a pass over blocks is dealt out."""
    size, me = world_size(), rank()
    return range(count * me // size, count * (me + 1) // size)


def spread(jobs: list[Any], work: Callable[[list[Any]], list[Any]]) -> list[list[Any]] | None:
    """Run independent ``jobs`` over the processes, each whole on one (:func:`my_share`, inside
    :func:`alone`), as ``work(this process's jobs) -> results``. Returns every process's results
    in rank order on rank 0 (``None`` elsewhere); ``[work(jobs)]`` for one process. Rank 0's list
    of jobs is the one used."""
    if not active():
        return [work(jobs)]
    jobs = share_from_main(jobs)
    mine = [jobs[i] for i in my_share(len(jobs))]
    with alone():
        done = work(mine)
    return gather_to_main(done)


def my_share(count: int) -> range:
    """This process's share of ``count`` independent jobs (job ``j`` runs on rank ``j mod N``):
    how a sweep of fits spreads over the processes, each fit whole on one of them."""
    return range(rank(), count, world_size())
