"""The balancer's MQTT adapter: topics in, pure core, effects out.

It owns everything the core must not know about: topic parsing, payload decoding (every bad
payload is answered, logged and counted, never raised), the clock, MQTT 5 response topics,
the retained status with its last will, and periodic ticks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import operator
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import compress, islice
from operator import is_not
from time import perf_counter
from typing import Any, NamedTuple

import msgspec

from balancer.admission import REFUSED_COST, Admission
from balancer.core import Balancer, Effect, ToEv
from balancer.core.limits import schedule_state
from balancer.core.model import w_to_kw
from balancer.core.views import StateMark, queue_state, state_mark, state_measured, substation_state
from balancer.gc_policy import GcPolicy
from balancer.operator_store import FileStore, OperatorStore
from balancer.settings import BalancerSettings
from balancer.startup import StartupGate
from grid_protocol import (
    BalancerStatus,
    ChargeRequest,
    ControlCommand,
    ControlResult,
    ErrorReport,
    LimitSchedule,
    PayloadError,
    Reason,
    Release,
    ScheduleState,
    SessionCommand,
    SessionEvent,
    SubstationStatus,
    Telemetry,
    TopicKind,
    Topics,
    decode,
    encode,
    is_valid_id,
)
from grid_protocol.ids import REQUEST_ID_PATTERN
from grid_protocol.lease import LeaseIssuer
from grid_protocol.messages import (
    DEFAULT_REGION,
    MAX_SCHEDULE_PAYLOAD_BYTES,
    QueueState,
    ResultAction,
    SessionView,
    SubstationState,
)
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import InMessage, Transport, Will, make_transport
from grid_runtime.ratelimit import RateLimitedLog

log = get_logger("balancer")
VERSION = "0.1.0"
#: Input that acts on the grid: held after a start until the grid is known (balancer/startup.py).
_ACTS_ON_GRID = frozenset({TopicKind.EV_REQUEST, TopicKind.EV_RELEASE, TopicKind.BALANCER_CONTROL,
                           TopicKind.SUBSTATION_LIMITS})
#: What EVs publish: admitted per EV, refused when retained, timed for the decision-latency histogram.
_FROM_EVS = frozenset({TopicKind.EV_REQUEST, TopicKind.EV_RELEASE})
_SHED_KEY = {kind: f"bad_payload:{kind}:{Reason.RATE_LIMITED}" for kind in TopicKind}
#: Retained states published between two looks at the socket (see publish_states_in_steps): at most this many, and
#: for at most this long (a state lists up to 150 sessions: at the bench's 6,500 sessions a substation, four took
#: ~0.4-1.3 ms in one go).
_STATE_STEP = 50
_STATE_SLICE_S = 0.0003
#: How often the periodic step forgets the admission buckets that are full again: a sweep reads only those
#: (balancer/admission.py), so the shorter the interval the fewer at once (the bench's 20,000 EVs of a second,
#: forgotten 5 s later in one go, were a 4-10 ms pause).
_SWEEP_EVERY_S = 0.5
#: Admission buckets read per slice of a sweep before the loop reads the socket again: 1,000 took ~0.1 ms in a tight
#: loop but 0.5-1.1 ms in the running balancer (its buckets cold in the cache), one of the bench's paced-p99 stalls.
_SWEEP_STEP = 250
_REQUEST_ID_RE = re.compile(rb'"request_id"\s*:\s*"(' + REQUEST_ID_PATTERN.strip("^$").encode() + rb')"')


def _request_id_hint(payload: bytes) -> str | None:
    """Best-effort request id from a payload that failed to decode, so the EV can correlate the rejection."""
    match = _REQUEST_ID_RE.search(payload[:4096])
    return match.group(1).decode() if match else None


#: Encodes a substation state's session list alone (the contract codec's settings: defaults), see _send_state.
_list_encoder = msgspec.json.Encoder()


#: A retained state is published again after this long even when nothing changed (the integrity period).
_STATE_REFRESH_S = 30.0
#: Telemetry topics kept parsed (see BalancerService.handle): one a substation, at most this many.
_TELEMETRY_TOPICS_MAX = 100_000

#: A substation state's measured numbers: the telemetry's, and what follows from them and from fields the change
#: key holds exactly (grants, capacity, online/stale/draining). Published when one moved by more than the
#: dead-band since the last publication (``BALANCER_STATE_DEADBAND_PCT``).
_MEASURED = ("load_kw", "base_load_kw", "headroom_kw", "utilisation")
_UNMEASURED = dict.fromkeys(_MEASURED)  # (in the change key: None)
_measured = operator.attrgetter(*_MEASURED)


def _moved(last: tuple[float | None, ...], now: tuple[float | None, ...], bands: tuple[float, ...]) -> bool:
    """Whether a measured number moved by more than its band since ``last`` was published; null <-> a number
    always counts."""
    for a, b, band in zip(last, now, bands, strict=True):
        if a is None or b is None:
            if a is not b:
                return True
        elif abs(b - a) > band:
            return True
    return False


def _beyond_deadband(last: tuple[float | None, ...], now: tuple[float | None, ...], capacity_kw: float,
                     ratio: float) -> bool:
    """:func:`_moved` with the dead-band of a substation of ``capacity_kw``: ``ratio`` of the capacity for the kW
    numbers, ``ratio`` itself for the utilisation (``_MEASURED``'s order)."""
    band_kw = ratio * capacity_kw
    return _moved(last, now, (band_kw, band_kw, band_kw, ratio))


class _Sent(NamedTuple):
    """The last retained state published on a topic: its change key, when, and (substation states) the session
    list it carried with that list's encoding, spliced into the next payloads while the list stands, and each
    listed view's own encoding, in the list's order (see _encode_views)."""

    # (Any, not object: mypyc, which compiles this module, fails on a NamedTuple field typed ``object``)
    key: Any
    at: float
    views: Any = None
    raw: msgspec.Raw | None = None
    parts: list[bytes] | None = None
    #: a substation state's measured numbers as published (see _MEASURED), held to the dead-band
    measured: tuple[float | None, ...] = ()
    #: the substation's ``views.state_mark`` when a state was last built and found equal to this one but for its
    #: clock fields and measured numbers (or published): while the mark stands, no state is built (see _states)
    mark: StateMark | None = None


def _encode_views(views: list[SessionView], last: _Sent | None) -> tuple[msgspec.Raw, list[bytes]]:
    """A session list's encoding, each view encoded only if it was not in the list ``last`` published: a list is
    rebuilt when one session of ~80 changes (``views.session_views`` keeps the views of the others), and encoding
    every view again was ~1.4 µs a view, ~14 ms a grid-second at 1,000 x 100k after churn. A view at the same place
    as in the last list (the same object: a grant changed elsewhere, or sessions were added at the end) takes the
    chunk from there, found by identity in C; only when places shifted (a session left) are the others looked up by
    ``id()`` (an id found in the last list is the very view: that list keeps its views alive). The views are joined
    as the encoder joins a list's items (compact JSON), so the bytes are what encoding the list whole gives
    (tests/unit/test_state_encoding.py)."""
    last_views: list[SessionView] | None = last.views if last is not None else None
    last_parts = last.parts if last is not None else None
    if last_views is None or last_parts is None:
        chunks: list[bytes] = list(map(_list_encoder.encode, views))
        return msgspec.Raw(b"[" + b",".join(chunks) + b"]"), chunks
    m = min(len(views), len(last_views))
    chunks = last_parts[:m]
    # the places whose view is not the one there before (few: those that changed), then the views added at the end
    moved = list(compress(range(m), map(is_not, views, last_views)))
    by_id: dict[int, bytes] | None = None
    if len(moved) > 2:  # (a session left: the places shifted) the others are still there, elsewhere
        by_id = dict(zip(map(id, last_views), last_parts, strict=True))
    for i in moved:
        chunk = by_id.get(id(views[i])) if by_id is not None else None
        chunks[i] = chunk if chunk is not None else _list_encoder.encode(views[i])
    for view in islice(views, m, None):
        chunk = by_id.get(id(view)) if by_id is not None else None
        chunks.append(chunk if chunk is not None else _list_encoder.encode(view))
    return msgspec.Raw(b"[" + b",".join(chunks) + b"]"), chunks


class BalancerService:
    """One region's balancer (issue 12): a region is an independent partition with its own core, startup gate,
    agent leases, retained status and MQTT session; a process owning several regions runs one of these each."""

    def __init__(self, settings: BalancerSettings, transport: Transport,
                 clock: Callable[[], float] = time.time, region: str = DEFAULT_REGION, *,
                 store: OperatorStore | None = None, epoch: int | None = None,
                 is_owner: Callable[[], bool] | None = None, gc_policy: GcPolicy | None = None) -> None:
        """``store``: where the operator's drains and capacity limits are kept (None: memory only). Cluster mode:
        ``epoch`` of the region lease (stamped on every command batch) and ``is_owner``, the lease checked locally
        (monotonic deadline) before any input is acted on and any command is published. ``gc_policy``: the process's
        (balancer/gc_policy.py), applied when the service runs and on its periodic step (None: the GC untouched)."""
        self.settings = settings
        self.gc_policy = gc_policy
        self.store = store
        self.is_owner: Callable[[], bool] = is_owner or (lambda: True)
        #: set when the lease was lost: nothing more is published, not even the offline status (the successor's)
        self.stepped_down = False
        self.transport = transport
        self.clock = clock
        self.region = region
        self.topics = Topics(settings.grid.grid_topic_prefix, region)
        #: logger ``balancer`` for the default region, ``balancer.<region>`` for any other (the region in every line)
        self.log = log if region == DEFAULT_REGION else get_logger(f"balancer.{region}")
        boot = os.urandom(4).hex()
        #: new with every start: agents answer it with their inventory (SubstationStatus.announced_for)
        self.instance = boot
        seq = iter(range(1, 1 << 62))
        self.core = Balancer(
            # An agent that reconnects within its lease keeps its sessions: hold them that long. Scheduled limits are
            # planned with early enough that a lease granted just before (a balancer that dies then) runs out first.
            dataclasses.replace(settings.core, offline_grace_s=settings.lease_s,
                                limit_lead_s=max(settings.core.limit_lead_s,
                                                 settings.lease_s + settings.core.rebalance_interval_s)),
            new_session_id=lambda: f"{boot}-{next(seq)}",
            new_request_id=lambda: f"auto-{boot}-{next(seq)}",
        )
        #: bad payloads by topic kind and reason, ignored messages, response-topic refusals
        self.counters: Counter[str] = Counter()
        #: messages received by topic kind, before admission (gridlb_balancer_received_messages_total)
        self.received: Counter[TopicKind] = Counter()
        self._reply_root = self.topics.reply_root()
        #: agent commands decided but not yet published, per substation (see _flush_commands)
        self._commands: dict[str, list[SessionCommand]] = {}
        self._flush_scheduled = False
        self._leases = LeaseIssuer(settings.lease_s, epoch)
        self._handlers = {
            TopicKind.EV_REQUEST: self._on_request,
            TopicKind.EV_RELEASE: self._on_release,
            TopicKind.SUBSTATION_TELEMETRY: self._on_telemetry,
            TopicKind.SUBSTATION_STATUS: self._on_status,
            TopicKind.SUBSTATION_SESSION: self._on_session_event,
        }
        #: what was last published per retained state topic (see _send_state)
        self._state_sent: dict[str, _Sent] = {}
        #: substation states built by the periodic publication, and looks that found nothing to build (see _states)
        self.state_counts: Counter[str] = Counter()
        #: each substation's state topic, and telemetry topics already parsed (valid id: kind, id), see handle
        self._state_topics: dict[str, str] = {}
        self._telemetry_topics: dict[str, tuple[TopicKind, str]] = {}
        #: when the periodic step next sweeps the admission buckets and publishes the retained states (see periodic)
        self._next_sweep = self._next_state = -math.inf
        self._sweep_due = False  # (an admission sweep is due: periodic marks it, sweep_in_steps runs it)
        #: called with the seconds each EV request or release took to decide and publish (metrics)
        self.observe_decision: Callable[[float], None] | None = None
        #: input that acts on the grid waits here until the grid is known (see balancer/startup.py)
        self.startup: StartupGate[InMessage] = StartupGate(time.monotonic(), settings.startup_wait_s,
                                                            settings.startup_buffer_max)
        self._ev_admission = Admission(settings.ev_rate_per_s, settings.ev_burst)
        self._shed_log = RateLimitedLog(self.log.warning, interval_s=10.0)
        self._refusal_log = RateLimitedLog(self.log.warning, interval_s=10.0)
        self._telemetry_admission = Admission(settings.telemetry_rate_per_s, settings.telemetry_burst)
        transport.set_handler(self.handle)
        for kind in self._handlers:
            # Retain as published: a request or release sent with the retain flag is seen as such and refused
            # (a retained request would be replayed to every future balancer, D4).
            rap = kind in (TopicKind.EV_REQUEST, TopicKind.EV_RELEASE)
            transport.subscribe(self.topics.filter(kind), 1, retain_as_published=rap)
        transport.subscribe(self.topics.balancer_control(), 1)
        # Operators' limit schedules (a retained one is seen as such and refused), and our own retained schedules,
        # read back on start.
        transport.subscribe(self.topics.filter(TopicKind.SUBSTATION_LIMITS), 1, retain_as_published=True)
        transport.subscribe(self.topics.filter(TopicKind.SUBSTATION_SCHEDULE), 1)
        #: substations whose schedule this process has set or read back (a later retained copy is not news)
        self._schedules_known: set[str] = set()
        transport.subscribe(self.topics.balancer_status(), 1)  # our own status echo closes the retained snapshot
        transport.on_connect(self._announce)

    @staticmethod
    def will(topics: Topics) -> Will:
        return Will(topics.balancer_status(), encode(BalancerStatus(state="offline")), qos=1, retain=True)

    def _announce(self) -> None:
        """On every connect: say online (agents answer with their inventory) and republish the retained view
        (a broker that crashed may have lost what it held since its last save)."""
        status = BalancerStatus(state="online", ts=self.clock(), version=VERSION, instance=self.instance,
                                safety_margin_pct=self.settings.core.safety_margin_pct,
                                stale_after_s=self.settings.core.stale_after_s)
        self.transport.publish(self.topics.balancer_status(), encode(status), qos=1, retain=True)
        self._state_sent.clear()

    # ------------------------------------------------------------------ inbound
    def handle(self, msg: InMessage) -> None:
        if not self.is_owner():
            self._lost_lease("input")
            return
        # Telemetry topics, a thousand substations' each second, are parsed (and their id checked) once each.
        known = self._telemetry_topics.get(msg.topic)
        id_: str | None
        if known is not None:
            kind, id_ = known
            self.received[kind] += 1
        else:
            parsed = self.topics.parse(msg.topic)
            if parsed is None:
                self.counters["ignored_topic"] += 1
                return
            kind, id_ = parsed
            self.received[kind] += 1
            if kind == TopicKind.BALANCER_STATUS:
                self._on_balancer_status(msg)
                return
            if id_ is not None and not is_valid_id(id_):
                # No valid id, so no topic to answer on: log and count only.
                self.counters[f"bad_payload:{kind}:invalid_topic_id"] += 1
                self.log.warning("invalid_topic_id", topic=msg.topic[:200])
                return
            if kind == TopicKind.SUBSTATION_TELEMETRY and id_ is not None \
                    and len(self._telemetry_topics) < _TELEMETRY_TOPICS_MAX:
                self._telemetry_topics[msg.topic] = (kind, id_)
        if not self._admitted(kind, id_, msg):
            return
        if not self.startup.is_open and kind in _ACTS_ON_GRID:
            self._open_when_ready()
        if not self.startup.is_open and kind in _ACTS_ON_GRID:
            if not self.startup.hold(msg):
                self._refuse(kind, id_, msg, Reason.STARTING,
                             "the balancer is starting and learning the grid; send it again in a few seconds")
            return
        self._dispatch(kind, id_, msg)

    def _lost_lease(self, where: str) -> None:
        """The region lease ran out (monotonic deadline) or was lost: act on nothing, publish nothing more."""
        self.counters[f"not_owner:{where}"] += 1
        if not self.stepped_down:
            self.stepped_down = True
            self.log.error("region_lease_lost_stepping_down", where=where, epoch=self._leases.epoch,
                      instance=self.instance)

    def _dispatch(self, kind: TopicKind, id_: str | None, msg: InMessage) -> None:
        handler = self._handlers.get(kind)  # (first: an EV request, the hot path, takes one lookup to reach)
        if handler is None:
            if kind == TopicKind.BALANCER_CONTROL:
                self._on_control(msg, self.clock())
            elif kind == TopicKind.SUBSTATION_LIMITS and id_ is not None:
                self._on_limits(id_, msg, self.clock())
            elif kind == TopicKind.SUBSTATION_SCHEDULE and id_ is not None:
                self._on_schedule_state(id_, msg, self.clock())
            return
        if id_ is None:
            return
        if kind in _FROM_EVS:
            if msg.retain:
                self._on_retained(kind, id_, msg)
                return
            observe = self.observe_decision
            if observe is not None:
                started = perf_counter()
                handler(id_, msg, self.clock())
                observe(perf_counter() - started)
                return
        handler(id_, msg, self.clock())

    # ------------------------------------------------------------------ admission and startup
    def _admitted(self, kind: TopicKind, id_: str | None, msg: InMessage) -> bool:
        """Per-sender budget (balancer/admission.py): the excess is shed before it costs a decode."""
        if id_ is None:
            return True
        if kind in _FROM_EVS:
            admission = self._ev_admission
        elif kind == TopicKind.SUBSTATION_TELEMETRY:
            admission = self._telemetry_admission
        else:
            return True  # status and session events: bounded by the sessions a substation runs
        now = time.monotonic()
        if admission.admit(id_, now):
            return True
        # The cheapest path there is (a flood goes through it tens of thousands of times a second): a count, and
        # now and then a notice to the sender and a log line that say how many.
        self.counters[_SHED_KEY[kind]] += 1
        shed = admission.notice_due(id_, now)
        if shed:
            self._shed_log(kind, "input_shed", n=shed, kind=str(kind), reason=str(Reason.RATE_LIMITED), last_id=id_)
            self._refuse(kind, id_, msg, Reason.RATE_LIMITED,
                         f"{shed} message(s) shed: more than {admission.rate:g} per second (bursts of "
                         f"{admission.burst:g}) from {id_}; send less often")
        return False

    def _refuse(self, kind: TopicKind, id_: str | None, msg: InMessage, reason: Reason, detail: str) -> None:
        """Answer a message that is not acted on: to the EV, to the substation, or to the operator."""
        now = self.clock()
        if kind in (TopicKind.EV_REQUEST, TopicKind.EV_RELEASE) and id_ is not None:
            self._publish([self.core.reject(id_, _request_id_hint(msg.payload), reason, detail, now)], msg)
        elif kind in (TopicKind.BALANCER_CONTROL, TopicKind.SUBSTATION_LIMITS):
            limits = kind == TopicKind.SUBSTATION_LIMITS
            refused = ControlResult(ok=False, action="set_limits" if limits else None,
                                    substation_id=id_ if limits else None, ts=now,
                                    request_id=_request_id_hint(msg.payload), reason=reason, detail=detail)
            self.transport.publish(self.topics.balancer_control_result(), encode(refused), 1)
        elif id_ is not None:
            report = ErrorReport(reason=reason, detail=detail, topic=msg.topic, ts=now)
            self.transport.publish(self.topics.substation_error(id_), encode(report), qos=1)

    def _on_retained(self, kind: TopicKind, ev_id: str, msg: InMessage) -> None:
        """A request or release with the retain flag (D4): refused, and the retained copy cleared at once, so no
        future balancer replays it (Mosquitto's ACL cannot forbid the flag itself)."""
        if not msg.payload:
            return  # a retained message being cleared (our own clear, echoed)
        self.counters[f"bad_payload:{kind}:{Reason.RETAINED}"] += 1
        self._refusal_log((kind, Reason.RETAINED), "retained_input_refused", kind=str(kind), last_id=ev_id)
        self._ev_admission.charge(ev_id, REFUSED_COST - 1)
        self.transport.publish(msg.topic, b"", 1, retain=True)
        self._refuse(kind, ev_id, msg, Reason.RETAINED,
                     "requests and releases must not be retained (a retained one would be replayed later); "
                     "publish it again without the retain flag")

    def _on_balancer_status(self, msg: InMessage) -> None:
        if not msg.payload:
            return
        try:
            status = decode(msg.payload, BalancerStatus, max_bytes=self.settings.max_payload_bytes)
        except PayloadError:
            return
        if status.instance == self.instance:
            if status.state == "online" and not self.startup.snapshot_complete:
                self.startup.own_status_seen()
                self._open_when_ready()
        elif status.state == "online" and not msg.retain:
            self.log.error("another_balancer_online", instance=status.instance, ours=self.instance,
                      hint="one balancer per broker account: two would double-book the grid")

    def _open_when_ready(self) -> None:
        """Act on the held input, in order, once the grid is known (or the wait is over)."""
        gate = self.startup
        if gate.is_open or not gate.ready(time.monotonic()):
            return
        held = len(gate.held)
        for msg in gate.release(time.monotonic()):
            parsed = self.topics.parse(msg.topic)
            if parsed is not None:
                self._dispatch(parsed[0], parsed[1], msg)
        self.log.info("startup_complete", waited_s=round(time.monotonic() - gate.started_at, 3), held=held,
                 inventoried=len(gate.inventoried), missing=sorted(gate.missing())[:20], timed_out=gate.timed_out,
                 sessions=self.core.session_count())

    def _bad_payload(self, kind: TopicKind, id_: str, err: PayloadError) -> None:
        """Counted each, logged rate-limited (a flood of junk costs a log line per interval, with its count), and
        charged to the sender's budget."""
        self.counters[f"bad_payload:{kind}:{err.reason}"] += 1
        self._refusal_log((kind, err.reason), "payload_rejected", kind=str(kind), last_id=id_,
                          reason=str(err.reason), detail=err.detail)
        if kind in (TopicKind.EV_REQUEST, TopicKind.EV_RELEASE):
            self._ev_admission.charge(id_, REFUSED_COST - 1)
        elif kind == TopicKind.SUBSTATION_TELEMETRY:
            self._telemetry_admission.charge(id_, REFUSED_COST - 1)

    def _on_request(self, ev_id: str, msg: InMessage, now: float) -> None:
        try:
            request = decode(msg.payload, ChargeRequest, max_bytes=self.settings.max_payload_bytes)
        except PayloadError as err:
            self._bad_payload(TopicKind.EV_REQUEST, ev_id, err)
            hint = _request_id_hint(msg.payload)
            effects: list[Effect] = [self.core.reject(ev_id, hint, err.reason, err.detail, now)]
        else:
            effects = self.core.on_request(ev_id, request, now)
        self._publish(effects, msg)

    def _on_release(self, ev_id: str, msg: InMessage, now: float) -> None:
        try:
            release = decode(msg.payload, Release, max_bytes=self.settings.max_payload_bytes)
        except PayloadError as err:
            self._bad_payload(TopicKind.EV_RELEASE, ev_id, err)
            self._publish([self.core.reject(ev_id, _request_id_hint(msg.payload), err.reason, err.detail, now)], msg)
            return
        if release.ev_id is not None and release.ev_id != ev_id:
            self._publish([self.core.reject(ev_id, release.request_id, Reason.ID_MISMATCH,
                                            "body ev_id differs from the topic's", now)], msg)
            return
        self._publish(self.core.on_release(ev_id, release, now), msg)

    def _substation_error(self, kind: TopicKind, sid: str, msg: InMessage, err: PayloadError, now: float) -> None:
        self._bad_payload(kind, sid, err)
        report = ErrorReport(reason=err.reason, detail=err.detail, topic=msg.topic, ts=now)
        self.transport.publish(self.topics.substation_error(sid), encode(report), qos=1)

    def _on_telemetry(self, sid: str, msg: InMessage, now: float) -> None:
        try:
            telemetry = decode(msg.payload, Telemetry, max_bytes=self.settings.max_payload_bytes)
            if telemetry.substation_id != sid:
                raise PayloadError(Reason.ID_MISMATCH, f"body substation_id {telemetry.substation_id!r} "
                                                       f"differs from the topic's {sid!r}")
        except PayloadError as err:
            self._substation_error(TopicKind.SUBSTATION_TELEMETRY, sid, msg, err, now)
            return
        self._publish(self.core.on_telemetry(telemetry, now))

    def _on_status(self, sid: str, msg: InMessage, now: float) -> None:
        if not msg.payload:
            return  # a retained status being cleared
        try:
            status = decode(msg.payload, SubstationStatus, max_bytes=self.settings.max_payload_bytes)
            if status.substation_id is not None and status.substation_id != sid:
                raise PayloadError(Reason.ID_MISMATCH, "body substation_id differs from the topic's")
            if status.region != self.region:
                # A misconfigured agent (SUBSTATION_REGION vs the topics it uses): two regions' balancers would
                # both plan for it, or neither. Refused (the agent's error topic says why), never adopted.
                raise PayloadError(Reason.REGION_MISMATCH,
                                   f"status says region {status.region!r} but was published under region "
                                   f"{self.region!r}'s topics; set SUBSTATION_REGION and the topics alike")
        except PayloadError as err:
            self._substation_error(TopicKind.SUBSTATION_STATUS, sid, msg, err, now)
            return
        if msg.retain and self.startup.snapshot_complete and sid in self.core.substations:
            # After the start's snapshot (which the startup gate needs), a retained copy of a substation we already
            # follow is an old snapshot, handed out again on every re-subscription (this instance reconnecting,
            # e.g. to another cluster node), in no order with the live messages: taken as news it would end an
            # agent's re-announcement half-way, or close it as an inventory, and drop every session confirmed
            # since. Live statuses (and staleness) say what is new.
            self.counters["retained_status_replayed"] += 1
            return
        inventory = not msg.retain and status.announced_for is not None and status.announced_for == self.instance
        self.log.info("substation_status", substation_id=sid, state=status.state, inventory=inventory,
                 sessions=status.sessions, retained=msg.retain)
        self._publish(self.core.on_status(sid, status.state, now, inventory=inventory, region=status.region,
                                          taken_at=status.ts, announced=status.sessions))
        if not self.startup.is_open:
            self.startup.substation_status(sid, status.state == "online", inventory)
            self._open_when_ready()

    def _on_session_event(self, sid: str, msg: InMessage, now: float) -> None:
        try:
            event = decode(msg.payload, SessionEvent, max_bytes=self.settings.max_payload_bytes)
            if event.substation_id is not None and event.substation_id != sid:
                raise PayloadError(Reason.ID_MISMATCH, "body substation_id differs from the topic's")
        except PayloadError as err:
            self._substation_error(TopicKind.SUBSTATION_SESSION, sid, msg, err, now)
            return
        self._publish(self.core.on_session_event(sid, event, now))

    def _on_control(self, msg: InMessage, now: float) -> None:
        """An operator action (only the api account may publish it). Every one is answered on the result
        topic, refusals included; the substation's new state is published at once."""
        try:
            command = decode(msg.payload, ControlCommand, max_bytes=self.settings.max_payload_bytes)
        except PayloadError as err:
            self.counters[f"bad_payload:{TopicKind.BALANCER_CONTROL}:{err.reason}"] += 1
            self.log.warning("control_rejected", reason=str(err.reason), detail=err.detail)
            refused = ControlResult(ok=False, action=None, substation_id=None, ts=now,
                                    request_id=_request_id_hint(msg.payload), reason=err.reason, detail=err.detail)
            self.transport.publish(self.topics.balancer_control_result(), encode(refused), 1)
            return
        if command.expires_at is not None and now > command.expires_at:
            self._expired(TopicKind.BALANCER_CONTROL, command.action, command.substation_id, command.request_id,
                          now - command.expires_at, now)
            return
        reason, detail, effects = self.core.on_control(command, now)
        self._publish(effects)
        durable = reason is None and self.store is not None
        sub = self.core.substations.get(command.substation_id)
        state = None
        if sub is not None:  # its new state at once, not at the next periodic publish
            state = substation_state(self.core, sub, now)
            self._send_state(self.topics.substation_state(sub.id), state, now, force=True)
        elif command.action == "forget" and reason is None:
            self._forget(command.substation_id)
        result = ControlResult(ok=reason is None, action=command.action, substation_id=command.substation_id,
                               ts=now, request_id=command.request_id, reason=reason, detail=detail, state=state)

        def answer(stored: bool = True) -> None:
            """The result, once the operator settings are stored (a failover right after it keeps them)."""
            if not self.is_owner():
                return
            out = result if stored else msgspec.structs.replace(
                result, detail=f"{detail} (not stored: lost on a restart; see the balancer's log)")
            self.transport.publish(self.topics.balancer_control_result(), encode(out), 1)

        if durable and self.store is not None:
            self.store.save(self.core.operator_settings(), answer)
        else:
            answer()
        self.log.info("control", action=command.action, substation_id=command.substation_id,
                 capacity_kw=command.capacity_kw, ok=reason is None, reason=reason, detail=detail)

    def _on_limits(self, sid: str, msg: InMessage, now: float) -> None:
        """An operator's limit schedule for one source on one substation (only the api account may publish it).
        Answered like a control command; the schedule and the substation's state are published at once."""
        if msg.retain:
            if msg.payload:  # (an empty one is our own clear, echoed)
                self.counters[f"bad_payload:{TopicKind.SUBSTATION_LIMITS}:{Reason.RETAINED}"] += 1
                self.transport.publish(msg.topic, b"", 1, retain=True)
                self._refuse(TopicKind.SUBSTATION_LIMITS, sid, msg, Reason.RETAINED,
                             "limit schedules must not be retained (a retained one would be replayed over newer "
                             "ones); publish it again without the retain flag")
            return
        try:
            schedule = decode(msg.payload, LimitSchedule, max_bytes=MAX_SCHEDULE_PAYLOAD_BYTES)
            if schedule.substation_id is not None and schedule.substation_id != sid:
                raise PayloadError(Reason.ID_MISMATCH, f"body substation_id {schedule.substation_id!r} differs "
                                                       f"from the topic's {sid!r}")
        except PayloadError as err:
            self.counters[f"bad_payload:{TopicKind.SUBSTATION_LIMITS}:{err.reason}"] += 1
            self.log.warning("limits_rejected", substation_id=sid, reason=str(err.reason), detail=err.detail)
            self._refuse(TopicKind.SUBSTATION_LIMITS, sid, msg, err.reason, err.detail)
            return
        if schedule.expires_at is not None and now > schedule.expires_at:
            self._expired(TopicKind.SUBSTATION_LIMITS, "set_limits", sid, schedule.request_id,
                          now - schedule.expires_at, now)
            return
        reason, detail, effects = self.core.on_limits(sid, schedule, now)
        self._publish(effects)
        state = None
        if reason is None:
            self._schedules_known.add(sid)
            state = self._send_schedule(sid, now)
            sub = self.core.substations.get(sid)
            if sub is not None:
                self._send_state(self.topics.substation_state(sid), substation_state(self.core, sub, now), now,
                                 force=True)
        result = ControlResult(ok=reason is None, action="set_limits", substation_id=sid, ts=now,
                               request_id=schedule.request_id, reason=reason, detail=detail, schedule=state)
        self.transport.publish(self.topics.balancer_control_result(), encode(result), 1)
        self.log.info("limits", substation_id=sid, source=schedule.source, entries=len(schedule.entries),
                 ok=reason is None, reason=reason, detail=detail)

    def _expired(self, kind: TopicKind, action: ResultAction, sid: str, request_id: str | None, late_s: float,
                 now: float) -> None:
        """An operator action received after its ``expires_at``: the caller has had its timeout, so it is refused
        (``expired``) and not applied. The replacement of MQTT 5 message expiry, which 3.1.1 lacks."""
        self.counters[f"bad_payload:{kind}:{Reason.EXPIRED}"] += 1
        log.warning("control_expired", action=action, substation_id=sid, request_id=request_id, late_s=round(late_s, 3))
        result = ControlResult(ok=False, action=action, substation_id=sid, ts=now,
                               request_id=request_id, reason=Reason.EXPIRED,
                               detail=f"received {late_s:.1f} s after its expires_at: nobody waits for the result "
                                      "any more; send it again")
        self.transport.publish(self.topics.balancer_control_result(), encode(result), 1)

    def _on_schedule_state(self, sid: str, msg: InMessage, now: float) -> None:
        """Our own retained schedule, delivered when we subscribe: a restarted balancer reads it back. Live copies
        (our own publications, echoed) and anything for a substation whose schedule we already hold are not news."""
        if not msg.retain or not msg.payload or sid in self._schedules_known:
            return
        try:
            state = decode(msg.payload, ScheduleState, max_bytes=MAX_SCHEDULE_PAYLOAD_BYTES)
            if state.substation_id != sid:
                raise PayloadError(Reason.ID_MISMATCH, "body substation_id differs from the topic's")
        except PayloadError as err:
            self.counters[f"bad_payload:{TopicKind.SUBSTATION_SCHEDULE}:{err.reason}"] += 1
            self.log.warning("schedule_unreadable", substation_id=sid, reason=str(err.reason), detail=err.detail)
            return
        self._schedules_known.add(sid)
        self._publish(self.core.restore_schedule(state, now))
        self.log.info("schedule_restored", substation_id=sid, entries=len(state.entries))

    def _send_schedule(self, sid: str, now: float) -> ScheduleState | None:
        """Publish a substation's schedule (retained). None when it has none left (then an empty schedule is
        published: nothing to read back)."""
        self.core.schedule_dirty.discard(sid)
        schedule = self.core.schedules.get(sid)
        if schedule is None:
            empty = ScheduleState(substation_id=sid, ts=now, limit_kw=None, source=None, entries=[], composite=[])
            self.transport.publish(self.topics.substation_schedule(sid), encode(empty), 1, retain=True)
            return empty
        schedule.recheck_at = schedule.next_change(now) or float("inf")  # (published as of now)
        state = schedule_state(sid, schedule, now)
        self.transport.publish(self.topics.substation_schedule(sid), encode(state), 1, retain=True)
        return state

    def _forget(self, substation_id: str) -> None:
        """A decommissioned substation: its retained state is cleared (readers drop it) and nothing of it is
        kept here."""
        topic = self.topics.substation_state(substation_id)
        self._state_sent.pop(topic, None)
        self._state_topics.pop(substation_id, None)
        self._telemetry_topics.pop(self.topics.telemetry(substation_id), None)
        self._leases.forget(substation_id)
        self.transport.publish(topic, b"", 1, retain=True)
        self.transport.publish(self.topics.substation_schedule(substation_id), b"", 1, retain=True)

    # ------------------------------------------------------------------ retained state
    def _send_state(self, topic: str, state: SubstationState | msgspec.Struct, now: float, *,
                    force: bool = False) -> None:
        """Publish a retained state when it changed (ignoring its clock fields) or every 30 s."""
        last = self._state_sent.get(topic)
        if isinstance(state, SubstationState):
            self._send_substation_state(topic, state, last, now, force)
            return
        if isinstance(state, QueueState):  # ETAs count down every second: only a move of a minute is news
            key = encode(msgspec.structs.replace(state, ts=0.0, entries=[
                msgspec.structs.replace(e, eta_s=None if e.eta_s is None else e.eta_s // 60) for e in state.entries]))
        else:
            key = encode(msgspec.structs.replace(state, ts=0.0))
        if not force and last is not None and last.key == key and now - last.at < _STATE_REFRESH_S:
            return
        self._state_sent[topic] = _Sent(key, now)
        self.transport.publish(topic, encode(state), 1, retain=True)

    def _send_substation_state(self, topic: str, state: SubstationState, last: _Sent | None, now: float,
                               force: bool, mark: StateMark | None = None) -> None:
        """:meth:`_send_state` for a substation, at a cost in what changed: at 1,000 substations nearly every
        state's numbers move every second (base-load noise), its ~15 KB session list seldom. The change key is the
        numbers but the measured ones (a tuple, nothing encoded); those (``_MEASURED``) are held to the dead-band
        against the values last published (report by exception: drift in small steps is published once it adds up
        to more than the band). The session list is encoded once per list the views keep
        (``views.session_views``: the same object until a session changes), a rebuilt list only in its new views
        (:func:`_encode_views`), and spliced into the payload as ``msgspec.Raw``: byte for byte what encoding the
        state whole gives (tests/unit/test_state_encoding.py)."""
        key = msgspec.structs.astuple(msgspec.structs.replace(state, ts=0.0, telemetry_age_s=None, sessions=None,
                                                              **_UNMEASURED))
        measured = _measured(state)
        views = state.sessions
        if last is not None and last.views is views:
            raw, parts = last.raw, last.parts
        else:  # a new list (or a policy that rebuilds it every time): the same sessions only if the same bytes
            raw, parts = _encode_views(views, last)
            if last is not None and last.raw == raw:
                raw = last.raw
        if (not force and last is not None and last.key == key and last.raw is raw
                and now - last.at < _STATE_REFRESH_S and not _beyond_deadband(
                    last.measured, measured, state.capacity_kw, self.settings.state_deadband_pct / 100)):
            if mark != last.mark:  # the same state as published: no need to build it again while this stands
                self._state_sent[topic] = last._replace(mark=mark)
            return
        self._state_sent[topic] = _Sent(key, now, views, raw, parts, measured, mark)
        self.transport.publish(topic, encode(msgspec.structs.replace(state, sessions=raw)), 1, retain=True)

    def publish_states(self, now: float) -> None:
        """The retained view of every substation and of the queue (readers such as the API rely on it)."""
        for _ in self._states(now):
            pass

    async def publish_states_in_steps(self, now: float) -> None:
        """:meth:`publish_states`, letting the loop read after every ``_STATE_STEP`` substations or ``_STATE_SLICE_S``
        of work, whichever comes first: at 1,000
        substations the states are ~1,000 publishes a second (~60 ms), and an EV's request that arrives meanwhile
        should not wait for all of them (the live run's p95/p99, bench live-grid)."""
        for _ in self._states(now):
            await asyncio.sleep(0)

    def _states(self, now: float) -> Iterator[None]:
        """Publish the states; yields between steps (a substation forgotten meanwhile is skipped)."""
        subs, core, sent, topics, counts = self.core.substations, self.core, self._state_sent, self._state_topics, \
            self.state_counts
        ratio = self.settings.state_deadband_pct / 100
        since, step = perf_counter(), 0
        for sub in list(subs.values()):
            if step == _STATE_STEP or (step and perf_counter() - since >= _STATE_SLICE_S):
                yield
                since, step = perf_counter(), 0
            step += 1
            if subs.get(sub.id) is not sub:
                continue
            topic = topics.get(sub.id)
            if topic is None:
                topic = topics[sub.id] = self.topics.substation_state(sub.id)
            # Built only when what it shows may have moved: the mark (everything but the clock fields and the
            # measured numbers), or a measured number beyond the dead-band (the test _send_substation_state makes
            # on the state built, made on the numbers alone), or the 30 s refresh is due.
            last = sent.get(topic)
            mark = state_mark(core, sub, now)
            if (last is not None and mark is not None and last.mark == mark and now - last.at < _STATE_REFRESH_S
                    and not _beyond_deadband(last.measured, state_measured(core, sub, now), w_to_kw(sub.capacity_w),
                                             ratio)):
                counts["kept"] += 1
                continue
            counts["built"] += 1
            self._send_substation_state(topic, substation_state(core, sub, now), last, now, False, mark)
        if step and perf_counter() - since >= _STATE_SLICE_S:
            yield
        # changed, or an entry started or ended; in id order (a set's order moves with the hash seed: the same run
        # would publish them in another order, and `bench scale --digest` could not compare two runs)
        for sid in sorted(self.core.schedule_dirty):
            if sid in self.core.substations or sid in self.core.schedules:
                self._send_schedule(sid, now)
            else:
                self.core.schedule_dirty.discard(sid)
        self._send_state(self.topics.balancer_queue(), queue_state(self.core, now), now)

    # ------------------------------------------------------------------ outbound
    def _publish(self, effects: list[Effect], request: InMessage | None = None) -> None:
        topics, publish = self.topics, self.transport.publish
        for effect in effects:
            if isinstance(effect, ToEv):
                payload = encode(effect.message)
                publish(topics.assignment(effect.ev_id), payload, 1)
                if effect.in_reply and request is not None and request.response_topic:
                    self._respond(request, payload, effect.ev_id)
                if effect.message.status == "rejected":
                    self.log.info("request_rejected", ev_id=effect.ev_id, request_id=effect.message.request_id,
                             reason=effect.message.reason)
            else:
                pending = self._commands.get(effect.substation_id)
                if pending is None:
                    self._commands[effect.substation_id] = [effect.message]
                else:
                    pending.append(effect.message)
        if self._commands and not self._flush_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._flush_commands()
            else:
                # After the transport's current read pass: a burst of requests becomes one batch.
                self._flush_scheduled = True
                loop.call_soon(self._flush_commands)

    def _flush_commands(self) -> None:
        """Publish pending agent commands, one message per substation (chunked), in decision order."""
        self._flush_scheduled = False
        pending, self._commands = self._commands, {}
        if not self.is_owner():
            self._lost_lease("commands")
            return
        now = self.clock()
        for sid, commands in pending.items():
            topic = self.topics.command(sid)
            for batch in self._leases.batches(sid, commands, now):
                self.transport.publish(topic, encode(batch), 1)

    def _renew_leases(self) -> None:
        """An empty batch renews the lease of every substation with sessions that has not heard from us lately."""
        if not self.is_owner():
            self._lost_lease("renewals")
            return
        with_sessions = [sid for sid, sub in self.core.substations.items() if sub.sessions]
        for sid, batch in self._leases.renewals(with_sessions, self.clock()):
            self.transport.publish(self.topics.command(sid), encode(batch), 1)

    def _respond(self, request: InMessage, payload: bytes, ev_id: str) -> None:
        """MQTT 5 reply, only below the sender's own reply root (D5): the request came on ``ev/{ev_id}/…``, which
        only that EV's account (or the API acting for it) may publish, so ``reply/{ev_id}/`` is its own. Whatever
        the ACL lets a reader see, the balancer never delivers into another account's replies."""
        topic = request.response_topic or ""
        root = f"{self._reply_root}{ev_id}/"
        if not topic.startswith(root) or len(topic) == len(root) or "+" in topic or "#" in topic:
            self.counters["response_topic_refused"] += 1
            self.log.warning("response_topic_refused", topic=topic[:200], allowed_root=root)
            return
        self.transport.publish(topic, payload, 1, correlation_data=request.correlation_data)

    # ------------------------------------------------------------------ periodic
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (or the region lease is lost), then publish the offline status and disconnect
        (after a lost lease: just disconnect). The operator settings are restored before the first connect."""
        if self.store is not None:
            restored = await self.store.load()
            self._publish(self.core.restore_operator(restored, self.clock()))
            self.log.info("operator_settings_restored", region=self.store.region, substations=len(restored),
                     drained=sorted(sid for sid, s in restored.items() if s.draining)[:20],
                     limited=sorted(sid for sid, s in restored.items() if s.capacity_limit_w is not None)[:20])
        conn = asyncio.create_task(self.transport.run())
        next_stats = time.monotonic() + self.settings.stats_interval_s
        self.gc_start()
        try:
            while not stop.is_set():
                await wait_event(stop, self.settings.tick_interval_s)
                if not self.is_owner():
                    self._lost_lease("tick")
                if self.stepped_down:
                    break
                states_due = self.periodic(time.monotonic(), states_possible=self.transport.connected.is_set(),
                                           sliced=True)
                await self.sweep_in_steps()
                if states_due:
                    await self.publish_states_in_steps(self.clock())
                if time.monotonic() >= next_stats:
                    next_stats += self.settings.stats_interval_s
                    self.log_stats()
        finally:
            if self.stepped_down or not self.is_owner():
                await self.transport.close(0.0)  # no offline status: the region has (or gets) another owner
            else:
                self._flush_commands()
                offline = BalancerStatus(state="offline", ts=self.clock())
                self.transport.publish(self.topics.balancer_status(), encode(offline), qos=1, retain=True)
                await self.transport.close()
            if self.store is not None:
                await self.store.close()
            conn.cancel()
            self.log_stats()

    def periodic(self, mono: float, *, states_possible: bool = True, sliced: bool = False) -> bool:
        """The periodic step (every ``tick_interval_s`` of ``run``; bench scale calls it on grid time): the startup
        gate, the core's tick, the agents' leases, the GC policy, the admission sweep (``_SWEEP_EVERY_S``; with
        ``sliced`` only marked due, for :meth:`sweep_in_steps`). ``mono``: the cadence's clock. True when the
        retained states are due (every ``state_interval_s``, and only while they can be published): the caller
        publishes them, in steps or at once."""
        self._open_when_ready()
        self._publish(self.core.tick(self.clock()))
        self._renew_leases()
        self.gc_step()
        if mono >= self._next_sweep:
            self._next_sweep = mono + _SWEEP_EVERY_S
            self._sweep_due = True
            if not sliced:
                for _ in self._sweeps():
                    pass
        if mono >= self._next_state and states_possible:
            self._next_state = mono + self.settings.state_interval_s
            return True
        return False

    async def sweep_in_steps(self) -> None:
        """The admission sweep when due, letting the loop read after every ``_SWEEP_STEP`` buckets read: when the
        EVs of a burst go idle together, forgetting 20,000 buckets at once was a 2-5 ms pause in the answers (the
        bench's paced p99)."""
        if self._sweep_due:
            for _ in self._sweeps():
                await asyncio.sleep(0)

    def _sweeps(self) -> Iterator[None]:
        """Both admission sweeps in slices of ``_SWEEP_STEP`` buckets, yielding between them; at most as many slices
        as the buckets there were at the start fill (kept buckets move behind the others and are not read twice)."""
        self._sweep_due = False
        for admission in (self._ev_admission, self._telemetry_admission):
            budget = len(admission)
            while admission.sweep(time.monotonic(), _SWEEP_STEP) and budget > _SWEEP_STEP:  # (monotonic stamps)
                budget -= _SWEEP_STEP
                yield

    def gc_start(self) -> None:
        """Start-up done: the process's GC policy freezes what lives on (once per process)."""
        if self.gc_policy is not None:
            self.gc_policy.start(self.clock())

    def gc_step(self) -> None:
        """The GC policy's periodic step (freeze what survived; now and then the full pass)."""
        if self.gc_policy is not None:
            self.gc_policy.step(self.clock())

    def log_stats(self) -> None:
        snap = self.core.snapshot(self.clock())
        self.log.info("balancer_stats", queue_length=snap["queue_length"], sessions=snap["sessions"],
                 open_requests=snap["open_requests"], decisions=dict(self.core.counters),
                 errors=dict(self.counters), mqtt=str(self.transport.stats))


def build(settings: BalancerSettings, region: str = DEFAULT_REGION,
          gc_policy: GcPolicy | None = None) -> BalancerService:
    """Single-node mode: the service of one region, with its own MQTT session (:meth:`BalancerSettings.region_mqtt`),
    no lease; operator settings in ``settings.state_file``."""
    topics = Topics(settings.grid.grid_topic_prefix, region)
    mqtt, client_id = settings.region_mqtt(region)
    transport = make_transport(settings.mqtt_client, mqtt, client_id=client_id,
                               will=BalancerService.will(topics), clean_start=False)
    store = FileStore(settings.state_file, region) if settings.state_file else None
    return BalancerService(settings, transport, region=region, store=store, gc_policy=gc_policy)


def build_all(settings: BalancerSettings, gc_policy: GcPolicy | None = None) -> list[BalancerService]:
    """One region service per region this process owns (``BALANCER_REGIONS``), sharing the process's GC policy."""
    return [build(settings, region, gc_policy) for region in settings.regions]
