"""Command-line entry of the recorder (``python -m monitoring.recorder``).

Configured by environment variables only (``INFLUX_*``, ``RECORDER_*``, ``MQTT_*``, ``GRID_*``, ``LOG_*``,
``METRICS_*``; see ``docs/recorder.md``), like every other service.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry

from grid_runtime.lifecycle import run_until_signalled
from grid_runtime.logs import get_logger
from grid_runtime.metrics import MqttCollector, serve_metrics, stop_metrics
from grid_runtime.mqtt import make_transport
from grid_runtime.settings import load_settings
from monitoring.recorder import settings as settings_module
from monitoring.recorder.influx import InfluxSink
from monitoring.recorder.metrics import RecorderCollector, RecorderStats, latency_histogram
from monitoring.recorder.service import RecorderService
from monitoring.recorder.settings import RecorderSettings


def build(settings: RecorderSettings, registry: CollectorRegistry | None = REGISTRY) -> RecorderService:
    """The service with its transport, sink and metrics registered on ``registry`` (None: unregistered)."""
    stats = RecorderStats()
    # A pure reader: MQTT 3.1.1, no properties to parse per message.
    transport = make_transport(settings.mqtt_client, settings.mqtt, client_id=settings.mqtt.username, mqtt5=False)
    service = RecorderService(settings, transport, InfluxSink(settings.influx), stats, latency_histogram(registry))
    if registry is not None:
        registry.register(RecorderCollector(stats, lambda: len(service.buffer)))
        registry.register(MqttCollector(lambda: {"recorder": transport}))
    return service


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; exit 0 after a clean shutdown, 2 on bad arguments or settings."""
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.recorder",
        description="Telemetry recorder: writes grid telemetry, status, state, assignments and session events "
                    "from MQTT to InfluxDB. Configured by environment variables; see docs/recorder.md.",
        epilog=settings_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    settings = load_settings(RecorderSettings)
    if settings is None:
        return 2
    log = get_logger("recorder")
    log.info("recorder_starting", host=settings.mqtt.host, port=settings.mqtt.port,
             username=settings.mqtt.username, influx_url=settings.influx.url)
    service = build(settings)
    handle = serve_metrics(settings.grid.metrics, "recorder")

    async def run(stop: asyncio.Event) -> None:
        await service.run(stop)

    try:
        run_until_signalled(run)
    finally:
        stop_metrics(handle)
        close = getattr(service.writer.sink, "close", None)
        if close is not None:
            close()
    log.info("recorder_exited")
    return 0
