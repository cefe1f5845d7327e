"""Running a job from the command line: with progress bars and printed results, and, with
``--nproc N``, as the same command again under torchrun."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from softtargets.cli.console import make_progress, print_outcome, say
from softtargets.errors import SoftTargetsError


def run_job(config: Any, out: Path, overwrite: bool, nproc: int = 1) -> None:
    """Run (or resume) one distillation job with progress bars, then print its results.

    With ``nproc > 1`` the same command is started again under torchrun; under torchrun (however
    started) only rank 0 shows progress and prints.
    """
    from softtargets import distributed
    from softtargets.run.distill import run_distillation
    from softtargets.training.common import resolve_device

    if nproc > 1 and not distributed.launched():
        raise typer.Exit(relaunch_under_torchrun(nproc))
    distributed.setup(resolve_device(config.device))
    if not distributed.is_main():
        run_distillation(config, out, overwrite=overwrite)
        return
    with make_progress() as progress:
        outcome = run_distillation(config, out, overwrite=overwrite, progress=progress, log=say)
    print_outcome(outcome)


def relaunch_under_torchrun(nproc: int) -> int:
    """Run this command line again as ``torchrun --standalone --nproc-per-node N -m softtargets
    ...`` (without ``--nproc``); its exit status. At most one process per CPU core (or GPU)."""
    import torch

    fits = max(os.cpu_count() or 1, torch.cuda.device_count())
    if nproc > fits:
        raise SoftTargetsError(
            f"--nproc {nproc} is more processes than this machine has cores or GPUs ({fits}); "
            f"use --nproc {fits} or fewer"
        )
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "softtargets.cli.torchrun", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "softtargets", *args]  # fmt: skip
    # one thread a process unless told otherwise (torchrun's default, without its banner)
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.run(command, env=env).returncode
