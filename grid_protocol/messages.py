"""One typed model per message of the contract (msgspec Structs, validated at decode time).

Units are in the field names (``_kw``, ``_kwh``, ``_minutes``); ``ts`` fields are Unix epoch seconds.
Unknown fields are ignored so that newer publishers can add fields without breaking older readers.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta

from grid_protocol.ids import ID_PATTERN, REQUEST_ID_PATTERN

# ``(?!\n)``: in Python's re (used by msgspec) ``$`` also matches before a final newline, which
# would let "EV_1\n" through; the look-ahead closes that and means nothing to ECMA regexes.
_STRICT_ID = ID_PATTERN + r"(?!\n)"
_STRICT_REQUEST_ID = REQUEST_ID_PATTERN + r"(?!\n)"
Id = Annotated[str, Meta(pattern=_STRICT_ID, description=f"EV or substation id, {ID_PATTERN}")]
RequestId = Annotated[str, Meta(pattern=_STRICT_REQUEST_ID, description="Client-chosen request id")]
SessionId = Annotated[str, Meta(pattern=_STRICT_REQUEST_ID, description="Balancer-issued session id")]
InstanceId = Annotated[str, Meta(pattern=_STRICT_ID, description="A balancer process's start id")]
Kw = Annotated[float, Meta(ge=0, le=1_000_000, description="Power in kW")]
RequestKw = Annotated[float, Meta(gt=0, le=1_000, description="Requested power in kW")]
Kwh = Annotated[float, Meta(gt=0, le=10_000, description="Energy in kWh")]
Minutes = Annotated[float, Meta(gt=0, le=10_080, description="Duration in minutes (at most 7 days)")]
Timestamp = Annotated[float, Meta(ge=0, le=1e11, description="Unix epoch seconds")]
Priority = Annotated[int, Meta(ge=0, le=9, description="0 (default) to 9 (most urgent)")]
Reason = Annotated[str, Meta(max_length=64)]
Detail = Annotated[str, Meta(max_length=512)]
#: The grid region a substation belongs to (a future topic level, so the id rule applies).
Region = Annotated[str, Meta(pattern=_STRICT_ID, description=f"Grid region of a substation, {ID_PATTERN}")]
DEFAULT_REGION = "default"

AssignmentStatus = Literal["assigned", "queued", "rejected", "updated", "revoked", "completed", "cancelled"]
#: Every status an :class:`Assignment` may carry, in the contract's order.
ASSIGNMENT_STATUSES: tuple[AssignmentStatus, ...] = get_args(AssignmentStatus)
#: Final: the request is closed and nothing more is said about it (docs/protocol.md "Request lifecycle").
FINAL_STATUSES: frozenset[AssignmentStatus] = frozenset({"rejected", "completed", "cancelled"})
#: The request holds a running session: the EV charges at up to ``granted_kw``.
CHARGING_STATUSES: frozenset[AssignmentStatus] = frozenset({"assigned", "updated"})


class ChargeRequest(msgspec.Struct, kw_only=True):
    """EV -> balancer on ``ev/{ev_id}/request``.

    ``request_id`` is optional for hand testing (the balancer then makes one up, and a redelivery
    cannot be recognised). At least one of ``duration_minutes`` or ``energy_kwh`` is required.
    """

    requested_kw: RequestKw
    request_id: RequestId | None = None
    ev_id: Id | None = None
    duration_minutes: Minutes | None = None
    energy_kwh: Kwh | None = None
    min_kw: Annotated[float, Meta(ge=0, le=1_000)] | None = None
    priority: Priority = 0
    #: When the EV leaves (epoch seconds). With ``energy_kwh`` it lets the deadline-aware policy give the
    #: EV the power it needs to finish in time.
    departure: Timestamp | None = None
    #: Void after this moment (epoch seconds): whoever sent it no longer waits for the answer. The balancer refuses
    #: a new request received later (``rejected``, reason ``expired``) instead of placing it; the replacement of
    #: MQTT 5's message expiry, which MQTT 3.1.1 lacks (docs/protocol.md "MQTT 3.1.1"). Compares two machines'
    #: clocks: keep them synchronised (NTP).
    expires_at: Timestamp | None = None

    def __post_init__(self) -> None:
        if self.duration_minutes is None and self.energy_kwh is None:
            raise ValueError("one of duration_minutes or energy_kwh is required")
        if self.min_kw is not None and self.min_kw > self.requested_kw:
            raise ValueError("min_kw must not exceed requested_kw")


class Release(msgspec.Struct, kw_only=True):
    """EV -> balancer on ``ev/{ev_id}/release``: stop the running session or withdraw the queued request.

    With neither id given, whatever the EV has open is released.
    """

    request_id: RequestId | None = None
    session_id: SessionId | None = None
    ev_id: Id | None = None


class Assignment(msgspec.Struct, kw_only=True, gc=False):
    """Balancer -> EV on ``ev/{ev_id}/assignment``. The balancer always writes every key (``null`` when
    not applicable); readers need only the four without defaults."""

    # gc=False: the balancer keeps one per open request and per recent final answer (100k and more at grid scale)
    # and no field ever refers back, so the cyclic GC need not scan them (tracked, they were nearly all of a full
    # collection's work at 1,000 substations x 100k EVs: bench scale).

    request_id: RequestId | None
    ev_id: Id
    status: AssignmentStatus
    ts: Timestamp
    substation_id: Id | None = None
    granted_kw: Kw | None = None
    session_id: SessionId | None = None
    reason: Reason | None = None
    detail: Detail | None = None
    position: Annotated[int, Meta(ge=1)] | None = None
    #: ``queued``: estimated wait in seconds (from running sessions' expected ends); null when unknown.
    eta_s: Annotated[float, Meta(ge=0)] | None = None


class Telemetry(msgspec.Struct, kw_only=True):
    """Substation agent -> all on ``substation/{substation_id}/telemetry``."""

    substation_id: Id
    ts: Timestamp
    seq: Annotated[int, Meta(ge=0)]
    capacity_kw: Annotated[float, Meta(gt=0, le=1_000_000)]
    load_kw: Kw
    base_load_kw: Kw
    ev_load_kw: Kw
    active_sessions: Annotated[int, Meta(ge=0)]


class SubstationStatus(msgspec.Struct, kw_only=True):
    """Retained on ``substation/{substation_id}/status``; the last will carries ``offline``.

    An agent that sees the balancer's ``online`` status re-announces every session it runs (``running``
    events) and then publishes ``online`` with ``announced_for`` = that balancer's ``instance`` and the number
    of ``sessions`` it announced: the balancer then knows the agent's whole inventory (a restarted balancer
    waits for it before acting on queued input; any balancer drops sessions the agent no longer has).
    ``region``: the grid region the agent says it belongs to (its last will says it too); absent means
    ``default``.
    """

    state: Literal["online", "offline"]
    substation_id: Id | None = None
    ts: Timestamp | None = None
    capacity_kw: Annotated[float, Meta(gt=0, le=1_000_000)] | None = None
    announced_for: InstanceId | None = None
    sessions: Annotated[int, Meta(ge=0)] | None = None
    region: Region = DEFAULT_REGION


class SessionCommand(msgspec.Struct, kw_only=True):
    """One command to an agent (an element of :class:`SessionCommands`).

    ``start`` carries what the agent needs to run the session and to describe it back to a
    restarted balancer (``request_id``, ``min_kw``, ``priority``: see ``running`` events).
    """

    command: Literal["start", "update", "stop"]
    session_id: SessionId
    ev_id: Id
    ts: Timestamp
    granted_kw: Kw = 0.0
    energy_kwh: Kwh | None = None
    duration_minutes: Minutes | None = None
    reason: Reason | None = None
    request_id: RequestId | None = None
    min_kw: Kw | None = None
    priority: Priority = 0


class SessionCommands(msgspec.Struct, kw_only=True):
    """Balancer -> agent on ``substation/{substation_id}/command``: one or more commands, applied in order.

    The balancer batches every command it decides for a substation while handling one burst of
    input into one message (at most ``MAX_COMMANDS_PER_MESSAGE``): a burst of requests costs the
    agent a few messages instead of one each. Order within a batch is the order to apply them:
    reductions and stops come before starts.
    """

    ts: Timestamp
    commands: Annotated[list[SessionCommand], Meta(min_length=0, max_length=100)]
    #: Lease: the agent drops every session of this substation to 0 kW if no newer batch arrives by then.
    #: The balancer renews it (an empty batch is a pure renewal) well before it lapses.
    valid_until: Timestamp | None = None
    #: Fencing (cluster mode): the epoch of the balancer's region lease (the NATS KV revision that acquired it).
    #: An agent keeps the highest epoch it has seen and refuses, with no effect, a batch of a lower one (or one
    #: without an epoch once it has seen one): an old owner that woke up after losing its lease cannot act.
    #: None in single-node mode (one balancer, no lease).
    epoch: Annotated[int, Meta(ge=1)] | None = None


#: 100 worst-case commands (longest ids and reasons) stay well below the broker's 64 KiB message limit.
MAX_COMMANDS_PER_MESSAGE = 100
#: Decode limit for the command topic (the broker's message_size_limit); other payloads use 4096.
MAX_COMMAND_PAYLOAD_BYTES = 65536


class SessionEvent(msgspec.Struct, kw_only=True):
    """Agent -> balancer on ``substation/{substation_id}/session``.

    ``started`` and ``ended`` follow the session's life. ``running`` re-announces a session that is
    still charging, sent for every session whenever the balancer's status turns ``online``: a
    restarted balancer adopts the sessions it no longer knows instead of double-booking their EVs.
    ``energy_kwh``/``duration_minutes`` are what is left of the session's targets at ``ts``.
    """

    event: Literal["started", "ended", "running"]
    session_id: SessionId
    ev_id: Id
    ts: Timestamp
    substation_id: Id | None = None
    reason: Reason | None = None
    energy_delivered_kwh: Annotated[float, Meta(ge=0, le=10_000)] | None = None
    request_id: RequestId | None = None
    granted_kw: Kw | None = None
    min_kw: Kw | None = None
    priority: Priority | None = None
    energy_kwh: Annotated[float, Meta(ge=0, le=10_000)] | None = None
    duration_minutes: Annotated[float, Meta(ge=0, le=10_080)] | None = None


class BalancerStatus(msgspec.Struct, kw_only=True):
    """Retained on ``balancer/status``; the balancer's last will carries ``offline``.

    ``instance`` is new with every start of the balancer process: agents answer it with their inventory
    (see :class:`SubstationStatus`).
    """

    state: Literal["online", "offline"]
    instance: InstanceId | None = None
    ts: Timestamp | None = None
    version: str | None = None
    safety_margin_pct: float | None = None
    stale_after_s: float | None = None


class ErrorReport(msgspec.Struct, kw_only=True):
    """Balancer -> agent on ``substation/{substation_id}/error``: a payload from it was refused."""

    reason: Reason
    detail: Detail
    topic: str
    ts: Timestamp


# --------------------------------------------------------------------------- balancer state (retained)
#: A substation's retained state lists at most this many sessions (``sessions_total`` says how many run):
#: 150 worst-case entries (longest ids) are about 49 KB, below the broker's 64 KiB message limit.
MAX_STATE_SESSIONS = 150
#: The retained queue state lists the first this many waiting requests (``length`` counts them all); 150
#: worst-case entries are about 55 KB.
MAX_STATE_QUEUE_ENTRIES = 150
#: Decode limit for the retained state topics (the broker's message_size_limit).
MAX_STATE_PAYLOAD_BYTES = 65536

Ratio = Annotated[float, Meta(ge=0, le=1_000, description="Load over capacity (1.0 = at capacity)")]


class SessionView(msgspec.Struct, kw_only=True):
    """One running session as the balancer sees it (an element of :class:`SubstationState`)."""

    session_id: SessionId
    ev_id: Id
    request_id: RequestId | None
    granted_kw: Kw
    requested_kw: Kw
    min_kw: Kw
    priority: Priority
    started_at: Timestamp
    #: when the session should end at its current grant; null when open-ended
    expected_end: Timestamp | None = None


class SubstationState(msgspec.Struct, kw_only=True):
    """Balancer -> all, retained on ``substation/{substation_id}/state``: the balancer's view of one substation.

    Published when it changes, at most once per ``BALANCER_STATE_INTERVAL_S`` per substation, so
    readers (the API, dashboards) learn the whole grid from retained messages after a restart.
    ``capacity_kw`` is what the balancer plans with: the reported capacity, lowered by the operator's
    ``capacity_limit_kw`` when one is set and by the limit schedule (``schedule_limit_kw``: the lowest limit
    from now to the lead time ahead, so sessions are reduced before a limit starts). ``reserved_kw`` is what it
    granted and telemetry does not show yet.
    """

    substation_id: Id
    ts: Timestamp
    online: bool
    stale: bool
    draining: bool
    capacity_kw: Kw
    reported_capacity_kw: Kw | None
    capacity_limit_kw: Kw | None
    limit_kw: Kw
    load_kw: Kw | None
    base_load_kw: Kw | None
    granted_kw: Kw
    reserved_kw: Kw
    headroom_kw: Kw
    utilisation: Ratio
    telemetry_age_s: Annotated[float, Meta(ge=0)] | None
    sessions_total: Annotated[int, Meta(ge=0)]
    sessions: Annotated[list[SessionView], Meta(max_length=MAX_STATE_SESSIONS)]
    sessions_truncated: bool = False
    #: the region of the agent's latest status (``default`` until one names another)
    region: Region = DEFAULT_REGION
    #: the lowest scheduled limit from now to the planning lead time ahead (null: no entry applies)
    schedule_limit_kw: Kw | None = None
    #: what sets ``capacity_kw``: ``capacity`` (reported), ``operator`` (set_capacity) or a schedule's source
    limit_source: Annotated[str, Meta(max_length=64)] | None = None


class QueueEntry(msgspec.Struct, kw_only=True):
    """A waiting request (an element of :class:`QueueState`)."""

    ev_id: Id
    request_id: RequestId | None
    position: Annotated[int, Meta(ge=1)]
    requested_kw: Kw
    min_kw: Kw
    priority: Priority
    waiting_since: Timestamp
    eta_s: Annotated[float, Meta(ge=0)] | None = None


class QueueState(msgspec.Struct, kw_only=True):
    """Balancer -> all, retained on ``balancer/queue``: the waiting line, in order (the first
    :data:`MAX_STATE_QUEUE_ENTRIES`), published when it changes, at most once per ``BALANCER_STATE_INTERVAL_S``."""

    ts: Timestamp
    length: Annotated[int, Meta(ge=0)]
    entries: Annotated[list[QueueEntry], Meta(max_length=MAX_STATE_QUEUE_ENTRIES)]
    truncated: bool = False


ControlAction = Literal["drain", "undrain", "set_capacity", "forget"]
#: What a :class:`ControlResult` answers: a control action, or ``set_limits`` (a :class:`LimitSchedule`).
ResultAction = Literal["drain", "undrain", "set_capacity", "forget", "set_limits"]


class ControlCommand(msgspec.Struct, kw_only=True):
    """Operator -> balancer on ``balancer/control``: act on one substation.

    * ``drain``: no new sessions go there; running ones finish (they are not moved).
    * ``undrain``: it takes new sessions again.
    * ``set_capacity``: plan with at most ``capacity_kw`` there (sessions are reduced or moved at once
      when it is lower than what runs); ``capacity_kw: null`` removes the operator's limit.
    * ``forget``: the substation is decommissioned: its sessions are revoked (reason ``decommissioned``) and
      placed elsewhere or queued, the balancer drops it and clears its retained ``state``. Sent by the API's
      ``DELETE /substations/{id}`` after the agent's account is revoked; a substation heard of again later (a new
      agent with the same id) is learnt afresh.

    Among clients only the ``api`` account (and its replicas ``api.<name>``) may publish it (broker ACL). The
    balancer answers every command with a :class:`ControlResult` on ``balancer/control/result`` carrying the same
    ``request_id``.
    """

    action: ControlAction
    substation_id: Id
    capacity_kw: Annotated[float, Meta(gt=0, le=1_000_000)] | None = None
    request_id: RequestId | None = None
    ts: Timestamp | None = None
    #: Void after this moment (epoch s): refused ``expired`` (``ControlResult``), not applied. The API sets it to
    #: now + its answer timeout (MQTT 3.1.1 has no message expiry; see ChargeRequest.expires_at).
    expires_at: Timestamp | None = None


# --------------------------------------------------------------------------- limit schedules (DSO)
#: Entries one :class:`LimitSchedule` may carry, and entries a substation's schedule may hold over every source:
#: 400 worst-case entries of :class:`ScheduleState` (plus its composite) stay below the 64 KiB message limit.
MAX_LIMIT_ENTRIES = 100
MAX_SCHEDULE_ENTRIES = 100
#: Decode limit for ``substation/{id}/limits`` and ``substation/{id}/schedule`` (the broker's message_size_limit).
MAX_SCHEDULE_PAYLOAD_BYTES = 65536
#: Names a limit's source may not take: the composite uses them for the substation's own limits.
RESERVED_SOURCES = frozenset({"capacity", "operator"})
LimitKw = Annotated[float, Meta(ge=0, le=1_000_000, description="A limit in kW (0: nothing may be drawn)")]
Source = Annotated[str, Meta(pattern=_STRICT_ID, description="Who set the limit (e.g. a DSO feed), id rule")]


class LimitEntry(msgspec.Struct, kw_only=True):
    """One time-bounded limit (an element of :class:`LimitSchedule`): at most ``limit_kw`` on the substation
    (its base load and every EV together) from ``start`` (inclusive) to ``end`` (exclusive)."""

    start: Timestamp
    end: Timestamp
    limit_kw: LimitKw
    #: Within one source a higher priority overrides a lower one where they overlap (OCPP's stack level);
    #: across sources the lowest limit always wins.
    priority: Priority = 0

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError("end must be after start")


class LimitSchedule(msgspec.Struct, kw_only=True):
    """Operator -> balancer on ``substation/{substation_id}/limits``: the limits one ``source`` sets for the
    substation (a DSO's import limits, OCPP ExternalConstraints, an OpenADR event).

    It replaces every entry that source had for the substation; ``entries: []`` withdraws the source. Entries
    already over are dropped. Answered with a :class:`ControlResult` (action ``set_limits``) on
    ``balancer/control/result``; the effective schedule is published retained on ``substation/{id}/schedule``.
    """

    source: Source
    entries: Annotated[list[LimitEntry], Meta(max_length=MAX_LIMIT_ENTRIES)]
    substation_id: Id | None = None
    request_id: RequestId | None = None
    ts: Timestamp | None = None
    #: Void after this moment (epoch s): refused ``expired``, not applied (as ControlCommand.expires_at).
    expires_at: Timestamp | None = None

    def __post_init__(self) -> None:
        if self.source in RESERVED_SOURCES:
            raise ValueError(f"source {self.source!r} is reserved (the substation's own limits)")


class ScheduleEntry(msgspec.Struct, kw_only=True):
    """An entry of a substation's schedule (an element of :class:`ScheduleState`), with its source."""

    start: Timestamp
    end: Timestamp
    limit_kw: LimitKw
    source: Source
    priority: Priority = 0


class CompositeSlot(ScheduleEntry, kw_only=True):
    """One interval of the composite schedule: the limit that applies there (the lowest) and whose it is (the
    same fields as an entry, a different meaning)."""


class ScheduleState(msgspec.Struct, kw_only=True):
    """Balancer -> all, retained on ``substation/{substation_id}/schedule``: the substation's limit schedule.

    ``entries``: every entry not yet over, by start (sources and priorities as received). ``composite``: from
    ``ts`` on, the intervals where some entry applies, each with the limit that binds there (the lowest after
    priorities within a source) and its source (OCPP's composite schedule). ``limit_kw``/``source``: what binds
    at ``ts`` (null when no entry applies). The balancer publishes it on every change and as entries expire,
    and re-reads it when it starts.
    """

    substation_id: Id
    ts: Timestamp
    limit_kw: LimitKw | None
    source: Source | None
    entries: Annotated[list[ScheduleEntry], Meta(max_length=MAX_SCHEDULE_ENTRIES)]
    composite: Annotated[list[CompositeSlot], Meta(max_length=2 * MAX_SCHEDULE_ENTRIES)]


class ControlResult(msgspec.Struct, kw_only=True):
    """Balancer -> all on ``balancer/control/result``: the outcome of a :class:`ControlCommand`. A command that
    could not be read is answered too (``ok: false``, its ``request_id`` when it can still be found in the
    payload); then ``action`` and ``substation_id`` may be null."""

    ok: bool
    action: ResultAction | None
    substation_id: Id | None
    ts: Timestamp
    request_id: RequestId | None = None
    reason: Reason | None = None
    detail: Detail | None = None
    state: SubstationState | None = None
    #: ``set_limits``: the substation's effective schedule after the change (also published retained)
    schedule: ScheduleState | None = None
