"""Command-line entry of the balancer (``python -m balancer`` / ``gridlb balancer``).

Configured by environment variables only (``BALANCER_*``, ``MQTT_*``, ``GRID_TOPIC_PREFIX``, ``LOG_*``;
see the README), so it runs the same way locally, in tests and under a supervisor. ``BALANCER_REGIONS`` names
the regions the process owns: one region service each, side by side in one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from prometheus_client import REGISTRY

from balancer import NATIVE, metrics
from balancer.cluster import run_cluster
from balancer.gc_policy import PROCESS_GC
from balancer.service import build_all
from balancer.settings import BalancerSettings
from grid_protocol import NATIVE as PROTOCOL_NATIVE
from grid_runtime.lifecycle import run_until_signalled
from grid_runtime.logs import get_logger
from grid_runtime.metrics import serve_metrics, stop_metrics
from grid_runtime.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; exit 0 after a clean shutdown, 2 on bad arguments or settings."""
    parser = argparse.ArgumentParser(
        prog="python -m balancer",
        description="The Smart Grid Load Balancer service: assigns, queues or rejects EV charging requests "
                    "over MQTT. Configured by environment variables (BALANCER_*, MQTT_*, GRID_TOPIC_PREFIX, "
                    "LOG_*); see the README.",
    )
    parser.parse_args(argv)
    settings = load_settings(BalancerSettings)
    if settings is None:
        return 2
    log = get_logger("balancer")
    log.info("balancer_starting", host=settings.mqtt.host, port=settings.mqtt.port,
             username=settings.mqtt.username, client=settings.mqtt_client, regions=list(settings.regions),
             safety_margin_pct=settings.core.safety_margin_pct, stale_after_s=settings.core.stale_after_s,
             core=NATIVE.status, contract=PROTOCOL_NATIVE.status)
    if settings.nats_urls:  # cluster mode: regions owned under leases in NATS KV, services built on takeover
        metrics_server = serve_metrics(settings.grid.metrics, "balancer")

        async def run_owners(stop: asyncio.Event) -> None:
            await run_cluster(settings, stop, REGISTRY)

        run_until_signalled(run_owners)
        stop_metrics(metrics_server)
        log.info("balancer_stopped")
        return 0
    # one region service each (BALANCER_REGIONS), one event loop; they apply the process's GC policy as they run
    # (everything alive after start-up is frozen out of every later collection; balancer/gc_policy.py)
    services = build_all(settings, PROCESS_GC)
    metrics.register(services, REGISTRY)
    metrics_server = serve_metrics(settings.grid.metrics, "balancer")

    async def run(stop: asyncio.Event) -> None:
        await asyncio.gather(*(service.run(stop) for service in services))

    run_until_signalled(run)
    stop_metrics(metrics_server)
    log.info("balancer_stopped")
    return 0
