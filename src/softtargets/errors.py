"""The one exception type softtargets raises for bad input.

Every check in the package raises :class:`SoftTargetsError` with a one-line message that names the
problem and the fix. It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep
working, and the command line turns it into ``error: <message>`` instead of a traceback.
"""

from __future__ import annotations


class SoftTargetsError(ValueError):
    """Bad input to softtargets: the message says what is wrong and how to fix it."""
