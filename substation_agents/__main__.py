"""``python -m substation_agents``: run the configured substation agents until SIGINT/SIGTERM."""

from substation_agents.cli import main

raise SystemExit(main())
