"""Prometheus metrics of the balancer, read from the core and the adapter at scrape time.

Gauges and counters come from state the balancer keeps anyway (a custom collector), so the hot path
pays nothing for them; the decision-latency histogram costs one observation per request or release,
and queue waits are drained from the core into a histogram at scrape time.
Names follow Prometheus conventions: watts and seconds, ``_total`` for counters, labels bounded by
the number of substations, outcomes and reasons (never EV ids). docs/observability.md lists them.
Every balancer metric carries a ``region`` label (issue 12): one process may own several regions, each with
its own core, and ``/metrics`` stays one endpoint.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from grid_protocol.messages import ASSIGNMENT_STATUSES, DEFAULT_REGION
from grid_runtime.metrics import MqttCollector

if TYPE_CHECKING:
    from balancer.service import BalancerService

#: From 50 microseconds (a decision in memory) to 1 s (a stalled loop).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1.0)
#: The outcomes of gridlb_decisions_total (the Assignment statuses); other core counters are events.
DECISION_OUTCOMES = frozenset(ASSIGNMENT_STATUSES)
#: From placed at once to hours in line.
WAIT_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class _Latency:
    """One region's decision latencies. Observed once per EV request or release, so kept as plain counts (a bisect
    and two additions, ~0.15 µs) rather than a prometheus_client Histogram child (a lock per bucket and per sum,
    ~0.5 µs); :class:`DecisionLatency` exposes them as that Histogram would, samples and order alike."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # (a bucket counts values <= its bound)
        self.sum += seconds


class DecisionLatency(Collector):
    """``gridlb_decision_latency_seconds`` by region. Written by the loop thread only, read at scrape time."""

    NAME = "gridlb_decision_latency_seconds"
    DOC = "Time to decide and publish the answers to one EV request or release"

    def __init__(self) -> None:
        self._regions: dict[str, _Latency] = {}

    def region(self, region: str) -> _Latency:
        """The region's latencies (kept across takeovers of the region, as a Histogram child is)."""
        latency = self._regions.get(region)
        if latency is None:
            latency = self._regions[region] = _Latency()
        return latency

    def collect(self) -> Iterable[Any]:
        family = HistogramMetricFamily(self.NAME, self.DOC, labels=["region"])
        for region, latency in list(self._regions.items()):
            counts, total = latency.counts[:], latency.sum
            buckets, seen = [], 0.0
            for bound, count in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
                seen += count
                buckets.append((floatToGoString(bound), seen))
            family.add_metric([region], buckets, total)
            if prometheus_metrics._use_created:  # (PROMETHEUS_DISABLE_CREATED_SERIES, as for every Histogram)
                family.samples.append(Sample(f"{self.NAME}_created", {"region": region}, latency.created))
        yield family


def _outcome_reason(key: str) -> tuple[str, str]:
    outcome, _, reason = key.partition(":")
    return outcome, reason


class BalancerCollector(Collector):
    """Per-substation state, decisions, queue and payload errors, straight from the balancers' memory (one
    service per region, each sample labelled with its region)."""

    def __init__(self, services: Sequence[BalancerService] | Callable[[], Sequence[BalancerService]],
                 queue_wait: Histogram) -> None:
        """``services``: the region services, or a function that says which run now (cluster mode: a region's
        service exists only while this process owns the region)."""
        fixed = None if callable(services) else list(services)
        self._services: Callable[[], Sequence[BalancerService]] = (
            services if callable(services) else lambda: fixed or [])
        self._queue_wait = queue_wait

    def collect(self) -> Iterable[Any]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["substation", "region"])

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["substation", "region"])

        per_sub: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "capacity": gauge("gridlb_substation_capacity_watts",
                              "Capacity the balancer plans with (reported, or the operator's lower limit)"),
            "reported": gauge("gridlb_substation_reported_capacity_watts", "Capacity as the agent reports it"),
            "limit": gauge("gridlb_substation_limit_watts", "Capacity less the safety margin: grants stay below"),
            "load": gauge("gridlb_substation_load_watts", "Measured load from the last telemetry"),
            "headroom": gauge("gridlb_substation_headroom_watts",
                              "Room for new sessions (0 when offline, stale, lost or draining)"),
            "reserved": gauge("gridlb_substation_reserved_watts",
                              "Granted since the last telemetry: committed, not yet visible in the load"),
            "granted": gauge("gridlb_substation_granted_watts", "Sum of the grants of its sessions"),
            "sessions": gauge("gridlb_substation_active_sessions", "Sessions the balancer placed there"),
            "online": gauge("gridlb_substation_online", "1 when online and heard from, else 0"),
            "stale": gauge("gridlb_substation_stale", "1 when its telemetry is older than stale_after_s"),
            "draining": gauge("gridlb_substation_draining", "1 while an operator drains it"),
            "utilisation": gauge("gridlb_substation_utilisation_ratio",
                                 "(uncontrolled load + grants) / capacity"),
            "age": gauge("gridlb_substation_telemetry_age_seconds", "Seconds since its last telemetry"),
            "overload": counter("gridlb_substation_overload_seconds",
                                "Seconds its measured load was above its reported capacity"),
            "stale_total": counter("gridlb_stale_telemetry",
                                   "Times its telemetry went stale (no sample for stale_after_s)"),
        }
        decisions = CounterMetricFamily("gridlb_decisions", "Answers the balancer gave, by outcome (assigned, "
                                        "queued, rejected, updated, revoked, completed, cancelled) and reason",
                                        labels=["outcome", "reason", "region"])
        events = CounterMetricFamily("gridlb_balancer_events", "Other things the balancer noticed or did: "
                                     "duplicates, adoptions, substations offline/lost/stale, operator actions",
                                     labels=["event", "detail", "region"])
        rejected = CounterMetricFamily("gridlb_rejected_payloads", "Payloads refused at the boundary, by topic "
                                       "kind and reason", labels=["kind", "reason", "region"])
        starting = GaugeMetricFamily("gridlb_balancer_starting", "1 while a (re)started balancer holds EV and "
                                     "operator input until the agents have re-announced their sessions",
                                     labels=["region"])
        held = GaugeMetricFamily("gridlb_balancer_startup_held", "Input messages held during the startup wait",
                                 labels=["region"])
        queue = GaugeMetricFamily("gridlb_queue_length", "Requests waiting for power", labels=["region"])
        sessions = GaugeMetricFamily("gridlb_sessions", "Running sessions on all substations", labels=["region"])
        open_requests = GaugeMetricFamily("gridlb_open_requests", "EVs with an open request (queued or charging)",
                                          labels=["region"])
        received = CounterMetricFamily("gridlb_balancer_received_messages", "Messages received, by topic kind, "
                                       "before admission (those shed or refused are also in gridlb_rejected_payloads)",
                                       labels=["kind", "region"])
        for service in list(self._services()):
            region = service.region
            core = service.core
            cfg = core.config
            now = service.clock()
            waits = core.queue_waits
            observe = self._queue_wait.labels(region).observe
            while True:  # popleft is atomic; two concurrent scrapes (Prometheus + a healthcheck) may drain together
                try:
                    observe(waits.popleft())
                except IndexError:
                    break
            for sub in sorted(core.substations.values(), key=lambda s: s.id):
                heard = sub.last_telemetry_at
                values = {
                    "capacity": sub.capacity_w, "reported": sub.reported_capacity_w,
                    "limit": max(0, sub.limit_w(cfg.safety_margin_pct)), "load": sub.load_w,
                    "headroom": sub.headroom_w(now, cfg.safety_margin_pct, cfg.stale_after_s),
                    "reserved": sub.reserved_w(), "granted": sub.granted_w, "sessions": len(sub.sessions),
                    "online": int(sub.status != "offline" and not sub.lost and heard is not None),
                    "stale": int(not sub.is_fresh(now, cfg.stale_after_s)), "draining": int(sub.draining),
                    "utilisation": sub.used_w() / sub.capacity_w if sub.capacity_w > 0 else 0.0,
                    "age": max(0.0, now - heard) if heard is not None else float("nan"),
                    "overload": sub.overload_s, "stale_total": sub.stale_transitions,
                }
                for key, family in per_sub.items():
                    family.add_metric([sub.id, region], float(values[key]))
            for key, count in sorted(core.counters.items()):
                outcome, reason = _outcome_reason(key)
                family = decisions if outcome in DECISION_OUTCOMES else events
                family.add_metric([outcome, reason, region], float(count))
            for key, count in sorted(service.counters.items()):
                if key.startswith("bad_payload:"):
                    _, kind, reason = key.split(":", 2)
                    rejected.add_metric([kind, reason, region], float(count))
            for kind, count in sorted(service.received.items()):
                received.add_metric([str(kind), region], float(count))
            gate = service.startup
            starting.add_metric([region], int(not gate.is_open))
            held.add_metric([region], len(gate.held))
            queue.add_metric([region], len(core.queue))
            sessions.add_metric([region], core.session_count())
            open_requests.add_metric([region], core.open_requests())
        yield from per_sub.values()
        yield from (decisions, events, rejected, received, starting, held, queue, sessions, open_requests)


def register(services: BalancerService | Sequence[BalancerService], registry: CollectorRegistry) -> None:
    """Register the metrics of a process's region services in ``registry`` and hook the decision-latency
    histogram. MQTT connections are labelled ``client="balancer"`` (the default region, as before) and
    ``client="balancer-<region>"``."""
    if not isinstance(services, Sequence):
        services = [services]
    fixed = list(services)
    hook = register_current(lambda: fixed, registry)
    for service in fixed:
        hook(service)


def register_current(current: Callable[[], Sequence[BalancerService]],
                     registry: CollectorRegistry) -> Callable[[BalancerService], None]:
    """Register the metrics of whichever region services ``current()`` returns at scrape time; returns the hook
    that connects a (new) service to the decision-latency histogram (cluster mode calls it on every takeover)."""
    latency = DecisionLatency()
    registry.register(latency)
    queue_wait = Histogram("gridlb_queue_wait_seconds", "How long requests placed from the queue waited",
                           ["region"], buckets=WAIT_BUCKETS, registry=registry)
    registry.register(BalancerCollector(current, queue_wait))
    registry.register(MqttCollector(lambda: {("balancer" if s.region == DEFAULT_REGION else f"balancer-{s.region}"):
                                             s.transport for s in current()}))

    def hook(service: BalancerService) -> None:
        service.observe_decision = latency.region(service.region).observe

    return hook
