"""Command-line entry of the balancer (``python -m balancer`` / ``gridlb balancer``)."""

from __future__ import annotations

import asyncio
import gc

from balancer.service import build
from balancer.settings import BalancerSettings
from grid_runtime.lifecycle import run_until_signalled
from grid_runtime.logs import configure_logging, get_logger


def main(argv: list[str] | None = None) -> int:
    settings = BalancerSettings()
    configure_logging(settings.grid.log_level, settings.grid.log_format, settings.grid.log_file)
    log = get_logger("balancer")
    log.info("balancer_starting", host=settings.mqtt.host, port=settings.mqtt.port,
             username=settings.mqtt.username, client=settings.mqtt_client,
             safety_margin_pct=settings.safety_margin_pct, stale_after_s=settings.stale_after_s)
    service = build(settings)
    # Everything alive now (modules, classes, settings) lives as long as the process: keep it out of
    # every later GC pass, so collections scan only what the balancer allocates while it runs.
    gc.collect()
    gc.freeze()

    async def run(stop: asyncio.Event) -> None:
        await service.run(stop)

    run_until_signalled(run)
    log.info("balancer_stopped")
    return 0
