"""``python -m softtargets`` is the ``softtargets`` command."""

from __future__ import annotations

from softtargets.cli.app import main

main()
