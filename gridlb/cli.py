"""``gridlb <command>``: run a service, the whole local system, or the account tooling.

Each service is also ``python -m <package>``; these subcommands only dispatch to the same mains.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = """usage: gridlb <command> [args]

commands:
  run           the whole system locally: broker, balancer, 3 substation agents, API + live page,
                recorder (with INFLUX_URL), EV fleet
  balancer      the balancer (python -m balancer)
  substations   substation agents (python -m substation_agents)
  evs           the EV fleet / load tester (python -m ev_clients)
  accounts      write a broker's accounts, roles and grants (python -m broker.accounts)
  admin         add or remove a substation or EV while the grid runs, through the API (python -m api.admin)
  broker        a private Mosquitto with the project's config (python -m broker.local)
"""


def _load(command: str) -> Callable[[list[str]], int] | None:
    if command == "run":
        from gridlb.localrun import main as run_main

        return run_main
    if command == "balancer":
        from balancer.cli import main as balancer_main

        return balancer_main
    if command == "substations":
        from substation_agents.cli import main as agents_main

        return agents_main
    if command == "evs":
        from ev_clients.cli import main as ev_main

        return ev_main
    if command == "accounts":
        from broker.accounts import main as accounts_main

        return accounts_main
    if command == "admin":
        from api.admin import main as admin_main

        return admin_main
    if command == "broker":
        from broker.local import main as broker_main

        return broker_main
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    entry = _load(args[0])
    if entry is None:
        print(f"gridlb: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(entry(args[1:]) or 0)
