"""The one exception type softtargets raises for bad input.

Every check in the package raises :class:`SoftTargetsError` with a one-line message that names the
problem and the fix. It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep
working, and the command line turns it into ``error: <message>`` instead of a traceback.
"""

from __future__ import annotations


class SoftTargetsError(ValueError):
    """Bad input to softtargets: the message says what is wrong and how to fix it."""


def first_line(err: BaseException, typed: bool = True, limit: int | None = None) -> str:
    """An exception in one line for a message: the first line of its text (at most ``limit``
    characters), after its type's name when ``typed``; the type's name alone when it has no
    text."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    line = lines[0] if limit is None else lines[0][:limit]
    return f"{type(err).__name__}: {line}" if typed else line
