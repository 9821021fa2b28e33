"""Command line entry point: configuration comes from environment variables (see ``settings``).

There are no options besides ``--help`` so the process is configured the same way locally, in tests
and in docker compose.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from grid_runtime.lifecycle import run_until_signalled
from grid_runtime.logs import configure_logging
from replay.scenario import Scenario, ScenarioError, load_scenario
from substation_agents import settings as settings_module
from substation_agents.agent import run_agents
from substation_agents.scenario import run_scenario_agents
from substation_agents.settings import AgentSettings


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configured agent until SIGINT/SIGTERM; exit 0 after a clean shutdown, 2 on bad settings."""
    parser = argparse.ArgumentParser(
        prog="python -m substation_agents",
        description="Simulated grid substations: one MQTT agent per substation, configured by environment.",
        epilog=settings_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        settings = AgentSettings()
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    scenario: Scenario | None = None
    if settings.substation_scenario:
        try:
            scenario = load_scenario(settings.substation_scenario)
        except ScenarioError as exc:
            print(f"invalid configuration: SUBSTATION_SCENARIO: {exc}", file=sys.stderr)
            return 2
    configure_logging(settings.grid.log_level, settings.grid.log_format, settings.grid.log_file)

    async def service(stop: asyncio.Event) -> None:
        if scenario is not None:
            await run_scenario_agents(settings, scenario, stop)
        else:
            await run_agents(settings, stop)

    run_until_signalled(service)
    return 0
