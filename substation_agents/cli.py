"""Command line entry point: configuration comes from environment variables (see ``settings``).

There are no options besides ``--help`` so the process is configured the same way locally, in tests
and in docker compose.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from grid_runtime.lifecycle import run_until_signalled
from grid_runtime.logs import get_logger
from grid_runtime.metrics import serve_metrics, stop_metrics
from grid_runtime.settings import load_settings
from grid_sim.scenario import Scenario, ScenarioError, load_scenario
from substation_agents import settings as settings_module
from substation_agents.agent import SubstationAgent, run_agents
from substation_agents.metrics import register_agent_metrics
from substation_agents.scenario_agents import run_scenario_agents
from substation_agents.settings import AgentSettings

log = get_logger("substation_agents")


def start_metrics(settings: AgentSettings, agents: Callable[[], Mapping[str, SubstationAgent]]) -> Any:
    """Register the agents' collectors and serve ``/metrics`` (``METRICS_*``); ``None`` when disabled or the
    port is taken (logged: the agents run on without ``/metrics``)."""
    if not settings.grid.metrics.enabled:
        return None
    register_agent_metrics(agents)
    return serve_metrics(settings.grid.metrics, "substation_agents")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configured agent until SIGINT/SIGTERM; exit 0 after a clean shutdown, 2 on bad settings."""
    parser = argparse.ArgumentParser(
        prog="python -m substation_agents",
        description="Simulated grid substations: one MQTT agent per substation, configured by environment.",
        epilog=settings_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    settings = load_settings(AgentSettings)
    if settings is None:
        return 2
    scenario: Scenario | None = None
    if settings.substation_scenario:
        try:
            scenario = load_scenario(settings.substation_scenario)
        except ScenarioError as exc:
            print(f"invalid configuration: SUBSTATION_SCENARIO: {exc}", file=sys.stderr)
            return 2

    live: dict[str, SubstationAgent] = {}
    metrics = start_metrics(settings, lambda: live)

    async def service(stop: asyncio.Event) -> None:
        if scenario is not None:
            await run_scenario_agents(settings, scenario, stop, on_built=live.update)
        else:
            await run_agents(settings, stop, on_built=live.update)

    try:
        run_until_signalled(service)
    finally:
        stop_metrics(metrics)
    return 0
