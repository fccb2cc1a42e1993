"""``python -m bame ...`` runs the ``bame`` command line (bame.cli)."""

from .cli import main

raise SystemExit(main())
