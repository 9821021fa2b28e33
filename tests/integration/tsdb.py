"""Test helpers around the recorder: start it against a private VictoriaMetrics (``monitoring.local``, re-exported
here), wait until it is subscribed, read its /metrics. Every wait is bounded."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from probe import Service

from broker.local import LocalBroker
from monitoring.local import Metrics, Series, VictoriaMetrics, metric, samples, scrape

__all__ = ["Metrics", "Series", "VictoriaMetrics", "metric", "recorder_ready", "samples", "scrape", "start_recorder",
           "wait_metrics"]

# --------------------------------------------------------------------------- the recorder under test
_METRICS_URL = re.compile(r"metrics_listening service=recorder url=(\S+)")


def start_recorder(broker: LocalBroker, log_dir: Path, vm: VictoriaMetrics, **env: str) -> Service:
    """``python -m monitoring.recorder`` as the read-only ``recorder``, writing to ``vm``, /metrics on a free port."""
    settings = {"MQTT_USERNAME": "recorder", "MQTT_PASSWORD": broker.password_for("recorder"),
                "INFLUX_URL": vm.url, "INFLUX_TOKEN": "test", "INFLUX_ORG": "test", "INFLUX_BUCKET": "test",
                "METRICS_PORT": "0", "RECORDER_FLUSH_INTERVAL_S": "0.2", "RECORDER_BACKOFF_MIN_S": "0.1",
                "RECORDER_BACKOFF_MAX_S": "1", "INFLUX_TIMEOUT_S": "2", "RECORDER_LOG_INTERVAL_S": "1"}
    settings.update(env)
    return Service("monitoring.recorder", broker, log_dir, **settings)


def recorder_ready(service: Service, timeout: float = 15.0) -> str:
    """Wait until the recorder is subscribed (logged ``mqtt_connected``) and return its /metrics URL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = service.log()
        match = _METRICS_URL.search(text)
        if match and "mqtt_connected" in text:
            time.sleep(0.3)  # the SUBACKs follow the CONNACK
            return match.group(1)
        if service.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"recorder not ready within {timeout} s:\n{service.log()[-3000:]}")


def wait_metrics(url: str, done: Callable[[Metrics], bool], timeout: float = 15.0, what: str = "") -> Metrics:
    """Poll ``url`` until ``done(metrics)``; ``AssertionError`` with the recorder's counters after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if done(m):
            return m
        if time.monotonic() >= deadline:
            mine = {f"{n}{dict(lbl)}": v for (n, lbl), v in m.items() if n.startswith("gridlb_recorder")}
            raise AssertionError(f"recorder metrics: {what} not reached within {timeout} s: {mine}")
        time.sleep(0.1)
