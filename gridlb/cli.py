"""``gridlb <command>``: run a service, the whole local system, a replay, or the account tooling.

Each command is also ``python -m <module>``; ``gridlb`` only dispatches to the same mains, importing the one asked
for (a service's dependencies are not loaded to run another). Everything after the command is that main's own:
``gridlb balancer --help`` shows the balancer's options.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    module: str  # ``python -m <module>`` runs the same thing
    help: str
    entry: str = ""  # ``module:function`` when it is not ``<module>.cli:main``-like; see :meth:`main`

    def main(self) -> Callable[[list[str]], int | None]:
        target = self.entry or f"{self.module}:main"
        module, _, function = target.partition(":")
        entry: Callable[[list[str]], int | None] = getattr(importlib.import_module(module), function)
        return entry


COMMANDS: tuple[Command, ...] = (
    Command("run", "gridlb.localrun", "the whole system locally: broker, balancer, 3 substation agents, API + live "
            "page, recorder (with INFLUX_URL), EV fleet"),
    Command("balancer", "balancer", "the balancer", "balancer.cli:main"),
    Command("substations", "substation_agents", "substation agents", "substation_agents.cli:main"),
    Command("evs", "ev_clients", "the EV fleet / load tester", "ev_clients.cli:main"),
    Command("api", "api", "the status API, operator endpoints and live page", "api.cli:main"),
    Command("recorder", "monitoring.recorder", "the telemetry recorder (MQTT -> InfluxDB)",
            "monitoring.recorder.cli:main"),
    Command("replay", "replay", "replay scenarios against the balancing policies (fast or live)", "replay.cli:main"),
    Command("accounts", "broker.accounts", "write a broker's accounts, roles and grants", "broker.accounts.cli:main"),
    Command("admin", "api.admin", "add or remove a substation or EV while the grid runs, through the API"),
    Command("broker", "broker.local", "a private Mosquitto with the project's config"),
    Command("nats", "broker.nats", "the NATS cluster: node configs and accounts, or a local 3-node cluster",
            "broker.nats.cli:main"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridlb", description="Run a service of the EV-charging load balancer, the whole system locally, a "
        "replay, or the account tooling. Arguments after the command are the command's own (gridlb CMD --help).")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for command in COMMANDS:
        # No options of its own (not even -h): everything after the name belongs to the command's main.
        sub.add_parser(command.name, help=f"{command.help} (python -m {command.module})", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    return int(command.main()(rest) or 0)
