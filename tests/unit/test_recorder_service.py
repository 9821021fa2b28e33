"""The recorder's MQTT adapter without a broker: subscriptions, decoding, bad payloads, metrics, settings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from grid_protocol.topics import TopicKind, Topics
from grid_runtime.mqtt import InMessage, TransportStats
from monitoring.recorder.metrics import RecorderCollector, latency_histogram
from monitoring.recorder.points import Point
from monitoring.recorder.service import RecorderService
from monitoring.recorder.settings import RecorderSettings

T = Topics()


class FakeTransport:
    def __init__(self) -> None:
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        self.subs: dict[str, int] = {}
        self.handler: Callable[[InMessage], None] = lambda _m: None
        self.published: list[str] = []

    def set_handler(self, handler: Callable[[InMessage], None]) -> None:
        self.handler = handler

    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        self.subs[topic_filter] = qos

    def on_connect(self, callback: Callable[[], None]) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> None:
        self.published.append(topic)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self, timeout: float = 2.0) -> None:
        pass


@pytest.fixture
def svc() -> tuple[RecorderService, FakeTransport, list[list[str]]]:
    transport = FakeTransport()
    written: list[list[str]] = []
    settings = RecorderSettings(flush_interval_s=0.01, shutdown_timeout_s=1)
    return RecorderService(settings, transport, written.append, clock=lambda: 99.0), transport, written


def deliver(transport: FakeTransport, topic: str, body: Any, retain: bool = False) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    transport.handler(InMessage(topic, payload, 1, retain))


TELEMETRY = {"substation_id": "A", "ts": 10.0, "seq": 1, "capacity_kw": 100, "load_kw": 30, "base_load_kw": 30,
             "ev_load_kw": 0, "active_sessions": 0}


def test_subscribes_read_only_to_the_six_recorded_topics(svc: Any) -> None:
    _service, transport, _ = svc
    assert transport.subs == {f: 1 for k in (
        TopicKind.SUBSTATION_TELEMETRY, TopicKind.SUBSTATION_STATUS, TopicKind.SUBSTATION_STATE,
        TopicKind.BALANCER_QUEUE, TopicKind.EV_ASSIGNMENT, TopicKind.SUBSTATION_SESSION)
        for f in T.filters_all_regions(k)}
    assert "grid/v1/ev/+/assignment" in transport.subs and "grid/v1/balancer/queue" in transport.subs
    assert "grid/v1/region/+/ev/+/assignment" in transport.subs  # every region (issue 12)


def test_good_messages_become_points_bad_ones_are_counted_by_reason_and_never_raise(svc: Any) -> None:
    service, transport, _ = svc
    deliver(transport, T.telemetry("A"), TELEMETRY)
    deliver(transport, T.substation_status("A"), {"state": "offline"}, retain=True)
    deliver(transport, T.balancer_queue(), {"ts": 11.0, "length": 0, "entries": []}, retain=True)
    bad = [
        (T.telemetry("A"), b'{"substation_id": "A", "load_kw": NaN}'),  # malformed_json
        (T.telemetry("A"), {**TELEMETRY, "load_kw": -5}),  # invalid_field
        (T.telemetry("A"), {**TELEMETRY, "substation_id": "B"}),  # id_mismatch
        ("grid/v1/substation/bad.id/telemetry", TELEMETRY),  # invalid_topic_id
        (T.session_events("A"),  # duplicate_key
         b'{"event": "started", "session_id": "s1", "ev_id": "EV_1", "ts": 1, "event": "ended"}'),
        (T.assignment("EV_1"), b"x" * 5000),  # payload_too_large
        (T.substation_state("A"), {"substation_id": "A"}),  # invalid_field (missing fields)
    ]
    for topic, body in bad:
        deliver(transport, topic, body)
    s = service.stats
    assert len(service.buffer) == 3 and s.points_queued == 3
    assert s.messages == {"substation_telemetry": 5, "substation_status": 1, "balancer_queue": 1,
                          "substation_session": 1, "ev_assignment": 1, "substation_state": 1}
    assert dict(s.bad_payloads) == {
        ("substation_telemetry", "malformed_json"): 1, ("substation_telemetry", "invalid_field"): 1,
        ("substation_telemetry", "id_mismatch"): 1, ("substation_telemetry", "invalid_topic_id"): 1,
        ("substation_session", "duplicate_key"): 1, ("ev_assignment", "payload_too_large"): 1,
        ("substation_state", "invalid_field"): 1}
    status = next(p for p in map(Point.parse, service.buffer.take(10)) if p.measurement == "substation_status")
    assert status.ts_us == 99_000_000  # no ts in the last will: the receive time
    assert transport.published == []  # read-only


def test_run_records_until_stopped_then_flushes(svc: Any) -> None:
    service, transport, written = svc

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.sleep(0.01)
        for seq in range(3):
            deliver(transport, T.telemetry("A"), {**TELEMETRY, "seq": seq})
        await asyncio.sleep(0.1)
        deliver(transport, T.telemetry("A"), {**TELEMETRY, "seq": 3})
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert [Point.parse(p).field("seq") for b in written for p in b] == [0, 1, 2, 3]
    assert service.stats.points_written == 4


def test_metrics_exposition_has_every_documented_name(svc: Any) -> None:
    service, transport, _ = svc
    deliver(transport, T.telemetry("A"), TELEMETRY)
    deliver(transport, T.telemetry("A"), b"{")
    registry = CollectorRegistry()
    registry.register(RecorderCollector(service.stats, lambda: len(service.buffer)))
    latency_histogram(registry).observe(0.01)
    text = generate_latest(registry).decode()
    for line in ("gridlb_recorder_points_written_total 0.0", "gridlb_recorder_points_retried_total 0.0",
                 'gridlb_recorder_points_dropped_total{reason="buffer_full"} 0.0',
                 "gridlb_recorder_write_errors_total 0.0", "gridlb_recorder_buffer_points 1.0",
                 "gridlb_recorder_write_latency_seconds_count 1.0", "gridlb_recorder_points_queued_total 1.0",
                 'gridlb_recorder_messages_total{kind="substation_telemetry"} 2.0',
                 'gridlb_recorder_bad_payloads_total{kind="substation_telemetry",reason="malformed_json"} 1.0'):
        assert line in text, line


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"INFLUX_URL": "http://127.0.0.1:8428", "INFLUX_TOKEN": "s3cret", "INFLUX_ORG": "o",
                       "INFLUX_BUCKET": "b", "RECORDER_BUFFER_MAX_POINTS": "50", "RECORDER_BATCH_SIZE": "7",
                       "RECORDER_FLUSH_INTERVAL_S": "0.5", "RECORDER_BACKOFF_MIN_S": "0.2",
                       "RECORDER_BACKOFF_MAX_S": "4", "MQTT_PORT": "1999"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MQTT_USERNAME", raising=False)
    s = RecorderSettings()
    assert (s.influx.url, s.influx.org, s.influx.bucket) == ("http://127.0.0.1:8428", "o", "b")
    assert s.influx.token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    assert (s.buffer_max_points, s.batch_size, s.flush_interval_s, s.backoff_min_s, s.backoff_max_s) == (
        50, 7, 0.5, 0.2, 4.0)
    assert (s.mqtt.username, s.mqtt.port) == ("recorder", 1999)  # read-only account by default
    monkeypatch.setenv("MQTT_USERNAME", "recorder2")
    assert RecorderSettings().mqtt.username == "recorder2"
    monkeypatch.setenv("RECORDER_BACKOFF_MAX_S", "0.1")
    with pytest.raises(ValidationError):
        RecorderSettings()


def test_influx_token_from_a_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """docker compose hands the recorder a write-only token as a file (INFLUX_TOKEN_FILE), never the admin's."""
    from monitoring.recorder.settings import RecorderSettings

    path = tmp_path / "recorder.token"
    path.write_text("write-only-token\n")
    monkeypatch.setenv("INFLUX_TOKEN_FILE", str(path))
    assert RecorderSettings().influx.token.get_secret_value() == "write-only-token"
    monkeypatch.setenv("INFLUX_TOKEN_FILE", str(tmp_path / "missing.token"))
    with pytest.raises(ValidationError, match="INFLUX_TOKEN_FILE"):
        RecorderSettings()


def test_every_region_is_recorded_with_its_region_tag(svc: Any) -> None:
    """Issue 12: a named region's points carry ``region``; the default region's carry none (series unchanged)."""
    service, transport, _ = svc
    east = T.for_region("east")
    deliver(transport, T.telemetry("A"), TELEMETRY)
    deliver(transport, east.telemetry("E1"), {**TELEMETRY, "substation_id": "E1"})
    deliver(transport, east.balancer_queue(), {"ts": 11.0, "length": 2, "entries": []}, retain=True)
    deliver(transport, "grid/v1/region/default/substation/A/telemetry", TELEMETRY)  # not a topic: ignored
    points = list(map(Point.parse, service.buffer.take(10)))
    assert [(p.measurement, p.tag("substation_id"), p.tag("region")) for p in points] == [
        ("substation_telemetry", "A", None), ("substation_telemetry", "E1", "east"), ("balancer_queue", None, "east")]
