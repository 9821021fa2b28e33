"""Pure translation: one decoded contract message -> InfluxDB line-protocol lines of the schema.

No I/O and no clock: the caller passes ``now`` (used only when a message carries no ``ts``), so this is
table-tested without a broker or a database. Every line is built by the :class:`LineFormat` of its
measurement, compiled once from :data:`~monitoring.recorder.schema.SCHEMA`: it refuses names that are not in
the schema and writes each field as its declared type, so what reaches the database is exactly what
``docs/recorder.md`` documents.

Why lines and not point objects: the recorder handles every message on one core (≥ 50,000 points/s is the
target); building a line straight from the decoded message costs a third of building a point object and
encoding it later, and it is what the database takes. The escaping is done here (the line-protocol rules are
short) rather than by ``influxdb_client.Point``, which costs several times more per point (measured in
docs/recorder.md). :class:`Point` parses a line back, for tests and debugging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from grid_protocol.messages import (
    DEFAULT_REGION,
    Assignment,
    QueueState,
    SessionEvent,
    SubstationState,
    SubstationStatus,
    Telemetry,
)
from grid_protocol.topics import TopicKind
from monitoring.recorder.schema import SCHEMA, FieldType, Measurement

FieldValue = float | int | str

_MEASUREMENT_ESC = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_KEY_ESC = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\\": "\\\\"})
_STRING_ESC = str.maketrans({'"': r"\"", "\\": "\\\\", "\n": r"\n"})


class SchemaError(ValueError):
    """A point does not match the schema table: a bug here, never bad input."""


_F, _N = FieldType.FLOAT, FieldType.INTEGER

#: Per series: (timestamp of its last point as sent, as written, its field values).
Seen = dict[str, tuple[int, int, str]]
#: Series remembered for :meth:`LineFormat.line`'s de-collision; ~80,000 at 1,000 substations (docs/recorder.md).
SEEN_MAX = 200_000


class LineFormat:
    """Writes the points of one measurement: tags in key order (InfluxDB's preferred order), typed fields,
    microsecond timestamps. Compiled once per schema row; :meth:`line` is the recorder's hot path."""

    __slots__ = ("_fields", "_head", "_tag_keys", "_tags", "measurement")

    def __init__(self, spec: Measurement) -> None:
        self.measurement = spec.name
        self._head = spec.name.translate(_MEASUREMENT_ESC)
        self._tags = frozenset(spec.tags)
        self._tag_keys = tuple((k, f",{k.translate(_KEY_ESC)}=") for k in sorted(spec.tags))
        self._fields = {name: (f"{name.translate(_KEY_ESC)}=", kind) for name, kind in spec.fields.items()}

    def line(self, ts: float, tags: Mapping[str, str | None], fields: Mapping[str, Any],
             seen: Seen | None = None) -> str:
        """One line at epoch seconds ``ts``; ``None`` (or empty) tags and ``None`` fields are left out.

        With ``seen`` (the recorder's, per process), a point that has the same series and timestamp as the
        previous point of its series but other values is moved 1 µs later (and the next one 2 µs, ...):
        InfluxDB keeps one point per series and timestamp, and ids are fields, not tags, so two EVs answered
        in the same instant share a series. A repeat of the previous point (a redelivered message) keeps
        its timestamp and overwrites it, as before.
        """
        if not tags.keys() <= self._tags or not fields.keys() <= self._fields.keys():
            unknown = (set(tags) - self._tags) | (set(fields) - set(self._fields))
            raise SchemaError(f"{self.measurement}: not in the schema: {sorted(unknown)}")
        series = self._head
        for key, prefix in self._tag_keys:
            tag = tags.get(key)
            if tag:
                series += prefix + tag.translate(_KEY_ESC)
        spec = self._fields
        parts = []
        for key, value in fields.items():
            if value is not None:
                prefix, kind = spec[key]
                parts.append(prefix + (repr(float(value)) if kind is _F else f"{int(value)}i" if kind is _N
                                       else '"' + str(value).translate(_STRING_ESC) + '"'))
        if not parts:
            raise SchemaError(f"{self.measurement}: a point needs at least one field")
        values = ",".join(parts)
        t = round(ts * 1_000_000)
        if seen is not None:
            prev = seen.get(series)
            written = t
            if prev is not None and prev[0] == t:
                written = prev[1] if prev[2] == values else prev[1] + 1
            if len(seen) >= SEEN_MAX:
                seen.clear()  # bounded: the series count is bounded by the schema anyway
            seen[series] = (t, written, values)
            t = written
        return f"{series} {values} {t}"


FORMATS: Mapping[str, LineFormat] = {name: LineFormat(spec) for name, spec in SCHEMA.items()}


def make_line(measurement: str, ts: float, tags: Mapping[str, str | None], fields: Mapping[str, Any],
              seen: Seen | None = None) -> str:
    """A line of ``measurement`` (see :meth:`LineFormat.line`)."""
    fmt = FORMATS.get(measurement)
    if fmt is None:
        raise SchemaError(f"unknown measurement {measurement!r}")
    return fmt.line(ts, tags, fields, seen)


_TELEMETRY, _STATUS, _STATE, _QUEUE, _ASSIGNMENT, _SESSION = (
    FORMATS[n] for n in ("substation_telemetry", "substation_status", "substation_state", "balancer_queue",
                         "ev_assignment", "session_event"))


def _telemetry(id_: str, t: Telemetry, now: float, seen: Seen | None, region: str | None = None) -> list[str]:
    return [_TELEMETRY.line(t.ts, {"substation_id": id_, "region": region}, {
        "capacity_kw": t.capacity_kw, "load_kw": t.load_kw, "base_load_kw": t.base_load_kw,
        "ev_load_kw": t.ev_load_kw, "active_sessions": t.active_sessions, "seq": t.seq}, seen)]


def _status(id_: str, s: SubstationStatus, now: float, seen: Seen | None, region: str | None = None) -> list[str]:
    return [_STATUS.line(s.ts if s.ts is not None else now, {"substation_id": id_, "state": s.state, "region": region},
                         {"online": s.state == "online", "capacity_kw": s.capacity_kw}, seen)]


def _state(id_: str, s: SubstationState, now: float, seen: Seen | None, region: str | None = None) -> list[str]:
    return [_STATE.line(s.ts, {"substation_id": id_, "region": region}, {
        "capacity_kw": s.capacity_kw, "limit_kw": s.limit_kw, "load_kw": s.load_kw, "base_load_kw": s.base_load_kw,
        "granted_kw": s.granted_kw, "reserved_kw": s.reserved_kw, "headroom_kw": s.headroom_kw,
        "utilisation": s.utilisation, "sessions_total": s.sessions_total, "draining": s.draining,
        "online": s.online, "stale": s.stale, "telemetry_age_s": s.telemetry_age_s}, seen)]


def _queue(_id: str, q: QueueState, now: float, seen: Seen | None, region: str | None = None) -> list[str]:
    head_eta = q.entries[0].eta_s if q.entries else None
    return [_QUEUE.line(q.ts, {"region": region}, {"length": q.length, "head_eta_s": head_eta}, seen)]


def _assignment(id_: str, a: Assignment, now: float, seen: Seen | None, region: str | None = None) -> list[str]:
    return [_ASSIGNMENT.line(a.ts, {"status": a.status, "substation_id": a.substation_id, "reason": a.reason,
                                     "region": region},
                             {"ev_id": id_, "granted_kw": a.granted_kw or 0.0, "position": a.position,
                              "eta_s": a.eta_s}, seen)]


def _session(id_: str, e: SessionEvent, now: float, seen: Seen | None, region: str | None = None) -> list[str]:
    return [_SESSION.line(e.ts, {"substation_id": id_, "event": e.event, "reason": e.reason, "region": region},
                          {"ev_id": e.ev_id, "session_id": e.session_id, "granted_kw": e.granted_kw,
                           "energy_delivered_kwh": e.energy_delivered_kwh}, seen)]


#: What the recorder subscribes to: topic kind -> (payload model, translation).
TRANSLATIONS: dict[TopicKind, tuple[Any, Callable[[str, Any, float, Seen | None, str | None], list[str]]]] = {
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


def to_lines(kind: TopicKind, id_: str | None, message: msgspec.Struct, now: float,
             seen: Seen | None = None, region: str = DEFAULT_REGION) -> list[str]:
    """Lines for one decoded message of ``kind`` received on a topic with id ``id_`` (``seen``: see
    :meth:`LineFormat.line`) in ``region``: tagged ``region`` outside the default region only, so the series
    recorded before regions existed keep their identity (no tag = ``default``)."""
    claimed = body_id(kind, message)
    if claimed is not None and id_ is not None and claimed != id_:
        raise IdMismatch(f"body says {claimed!r}, topic says {id_!r}")
    _model, translate = TRANSLATIONS[kind]
    return translate(id_ or "", message, now, seen, None if region == DEFAULT_REGION else region)


# --- reading a line back (tests, debugging) ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Point:
    """A line read back: measurement, tags (in line order), typed fields and the timestamp in µs."""

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, FieldValue], ...]
    ts_us: int

    def tag(self, name: str) -> str | None:
        return dict(self.tags).get(name)

    def field(self, name: str) -> FieldValue | None:
        return dict(self.fields).get(name)

    @classmethod
    def parse(cls, line: str) -> Point:
        """Parse one line as :class:`LineFormat` writes it (the inverse of its escaping)."""
        tokens = _scan(line)
        measurement, _, sep = tokens[0]
        tags: list[tuple[str, str]] = []
        i = 1
        while sep == ",":  # ,key=value pairs until the space before the fields
            tags.append((tokens[i][0], tokens[i + 1][0]))
            sep = tokens[i + 1][2]
            i += 2
        fields: list[tuple[str, FieldValue]] = []
        while True:
            key = tokens[i][0]
            raw, quoted, sep = tokens[i + 1]
            fields.append((key, raw if quoted else int(raw[:-1]) if raw.endswith("i") else float(raw)))
            i += 2
            if sep != ",":
                break
        return cls(measurement, tuple(tags), tuple(fields), int(tokens[i][0]))


def _scan(line: str) -> list[tuple[str, str, str]]:
    """Tokens of a line: (text unescaped, '"' when it was a string value else '', the separator after it)."""
    tokens: list[tuple[str, str, str]] = []
    buf: list[str] = []
    quoted = in_string = False
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if ch == "\\" and i + 1 < n:
            nxt = line[i + 1]
            buf.append("\n" if nxt == "n" else nxt)
            i += 2
            continue
        if in_string:
            if ch == '"':
                in_string = False
            else:
                buf.append(ch)
        elif ch == '"' and not buf:
            in_string = quoted = True
        elif ch in " ,=":
            tokens.append(("".join(buf), '"' if quoted else "", ch))
            buf, quoted = [], False
        else:
            buf.append(ch)
        i += 1
    tokens.append(("".join(buf), '"' if quoted else "", ""))
    return tokens
