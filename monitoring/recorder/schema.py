"""The recorder's InfluxDB schema, in code: one row per measurement (tags, typed fields, source topic).

``points.py`` builds points only through this table, ``docs/recorder.md`` documents it and
``tests/unit/test_recorder_docs.py`` checks the two agree, so dashboards and Flux queries can rely on
every name here. Units are in the field names (``_kw``, ``_kwh``, ``_s``); 0/1 fields are booleans
stored as integers (one numeric type per field keeps InfluxDB's per-field typing and VictoriaMetrics happy).
Every measurement has the tag ``region`` outside the default region (absent = ``default``, issue 12).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from grid_protocol.topics import TopicKind


class FieldType(StrEnum):
    """InfluxDB line-protocol field types used here."""

    FLOAT = "float"
    INTEGER = "integer"
    STRING = "string"


F, N, S = FieldType.FLOAT, FieldType.INTEGER, FieldType.STRING  # short names keep the table readable


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measurement: where its points come from, what identifies a series, what is measured."""

    name: str
    source: TopicKind
    tags: tuple[str, ...]
    fields: Mapping[str, FieldType]
    summary: str


def _m(name: str, source: TopicKind, tags: tuple[str, ...], fields: dict[str, FieldType], summary: str) -> Measurement:
    return Measurement(name, source, tags, MappingProxyType(fields), summary)


MEASUREMENTS: tuple[Measurement, ...] = (
    _m("substation_telemetry", TopicKind.SUBSTATION_TELEMETRY, ("substation_id", "region"),
       {"capacity_kw": F, "load_kw": F, "base_load_kw": F, "ev_load_kw": F, "active_sessions": N, "seq": N},
       "Measured load reported by a substation agent (every telemetry message)."),
    _m("substation_status", TopicKind.SUBSTATION_STATUS, ("substation_id", "state", "region"),
       {"online": N, "capacity_kw": F},
       "Agent online/offline (retained; offline is its last will). capacity_kw only when the agent sent it."),
    _m("substation_state", TopicKind.SUBSTATION_STATE, ("substation_id", "region"),
       {"capacity_kw": F, "limit_kw": F, "load_kw": F, "base_load_kw": F, "granted_kw": F, "reserved_kw": F,
        "headroom_kw": F, "utilisation": F, "sessions_total": N, "draining": N, "online": N, "stale": N,
        "telemetry_age_s": F},
       "The balancer's view of a substation (retained, on change). load_kw, base_load_kw and "
       "telemetry_age_s are absent while it has no telemetry."),
    _m("balancer_queue", TopicKind.BALANCER_QUEUE, ("region",),
       {"length": N, "head_eta_s": F},
       "Length of the balancer's waiting line (retained, on change); head_eta_s when the first has an ETA."),
    _m("ev_assignment", TopicKind.EV_ASSIGNMENT, ("status", "substation_id", "reason", "region"),
       {"ev_id": S, "granted_kw": F, "position": N, "eta_s": F},
       "Every answer to an EV. ev_id is a field (unbounded: never a tag); granted_kw is 0 when nothing is "
       "granted; position and eta_s only when queued; tags substation_id and reason only when set."),
    _m("session_event", TopicKind.SUBSTATION_SESSION, ("substation_id", "event", "reason", "region"),
       {"ev_id": S, "session_id": S, "granted_kw": F, "energy_delivered_kwh": F},
       "Session started/ended/running, from the agent. ev_id and session_id are string fields (unbounded: "
       "never tags; VictoriaMetrics stores string fields as 0); reason only on ended."),
)

SCHEMA: Mapping[str, Measurement] = MappingProxyType({m.name: m for m in MEASUREMENTS})
BY_SOURCE: Mapping[TopicKind, Measurement] = MappingProxyType({m.source: m for m in MEASUREMENTS})
