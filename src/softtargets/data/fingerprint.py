"""Fingerprints of data: a short hash of a dataset's features and ids (in blocks, so a stream
and a sharded labelling hash the same rows the same way) and of its labels. Stores, checkpoints
and run folders are keyed by them, so outputs are never used with other data."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from torch import Tensor

#: The fingerprint hashes rows in blocks of this many; a block's digest depends only on its rows,
#: so writers of row ranges that start on a block boundary (the shards of a store, one per
#: process) can each hash their own rows and the digests combine into the whole data's
#: fingerprint (:meth:`Fingerprinter.combine`).
FINGERPRINT_BLOCK = 65536


class Fingerprinter:
    """Builds a dataset fingerprint from row chunks, so data streamed in chunks of any size gets
    the same fingerprint as the same rows held in memory.

    Rows are hashed in blocks of :data:`FINGERPRINT_BLOCK`: each block's ids and features get a
    SHA-256 each, and the fingerprint is the SHA-256 of the feature shape and every block's pair,
    in row order (cut to 16 hex digits).
    """

    def __init__(self, feature_shape: tuple[int, ...]) -> None:
        self._shape = tuple(feature_shape)
        self._digests: list[bytes] = []
        self._open_block()

    def _open_block(self) -> None:
        self._ids, self._features, self._rows = hashlib.sha256(), hashlib.sha256(), 0

    def update(self, features: Tensor, ids: Tensor) -> None:
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, FINGERPRINT_BLOCK - self._rows)
            # hashlib reads contiguous arrays through the buffer protocol: no bytes copy
            part = slice(start, start + take)
            self._ids.update(np.ascontiguousarray(ids[part].detach().cpu().numpy(), np.int64))
            self._features.update(
                np.ascontiguousarray(features[part].detach().cpu().numpy(), np.float32)
            )
            self._rows += take
            start += take
            if self._rows == FINGERPRINT_BLOCK:
                self._close_block()

    def _close_block(self) -> None:
        self._digests.append(self._ids.digest() + self._features.digest())
        self._open_block()

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self._shape

    def block_digests(self) -> list[bytes]:
        """The digests of the rows so far, one per block (the last one possibly partial)."""
        return self._digests + (
            [self._ids.digest() + self._features.digest()] if self._rows else []
        )

    @staticmethod
    def combine(feature_shape: tuple[int, ...], digests: list[bytes]) -> str:
        """The fingerprint of rows whose blocks have ``digests``, in row order."""
        total = hashlib.sha256(str(tuple(feature_shape)).encode())
        for digest in digests:
            total.update(digest)
        return total.hexdigest()[:16]

    def hexdigest(self) -> str:
        return self.combine(self._shape, self.block_digests())


def features_fingerprint(features: Tensor, ids: Tensor) -> str:
    hasher = Fingerprinter(tuple(features.shape[1:]))
    hasher.update(features, ids)
    return hasher.hexdigest()


def labels_fingerprint(
    data: Any = None, *, ids: Tensor | None = None, labels: Tensor | None = None
) -> str:
    """A short hash of ``data``'s ids and labels (the features' hash is ``data.fingerprint``), or
    of ``ids (N,)`` and ``labels (N,)`` given alone (streamed data)."""
    if data is not None:
        ids, labels = data.ids, data.labels
    assert ids is not None and labels is not None
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(ids.cpu().numpy(), dtype=np.int64))
    digest.update(np.ascontiguousarray(labels.cpu().numpy(), dtype=np.int64))
    return digest.hexdigest()[:16]
