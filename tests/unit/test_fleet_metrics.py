"""``ev_clients.metrics``: the fleet's Prometheus metrics read from real :class:`FleetStats` and
:class:`EvConnections` (no broker), checked on a fresh registry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from ev_clients.fleet import EvConnections, FleetRunner, RunConfig
from ev_clients.metrics import FLEET_CLIENT, register_fleet_metrics
from ev_clients.settings import EvSettings
from ev_clients.stats import RequestRecord
from grid_runtime.mqtt import TransportStats


@dataclass(eq=False)
class FakeTransport:
    stats: TransportStats = field(default_factory=TransportStats)
    connected: asyncio.Event = field(default_factory=asyncio.Event)


def runner_with_registry() -> tuple[FleetRunner, CollectorRegistry]:
    runner = FleetRunner(EvSettings(), RunConfig(mode="loadtest", requests=10))
    registry = CollectorRegistry()
    register_fleet_metrics(runner, registry)
    return runner, registry


def request(runner: FleetRunner, rid: str, *, attempts: int, sent_at: float = 100.0) -> RequestRecord:
    record = runner.stats.new_record(RequestRecord(ev_id="EV_0001", request_id=rid, requested_kw=11.0))
    record.attempts = attempts
    record.sent_at = sent_at
    return record


def test_requests_retries_answers_and_live_gauges() -> None:
    runner, registry = runner_with_registry()
    stats = runner.stats

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("gridlb_ev_requests_total") == 0
    assert value("gridlb_ev_answers_total", status="assigned") == 0  # every status, before any answer

    r1 = request(runner, "r1", attempts=1)
    r2 = request(runner, "r2", attempts=3)
    r3 = request(runner, "r3", attempts=2)
    runner.stats.new_record(RequestRecord(ev_id="EV_0002", request_id="r4", requested_kw=7.4))  # not sent yet
    stats.on_answer(r1, 100.0004, "assigned", substation_id="A", granted_kw=11.0)
    stats.on_answer(r1, 100.0004, "assigned", substation_id="A", granted_kw=11.0)  # duplicate: not counted
    stats.on_answer(r2, 100.3, "queued", position=1)
    stats.on_answer(r3, 102.0, "rejected", reason="ev_busy")
    assert value("gridlb_ev_requests_total") == 3
    assert value("gridlb_ev_retries_total") == 3  # r2 twice, r3 once
    assert value("gridlb_ev_answers_total", status="assigned") == 1
    assert value("gridlb_ev_answers_total", status="queued") == 1
    assert value("gridlb_ev_answers_total", status="rejected") == 1
    assert value("gridlb_ev_answers_total", status="completed") == 0
    assert value("gridlb_ev_active_sessions") == 1
    assert value("gridlb_ev_queued_requests") == 1

    stats.on_answer(r2, 101.0, "assigned", substation_id="B", granted_kw=11.0)  # a second answer: no new latency
    stats.on_answer(r1, 103.0, "completed")
    assert value("gridlb_ev_active_sessions") == 1
    assert value("gridlb_ev_queued_requests") == 0
    assert value("gridlb_ev_answers_total", status="assigned") == 2

    # latency histogram: first answers only, 0.4 ms, 300 ms, 2 s
    assert value("gridlb_ev_answer_latency_seconds_count") == 3
    assert abs((value("gridlb_ev_answer_latency_seconds_sum") or 0) - 2.3004) < 1e-6
    assert value("gridlb_ev_answer_latency_seconds_bucket", le="0.0001") == 0
    assert value("gridlb_ev_answer_latency_seconds_bucket", le="0.0005") == 1
    assert value("gridlb_ev_answer_latency_seconds_bucket", le="0.5") == 2
    assert value("gridlb_ev_answer_latency_seconds_bucket", le="2.5") == 3
    assert value("gridlb_ev_answer_latency_seconds_bucket", le="10.0") == 3
    assert value("gridlb_ev_answer_latency_seconds_bucket", le="+Inf") == 3

    stats.connect_failures += 2
    assert value("gridlb_ev_connect_failures_total") == 2


def test_connections_are_aggregated_under_one_client_label() -> None:
    runner, registry = runner_with_registry()
    conns: EvConnections = runner.connections
    up, down, gone = FakeTransport(), FakeTransport(), FakeTransport()
    for t, connects, published in ((up, 1, 5), (down, 2, 3), (gone, 3, 7)):
        t.stats.connects = connects
        t.stats.published = published
        conns.opened(t)  # type: ignore[arg-type]
    up.connected.set()
    gone.connected.set()
    conns.closed(gone)  # type: ignore[arg-type]
    conns.closed(gone)  # type: ignore[arg-type]  # twice: counted once

    def value(name: str) -> float | None:
        return registry.get_sample_value(name, {"client": FLEET_CLIENT})

    assert value("gridlb_mqtt_connected") == 1  # a count: "gone" closed, "down" not connected
    assert value("gridlb_mqtt_connects_total") == 6
    assert value("gridlb_mqtt_reconnects_total") == 3  # per connection: 0 + 1 + 2
    assert value("gridlb_mqtt_messages_published_total") == 15  # the closed one's traffic is kept
    down.connected.set()
    assert value("gridlb_mqtt_connected") == 2
    text = generate_latest(registry).decode()
    assert 'client="EV_' not in text  # no per-EV label anywhere
    assert text.count("gridlb_mqtt_connected{") == 1


class NoWalking:
    """Stands in for the records (and the unanswered ones): any walk over them fails the test."""

    def __iter__(self) -> Any:
        raise AssertionError("a scrape walked the records")

    def __len__(self) -> int:
        raise AssertionError("a scrape walked the records")

    def values(self) -> Any:
        raise AssertionError("a scrape walked the records")


def test_open_ended_fleet_scrape_reads_counters_not_records() -> None:
    runner = FleetRunner(EvSettings(keep_records=5), RunConfig(mode="fleet"))  # open-ended: bounded window
    registry = CollectorRegistry()
    register_fleet_metrics(runner, registry)
    stats = runner.stats

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    n = 1000
    for i in range(n):
        r = request(runner, f"r{i}", attempts=1 + (i % 4 == 0), sent_at=float(i))
        if i % 100 == 99:
            continue  # never answered
        stats.on_answer(r, i + 0.001, "queued" if i % 2 else "assigned", substation_id="A", granted_kw=11.0)
        stats.on_answer(r, i + 0.001, "queued" if i % 2 else "assigned", substation_id="A", granted_kw=11.0)  # dup
        if i % 2:
            stats.on_answer(r, i + 0.5, "assigned", substation_id="A", granted_kw=11.0)
        if i < n - 10:  # the last ones are still charging
            stats.on_answer(r, i + 0.9, "completed", reason="energy_delivered")
    assert len(stats.records) == 5 and stats.first_answer.kept == 5  # bounded ...

    stats.records = NoWalking()  # type: ignore[assignment]
    stats._unanswered = NoWalking()  # type: ignore[assignment]
    answered = n - n // 100
    charging = 9  # 990 ... 998 (999 was never answered)
    assert value("gridlb_ev_requests_total") == n  # ... the counters are not
    assert value("gridlb_ev_retries_total") == n // 4
    assert value("gridlb_ev_answers_total", status="assigned") == answered
    assert value("gridlb_ev_answers_total", status="queued") == answered // 2 - 5  # odd i, 99 ... 999 excepted
    assert value("gridlb_ev_answers_total", status="completed") == answered - charging
    assert value("gridlb_ev_active_sessions") == charging
    assert value("gridlb_ev_queued_requests") == 0
    assert value("gridlb_ev_answer_latency_seconds_count") == answered  # every first answer, not the window
    assert value("gridlb_ev_answer_latency_seconds_bucket", le="0.0025") == answered
    # the rest of the live view reads counters too
    assert stats.sent_and_retries() == (n, n // 4)
    assert stats.unanswered_count == n // 100 and stats.answered == answered
    assert "answered 990/1000" in stats.live_line(float(n))


def test_counters_seen_by_a_scrape_never_go_down_while_a_request_changes() -> None:
    runner, registry = runner_with_registry()
    stats = runner.stats
    record = request(runner, "r", attempts=0)
    seen: list[tuple[int, int]] = []
    original = stats._record_changed

    def spying(rec: RequestRecord, before: Any) -> None:
        original(rec, before)
        seen.append(stats.sent_and_retries())

    stats._record_changed = spying  # type: ignore[method-assign]
    for _ in range(4):
        record.attempts += 1
    stats.on_answer(record, 101.0, "assigned", substation_id="A", granted_kw=11.0)
    record.outcome = "completed"
    assert seen == sorted(seen) and seen[-1] == (1, 3)
    assert registry.get_sample_value("gridlb_ev_retries_total") == 3
