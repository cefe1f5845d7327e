"""Checking keyword options against a builder's signature, so a typo is an error with its name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from softtargets.errors import SoftTargetsError


def accepted_options(builder: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the keyword parameters ``builder`` accepts, minus ``skip``."""
    params = inspect.signature(builder).parameters.values()
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip
    ]


def check_options(
    builder: Callable[..., Any], options: dict[str, Any], what: str, skip: tuple[str, ...] = ()
) -> None:
    """Raise if ``options`` holds a key that ``builder`` does not take."""
    valid = accepted_options(builder, skip)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SoftTargetsError(
            f"unknown option {unknown[0]!r} for {what}; valid options: {', '.join(valid) or 'none'}"
        )
