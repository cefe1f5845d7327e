"""``torchrun`` for ``--nproc N``, quiet about its processes' failures.

A process that stops on bad input has printed its one line (``error: ...``) and exits with status
2; torchrun's own report of that (a logged error and a traceback of ``ChildFailedError``, ~40
lines) would bury it. This runs ``torch.distributed.run`` with those silenced and exits with the
failed process's status. ``python -m softtargets.cli.torchrun ARGS`` takes torchrun's arguments.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def run_quietly(argv: list[str]) -> int:
    """``torchrun ARGV``'s exit status: 0, or the first failed process's (1 if it has none)."""
    # the elastic agent logs every failed process at ERROR: the process said why already
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(run_quietly(sys.argv[1:]))
