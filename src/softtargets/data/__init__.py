"""The data wing: what a row is and where rows come from.

| module | holds |
| --- | --- |
| :mod:`~softtargets.data.dataset` | ``Dataset`` (features, labels, stable ids, class names), splits |
| :mod:`~softtargets.data.fingerprint` | the hashes of features, ids and labels that key stores and runs |
| :mod:`~softtargets.data.targets` | probability rows: checks, softening, smoothing, counts |
| :mod:`~softtargets.data.builtin` | built-in data: digits, MNIST-1D, gaussians, margin tasks |
| :mod:`~softtargets.data.files` | every file loader (npz, npy, CSV, IDX, CIFAR, image folders) |
| :mod:`~softtargets.data.streams` | streamed ``(x, label, id)`` datasets and their loaders |
| :mod:`~softtargets.data.counts` | aggregated rows: counts to proportions and weights |

It imports only ``config``, ``errors`` and ``files`` below it.
"""
