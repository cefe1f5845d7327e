"""The store wing: a teacher's logits, computed once, for every sample id.

| module | holds |
| --- | --- |
| :mod:`~softtargets.store.store` | ``SoftTargetStore``: logits (full or top-k + tail), ids, fingerprints, its file |
| :mod:`~softtargets.store.label` | ``label`` (run a teacher once), ``ensemble``, ``predict_logits`` |
| :mod:`~softtargets.store.write` | streamed and sharded writing of stores larger than memory |
"""
