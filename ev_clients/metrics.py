"""Prometheus metrics of the EV fleet / load tester (``/metrics``, default port 9103).

Counts and gauges are read at scrape time from the running counters of the run's
:class:`~ev_clients.stats.FleetStats` (a scrape costs the same after days of a fleet: no record is walked) and
its :class:`~ev_clients.fleet.EvConnections`; only the latency histogram is observed as answers arrive. No
metric has a per-EV label: the fleet's connections are aggregated under ``client="ev_fleet"``.

==============================================  =========  ========================================================
Metric                                          Type       Meaning
==============================================  =========  ========================================================
``gridlb_ev_requests_total``                    counter    charge requests sent (each counted once, retries not)
``gridlb_ev_retries_total``                     counter    re-sends of a request not answered yet
``gridlb_ev_answers_total{status}``             counter    answers received (duplicates not counted), by status
                                                           (``assigned``, ``queued``, ``rejected``, ...)
``gridlb_ev_answer_latency_seconds``            histogram  request first sent -> first answer (retries included)
``gridlb_ev_active_sessions``                   gauge      EVs charging (assigned, not yet completed/released)
``gridlb_ev_queued_requests``                   gauge      requests waiting in the balancer's queue
``gridlb_ev_connect_failures_total``            counter    EVs that could not connect within the timeout
``gridlb_mqtt_connected{client="ev_fleet"}``    gauge      EV connections up right now (a count, not 0/1)
``gridlb_mqtt_*_total{client="ev_fleet"}``      counter    traffic of all EV connections so far, see
                                                           :class:`grid_runtime.metrics.MqttCollector`
==============================================  =========  ========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ev_clients.fleet import EvConnections, FleetRunner
from ev_clients.stats import FleetStats
from grid_protocol.messages import ASSIGNMENT_STATUSES
from grid_runtime.metrics import MqttCollector
from grid_runtime.mqtt import TransportStats

__all__ = ["FLEET_CLIENT", "LATENCY_BUCKETS", "FleetCollector", "FleetMqttCollector", "register_fleet_metrics"]

#: The ``client`` label of the fleet's aggregated MQTT connections.
FLEET_CLIENT = "ev_fleet"
#: Seconds: 0.1 ms (a balancer on the same host) .. 10 s (retries, a stalled broker).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
#: Every status is reported, 0 included, so dashboards see the series before the first answer.


class FleetCollector(Collector):
    """``gridlb_ev_*`` counts and gauges, read from :class:`FleetStats` at scrape time."""

    def __init__(self, stats: Callable[[], FleetStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Any]:
        stats = self._stats()
        sent, retries = stats.sent_and_retries()  # running counters, O(1)
        answers = dict(stats.status_events)  # a copy: the event loop adds statuses meanwhile
        yield CounterMetricFamily("gridlb_ev_requests", "Charge requests sent (each once, however often re-sent)",
                                  value=float(sent))
        yield CounterMetricFamily("gridlb_ev_retries", "Re-sends of requests not answered yet",
                                  value=float(retries))
        family = CounterMetricFamily("gridlb_ev_answers", "Answers received (duplicates not counted), by status",
                                     labels=["status"])
        for status in sorted(set(ASSIGNMENT_STATUSES) | answers.keys()):
            family.add_metric([status], float(answers.get(status, 0)))
        yield family
        yield GaugeMetricFamily("gridlb_ev_active_sessions", "EVs charging (assigned, not yet completed or released)",
                                value=float(stats.active_sessions))
        yield GaugeMetricFamily("gridlb_ev_queued_requests", "Requests waiting in the balancer's queue",
                                value=float(stats.queued_now))
        yield CounterMetricFamily("gridlb_ev_connect_failures", "EVs that could not connect within the timeout",
                                  value=float(stats.connect_failures))


class _Aggregate:
    """All the fleet's connections as one "transport" for :class:`MqttCollector`."""

    def __init__(self, stats: TransportStats) -> None:
        self.stats = stats
        self.connected = self  # ``connected.is_set()``: replaced by the count below

    def is_set(self) -> bool:
        return False


class FleetMqttCollector(Collector):
    """``gridlb_mqtt_*{client="ev_fleet"}``: the families of :class:`MqttCollector` over all EV connections.

    One connection per EV would mean one label value per EV, so they are aggregated: counters are summed over
    every connection the run opened (closed ones included, so they never go down), ``gridlb_mqtt_reconnects``
    is the sum of each connection's reconnects, and ``gridlb_mqtt_connected`` is the number of EV connections
    up right now.
    """

    def __init__(self, connections: Callable[[], EvConnections]) -> None:
        self._connections = connections

    def collect(self) -> Iterable[Any]:
        totals = self._connections().totals()
        aggregate: Any = _Aggregate(totals.stats)
        overrides = {"gridlb_mqtt_connected": totals.connected, "gridlb_mqtt_reconnects": totals.reconnects}
        for family in MqttCollector(lambda: {FLEET_CLIENT: aggregate}).collect():
            if family.name in overrides:
                family.samples = [s._replace(value=float(overrides[family.name])) for s in family.samples]
            if family.name == "gridlb_mqtt_connected":
                family.documentation = "1 while connected to the broker (ev_fleet: the number of EV connections up)"
            yield family


def register_fleet_metrics(runner: FleetRunner, registry: CollectorRegistry = REGISTRY) -> None:
    """Register the fleet's collectors and its latency histogram (observed by ``runner.stats``)."""
    latency = Histogram("gridlb_ev_answer_latency_seconds",
                        "Charge request first sent -> first answer, any status (retries included), in seconds",
                        buckets=LATENCY_BUCKETS, registry=registry)
    runner.stats.on_first_answer = latency.observe
    registry.register(FleetCollector(lambda: runner.stats))
    registry.register(FleetMqttCollector(lambda: runner.connections))
