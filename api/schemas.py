"""Request and response bodies of the HTTP API (pydantic: they make the OpenAPI schema, with examples).

The MQTT payloads stay msgspec models in :mod:`grid_protocol`; these describe what the API answers,
which is the MQTT view plus what the API derives (staleness, condition, totals, pagination).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grid_protocol.ids import ID_PATTERN, REQUEST_ID_PATTERN
from grid_protocol.messages import AssignmentStatus

Id = Annotated[str, Field(pattern=ID_PATTERN, description="EV or substation id", examples=["north"])]
Kw = Annotated[float, Field(description="Power in kW")]
Condition = Literal["ok", "draining", "overloaded", "stale", "offline"]
SessionStatus = Literal["charging", "reduced", "paused"]

_SUB_EXAMPLE: dict[str, Any] = {
    "substation_id": "north", "region": "default", "online": True, "stale": False, "draining": False,
    "overloaded": False, "condition": "ok", "source": "balancer", "telemetry_age_s": 0.4,
    "heard_at": 1767225599.6, "state_ts": 1767225600.0,
    "capacity_kw": 400.0, "reported_capacity_kw": 400.0, "capacity_limit_kw": None, "limit_kw": 380.0,
    "load_kw": 262.5, "base_load_kw": 196.5, "granted_kw": 66.0, "reserved_kw": 0.0, "headroom_kw": 117.5,
    "utilisation": 0.6563, "sessions_total": 3,
}
_ASSIGNMENT_EXAMPLE: dict[str, Any] = {
    "request_id": "api-5f0c2a9e4b1d4c1e", "ev_id": "EV_1234", "status": "assigned", "ts": 1767225600.2,
    "substation_id": "south", "granted_kw": 22.0, "session_id": "9f1c0e2a-17", "reason": None, "detail": None,
    "position": None, "eta_s": None,
}


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; some problems add members (``errors``, ``answer``, ``request_id``, ``checks``)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "type": "urn:gridlb:problem:not-found", "title": "Not Found", "status": 404,
        "detail": "no substation 'west'", "instance": "/substations/west"}]})

    type: str = Field("about:blank", description="Problem kind: urn:gridlb:problem:<name>, or about:blank")
    title: str
    status: int
    detail: str
    instance: str | None = None


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "version": "0.1.0",
                                                              "uptime_s": 12.5}]})
    status: Literal["ok"]
    version: str
    uptime_s: float


class ReadyChecks(BaseModel):
    mqtt_connected: bool
    substation_data: bool = Field(description="some substation data (state or telemetry) is fresh")
    substations_known: int
    freshest_data_age_s: float | None
    balancer: Literal["online", "offline", "unknown"]


class Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True, "checks": {
        "mqtt_connected": True, "substation_data": True, "substations_known": 3, "freshest_data_age_s": 0.3,
        "balancer": "online"}}]})
    ready: bool
    checks: ReadyChecks


class BalancerInfo(BaseModel):
    state: Literal["online", "offline", "unknown"] = Field(description="from the retained balancer/status")
    ts: float | None
    version: str | None
    age_s: float | None = Field(description="seconds since the status was published")


class Substation(BaseModel):
    """One substation: the balancer's retained view, with what the API derives (staleness, condition)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_SUB_EXAMPLE]})

    substation_id: str
    region: str = Field(description="the region its agent reports (SUBSTATION_REGION; 'default' when none)")
    online: bool = Field(description="false when its retained status or the balancer says offline")
    stale: bool = Field(description="no telemetry for API_STALE_AFTER_S (or the balancer says stale)")
    draining: bool = Field(description="an operator drained it: no new sessions")
    overloaded: bool = Field(description="measured load above capacity")
    condition: Condition = Field(description="one word for the page's colour: offline > stale > overloaded > "
                                             "draining > ok")
    source: Literal["balancer", "telemetry", "status"] = Field(
        description="balancer: from its retained state; telemetry/status: the balancer has published none yet")
    telemetry_age_s: float | None
    heard_at: float | None = Field(description="when its latest measurement was received (epoch s): "
                                               "now - telemetry_age_s")
    state_ts: float | None = Field(description="when the balancer published the state")
    capacity_kw: float | None = Field(description="what the balancer plans with (reported, lowered by the "
                                                  "operator's limit)")
    reported_capacity_kw: float | None
    capacity_limit_kw: float | None = Field(description="operator's limit (PUT /substations/{id}/capacity)")
    limit_kw: float | None = Field(description="capacity less the safety margin: grants + base load stay below")
    load_kw: float | None = Field(description="latest measured load")
    base_load_kw: float | None
    granted_kw: float | None = Field(description="sum of the running sessions' grants")
    reserved_kw: float | None = Field(description="granted but not yet visible in telemetry")
    headroom_kw: float | None
    utilisation: float | None = Field(description="load over capacity (1.0 = at capacity)")
    sessions_total: int
    schedule_limit_kw: float | None = Field(None, description="the lowest scheduled limit from now to the planning "
                                                              "lead time (GET /substations/{id}/limits)")
    limit_source: str | None = Field(None, description="what sets capacity_kw: capacity, operator or a schedule's "
                                                       "source")


class Totals(BaseModel):
    """Over the substations that are online; offline ones are counted apart, decommissioned ones not at all."""

    substations: int = Field(description="substations listed (online and offline)")
    online: int
    offline: int
    stale: int = Field(description="online, but no recent telemetry (no new sessions go there)")
    draining: int
    overloaded: int
    capacity_kw: float = Field(description="capacity of the online substations")
    usable_capacity_kw: float = Field(description="capacity of online, fresh substations")
    load_kw: float = Field(description="load of the online substations")
    granted_kw: float
    headroom_kw: float = Field(description="headroom of online, fresh substations")
    utilisation: float | None = Field(description="load_kw / capacity_kw")
    sessions: int
    queue_length: int
    offline_capacity_kw: float = Field(description="last known capacity of offline substations (not in capacity_kw)")
    offline_load_kw: float = Field(description="last load reported by the offline substations (not in load_kw)")
    decommissioned: int = Field(description="substations removed recently (DELETE /substations/{id}), in no total")


class Decommissioned(BaseModel):
    substation_id: str
    at: float = Field(description="when this API saw it forgotten")
    capacity_kw: float | None = Field(description="its capacity when it was removed")


class Event(BaseModel):
    """One line of the operator's event log."""

    id: int = Field(description="increasing; a client that has seen id N needs only the newer ones")
    ts: float
    kind: Literal["drain", "undrain", "capacity", "schedule", "revoked", "stale", "offline", "overloaded", "recovered",
                  "decommissioned", "account_added", "account_removed", "balancer_online", "balancer_offline"]
    text: str
    substation_id: str | None
    ev_id: str | None
    count: int = Field(description="revocations merged into this line (a burst on one substation)")


class EventLog(BaseModel):
    events: list[Event] = Field(description="newest first")


class TrendSeries(BaseModel):
    t: list[float] = Field(description="sample times (epoch seconds), oldest first")
    load_kw: list[float | None]
    ev_load_kw: list[float | None]
    limit_kw: list[float | None] = Field(description="capacity less the safety margin (operator limits included)")


class Trends(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "step_s": 10.0, "window_s": 900.0, "substations": {"north": {
            "t": [1767225590.0, 1767225600.0], "load_kw": [250.1, 262.5], "ev_load_kw": [44.0, 66.0],
            "limit_kw": [380.0, 380.0]}}}]})
    step_s: float = Field(description="at most one sample per substation this often")
    window_s: float
    substations: dict[str, TrendSeries]


class WhoAmI(BaseModel):
    name: str | None = Field(description="the token's name; null without a token (open reads)")
    role: Literal["operator", "ev", "viewer"] | None
    may_read_grid: bool
    may_operate: bool


class QueueEntry(BaseModel):
    ev_id: str
    request_id: str | None
    position: int
    requested_kw: float
    min_kw: float
    priority: int
    waiting_since: float
    eta_s: float | None = None


class Queue(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "known": True, "ts": 1767225600.0, "length": 1, "truncated": False, "entries": [{
            "ev_id": "EV_0042", "request_id": "r-17", "position": 1, "requested_kw": 22.0, "min_kw": 1.4,
            "priority": 0, "waiting_since": 1767225590.0, "eta_s": 120.0}]}]})
    known: bool = Field(description="false until the balancer's retained queue was received")
    ts: float | None
    length: int = Field(description="all waiting requests (entries lists the first ones)")
    truncated: bool
    entries: list[QueueEntry]


class Assignment(BaseModel):
    """The balancer's answer on ``ev/{ev_id}/assignment`` (see docs/protocol.md)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_ASSIGNMENT_EXAMPLE]})
    request_id: str | None
    ev_id: str
    status: AssignmentStatus
    ts: float
    substation_id: str | None = None
    granted_kw: float | None = None
    session_id: str | None = None
    reason: str | None = None
    detail: str | None = None
    position: int | None = None
    eta_s: float | None = None


class Status(BaseModel):
    ts: float
    mqtt_connected: bool
    balancer: BalancerInfo
    totals: Totals = Field(description="over the whole grid, whatever region or limit is asked for")
    substations: list[Substation] = Field(description="by id, or worst first with order=worst; only the region "
                                                      "asked for; at most `limit`")
    substations_matched: int = Field(description="substations of the region asked for (all without one), before "
                                                 "the limit")
    decommissioned: list[Decommissioned] = Field(description="removed recently, newest first (this API instance)")
    queue: Queue = Field(description="the first 10 waiting requests")
    latest_assignments: list[Assignment] = Field(description="newest first, as seen by this API instance; without "
                                                             "probe noise (nothing_to_release) unless noise=true")
    events: list[Event] = Field(description="the event log, newest first (GET /event-log has more)")


CompactValue = str | float | int | bool | None


class StatusCompact(Status):
    """``GET /status?compact=true``: each substation one array of ``fields`` (about a quarter of the bytes)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"fields": ["substation_id", "region", "..."]}]})

    fields: list[str] = Field(description="the names of a compact substation's values, in order")
    substations: list[list[CompactValue]] = Field(  # type: ignore[assignment]
        description="one array per substation (values in the order of `fields`): kW to 0.1, utilisation to "
                    "0.001, heard_at only while stale or offline")


class Session(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "session_id": "9f1c0e2a-17", "ev_id": "EV_1234", "substation_id": "south", "request_id": "r-1",
        "status": "charging", "granted_kw": 22.0, "requested_kw": 22.0, "min_kw": 1.4, "priority": 0,
        "started_at": 1767225600.2, "expected_end": 1767232800.2}]})
    session_id: str
    ev_id: str
    substation_id: str
    request_id: str | None
    status: SessionStatus = Field(description="charging: full grant; reduced: less than requested; paused: 0 kW")
    granted_kw: float
    requested_kw: float
    min_kw: float
    priority: int
    started_at: float
    expected_end: float | None


class SessionPage(BaseModel):
    total: int = Field(description="sessions matching the filters")
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")
    truncated: bool = Field(description="a substation runs more sessions than its retained state lists")
    items: list[Session]


class Ev(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ev_id": "EV_1234", "state": "charging", "session": {
            "session_id": "9f1c0e2a-17", "ev_id": "EV_1234", "substation_id": "south", "request_id": "r-1",
            "status": "charging", "granted_kw": 22.0, "requested_kw": 22.0, "min_kw": 1.4, "priority": 0,
            "started_at": 1767225600.2, "expected_end": 1767232800.2},
        "queue_entry": None, "last_answer": _ASSIGNMENT_EXAMPLE}]})
    ev_id: str
    state: Literal["charging", "queued", "idle"]
    session: Session | None
    queue_entry: QueueEntry | None
    last_answer: Assignment | None = Field(description="the latest answer this API instance saw (live only)")


class ChargeIn(BaseModel):
    """The original HTTP design's body (``ev_id``, ``requested_kw``, ``duration_minutes``) plus the MQTT
    request's optional fields."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"ev_id": "EV_1234", "requested_kw": 22, "duration_minutes": 120},
        {"ev_id": "EV_0042", "requested_kw": 11, "energy_kwh": 30, "min_kw": 3.7, "priority": 2,
         "request_id": "trip-2026-01-01-1"},
    ]})

    ev_id: Id = Field(examples=["EV_1234"])
    requested_kw: float = Field(gt=0, le=1000, description="kW asked for")
    duration_minutes: float | None = Field(None, gt=0, le=10_080)
    energy_kwh: float | None = Field(None, gt=0, le=10_000)
    min_kw: float | None = Field(None, ge=0, le=1000, description="smallest grant worth having")
    priority: int = Field(0, ge=0, le=9)
    departure: float | None = Field(None, ge=0, le=1e11, description="epoch seconds the EV leaves")
    expires_at: float | None = Field(None, ge=0, le=1e11,
                                     description="epoch seconds after which the request is void (refused "
                                                 "``expired``, not placed); default: now + the API's answer timeout")
    request_id: str | None = Field(None, pattern=REQUEST_ID_PATTERN,
                                   description="retry with the same id after a 504: the balancer answers "
                                               "the same request again instead of opening a second one")

    @model_validator(mode="after")
    def _check(self) -> ChargeIn:
        if self.duration_minutes is None and self.energy_kwh is None:
            raise ValueError("one of duration_minutes or energy_kwh is required")
        if self.min_kw is not None and self.min_kw > self.requested_kw:
            raise ValueError("min_kw must not exceed requested_kw")
        return self


class CapacityIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"capacity_kw": 300},
                                                                             {"capacity_kw": None}]})
    capacity_kw: float | None = Field(..., gt=0, le=1_000_000,
                                      description="operator limit in kW; null removes it")


class ControlOutcome(BaseModel):
    """The balancer's answer to an operator action (``balancer/control/result``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ok": True, "action": "drain", "substation_id": "north", "request_id": "api-1c9e", "ts": 1767225600.0,
        "reason": None, "detail": None, "substation": _SUB_EXAMPLE | {"draining": True, "condition": "draining"}}]})
    ok: bool
    action: Literal["drain", "undrain", "set_capacity"]
    substation_id: str
    request_id: str | None
    ts: float
    reason: str | None
    detail: str | None
    substation: Substation | None = Field(description="the substation after the action")


class WithdrawOutcome(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ev_id": "EV_0999", "answer": _ASSIGNMENT_EXAMPLE | {"status": "cancelled", "reason": "released",
                                                             "substation_id": None, "granted_kw": None,
                                                             "session_id": None}}]})
    ev_id: str
    answer: Assignment = Field(description="the balancer's cancelled (queued request) or completed (session) answer")


class ReleaseOutcome(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "session_id": "9f1c0e2a-17", "ev_id": "EV_1234", "substation_id": "south",
        "answer": _ASSIGNMENT_EXAMPLE | {"status": "completed", "reason": "released"}}]})
    session_id: str
    ev_id: str
    substation_id: str
    answer: Assignment = Field(description="the balancer's completed (or cancelled) answer")


# ------------------------------------------------------------------------------------------------ accounts
class SubstationIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"substation_id": "east",
                                                                               "capacity_kw": 300}]})
    substation_id: Id
    capacity_kw: float | None = Field(None, gt=0, le=1_000_000,
                                      description="only for the agent command in the answer (the agent reports "
                                                  "its capacity itself)")


class EvIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ev_id": "EV_9000"}]})
    ev_id: Id


class AccountCreated(BaseModel):
    """A broker account, created now. The password is shown once: it is stored only as a hash."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "east", "username": "substation.east", "password": "Zr0t0k3n-once-only-xxxxxxxxxxxx",
        "mqtt_url": "mqtt://127.0.0.1:1884",
        "command": "MQTT_HOST=127.0.0.1 MQTT_PORT=1884 MQTT_PASSWORD='…' SUBSTATIONS=east:300 METRICS_PORT=0 "
                   "python -m substation_agents"}]})
    id: str = Field(description="the substation or EV id")
    username: str = Field(description="its broker username (substation.<id>, or the EV id)")
    password: str = Field(description="shown once")
    mqtt_url: str = Field(description="the broker as clients reach it (API_MQTT_PUBLIC_URL)")
    command: str = Field(description="how to start its agent (substations) or where it publishes (EVs)")


class SubstationRemoved(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "substation_id": "east", "account_removed": True, "balancer": "forgotten", "sessions_moved": 2,
        "detail": "forgotten; 2 session(s) moved elsewhere or back in the queue"}]})
    substation_id: str
    account_removed: bool = Field(description="false: it had no broker account (retained data cleared anyway)")
    balancer: Literal["forgotten", "unknown"] = Field(description="unknown: the balancer had never heard of it")
    sessions_moved: int = Field(description="its sessions when it was removed: revoked and placed elsewhere or "
                                            "queued")
    detail: str | None


class EvRemoved(BaseModel):
    ev_id: str
    account_removed: bool
    released: Assignment | None = Field(description="its request or session, ended first (null: nothing open)")


class LimitEntryIn(BaseModel):
    """One limit of a source's schedule: at most ``limit_kw`` on the substation from ``start`` to ``end``."""

    model_config = ConfigDict(extra="forbid")
    start: float = Field(..., ge=0, le=1e11, description="epoch seconds (inclusive)")
    end: float = Field(..., ge=0, le=1e11, description="epoch seconds (exclusive), after start")
    limit_kw: float = Field(..., ge=0, le=1_000_000, description="base load and EVs together; 0: nothing")
    priority: int = Field(0, ge=0, le=9, description="within the source, a higher one overrides a lower one")

    @model_validator(mode="after")
    def _ordered(self) -> LimitEntryIn:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class LimitsIn(BaseModel):
    """A source's whole schedule for the substation: replaces what it sent before; ``[]`` withdraws it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"entries": [
        {"start": 1767286800, "end": 1767297600, "limit_kw": 250}]}]})
    entries: list[LimitEntryIn] = Field(..., max_length=100)


class ScheduleSlot(BaseModel):
    start: float
    end: float
    limit_kw: float
    source: str
    priority: int = 0


class Schedule(BaseModel):
    """A substation's limit schedule as the balancer publishes it (retained ``substation/{id}/schedule``)."""

    substation_id: str
    ts: float | None = Field(description="when the balancer took it; null: it has published none")
    limit_kw: float | None = Field(description="the scheduled limit in force at ts")
    source: str | None = Field(description="whose limit that is")
    entries: list[ScheduleSlot] = Field(description="every entry not yet over, by start")
    composite: list[ScheduleSlot] = Field(description="from ts on: where an entry applies, the lowest limit and its "
                                                      "source")


class LimitsOutcome(BaseModel):
    """The balancer's answer to a schedule (``set_limits`` on ``balancer/control/result``)."""

    ok: bool
    action: Literal["set_limits"]
    substation_id: str
    request_id: str | None
    ts: float
    reason: str | None
    detail: str | None
    schedule: Schedule | None
