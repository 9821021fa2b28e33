"""The recorder's counters and their Prometheus view (``gridlb_recorder_*``).

Counters are plain integers on :class:`RecorderStats`, incremented by the buffer, the writer and the MQTT
adapter and read at scrape time by :class:`RecorderCollector` (the project's convention: the hot path pays
nothing for metrics). Only the write latency, a distribution, is a prometheus_client Histogram.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(slots=True)
class RecorderStats:
    """Everything the recorder counts. Invariant (checked by the tests):
    ``points_queued == points_written + sum(points_dropped.values()) + buffered + in flight``."""

    messages: Counter[str] = field(default_factory=Counter)  # by topic kind, bad ones included
    bad_payloads: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, reason)
    points_queued: int = 0  # points made from messages and handed to the buffer
    points_written: int = 0
    points_retried: int = 0  # points in a batch whose write failed and was retried (once per attempt)
    points_dropped: Counter[str] = field(default_factory=Counter)  # by reason: buffer_full, rejected, shutdown
    write_errors: int = 0
    in_flight: int = 0  # points in the batch being written right now

    def dropped_total(self) -> int:
        return sum(self.points_dropped.values())


def latency_histogram(registry: CollectorRegistry | None) -> Histogram:
    """``gridlb_recorder_write_latency_seconds``: one observation per successful batch write."""
    return Histogram("gridlb_recorder_write_latency_seconds", "Duration of successful batch writes",
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                     registry=registry)


class RecorderCollector(Collector):
    """Reads :class:`RecorderStats` (and the buffer's fill level) at scrape time."""

    def __init__(self, stats: RecorderStats, buffered: Callable[[], int]) -> None:
        self._stats = stats
        self._buffered = buffered

    def collect(self) -> Iterable[Any]:
        s = self._stats
        written = CounterMetricFamily("gridlb_recorder_points_written", "Points the database accepted")
        written.add_metric([], s.points_written)
        queued = CounterMetricFamily("gridlb_recorder_points_queued", "Points made from messages and buffered")
        queued.add_metric([], s.points_queued)
        retried = CounterMetricFamily("gridlb_recorder_points_retried",
                                      "Points whose write failed and was retried (counted per attempt)")
        retried.add_metric([], s.points_retried)
        dropped = CounterMetricFamily("gridlb_recorder_points_dropped", "Points given up, by reason",
                                      labels=["reason"])
        for reason in sorted({"buffer_full", "rejected", "shutdown", *s.points_dropped}):
            dropped.add_metric([reason], s.points_dropped[reason])
        errors = CounterMetricFamily("gridlb_recorder_write_errors", "Failed batch writes (each attempt)")
        errors.add_metric([], s.write_errors)
        buffered = GaugeMetricFamily("gridlb_recorder_buffer_points", "Points waiting in the buffer")
        buffered.add_metric([], self._buffered())
        messages = CounterMetricFamily("gridlb_recorder_messages", "Messages received, by topic kind",
                                       labels=["kind"])
        for kind, n in sorted(s.messages.items()):
            messages.add_metric([kind], n)
        bad = CounterMetricFamily("gridlb_recorder_bad_payloads", "Messages refused (not recorded), by reason",
                                  labels=["kind", "reason"])
        for (kind, reason), n in sorted(s.bad_payloads.items()):
            bad.add_metric([kind, reason], n)
        yield from (written, queued, retried, dropped, errors, buffered, messages, bad)
