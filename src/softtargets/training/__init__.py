"""The training wing: turning targets into trained models.

| module | holds |
| --- | --- |
| :mod:`~softtargets.training.objectives` | the one resolver: any ``targets`` -> the batch loss |
| :mod:`~softtargets.training.fit` | ``fit``: one model, one readable loop |
| :mod:`~softtargets.training.batches` | in-memory (index) and streamed (``DataLoader``) batches |
| :mod:`~softtargets.training.fit_many` | ``fit_many``: many small MLPs trained at once |
| :mod:`~softtargets.training.stacked` | the stacked MLP and its optimizer |
| :mod:`~softtargets.training.selection` | epoch records, learning rates, early stopping, best epoch |
| :mod:`~softtargets.training.checkpoint` | exact resume |
| :mod:`~softtargets.training.features` | feature distillation (FitNets-style hints) |
| :mod:`~softtargets.training.models` | the built-in models (``mlp``, ``cnn1d``, ``cnn2d``) |
| :mod:`~softtargets.training.metrics` | accuracy, NLL, ECE, agreement, ``evaluate`` |
| :mod:`~softtargets.training.sklearn` | ``SoftLabelClassifier``, a scikit-learn estimator |
| :mod:`~softtargets.training.common` | devices, optimizers, shared checks |
"""
