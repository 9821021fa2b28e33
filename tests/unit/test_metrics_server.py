"""``/metrics`` serving shared by every service: where it listens, and a busy port costs only the metrics."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from grid_runtime.metrics import serve_metrics, stop_metrics
from grid_runtime.settings import MetricsSettings


def test_serves_the_registry_on_a_free_port_and_stops() -> None:
    registry = CollectorRegistry()
    Counter("gridlb_test_things", "things", registry=registry).inc(3)
    handle = serve_metrics(MetricsSettings(port=0), "balancer", registry)
    assert handle is not None
    port = handle[0].server_port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert "gridlb_test_things_total 3.0" in resp.read().decode()
    finally:
        stop_metrics(handle)


def test_a_busy_port_or_disabled_metrics_give_no_server_and_no_exception() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_metrics(MetricsSettings(port=port), "recorder", CollectorRegistry()) is None
    assert serve_metrics(MetricsSettings(enabled=False), "recorder", CollectorRegistry()) is None
