"""``python -m balancer``: run the balancer until SIGINT/SIGTERM."""

import sys

from balancer.cli import main

sys.exit(main())
