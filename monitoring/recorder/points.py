"""Pure translation: one decoded contract message -> points of the schema, and points -> line protocol.

No I/O and no clock: the caller passes ``now`` (used only when a message carries no ``ts``), so this is
table-tested without a broker or a database. Every point is built through :func:`make_point`, which
refuses names that are not in :data:`~monitoring.recorder.schema.SCHEMA` and casts each field to its
declared type, so what reaches the database is exactly what ``docs/recorder.md`` documents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from grid_protocol.messages import Assignment, QueueState, SessionEvent, SubstationState, SubstationStatus, Telemetry
from grid_protocol.topics import TopicKind
from monitoring.recorder.schema import SCHEMA, FieldType

FieldValue = float | int | str


@dataclass(frozen=True, slots=True)
class Point:
    """One InfluxDB point; ``ts_ms`` is epoch milliseconds (written with precision ``ms``)."""

    measurement: str
    tags: tuple[tuple[str, str], ...]  # sorted by key (InfluxDB's preferred order)
    fields: tuple[tuple[str, FieldValue], ...]
    ts_ms: int

    def tag(self, name: str) -> str | None:
        return dict(self.tags).get(name)

    def field(self, name: str) -> FieldValue | None:
        return dict(self.fields).get(name)

    def to_line(self) -> str:
        """InfluxDB line protocol (escaping per the spec; ids are safe already, reasons may not be)."""
        head = _escape(self.measurement, _MEASUREMENT_ESC)
        tags = "".join(f",{_escape(k, _KEY_ESC)}={_escape(v, _KEY_ESC)}" for k, v in self.tags)
        fields = ",".join(f"{_escape(k, _KEY_ESC)}={_value(v)}" for k, v in self.fields)
        return f"{head}{tags} {fields} {self.ts_ms}"


_MEASUREMENT_ESC = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_KEY_ESC = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_STRING_ESC = str.maketrans({'"': r"\"", "\\": "\\\\", "\n": r"\n"})


def _escape(text: str, table: dict[int, str]) -> str:
    return text.translate(table)


def _value(v: FieldValue) -> str:
    if isinstance(v, str):
        return f'"{v.translate(_STRING_ESC)}"'
    if isinstance(v, int):
        return f"{v}i"
    return repr(v)


class SchemaError(ValueError):
    """A point does not match the schema table: a bug here, never bad input."""


def make_point(measurement: str, ts: float, tags: dict[str, str | None],
               fields: dict[str, float | int | bool | str | None]) -> Point:
    """A point of ``measurement`` at epoch seconds ``ts``; ``None`` tags and fields are left out."""
    spec = SCHEMA.get(measurement)
    if spec is None:
        raise SchemaError(f"unknown measurement {measurement!r}")
    if unknown := (set(tags) - set(spec.tags)) | (set(fields) - set(spec.fields)):
        raise SchemaError(f"{measurement}: not in the schema: {sorted(unknown)}")
    typed: list[tuple[str, FieldValue]] = []
    for name, value in fields.items():
        if value is None:
            continue
        kind = spec.fields[name]
        typed.append((name, float(value) if kind is FieldType.FLOAT
                      else int(value) if kind is FieldType.INTEGER else str(value)))
    if not typed:
        raise SchemaError(f"{measurement}: a point needs at least one field")
    return Point(measurement, tuple(sorted((k, v) for k, v in tags.items() if v)), tuple(typed), round(ts * 1000))


def _telemetry(id_: str, t: Telemetry, now: float) -> list[Point]:
    return [make_point("substation_telemetry", t.ts, {"substation_id": id_}, {
        "capacity_kw": t.capacity_kw, "load_kw": t.load_kw, "base_load_kw": t.base_load_kw,
        "ev_load_kw": t.ev_load_kw, "active_sessions": t.active_sessions, "seq": t.seq})]


def _status(id_: str, s: SubstationStatus, now: float) -> list[Point]:
    return [make_point("substation_status", s.ts if s.ts is not None else now,
                       {"substation_id": id_, "state": s.state},
                       {"online": s.state == "online", "capacity_kw": s.capacity_kw})]


def _state(id_: str, s: SubstationState, now: float) -> list[Point]:
    return [make_point("substation_state", s.ts, {"substation_id": id_}, {
        "capacity_kw": s.capacity_kw, "limit_kw": s.limit_kw, "load_kw": s.load_kw, "base_load_kw": s.base_load_kw,
        "granted_kw": s.granted_kw, "reserved_kw": s.reserved_kw, "headroom_kw": s.headroom_kw,
        "utilisation": s.utilisation, "sessions_total": s.sessions_total, "draining": s.draining,
        "online": s.online, "stale": s.stale, "telemetry_age_s": s.telemetry_age_s})]


def _queue(_id: str, q: QueueState, now: float) -> list[Point]:
    head_eta = q.entries[0].eta_s if q.entries else None
    return [make_point("balancer_queue", q.ts, {}, {"length": q.length, "head_eta_s": head_eta})]


def _assignment(id_: str, a: Assignment, now: float) -> list[Point]:
    return [make_point("ev_assignment", a.ts,
                       {"ev_id": id_, "status": a.status, "substation_id": a.substation_id, "reason": a.reason},
                       {"granted_kw": a.granted_kw or 0.0, "position": a.position, "eta_s": a.eta_s})]


def _session(id_: str, e: SessionEvent, now: float) -> list[Point]:
    return [make_point("session_event", e.ts,
                       {"substation_id": id_, "ev_id": e.ev_id, "event": e.event, "reason": e.reason},
                       {"session_id": e.session_id, "granted_kw": e.granted_kw,
                        "energy_delivered_kwh": e.energy_delivered_kwh})]


#: What the recorder subscribes to: topic kind -> (payload model, translation).
TRANSLATIONS: dict[TopicKind, tuple[Any, Callable[[str, Any, float], list[Point]]]] = {
    TopicKind.SUBSTATION_TELEMETRY: (Telemetry, _telemetry),
    TopicKind.SUBSTATION_STATUS: (SubstationStatus, _status),
    TopicKind.SUBSTATION_STATE: (SubstationState, _state),
    TopicKind.BALANCER_QUEUE: (QueueState, _queue),
    TopicKind.EV_ASSIGNMENT: (Assignment, _assignment),
    TopicKind.SUBSTATION_SESSION: (SessionEvent, _session),
}


class IdMismatch(ValueError):
    """The id in the body disagrees with the topic's: the message is refused like the balancer does."""


def body_id(kind: TopicKind, message: msgspec.Struct) -> str | None:
    """The id a message body claims for its topic level (``None`` when the body does not say)."""
    if kind is TopicKind.EV_ASSIGNMENT:
        return getattr(message, "ev_id", None)
    if kind in (TopicKind.BALANCER_QUEUE,):
        return None
    return getattr(message, "substation_id", None)


def to_points(kind: TopicKind, id_: str | None, message: msgspec.Struct, now: float) -> list[Point]:
    """Points for one decoded message of ``kind`` received on a topic with id ``id_``."""
    claimed = body_id(kind, message)
    if claimed is not None and id_ is not None and claimed != id_:
        raise IdMismatch(f"body says {claimed!r}, topic says {id_!r}")
    _model, translate = TRANSLATIONS[kind]
    return translate(id_ or "", message, now)
