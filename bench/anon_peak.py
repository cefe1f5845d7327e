"""The peak anonymous memory of a block of code, for the benches' child processes.

Anonymous memory only (``RssAnon``): a mapped file's pages (a store, a token file, a ``.npy``)
are the page cache's, counted in RSS only while resident and reclaimable, which made ``VmHWM``
vary from 0.2 to 1.3 store sizes between runs. Sampled from a thread, so a peak shorter than
the interval can be missed.
"""

from __future__ import annotations

import threading
from types import TracebackType


def anon_bytes() -> int:
    """This process's anonymous resident memory, in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


class AnonPeak:
    """``with AnonPeak() as peak: ...`` then ``peak.bytes``: the largest anonymous memory seen
    while the block ran beyond what there was before it (``peak.total``: not less the start)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.before = self.total = 0
        self._done = threading.Event()

    @property
    def bytes(self) -> int:
        return self.total - self.before

    def __enter__(self) -> AnonPeak:
        self.before = self.total = anon_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            self.total = max(self.total, anon_bytes())

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()
        self.total = max(self.total, anon_bytes())
