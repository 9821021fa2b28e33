"""``python -m ev_clients``: see :mod:`ev_clients.cli`."""

from ev_clients.cli import main

raise SystemExit(main())
