"""Numeric limits shared by the input checks and the typed configs.

Torch-free, so that the command line (whose ``--help`` shows the configs' defaults and ranges)
starts without importing torch.
"""

from __future__ import annotations

#: Temperatures softtargets accepts. Beyond them the losses leave float32's range: z / T overflows
#: for tiny T, and the T^2 factor of Hinton's loss multiplies a KL that rounds to 0 for huge T.
#: Hinton et al. use 1 to 20; T = 1e4 is already the logit-matching limit.
TEMPERATURE_RANGE = (1e-2, 1e4)
