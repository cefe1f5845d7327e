"""The ``softtargets`` command: :mod:`~softtargets.cli.app` (the commands),
:mod:`~softtargets.cli.options` (flags and flags -> config), :mod:`~softtargets.cli.console`
(output, errors, progress), :mod:`~softtargets.cli.proportions` (``fit-proportions``,
``predict``). Torch is imported only by the commands that train, so ``--help`` answers at once."""
