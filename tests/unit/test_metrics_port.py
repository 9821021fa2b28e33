"""``/metrics`` when the port is taken: the default port gives way to a free one (a second agent process on the same
machine), a port chosen explicitly does not (the service runs on without ``/metrics`` and says how to choose)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from grid_runtime import metrics
from grid_runtime.settings import MetricsSettings


@pytest.fixture
def taken() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("gridlb_test_total", "a counter", registry=registry).inc()
    return registry


def test_default_port_taken_serves_on_a_free_one(taken: int, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(metrics.DEFAULT_PORTS, "substation_agents", taken)
    handle = metrics.serve_metrics(MetricsSettings(port=None), "substation_agents", _registry())
    assert handle is not None
    try:
        port = handle[0].server_port
        assert port != taken
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "gridlb_test_total 1.0" in body
    finally:
        metrics.stop_metrics(handle)


def test_explicit_port_taken_is_not_replaced(taken: int) -> None:
    assert metrics.serve_metrics(MetricsSettings(port=taken), "substation_agents", _registry()) is None
