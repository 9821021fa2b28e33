"""``python -m bench`` runs the balancer benchmark; ``python -m bench flood|faults`` the fault figures."""

import sys

from bench import bench_balancer, faults, flood

_COMMANDS = {"flood": flood.main, "faults": faults.main}

if len(sys.argv) > 1 and sys.argv[1] in _COMMANDS:
    sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
sys.exit(bench_balancer.main())
