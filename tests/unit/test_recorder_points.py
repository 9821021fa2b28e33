"""monitoring.recorder.points: every recorded message kind -> line-protocol lines of the schema, read back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from grid_protocol.codec import decode
from grid_protocol.messages import MAX_STATE_PAYLOAD_BYTES
from grid_protocol.topics import TopicKind
from monitoring.recorder.points import TRANSLATIONS, IdMismatch, Point, SchemaError, Seen, make_line, to_lines
from monitoring.recorder.schema import BY_SOURCE, SCHEMA, FieldType

TS = 1_700_000_000.1234
TS_US = 1_700_000_000_123_400


def points(kind: TopicKind, id_: str | None, body: dict[str, Any], now: float = 5.0,
           seen: Seen | None = None) -> list[Point]:
    model, _ = TRANSLATIONS[kind]
    message = decode(json.dumps(body).encode(), model, max_bytes=MAX_STATE_PAYLOAD_BYTES)
    lines = to_lines(kind, id_, message, now, seen)
    return [Point.parse(line) for line in lines]


def one(kind: TopicKind, id_: str | None, body: dict[str, Any], now: float = 5.0, seen: Seen | None = None) -> Point:
    [p] = points(kind, id_, body, now, seen)
    return p


STATE = {"substation_id": "A", "ts": TS, "online": True, "stale": False, "draining": True, "capacity_kw": 400.0,
         "reported_capacity_kw": 500.0, "capacity_limit_kw": 400.0, "limit_kw": 380.0, "load_kw": 120.5,
         "base_load_kw": 98.5, "granted_kw": 44.0, "reserved_kw": 22.0, "headroom_kw": 213.5, "utilisation": 0.4375,
         "telemetry_age_s": 0.4, "sessions_total": 2, "sessions": [
             {"session_id": "b-1", "ev_id": "EV_1", "request_id": "r1", "granted_kw": 22.0, "requested_kw": 22.0,
              "min_kw": 1.4, "priority": 0, "started_at": TS - 10, "expected_end": None}]}
QUEUE = {"ts": TS, "length": 3, "truncated": False, "entries": [
    {"ev_id": "EV_7", "request_id": "r7", "position": 1, "requested_kw": 11.0, "min_kw": 11.0, "priority": 0,
     "waiting_since": TS - 5, "eta_s": 42.0}]}
SAMPLES: dict[TopicKind, tuple[str | None, dict[str, Any]]] = {
    TopicKind.SUBSTATION_TELEMETRY: ("A", {"substation_id": "A", "ts": TS, "seq": 7, "capacity_kw": 400,
                                           "load_kw": 150.5, "base_load_kw": 128.5, "ev_load_kw": 22,
                                           "active_sessions": 1}),
    TopicKind.SUBSTATION_STATUS: ("A", {"state": "online", "substation_id": "A", "ts": TS, "capacity_kw": 400}),
    TopicKind.SUBSTATION_STATE: ("A", STATE),
    TopicKind.BALANCER_QUEUE: (None, QUEUE),
    TopicKind.EV_ASSIGNMENT: ("EV_1", {"request_id": "r1", "ev_id": "EV_1", "status": "assigned", "ts": TS,
                                       "substation_id": "A", "granted_kw": 22, "session_id": "b-1", "reason": None,
                                       "detail": None, "position": None, "eta_s": None}),
    TopicKind.SUBSTATION_SESSION: ("A", {"event": "ended", "session_id": "b-1", "ev_id": "EV_1", "ts": TS,
                                         "substation_id": "A", "reason": "energy_delivered",
                                         "energy_delivered_kwh": 10.25, "granted_kw": 22}),
}


def test_every_recorded_kind_has_a_sample_and_a_measurement() -> None:
    assert set(SAMPLES) == set(TRANSLATIONS) == set(BY_SOURCE)


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_points_match_the_schema_exactly(kind: TopicKind) -> None:
    id_, body = SAMPLES[kind]
    for p in points(kind, id_, body):
        spec = SCHEMA[p.measurement]
        assert spec.source is kind
        assert {k for k, _ in p.tags} <= set(spec.tags)
        assert [k for k, _ in p.tags] == sorted(k for k, _ in p.tags)
        for name, value in p.fields:
            expected = {FieldType.FLOAT: float, FieldType.INTEGER: int, FieldType.STRING: str}[spec.fields[name]]
            assert type(value) is expected, (name, value)
        assert p.ts_us == TS_US


def test_telemetry() -> None:
    id_, body = SAMPLES[TopicKind.SUBSTATION_TELEMETRY]
    p = one(TopicKind.SUBSTATION_TELEMETRY, id_, body)
    assert p.measurement == "substation_telemetry" and p.tags == (("substation_id", "A"),)
    assert dict(p.fields) == {"capacity_kw": 400.0, "load_kw": 150.5, "base_load_kw": 128.5, "ev_load_kw": 22.0,
                              "active_sessions": 1, "seq": 7}


def test_status_online_offline_and_missing_ts_uses_receive_time() -> None:
    p = one(TopicKind.SUBSTATION_STATUS, "A", {"state": "online", "ts": TS, "capacity_kw": 400})
    assert (p.tag("state"), p.field("online"), p.field("capacity_kw")) == ("online", 1, 400.0)
    last_will = one(TopicKind.SUBSTATION_STATUS, "B", {"state": "offline"}, now=12.5)
    assert last_will.tags == (("state", "offline"), ("substation_id", "B"))
    assert dict(last_will.fields) == {"online": 0} and last_will.ts_us == 12_500_000


def test_substation_state_flags_are_integers_and_missing_telemetry_fields_are_left_out() -> None:
    p = one(TopicKind.SUBSTATION_STATE, "A", STATE)
    f = dict(p.fields)
    assert (f["draining"], f["online"], f["stale"], f["sessions_total"]) == (1, 1, 0, 2)
    assert (f["headroom_kw"], f["reserved_kw"], f["granted_kw"], f["utilisation"]) == (213.5, 22.0, 44.0, 0.4375)
    no_telemetry = {**STATE, "load_kw": None, "base_load_kw": None, "telemetry_age_s": None, "online": False}
    f = dict(one(TopicKind.SUBSTATION_STATE, "A", no_telemetry).fields)
    assert "load_kw" not in f and "base_load_kw" not in f and "telemetry_age_s" not in f and f["online"] == 0


def test_queue_state() -> None:
    p = one(TopicKind.BALANCER_QUEUE, None, QUEUE)
    assert p.measurement == "balancer_queue" and p.tags == ()
    assert dict(p.fields) == {"length": 3, "head_eta_s": 42.0}
    empty = one(TopicKind.BALANCER_QUEUE, None, {"ts": TS, "length": 0, "entries": []})
    assert dict(empty.fields) == {"length": 0}


@pytest.mark.parametrize(("extra", "tags", "fields"), [
    ({"status": "assigned", "substation_id": "A", "granted_kw": 22},
     {"status": "assigned", "substation_id": "A"}, {"ev_id": "EV_1", "granted_kw": 22.0}),
    ({"status": "queued", "position": 4, "eta_s": 90.5, "reason": "no_headroom"},
     {"status": "queued", "reason": "no_headroom"},
     {"ev_id": "EV_1", "granted_kw": 0.0, "position": 4, "eta_s": 90.5}),
    ({"status": "rejected", "reason": "exceeds_capacity", "detail": "too big"},
     {"status": "rejected", "reason": "exceeds_capacity"}, {"ev_id": "EV_1", "granted_kw": 0.0}),
])
def test_assignments(extra: dict[str, Any], tags: dict[str, str], fields: dict[str, Any]) -> None:
    p = one(TopicKind.EV_ASSIGNMENT, "EV_1", {"request_id": "r1", "ev_id": "EV_1", "ts": TS, **extra})
    assert dict(p.tags) == tags and dict(p.fields) == fields


def test_session_events() -> None:
    started = one(TopicKind.SUBSTATION_SESSION, "A", {"event": "started", "session_id": "b-1", "ev_id": "EV_1",
                                                      "ts": TS, "granted_kw": 11})
    assert dict(started.tags) == {"substation_id": "A", "event": "started"}
    assert dict(started.fields) == {"ev_id": "EV_1", "session_id": "b-1", "granted_kw": 11.0}
    ended = one(TopicKind.SUBSTATION_SESSION, *SAMPLES[TopicKind.SUBSTATION_SESSION])
    assert ended.tag("reason") == "energy_delivered" and ended.field("energy_delivered_kwh") == 10.25


@pytest.mark.parametrize(("kind", "id_", "body"), [
    (TopicKind.SUBSTATION_TELEMETRY, "B", SAMPLES[TopicKind.SUBSTATION_TELEMETRY][1]),
    (TopicKind.EV_ASSIGNMENT, "EV_2", SAMPLES[TopicKind.EV_ASSIGNMENT][1]),
    (TopicKind.SUBSTATION_STATE, "B", STATE),
])
def test_body_id_must_match_topic_id(kind: TopicKind, id_: str, body: dict[str, Any]) -> None:
    with pytest.raises(IdMismatch):
        points(kind, id_, body)


def test_make_line_refuses_what_is_not_in_the_schema() -> None:
    with pytest.raises(SchemaError):
        make_line("nope", TS, {}, {"x": 1.0})
    with pytest.raises(SchemaError):
        make_line("substation_telemetry", TS, {"ev_id": "EV_1"}, {"load_kw": 1.0})
    with pytest.raises(SchemaError):
        make_line("substation_telemetry", TS, {}, {"load_kw": None})


def test_no_unbounded_id_is_a_tag() -> None:
    """Tags are what InfluxDB indexes as series: EV, session and request ids would make one series per id."""
    unbounded = {"ev_id", "session_id", "request_id"}
    assert all(not unbounded & set(m.tags) for m in SCHEMA.values())
    assert {"ev_id"} <= set(SCHEMA["ev_assignment"].fields) and {"ev_id", "session_id"} <= set(
        SCHEMA["session_event"].fields)


def test_line_protocol_types_and_escaping() -> None:
    line = make_line("ev_assignment", TS, {"status": "rejected", "reason": 'a b,c=d\\"'},
                     {"ev_id": "EV_1", "granted_kw": 0, "position": 2})
    assert line == ('ev_assignment,reason=a\\ b\\,c\\=d\\\\",status=rejected '
                    f'ev_id="EV_1",granted_kw=0.0,position=2i {TS_US}')
    s = make_line("session_event", TS, {"event": "started"}, {"session_id": 'x"y\\z\n', "ev_id": "EV_1"})
    assert s == f'session_event,event=started session_id="x\\"y\\\\z\\n",ev_id="EV_1" {TS_US}'
    back = Point.parse(s)
    assert back.fields == (("session_id", 'x"y\\z\n'), ("ev_id", "EV_1")) and back.ts_us == TS_US
    assert Point.parse(line).tags == (("reason", 'a b,c=d\\"'), ("status", "rejected"))


def test_points_of_one_series_and_instant_are_kept_apart_and_repeats_overwrite() -> None:
    """InfluxDB keeps one point per series and timestamp: two EVs answered in the same instant with the same
    status share a series now that ev_id is a field, so the second moves 1 µs later; a redelivered message
    (same values) keeps its timestamp and overwrites its first copy, as it did with ev_id as a tag."""
    seen: Seen = {}
    body = {"request_id": "r1", "status": "assigned", "ts": TS, "substation_id": "A", "granted_kw": 22}
    first = one(TopicKind.EV_ASSIGNMENT, "EV_1", {**body, "ev_id": "EV_1"}, seen=seen)
    second = one(TopicKind.EV_ASSIGNMENT, "EV_2", {**body, "ev_id": "EV_2"}, seen=seen)
    third = one(TopicKind.EV_ASSIGNMENT, "EV_3", {**body, "ev_id": "EV_3"}, seen=seen)
    repeat = one(TopicKind.EV_ASSIGNMENT, "EV_3", {**body, "ev_id": "EV_3"}, seen=seen)
    assert [p.ts_us for p in (first, second, third, repeat)] == [TS_US, TS_US + 1, TS_US + 2, TS_US + 2]
    other = one(TopicKind.EV_ASSIGNMENT, "EV_4", {**body, "ev_id": "EV_4", "substation_id": "B"}, seen=seen)
    later = one(TopicKind.EV_ASSIGNMENT, "EV_5", {**body, "ev_id": "EV_5", "ts": TS + 1}, seen=seen)
    assert other.ts_us == TS_US and later.ts_us == TS_US + 1_000_000  # another series, another instant
    assert one(TopicKind.EV_ASSIGNMENT, "EV_2", {**body, "ev_id": "EV_2"}).ts_us == TS_US  # no memory: as sent


@pytest.mark.parametrize(("tags", "fields"), [
    ({"status": "assigned", "substation_id": "north", "reason": None},
     {"ev_id": "EV_0001", "granted_kw": 11.0, "position": 3, "eta_s": 0.1}),
    ({"status": "re jected", "substation_id": "a,b=c", "reason": "x y"},  # (ids and reasons hold no backslash)
     {"ev_id": 'quo"te\\ and\nnewline', "granted_kw": 1e-7, "position": -2, "eta_s": 12345678.901}),
])
def test_lines_are_what_influxdb_client_writes(tags: dict[str, str | None], fields: dict[str, object]) -> None:
    """The line protocol is built here for speed (docs/recorder.md: 8.1 vs 19.3 µs per point); it must mean what
    the client library itself writes for the same point: the same series (escaping included, byte for byte), the
    same typed values and timestamp (the client sorts the fields and writes 11.0 as 11)."""
    from influxdb_client import Point as ClientPoint
    from influxdb_client import WritePrecision

    ts = 1_767_225_600.123456
    ours = make_line("ev_assignment", ts, tags, fields)
    theirs = ClientPoint("ev_assignment")
    for key in sorted(tags):
        if tags[key]:
            theirs = theirs.tag(key, tags[key])
    for key, value in fields.items():
        theirs = theirs.field(key, value)
    line = theirs.time(round(ts * 1_000_000), WritePrecision.US).to_line_protocol()
    assert _series(ours) == _series(line)
    mine, client = Point.parse(ours), Point.parse(line)
    assert (mine.measurement, mine.tags, mine.ts_us) == (client.measurement, client.tags, client.ts_us)
    assert sorted(mine.fields) == sorted(client.fields)
    assert {k: type(v) for k, v in mine.fields} == {k: type(v) for k, v in client.fields}


def _series(line: str) -> str:
    """Measurement and tags: everything before the first space that is not escaped."""
    i = 0
    while line[i] != " ":
        i += 2 if line[i] == "\\" else 1
    return line[:i]
