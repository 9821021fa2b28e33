"""``python -m monitoring.recorder``: run the telemetry recorder until SIGINT/SIGTERM."""

from monitoring.recorder.cli import main

raise SystemExit(main())
