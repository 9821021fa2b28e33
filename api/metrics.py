"""Prometheus metrics of the API, in a registry per app (tests build several apps in one process).

``gridlb_api_requests_total{method,route,status}`` and ``gridlb_api_request_duration_seconds{method,route}``
are labelled with the route *template* (``/substations/{substation_id}``), never the raw path, so the
label set stays bounded; unknown paths count as ``route="unmatched"``. State is read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.live import LiveHub
from api.state import StateStore
from grid_runtime.metrics import MqttCollector
from grid_runtime.mqtt import Transport

#: Paths that would otherwise each be their own label value.
_STATIC_PREFIX = "/static/"


class ApiMetrics:
    def __init__(self, transport: Transport, store: StateStore, hub: LiveHub,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gridlb_api_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.duration = Histogram("gridlb_api_request_duration_seconds", "HTTP request handling time",
                                  ["method", "route"], registry=self.registry,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.answers = Counter("gridlb_api_balancer_answers", "Answers awaited from the balancer, by outcome",
                               ["operation", "outcome"], registry=self.registry)
        self.auth_refused = Counter("gridlb_api_auth_refused", "Requests refused for their credentials: "
                                    "missing_token, invalid_token (401), forbidden (403), not_configured (503)",
                                    ["reason"], registry=self.registry)
        for reason in ("missing_token", "invalid_token", "forbidden", "not_configured"):
            self.auth_refused.labels(reason)
        self.registry.register(MqttCollector(lambda: {"api": transport}))
        self.registry.register(_StateCollector(store, hub, clock))


class _StateCollector(Collector):
    def __init__(self, store: StateStore, hub: LiveHub, clock: Callable[[], float]) -> None:
        self.store, self.hub, self.clock = store, hub, clock

    def collect(self) -> Iterable[Any]:
        store, hub = self.store, self.hub
        yield GaugeMetricFamily("gridlb_api_sse_clients", "Live-page (SSE) clients connected",
                                value=len(hub.clients))
        yield CounterMetricFamily("gridlb_api_sse_snapshots_dropped",
                                  "Live-feed updates a slow client missed (it got a fresh snapshot instead)",
                                  value=hub.dropped)
        yield CounterMetricFamily("gridlb_api_sse_resyncs", "Fresh snapshots sent to live clients that fell behind",
                                  value=hub.resyncs)
        yield CounterMetricFamily("gridlb_api_sse_bytes", "Live-feed event data queued for clients (all clients)",
                                  value=hub.sent_bytes)
        refused = CounterMetricFamily("gridlb_api_payloads_refused", "MQTT payloads that did not decode",
                                      labels=["kind", "reason"])
        for key, n in sorted(store.decode_errors.items()):
            kind, _, reason = key.partition(":")
            refused.add_metric([kind, reason], n)
        yield refused
        received = CounterMetricFamily("gridlb_api_messages_applied", "MQTT messages applied to the state",
                                       labels=["kind"])
        for kind, n in sorted(store.messages.items()):
            received.add_metric([kind], n)
        yield received
        known = GaugeMetricFamily("gridlb_api_substations_known", "Substations the API knows of",
                                  value=sum(1 for e in store.substations.values() if e.known()))
        yield known
        queue = GaugeMetricFamily("gridlb_api_queue_length", "Waiting requests (balancer's retained queue)",
                                  value=store.queue_state.length if store.queue_state is not None else 0)
        yield queue
        last = store.last_message_at
        yield GaugeMetricFamily("gridlb_api_last_message_age_seconds", "Seconds since the last MQTT message "
                                "(-1: none yet)", value=-1.0 if last is None else max(0.0, self.clock() - last))


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(path, str):
        return path
    raw = scope.get("path", "")
    if isinstance(raw, str) and raw.startswith(_STATIC_PREFIX):
        return _STATIC_PREFIX + "{path}"
    return "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware (streams such as /events pass through untouched); counts when the response ends."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], ApiMetrics]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m = self.metrics()
            route = _route_label(scope)
            method = scope.get("method", "GET")
            m.requests.labels(method, route, str(status)).inc()
            m.duration.labels(method, route).observe(time.perf_counter() - start)
