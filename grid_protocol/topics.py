"""Every MQTT topic of the contract, built and parsed in one place.

Nothing else in the code base formats topic strings: services call :class:`Topics`. The
:data:`CHANNELS` table is the single source for QoS, retain flag, direction and payload model;
the AsyncAPI document is checked against it.

Regions (issue 12): a region is a topic namespace. Region ``default`` keeps the prefix's own topics
(``grid/v1/ev/{id}/request``), so a single-region grid is what it always was; region ``R`` lives under
``grid/v1/region/R/`` with the same channels below it. ``Topics(prefix, region)`` (or
:meth:`Topics.for_region`) builds one region's topics; :meth:`Topics.filters_all_regions` and
:meth:`Topics.parse_any_region` serve the readers of every region (api, recorder).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from grid_protocol import messages as m
from grid_protocol.ids import checked_id, is_valid_id

DEFAULT_PREFIX = "grid/v1"
#: The topic level below the prefix under which every region but ``default`` lives.
REGION_LEVEL = "region"


class TopicKind(StrEnum):
    SUBSTATION_TELEMETRY = "substation_telemetry"
    SUBSTATION_STATUS = "substation_status"
    SUBSTATION_COMMAND = "substation_command"
    SUBSTATION_SESSION = "substation_session"
    SUBSTATION_ERROR = "substation_error"
    EV_REQUEST = "ev_request"
    EV_RELEASE = "ev_release"
    EV_ASSIGNMENT = "ev_assignment"
    SUBSTATION_STATE = "substation_state"
    BALANCER_STATUS = "balancer_status"
    BALANCER_QUEUE = "balancer_queue"
    BALANCER_CONTROL = "balancer_control"
    BALANCER_CONTROL_RESULT = "balancer_control_result"
    SUBSTATION_LIMITS = "substation_limits"
    SUBSTATION_SCHEDULE = "substation_schedule"


@dataclass(frozen=True, slots=True)
class Channel:
    """One row of the contract: where a message goes and how it is delivered."""

    kind: TopicKind
    template: str  # relative to the prefix; ``{id}`` is the EV or substation id
    publisher: str
    subscribers: str
    qos: int
    retain: bool
    payload: type
    summary: str


CHANNELS: dict[TopicKind, Channel] = {
    c.kind: c
    for c in (
        Channel(TopicKind.SUBSTATION_TELEMETRY, "substation/{id}/telemetry", "substation agent",
                "balancer, recorder, api", 0, False, m.Telemetry,
                "Measured load, periodically (default every 1 s). Loss is tolerated: staleness is detected."),
        Channel(TopicKind.SUBSTATION_STATUS, "substation/{id}/status", "substation agent (will: broker)",
                "balancer, api", 1, True, m.SubstationStatus,
                "Retained online/offline state; the agent's last will publishes offline."),
        Channel(TopicKind.SUBSTATION_COMMAND, "substation/{id}/command", "balancer", "that substation agent",
                1, False, m.SessionCommands,
                "Start, update or stop EV sessions on the substation (a batch, applied in order)."),
        Channel(TopicKind.SUBSTATION_SESSION, "substation/{id}/session", "substation agent", "balancer, recorder, api",
                1, False, m.SessionEvent, "Session lifecycle events: started, ended (with the reason)."),
        Channel(TopicKind.SUBSTATION_ERROR, "substation/{id}/error", "balancer", "that substation agent, operators",
                1, False, m.ErrorReport, "A payload from this substation was refused; says why."),
        Channel(TopicKind.SUBSTATION_STATE, "substation/{id}/state", "balancer", "api, dashboards, operators",
                1, True, m.SubstationState,
                "Retained: the balancer's view of the substation (capacity, load, reservations, headroom, "
                "draining, sessions). Published on change, at most once per second per substation."),
        Channel(TopicKind.EV_REQUEST, "ev/{id}/request", "EV", "balancer",
                1, False, m.ChargeRequest, "A charge request. Retry with the same request_id until answered."),
        Channel(TopicKind.EV_RELEASE, "ev/{id}/release", "EV", "balancer",
                1, False, m.Release, "The EV stops charging early or withdraws a queued request."),
        Channel(TopicKind.EV_ASSIGNMENT, "ev/{id}/assignment", "balancer", "that EV only",
                1, False, m.Assignment,
                "Every answer and lifecycle update for the EV: assigned, queued, rejected, updated, "
                "revoked, completed, cancelled."),
        Channel(TopicKind.BALANCER_STATUS, "balancer/status", "balancer (will: broker)", "everyone",
                1, True, m.BalancerStatus, "Retained online/offline state of the balancer."),
        Channel(TopicKind.BALANCER_QUEUE, "balancer/queue", "balancer", "api, dashboards, operators",
                1, True, m.QueueState,
                "Retained: the waiting line in order. Published on change, at most once per second."),
        Channel(TopicKind.BALANCER_CONTROL, "balancer/control", "api (operators)", "balancer",
                1, False, m.ControlCommand,
                "Operator actions: drain, undrain, set_capacity, forget. Only the api account may publish them."),
        Channel(TopicKind.BALANCER_CONTROL_RESULT, "balancer/control/result", "balancer", "api, operators",
                1, False, m.ControlResult,
                "The outcome of every control message, with its request_id (ok, or why not)."),
        Channel(TopicKind.SUBSTATION_LIMITS, "substation/{id}/limits", "api (operators)", "balancer",
                1, False, m.LimitSchedule,
                "Operator limit schedule (a DSO's time-bounded limits) of one source for the substation: replaces "
                "that source's entries. Only the api account may publish it; answered on balancer/control/result."),
        Channel(TopicKind.SUBSTATION_SCHEDULE, "substation/{id}/schedule", "balancer", "balancer, api, operators",
                1, True, m.ScheduleState,
                "Retained: the substation's limit schedule (every entry not yet over) and its composite (the "
                "lowest limit and its source per interval). The balancer re-reads it on start."),
    )
}

_BY_TAIL: dict[tuple[str, str], TopicKind] = {
    (c.template.split("/")[0], c.template.split("/")[2]): c.kind for c in CHANNELS.values() if "{id}" in c.template
}
_FIXED: dict[str, TopicKind] = {c.template: c.kind for c in CHANNELS.values() if "{id}" not in c.template}


class Topics:
    """Topic builder and parser for one prefix (``GRID_TOPIC_PREFIX``, default ``grid/v1``) and one region.

    ``prefix`` is the grid's prefix whatever the region; ``root`` is where this region's channels live
    (the prefix itself for ``default``, ``<prefix>/region/<region>`` for any other).
    """

    __slots__ = ("_parts", "_plen", "prefix", "region", "root")

    def __init__(self, prefix: str = DEFAULT_PREFIX, region: str = m.DEFAULT_REGION) -> None:
        prefix = prefix.strip("/")
        if not prefix or any(ch in prefix for ch in "+#\x00"):
            raise ValueError(f"invalid topic prefix {prefix!r}")
        checked_id(region, "region")
        self.prefix = prefix
        self.region = region
        self.root = prefix if region == m.DEFAULT_REGION else f"{prefix}/{REGION_LEVEL}/{region}"
        self._plen = len(self.root) + 1
        #: per kind, the topic split around its ``{id}`` (tail None: no id): an EV's answer topic is built per request
        self._parts: dict[TopicKind, tuple[str, str | None]] = {
            kind: (f"{self.root}/{head}", tail) if sep else (f"{self.root}/{head}", None)
            for kind, (head, sep, tail) in ((k, c.template.partition("{id}")) for k, c in CHANNELS.items())}

    def for_region(self, region: str) -> Topics:
        """The same grid's topics of ``region``."""
        return Topics(self.prefix, region)

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r}, {self.region!r})"

    # --- builders ---------------------------------------------------------------------------
    def topic(self, kind: TopicKind, id_: str | None = None) -> str:
        head, tail = self._parts[kind]
        if tail is None:
            return head
        if id_ is None or not is_valid_id(id_):
            raise ValueError(f"invalid id {id_!r} for {kind}")
        return head + id_ + tail

    def telemetry(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_TELEMETRY, substation_id)

    def substation_status(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_STATUS, substation_id)

    def command(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_COMMAND, substation_id)

    def session_events(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_SESSION, substation_id)

    def substation_error(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_ERROR, substation_id)

    def request(self, ev_id: str) -> str:
        return self.topic(TopicKind.EV_REQUEST, ev_id)

    def release(self, ev_id: str) -> str:
        return self.topic(TopicKind.EV_RELEASE, ev_id)

    def assignment(self, ev_id: str) -> str:
        return self.topic(TopicKind.EV_ASSIGNMENT, ev_id)

    def substation_state(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_STATE, substation_id)

    def balancer_status(self) -> str:
        return self.topic(TopicKind.BALANCER_STATUS)

    def balancer_queue(self) -> str:
        return self.topic(TopicKind.BALANCER_QUEUE)

    def balancer_control(self) -> str:
        return self.topic(TopicKind.BALANCER_CONTROL)

    def balancer_control_result(self) -> str:
        return self.topic(TopicKind.BALANCER_CONTROL_RESULT)

    def substation_limits(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_LIMITS, substation_id)

    def substation_schedule(self, substation_id: str) -> str:
        return self.topic(TopicKind.SUBSTATION_SCHEDULE, substation_id)

    def reply_root(self) -> str:
        """MQTT 5 response topics are honoured only below this root (see docs/protocol.md). One per grid, not per
        region: replies belong to the EV wherever it drives."""
        return f"{self.prefix}/reply/"

    def filter(self, kind: TopicKind) -> str:
        """Subscription filter matching ``kind`` for every id in this region."""
        return f"{self.root}/{CHANNELS[kind].template.replace('{id}', '+')}"

    def filters_all_regions(self, kind: TopicKind, id_: str | None = None) -> tuple[str, str]:
        """The two filters that match ``kind`` in every region: the default region's and ``region/+/...``
        (MQTT has no optional level). ``id_`` narrows them to one EV or substation (e.g. an EV's assignment)."""
        template = CHANNELS[kind].template
        if "{id}" in template:
            if id_ is not None and not is_valid_id(id_):
                raise ValueError(f"invalid id {id_!r} for {kind}")
            template = template.replace("{id}", id_ or "+")
        return (f"{self.prefix}/{template}", f"{self.prefix}/{REGION_LEVEL}/+/{template}")

    # --- parser ----------------------------------------------------------------------------
    def parse(self, topic: str) -> tuple[TopicKind, str | None] | None:
        """Return ``(kind, id)`` for a contract topic of this region, ``None`` for anything else (other regions'
        topics included).

        The id is returned even when invalid so the caller can log it; callers must check it
        with :func:`is_valid_id` before using it to build a reply topic.
        """
        if not topic.startswith(self.root) or topic[self._plen - 1 : self._plen] != "/":
            return None
        return _parse_rest(topic[self._plen :])

    def parse_any_region(self, topic: str) -> tuple[str, TopicKind, str | None] | None:
        """Return ``(region, kind, id)`` for a contract topic of any region of this prefix, else ``None``.

        ``<prefix>/region/default/...`` is not a topic (the default region has only the short form), nor is a
        region level that is not a valid region id.
        """
        plen = len(self.prefix) + 1
        if not topic.startswith(self.prefix) or topic[plen - 1 : plen] != "/":
            return None
        rest = topic[plen:]
        region = m.DEFAULT_REGION
        if rest.startswith(_REGION_HEAD):
            region, sep, rest = rest[len(_REGION_HEAD):].partition("/")
            if not sep or region == m.DEFAULT_REGION or not is_valid_id(region):
                return None
        parsed = _parse_rest(rest)
        return None if parsed is None else (region, parsed[0], parsed[1])


_REGION_HEAD = f"{REGION_LEVEL}/"


def _parse_rest(rest: str) -> tuple[TopicKind, str | None] | None:
    """``(kind, id)`` of a topic below a region's root."""
    fixed = _FIXED.get(rest)
    if fixed is not None:
        return (fixed, None)
    parts = rest.split("/")
    if len(parts) == 3:
        kind = _BY_TAIL.get((parts[0], parts[2]))
        return (kind, parts[1]) if kind is not None else None
    return None
