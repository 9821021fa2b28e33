"""``python -m bench`` runs the balancer benchmark; ``python -m bench flood`` the flood (see each module)."""

import sys

from bench import bench_balancer, flood

if len(sys.argv) > 1 and sys.argv[1] == "flood":
    sys.exit(flood.main(sys.argv[2:]))
sys.exit(bench_balancer.main())
