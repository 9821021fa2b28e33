import sys

from bench.bench_balancer import main

sys.exit(main())
