"""``python -m pgproxy`` is the ``pgproxy`` command."""

from pgproxy.cli import main

raise SystemExit(main())
