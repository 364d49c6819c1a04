"""``python -m nodecryptor``: the same entry point as the ``nodecryptor`` command."""

from nodecryptor.cli import main

raise SystemExit(main())
