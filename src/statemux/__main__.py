"""``python -m statemux``: the ``statemux`` command (see :mod:`statemux.cli`)."""

from .cli import main

raise SystemExit(main())
