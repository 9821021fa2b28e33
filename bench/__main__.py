"""``python -m bench`` runs the balancer benchmark; ``python -m bench flood|faults|failover`` the fault figures;
``python -m bench recorder`` the recorder's throughput and the series counts; ``python -m bench provisioning`` what a
runtime account change costs; ``python -m bench live-page`` the live page at 1,000 substations in headless Chromium;
``python -m bench scale`` the allocation core at utility scale; ``python -m bench cluster`` the balancer against an
echo through a local 3-node NATS cluster; ``python -m bench regions`` two regions on two balancer processes against
one (issue 12); ``python -m bench live-grid`` 1,000 substations and an EV fleet through
Mosquitto, live; ``python -m bench service-path`` the balancer's CPU per request in-process, on the bench's requests;
``python -m bench perf-owners`` where a compiled process spends its CPU, from ``perf`` call graphs."""

import sys

from bench import (
    bench_balancer,
    bench_recorder,
    cluster,
    failover,
    faults,
    flood,
    live_grid,
    live_page,
    perf_owners,
    provisioning,
    regions,
    scale,
    service_path,
)

_COMMANDS = {"flood": flood.main, "faults": faults.main, "failover": failover.main, "recorder": bench_recorder.main,
             "provisioning": provisioning.main, "live-page": live_page.main, "scale": scale.main,
             "cluster": cluster.main, "regions": regions.main, "live-grid": live_grid.main,
             "service-path": service_path.main, "perf-owners": perf_owners.main}

if len(sys.argv) > 1 and sys.argv[1] in _COMMANDS:
    sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
sys.exit(bench_balancer.main())
