"""``python -m api``: serve the status API and live page until SIGINT/SIGTERM."""

import sys

from api.cli import main

sys.exit(main())
