"""Numeric limits shared by the input checks and the typed configs.

Torch-free, so that the command line (whose ``--help`` shows the configs' defaults and ranges)
starts without importing torch.
"""

from __future__ import annotations

from softtargets.errors import SoftTargetsError

#: Temperatures softtargets accepts. Beyond them the losses leave float32's range: z / T overflows
#: for tiny T, and the T^2 factor of Hinton's loss multiplies a KL that rounds to 0 for huge T.
#: Hinton et al. use 1 to 20; T = 1e4 is already the logit-matching limit.
TEMPERATURE_RANGE = (1e-2, 1e4)

#: A chunked loop over rows (checking, labelling, per-row constants) takes about this many numbers
#: at a time (1 MB of float32). Small on purpose: glibc's malloc keeps freed blocks of several MB
#: in whichever arena they came from, and with another thread running (a progress bar's) a loop of
#: 16 MB temporaries over a 381 MB store left up to +700 MB resident; with 1 MB ones, none
#: (bench/run_all.py's distill_memory_over_store samples from a thread of its own).
CHUNK_NUMBERS = 1 << 18


def chunk_rows(numbers_per_row: int) -> int:
    """Rows per chunk for rows of ``numbers_per_row`` numbers (at least one)."""
    return max(1, CHUNK_NUMBERS // max(numbers_per_row, 1))


#: The distillation methods (``softtargets.losses.methods``) and the options each takes, here so
#: that configs check them without importing torch. Every method also takes ``warmup`` (epochs over
#: which the soft term's weight rises to alpha, DKD's recipe): the trainers' option, not the loss's.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    name: (*own, "warmup")
    for name, own in {
        "kd": ("standardize",),
        "dkd": ("alpha", "beta", "standardize"),
        "dist": ("beta", "gamma"),
        "jsd": ("beta",),
        "rkl": (),
        "tv": (),
    }.items()
}


#: methods of a run (``softtargets distill --method``) that pair features, not logits: the
#: student learns the run's KD plus one feature pair (:mod:`softtargets.features`)
FEATURE_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "fitnet": ("student_layer", "teacher_layer", "loss", "weight", "warmup"),
}
RUN_METHOD_OPTIONS = {**METHOD_OPTIONS, **FEATURE_METHOD_OPTIONS}


def check_method_name(name: str, options: dict | None, *, features: bool = False) -> dict:
    """``options`` of method ``name`` as a dict; one-line error for an unknown method or option.
    ``features``: the feature methods a run may name (``fitnet``) are known too."""
    known = RUN_METHOD_OPTIONS if features else METHOD_OPTIONS
    if name not in known:
        raise SoftTargetsError(f"unknown method {name!r}; use one of {', '.join(known)}")
    options = dict(options or {})
    allowed = known[name]
    for key in options:
        if key not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise SoftTargetsError(f"unknown option {key!r} for method {name!r}; it takes: {known}")
    if "warmup" in options:
        check_warmup(options["warmup"])
    return options


def check_warmup(warmup: object) -> int:
    """A warm-up's length: a whole number of epochs >= 0, refused with one line otherwise."""
    whole = isinstance(warmup, int | float) and not isinstance(warmup, bool)
    if not whole or warmup < 0 or float(warmup) != int(warmup):  # type: ignore[operator,arg-type]
        raise SoftTargetsError(f"warmup must be a whole number of epochs >= 0, got {warmup!r}")
    return int(warmup)  # type: ignore[arg-type]
