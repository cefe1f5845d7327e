"""``python -m softtargets`` is the ``softtargets`` command."""

from softtargets.cli import main

main()
