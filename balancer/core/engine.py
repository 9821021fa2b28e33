"""The allocation engine: a state machine over plain data, with time passed in.

Every event handler returns the effects (messages) it decided on, in the order they must be
published: reductions and stops before any new grant, so a substation is never over its limit
in between. Guarantees (see docs/balancing.md and the tests):

1. capacity: on every substation, base load + power granted <= capacity less the safety margin;
   grants count from the moment they are made, before telemetry shows them;
2. placement: largest grant available (down to ``min_kw``), then least utilisation after placement;
3. no headroom: a bounded queue, priority then arrival, served as capacity frees;
4. stale/offline substations get nothing; sessions on an offline or lost one are revoked and re-queued;
5. idempotent: the same (ev_id, request_id) gets the same (latest) answer, one open request per EV.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from balancer.core.allocation import equal_share, laxity_share, water_fill
from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.model import (
    PendingRequest,
    Session,
    Substation,
    kw_to_w_down,
    kw_to_w_up,
    w_to_kw,
)
from balancer.core.policy import (
    BASELINES,
    COMPRESSIBLE,
    DEADLINE,
    LEAST_UTILISED,
    POLICIES,
    ROUND_ROBIN,
    WEIGHTED_FAIR,
    baseline_candidates,
    compressible_room_w,
    fair_placement,
    least_utilised,
)
from balancer.core.queue import RequestQueue
from grid_protocol.messages import (
    Assignment,
    AssignmentStatus,
    ChargeRequest,
    ControlCommand,
    Release,
    SessionCommand,
    SessionEvent,
    Telemetry,
)
from grid_protocol.reasons import FINAL_END_REASONS, Reason


@dataclass(slots=True)
class CoreConfig:
    safety_margin_pct: float = 5.0
    stale_after_s: float = 5.0
    lost_after_s: float = 30.0
    queue_max: int = 10_000
    default_min_kw: float = 1.4
    answer_ttl_s: float = 3600.0
    answers_max: int = 200_000
    #: A waiting request may be overtaken by later ones that fit, until it has waited this long; then
    #: capacity is held for it (nobody behind it is placed), so a large request cannot starve.
    overtake_guard_s: float = 30.0
    #: one of policy.POLICIES; the baselines need ``allow_baselines`` (they ignore capacity).
    policy: str = LEAST_UTILISED
    allow_baselines: bool = False
    #: grant changes smaller than this are not made (unless needed to stay within the limit) ...
    hysteresis_kw: float = 1.0
    #: ... nor within this long of the session's last change: noise in telemetry must not make power flap.
    min_hold_s: float = 10.0
    #: The band kept free below the limit (and the smallest raise) is the base-load noise measured per substation:
    #: the largest change of its uncontrolled load over one hold time (``min_hold_s``), held and decaying over
    #: this long; until one hold time is measured, ``hysteresis_kw``.
    noise_decay_s: float = 300.0
    #: ``deadline`` orders sessions by laxity (time to spare at full power) rounded down to this step, so that
    #: two sessions of almost equal laxity do not swap power back and forth as their laxities cross.
    laxity_step_s: float = 1800.0
    rebalance_interval_s: float = 1.0
    poll_interval_s: float = 5.0  # polled-least-loaded's snapshot age
    queue_update_interval_s: float = 5.0  # queued EVs hear new positions/ETAs at most this often
    #: An offline substation (its last will, or a clean shutdown) keeps its sessions this long before they are
    #: revoked and re-queued: an agent that reconnects within its lease (the service sets this to the lease)
    #: keeps charging, and nothing is placed twice meanwhile (the power stays counted). 0: revoke at once.
    offline_grace_s: float = 10.0


class _EvState(msgspec.Struct, gc=False):
    request: PendingRequest
    answer: Assignment
    session_id: str | None = None


class _Closed(msgspec.Struct, gc=False):
    answer: Assignment
    at: float


def _counter_ids(prefix: str = "s") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


@dataclass
class Balancer:
    config: CoreConfig = field(default_factory=CoreConfig)
    new_session_id: Callable[[], str] = field(default_factory=_counter_ids)
    new_request_id: Callable[[], str] = field(default_factory=lambda: _counter_ids("auto-"))

    def __post_init__(self) -> None:
        if self.config.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.config.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.config.policy in BASELINES and not self.config.allow_baselines:
            raise ValueError(f"{self.config.policy!r} is a comparison baseline that ignores capacity; "
                             "it runs only with allow_baselines (replays, never a real grid)")
        self.substations: dict[str, Substation] = {}
        self._rr = 0  # round-robin position
        self._poll_snapshot: dict[str, int] = {}
        self._polled_at = float("-inf")
        self._queue_updated_at = float("-inf")
        self.queue = RequestQueue(self.config.queue_max)
        self._evs: dict[str, _EvState] = {}
        self._sessions: dict[str, Session] = {}
        self._closed: OrderedDict[tuple[str, str], _Closed] = OrderedDict()
        #: ids of sessions this balancer ended (bounded): their agents' late "ended" events are expected
        self._ended_sessions: OrderedDict[str, None] = OrderedDict()
        self._arrivals = itertools.count(1)
        self._requeued: list[str] = []  # revoked in this step, waiting for a queued notice
        #: decisions and events by outcome/reason, for the adapter's metrics and logs
        self.counters: Counter[str] = Counter()
        #: how long requests placed from the queue waited (seconds); the adapter drains it into a histogram
        self.queue_waits: deque[float] = deque(maxlen=10_000)

    # ------------------------------------------------------------------ helpers
    def _answer(self, req: PendingRequest, status: AssignmentStatus, now: float, *, session: Session | None = None,
                reason: str | None = None, detail: str | None = None, position: int | None = None,
                ends: list[float] | None = None) -> Assignment:
        return Assignment(
            request_id=req.request_id, ev_id=req.ev_id, status=status, ts=now,
            substation_id=session.substation_id if session else None,
            granted_kw=w_to_kw(session.granted_w) if session else None,
            session_id=session.session_id if session else None,
            reason=reason, detail=detail, position=position,
            eta_s=self.eta_s(position, now, ends) if position is not None else None,
        )

    def session_ends(self) -> Iterator[float]:
        """Expected ends of the running sessions, unordered."""
        return (e for s in self._sessions.values() if (e := s.expected_end()) is not None)

    def expected_ends(self) -> list[float]:
        return sorted(self.session_ends())

    def eta_s(self, position: int, now: float, ends: list[float] | None = None) -> float | None:
        """Rough wait for the ``position``-th in line: the position-th earliest expected end of a running
        session (each end frees room for about one session). None when too few ends are known.
        ``ends`` (from expected_ends) lets a pass over the whole queue sort them once."""
        ends = self.expected_ends() if ends is None else ends
        if position > len(ends):
            return None
        return round(max(0.0, ends[position - 1] - now), 1)

    def _close(self, ev_id: str, answer: Assignment, now: float) -> None:
        """The EV's request is finished; remember the final answer for redeliveries."""
        state = self._evs.pop(ev_id, None)
        if state is not None:
            self._closed[(ev_id, state.request.request_id)] = _Closed(answer, now)
            self._closed.move_to_end((ev_id, state.request.request_id))

    def substation(self, substation_id: str, now: float) -> Substation:
        sub = self.substations.get(substation_id)
        if sub is None:
            sub = self.substations[substation_id] = Substation(substation_id, known_since=now)
        return sub

    def _new_session(self, sub: Substation, req: PendingRequest, grant: int, now: float) -> Session:
        session = Session(self.new_session_id(), sub.id, req, grant, now, last_change_at=now, accounted_at=now)
        self._attach(sub, session)
        return session

    def _attach(self, sub: Substation, session: Session) -> None:
        sub.sessions[session.session_id] = session
        sub.granted_w += session.granted_w
        sub.requested_w += session.request.requested_w
        sub.floors_w += session.request.min_w
        self._sessions[session.session_id] = session

    def _place(self, req: PendingRequest, now: float) -> tuple[Session, list[Effect]] | None:
        """Choose a substation and a grant by the policy. Returns the new session and the reductions of
        other sessions that must be published before it starts (compressible policies)."""
        cfg = self.config
        subs = self.substations.values()
        if cfg.policy == LEAST_UTILISED:
            choice = least_utilised(subs, req.requested_w, req.min_w, now, cfg.safety_margin_pct, cfg.stale_after_s)
            if choice is None:
                return None
            return self._new_session(choice[0], req, choice[1], now), []
        if cfg.policy in COMPRESSIBLE:
            sub = fair_placement(subs, req.requested_w, req.min_w, now, cfg.safety_margin_pct, cfg.stale_after_s)
            if sub is None:
                return None
            session = self._new_session(sub, req, 0, now)
            target = dict((s.session_id, t) for s, t in self._targets(sub, now))[session.session_id]
            # Make room for the new session's share: squeeze the others now (they are told first).
            free = sub.limit_w(cfg.safety_margin_pct) - self._band_w(sub) - sub.used_w()
            reductions = self._decrease(sub, now, shed=target - free, skip=session)
            # Targets fit the room the squeeze made; the min() only ever guards the capacity guarantee.
            grant = max(0, min(target, sub.limit_w(cfg.safety_margin_pct) - sub.used_w()))
            session.granted_w = grant
            sub.granted_w += grant
            return session, reductions
        candidates = baseline_candidates(subs)
        if not candidates:
            return None
        if cfg.policy == ROUND_ROBIN:
            sub = candidates[self._rr % len(candidates)]
            self._rr += 1
        else:  # POLLED_LEAST_LOADED: the original design's choice, on a snapshot that goes stale
            if now - self._polled_at >= cfg.poll_interval_s:
                self._poll_snapshot = {s.id: len(s.sessions) for s in candidates}
                self._polled_at = now
            sub = min(candidates, key=lambda s: (self._poll_snapshot.get(s.id, 0), s.id))
        return self._new_session(sub, req, req.requested_w, now), []

    # ------------------------------------------------------------------ rebalancing
    def _band_w(self, sub: Substation) -> int:
        """Power kept free below the limit: base-load noise inside the band changes no grant, where shares computed
        right at the limit would follow every watt of noise (measured: flapping). Sized from the substation's own
        measured noise (how far its uncontrolled load moved within one hold time, lately): a quiet substation
        (base load constant, as on the ACN benchmark) keeps nothing idle, a noisy one as much as its noise."""
        if sub.noise_w is None:
            return kw_to_w_up(self.config.hysteresis_kw)
        return math.ceil(sub.noise_w)

    def _step_w(self, sub: Substation) -> int:
        """The smallest change worth making without need: one hysteresis step, or the noise band when larger."""
        return max(kw_to_w_up(self.config.hysteresis_kw), self._band_w(sub))

    def _targets(self, sub: Substation, now: float) -> list[tuple[Session, int]]:
        """The policy's share of the substation's available power for each of its sessions."""
        sessions = list(sub.sessions.values())
        available = max(sum(s.request.min_w for s in sessions),
                        sub.limit_w(self.config.safety_margin_pct) - sub.uncontrolled_w() - self._band_w(sub))
        floors = [s.request.min_w for s in sessions]
        caps = [s.request.requested_w for s in sessions]
        if self.config.policy == WEIGHTED_FAIR:
            targets = water_fill(available, floors, caps, [s.request.priority + 1.0 for s in sessions])
        elif self.config.policy == DEADLINE:
            urgency: list[tuple[float, float, int] | None] = []
            step = self.config.laxity_step_s
            for s in sessions:
                s.account(now)
                remaining, departure = s.remaining_wh(), s.request.departure
                if remaining is None or departure is None:
                    urgency.append(None)
                    continue
                laxity = departure - now - remaining * 3600 / max(1, s.request.requested_w)
                urgency.append((math.floor(laxity / step), departure, s.request.arrival))
            targets = laxity_share(available, floors, caps, urgency)
        else:
            targets = equal_share(available, floors, caps)
        return list(zip(sessions, targets, strict=True))

    def _set_grant(self, session: Session, grant: int, now: float, reason: Reason, detail: str) -> list[Effect]:
        sub = self.substations[session.substation_id]
        session.account(now)
        sub.granted_w += grant - session.granted_w
        session.granted_w = grant
        session.last_change_at = now
        session.changes += 1
        req = session.request
        answer = self._answer(req, "updated", now, session=session, reason=reason, detail=detail)
        self._evs[req.ev_id].answer = answer
        self.counters[f"updated:{reason}"] += 1
        return [ToSubstation(sub.id, SessionCommand(
                    command="update", session_id=session.session_id, ev_id=req.ev_id, ts=now,
                    granted_kw=w_to_kw(grant), reason=reason)),
                ToEv(req.ev_id, answer)]

    def _decrease(self, sub: Substation, now: float, *, shed: int = 0, skip: Session | None = None) -> list[Effect]:
        """Lower grants toward the policy's targets. While ``shed`` watts are still to be freed (over the limit, or
        making room for a new session): at once, the sessions furthest above their share first, each by at least
        a hysteresis step (or all that is left to shed) and at least down to its share: a base-load step or a
        newcomer moves a few grants, not all. Otherwise only cuts to the share past the hysteresis and hold time."""
        cfg = self.config
        if (shed <= 0 and sub.granted_w == sub.requested_w
                and sub.requested_w <= sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w()):
            return []  # everyone has all they asked for and it fits: no share to lower (the common case)
        step = self._step_w(sub)
        effects: list[Effect] = []
        for session, target in sorted(self._targets(sub, now), key=lambda st: st[1] - st[0].granted_w):
            if session is skip:
                continue
            above = session.granted_w - target
            if shed > 0:
                cut = min(session.granted_w - session.request.min_w, max(above, min(step, shed)))
                if cut > 0:
                    effects += self._set_grant(session, session.granted_w - cut, now, Reason.CAPACITY_REDUCED,
                                               "substation limit")
                    shed -= cut
                continue
            if above <= 0:
                break  # (sorted: nobody after this one is above its share)
            if above >= step and now - session.last_change_at >= cfg.min_hold_s:
                effects += self._set_grant(session, target, now, Reason.REBALANCED, "fair share changed")
        return effects

    def _raise(self, sub: Substation, now: float) -> list[Effect]:
        """Hand free power (beyond the noise band) to the sessions furthest below their share, past the hold time.
        Each raise is at least one hysteresis step (or all the room left), even past the session's share (by
        less than a step, so no later cut follows): power freed in small slices (one of 40 sessions ends: 0.03 kW
        each) still reaches EVs, in a few changes instead of one per session. No raise is smaller than the
        noise band: free power that noise would take back at once is left alone. Baselines never change a grant."""
        cfg = self.config
        if (cfg.policy in BASELINES or not sub.sessions or sub.granted_w >= sub.requested_w
                or not sub.is_available(now, cfg.stale_after_s)):
            return []  # (everyone already has all it asked for: nothing to raise)
        band = self._band_w(sub)
        step = self._step_w(sub)
        smallest = max(1, band)
        room = sub.limit_w(cfg.safety_margin_pct) - sub.used_w() - band
        effects: list[Effect] = []
        for session, target in sorted(self._targets(sub, now), key=lambda st: st[0].granted_w - st[1]):
            if room < smallest:
                break
            below = target - session.granted_w
            if below <= 0 or now - session.last_change_at < cfg.min_hold_s:
                continue
            rise = min(max(below, min(step, room)), session.request.requested_w - session.granted_w, room)
            if rise >= smallest:
                effects += self._set_grant(session, session.granted_w + rise, now, Reason.POWER_AVAILABLE,
                                           "more power is available")
                room -= rise
        return effects

    def _reduce(self, sub: Substation, now: float) -> list[Effect]:
        """Keep the substation within its limit: revoke the newest sessions while even their minimums do not
        fit, then bring grants down to their shares (at once when over the limit). Baselines never do."""
        cfg = self.config
        if cfg.policy in BASELINES or not sub.sessions or sub.capacity_w <= 0:
            return []
        sub.rebalanced_at = now
        effects: list[Effect] = []
        available = sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w()
        floors = sub.floors_w
        if floors > available:
            # reversed(): among sessions placed at the same instant, the one placed last is the newest.
            for session in sorted(reversed(sub.sessions.values()), key=lambda s: s.started_at, reverse=True):
                if floors <= available:
                    break
                floors -= session.request.min_w
                effects += self._revoke(session, now, Reason.CAPACITY_REDUCED,
                                        "substation load rose above its limit", stop_agent=True)
        limit = sub.limit_w(cfg.safety_margin_pct)
        # Over the limit: back under it, and under the noise band too, so the next wobble does not cut again.
        shed = sub.used_w() - (limit - self._band_w(sub)) if sub.used_w() > limit else 0
        return effects + self._decrease(sub, now, shed=shed)

    def _start_effects(self, session: Session, now: float, *, in_reply: bool) -> list[Effect]:
        req = session.request
        partial = session.granted_w < req.requested_w
        answer = self._answer(req, "assigned", now, session=session,
                              reason=Reason.PARTIAL_GRANT if partial else None,
                              detail="less than requested is available" if partial else None)
        state = self._evs[req.ev_id]
        state.answer = answer
        state.session_id = session.session_id
        self.counters["assigned"] += 1
        command = SessionCommand(
            command="start", session_id=session.session_id, ev_id=req.ev_id, ts=now,
            granted_kw=w_to_kw(session.granted_w), energy_kwh=req.energy_kwh,
            duration_minutes=req.duration_minutes, request_id=req.request_id, min_kw=w_to_kw(req.min_w),
            priority=req.priority,
        )
        # Decision order; the service batches agent commands per substation and publishes them after
        # the EV answers of the same pass (see balancer.service).
        return [ToSubstation(session.substation_id, command), ToEv(req.ev_id, answer, in_reply)]

    def _remove_session(self, session: Session) -> None:
        sub = self.substations[session.substation_id]
        if sub.sessions.pop(session.session_id, None) is not None:
            sub.granted_w -= session.granted_w
            sub.requested_w -= session.request.requested_w
            sub.floors_w -= session.request.min_w
        self._sessions.pop(session.session_id, None)
        self._ended_sessions[session.session_id] = None
        if len(self._ended_sessions) > self.config.answers_max:
            self._ended_sessions.popitem(last=False)

    def _max_headroom_w(self, now: float) -> int:
        """The most a new session could get anywhere now, under the policy (0: nothing can be placed)."""
        cfg = self.config
        subs = self.substations.values()
        if cfg.policy in BASELINES:
            return 1 << 40 if baseline_candidates(subs) else 0
        if cfg.policy in COMPRESSIBLE:
            return max((compressible_room_w(sub, now, cfg.safety_margin_pct, cfg.stale_after_s) for sub in subs),
                       default=0)
        return max((sub.headroom_w(now, cfg.safety_margin_pct, cfg.stale_after_s) for sub in subs), default=0)

    def _holds_capacity(self, req: PendingRequest, now: float) -> bool:
        """``req`` (at the head) has waited past the overtake guard and some substation could take it once
        enough frees. One that fits nowhere even when empty (capacity was cut) holds nothing back."""
        margin = self.config.safety_margin_pct
        return now - req.received_at >= self.config.overtake_guard_s and any(
            req.min_w <= sub.limit_w(margin) for sub in self.substations.values() if not sub.draining)

    def _head_reserved(self, now: float) -> bool:
        """The head has waited past the overtake guard: capacity is held for it."""
        head = self.queue.head()
        return head is not None and self._holds_capacity(head, now)

    def _serve_queue(self, now: float, replying_to: str | None = None) -> list[Effect]:
        """Place waiting requests in queue order. A request that does not fit is passed over (later ones
        that fit go first) unless it is the head and has waited past the overtake guard."""
        effects: list[Effect] = []
        if not len(self.queue):
            return effects
        room = self._max_headroom_w(now)
        at_head = True
        for req in self.queue.items():
            if room <= 0:
                break
            placed = self._place(req, now) if req.min_w <= room else None
            if placed is not None:
                self.queue.remove(req.ev_id)
                self.queue_waits.append(max(0.0, now - req.received_at))  # (the wall clock may step back)
                effects += placed[1] + self._start_effects(placed[0], now, in_reply=req.ev_id == replying_to)
                room = self._max_headroom_w(now)
                continue
            if at_head and self._holds_capacity(req, now):
                break
            at_head = False
        return effects

    def _revoke(self, session: Session, now: float, reason: Reason, detail: str, *,
                stop_agent: bool) -> list[Effect]:
        """Take a session away and put its request back in line (it was accepted: never dropped), asking
        only for what is left of its energy and duration."""
        session.account(now)
        self._remove_session(session)
        req = session.request
        remaining = session.remaining_wh()
        if remaining is not None:
            req.energy_kwh = max(0.001, round(remaining / 1000, 6))
        if req.duration_minutes is not None:
            req.duration_minutes = max(0.1, req.duration_minutes - (now - session.started_at) / 60)
        effects: list[Effect] = []
        if stop_agent:
            effects.append(ToSubstation(session.substation_id, SessionCommand(
                command="stop", session_id=session.session_id, ev_id=req.ev_id, ts=now, reason=reason)))
        revoked = self._answer(req, "revoked", now, session=session, reason=reason,
                               detail=detail + "; the request is back in the queue and will be re-assigned")
        effects.append(ToEv(req.ev_id, revoked))
        self.counters[f"revoked:{reason}"] += 1
        state = self._evs[req.ev_id]
        state.session_id = None
        position = self.queue.push(req, force=True)
        state.answer = self._answer(req, "queued", now, reason=reason, position=position)
        self._requeued.append(req.ev_id)
        return effects

    def _requeue_notices(self, now: float) -> list[Effect]:
        """``queued`` (with the position) for revoked requests that did not find a new place at once."""
        effects: list[Effect] = []
        for ev_id in self._requeued:
            state = self._evs.get(ev_id)
            position = self.queue.position(ev_id)
            if state is not None and position is not None:
                state.answer = self._answer(state.request, "queued", now, reason=state.answer.reason,
                                            position=position)
                effects.append(ToEv(ev_id, state.answer))
        self._requeued.clear()
        return effects

    # ------------------------------------------------------------------ EV requests
    def _on_request(self, ev_id: str, msg: ChargeRequest, now: float) -> list[Effect]:
        request_id = msg.request_id or self.new_request_id()
        if msg.ev_id is not None and msg.ev_id != ev_id:
            return [self.reject(ev_id, request_id, Reason.ID_MISMATCH,
                                f"body ev_id {msg.ev_id!r} differs from the topic's {ev_id!r}", now)]
        state = self._evs.get(ev_id)
        if state is not None and state.request.request_id == request_id:
            self.counters["duplicate"] += 1
            return [ToEv(ev_id, state.answer, in_reply=True)]
        closed = self._closed.get((ev_id, request_id))
        if closed is not None:
            self.counters["duplicate"] += 1
            return [ToEv(ev_id, closed.answer, in_reply=True)]
        if state is not None:
            return [self.reject(ev_id, request_id, Reason.EV_BUSY,
                                f"EV already has open request {state.request.request_id!r}; "
                                "release it first", now, remember=True)]
        requested_w = max(1, kw_to_w_down(msg.requested_kw))  # never a grant of 0 W
        min_kw = msg.min_kw if msg.min_kw is not None else min(msg.requested_kw, self.config.default_min_kw)
        req = PendingRequest(
            ev_id=ev_id, request_id=request_id, requested_w=requested_w,
            min_w=max(1, min(requested_w, kw_to_w_up(min_kw))), priority=msg.priority,
            arrival=next(self._arrivals), received_at=now,
            duration_minutes=msg.duration_minutes, energy_kwh=msg.energy_kwh, departure=msg.departure,
        )
        largest = max((sub.limit_w(self.config.safety_margin_pct) for sub in self.substations.values()
                       if sub.capacity_w > 0), default=None)
        if largest is not None and req.min_w > largest:
            return [self.reject(ev_id, request_id, Reason.EXCEEDS_CAPACITY,
                                f"min_kw {w_to_kw(req.min_w):g} exceeds the largest substation limit "
                                f"({w_to_kw(largest):g} kW): it could never be placed", now,
                                remember=True)]  # guarantee 5: a redelivery gets this same answer
        reserved = self._head_reserved(now)
        if not reserved:
            placed = self._place(req, now)
            if placed is not None:
                self._evs[ev_id] = _EvState(req, self._answer(req, "queued", now))
                return placed[1] + self._start_effects(placed[0], now, in_reply=True)
        if self.queue.full():
            return [self.reject(ev_id, request_id, Reason.QUEUE_FULL,
                                f"no headroom and {len(self.queue)} requests already waiting", now, remember=True)]
        self.queue.push(req)
        self._evs[ev_id] = _EvState(req, self._answer(req, "queued", now))
        # Nothing else changed, so nothing else waiting can fit now: no need to serve the queue. Unless it
        # went ahead of a head that held capacity (higher priority): the hold is gone, the new head may fit.
        effects = self._serve_queue(now, replying_to=ev_id) if reserved and self.queue.head() is req else []
        if ev_id in self.queue:
            answer = self._answer(req, "queued", now, reason=Reason.NO_HEADROOM,
                                  position=self.queue.position(ev_id))
            self._evs[ev_id].answer = answer
            self.counters["queued"] += 1
            effects.append(ToEv(ev_id, answer, in_reply=True))
        return effects

    def reject(self, ev_id: str, request_id: str | None, reason: Reason, detail: str, now: float, *,
               remember: bool = False) -> ToEv:
        """A ``rejected`` answer. ``remember`` keeps it for redeliveries of the same request id."""
        answer = Assignment(request_id=request_id, ev_id=ev_id, status="rejected", ts=now,
                            reason=reason, detail=detail)
        self.counters[f"rejected:{reason}"] += 1
        if remember and request_id is not None:
            self._closed[(ev_id, request_id)] = _Closed(answer, now)
        return ToEv(ev_id, answer, in_reply=True)

    def _on_release(self, ev_id: str, msg: Release, now: float) -> list[Effect]:
        state = self._evs.get(ev_id)
        matches = state is not None and (
            (msg.request_id is None or msg.request_id == state.request.request_id)
            and (msg.session_id is None or msg.session_id == state.session_id))
        if state is None or not matches:
            return [self.reject(ev_id, msg.request_id, Reason.NOTHING_TO_RELEASE,
                                "no open request or session matches this release", now)]
        if state.session_id is None:
            self.queue.remove(ev_id)
            answer = self._answer(state.request, "cancelled", now, reason=Reason.RELEASED)
            self._close(ev_id, answer, now)
            self.counters["cancelled"] += 1
            # The withdrawn request may have been the head that blocked the ones behind it.
            return [ToEv(ev_id, answer, in_reply=True), *self._serve_queue(now)]
        session = self._sessions[state.session_id]
        self._remove_session(session)
        answer = self._answer(state.request, "completed", now, session=session, reason=Reason.RELEASED)
        self._close(ev_id, answer, now)
        self.counters["completed:released"] += 1
        effects: list[Effect] = [
            ToSubstation(session.substation_id, SessionCommand(
                command="stop", session_id=session.session_id, ev_id=ev_id, ts=now, reason=Reason.RELEASED)),
            ToEv(ev_id, answer, in_reply=True),
        ]
        return effects + self._serve_queue(now)

    # ------------------------------------------------------------------ substations
    def _on_telemetry(self, msg: Telemetry, now: float) -> list[Effect]:
        sub = self.substation(msg.substation_id, now)
        if msg.seq <= sub.last_seq and sub.last_seq - msg.seq < 100:
            self.counters["telemetry_out_of_order"] += 1
            return []
        sub.last_seq = msg.seq
        if (sub.last_telemetry_at is not None and sub.reported_capacity_w > 0
                and sub.load_w > sub.reported_capacity_w):  # overloaded since the previous sample
            sub.overload_s += max(0.0, min(now - sub.last_telemetry_at, self.config.stale_after_s))
        sub.reported_capacity_w = kw_to_w_down(msg.capacity_kw)
        sub.apply_capacity()
        sub.stale = False
        sub.base_load_w = kw_to_w_up(msg.base_load_kw)
        sub.load_w = kw_to_w_up(msg.load_kw)
        sub.ev_load_w = kw_to_w_up(msg.ev_load_kw)
        sub.reported_sessions = msg.active_sessions
        sub.last_telemetry_at = now
        sub.granted_at_telemetry_w = sub.granted_w
        sub.observe_noise(now, max(self.config.min_hold_s, 1.0), self.config.noise_decay_s)
        sub.lost = False
        effects = self._reduce(sub, now)
        effects += self._serve_queue(now)
        effects += self._raise(sub, now)
        return effects + self._requeue_notices(now)

    def _on_status(self, substation_id: str, state: str, now: float, *, inventory: bool = False) -> list[Effect]:
        """``inventory``: this ``online`` status closes the agent's re-announcement to this balancer (every
        session it runs was announced just before): sessions it did not announce are gone there."""
        if state != "online" and substation_id not in self.substations:
            return []  # the retained last will of an agent we do not know (one removed long ago): nothing to do
        sub = self.substation(substation_id, now)
        effects = self._reconcile(sub, now) if inventory and state == "online" else []
        sub.announced.clear()  # a status closes (or, offline, breaks off) the agent's announcement
        if state == "online":
            sub.status = state
            sub.offline_since = None
            sub.last_seq = -1  # the agent may have restarted and counts from 0 again
            return effects + self._serve_queue(now) + self._requeue_notices(now)  # back: it has headroom again
        if sub.status != "offline":
            self.counters["substation_offline"] += 1
            sub.offline_since = now
        sub.status = state
        return self._offline_grace_over(sub, now)

    def _offline_grace_over(self, sub: Substation, now: float) -> list[Effect]:
        """Offline past the grace: its sessions are revoked and their requests re-queued (re-placed elsewhere)."""
        since = sub.offline_since
        if since is None or not sub.sessions or now - since < self.config.offline_grace_s:
            return []
        return self._revoke_all(sub, now, Reason.SUBSTATION_OFFLINE,
                                f"substation {sub.id} went offline and did not come back within "
                                f"{self.config.offline_grace_s:g} s", stop_agent=False)

    def _reconcile(self, sub: Substation, now: float) -> list[Effect]:
        """The agent announced its whole inventory: a session it had confirmed and no longer announces is gone
        (the agent restarted): revoke it and re-queue its request. Unconfirmed ones may be starting right now."""
        gone = [s for s in sub.sessions.values() if s.confirmed and s.session_id not in sub.announced]
        effects: list[Effect] = []
        for session in gone:
            self.counters["session_lost"] += 1
            effects += self._revoke(session, now, Reason.SESSION_LOST,
                                    f"substation {sub.id} no longer runs this session", stop_agent=True)
        return effects

    def _revoke_all(self, sub: Substation, now: float, reason: Reason, detail: str, *,
                    stop_agent: bool) -> list[Effect]:
        effects: list[Effect] = []
        for session in sorted(sub.sessions.values(), key=lambda s: s.request.queue_key):
            effects += self._revoke(session, now, reason, detail, stop_agent=stop_agent)
        effects += self._serve_queue(now)
        return effects + self._requeue_notices(now)

    def _on_session_event(self, substation_id: str, msg: SessionEvent, now: float) -> list[Effect]:
        session = self._sessions.get(msg.session_id)
        if session is None or session.substation_id != substation_id:
            if msg.event == "started" and msg.session_id in self._ended_sessions:
                return []  # ended (released, revoked) before it started: the agent has its stop already
            if msg.event in ("started", "running"):
                return self._adopt_or_stop(substation_id, msg, now)
            if msg.session_id not in self._ended_sessions and msg.ev_id not in self._evs:
                # A session from before a balancer restart ended: its EV still deserves to hear it.
                self.counters["completed:unknown_session"] += 1
                return [ToEv(msg.ev_id, Assignment(
                    request_id=None, ev_id=msg.ev_id, status="completed", ts=now, substation_id=substation_id,
                    session_id=msg.session_id, reason=msg.reason or Reason.STOPPED_BY_AGENT))]
            return []
        if msg.event != "ended":
            session.confirmed = True
            if msg.event == "running":
                self.substation(substation_id, now).announced.add(msg.session_id)
            return []
        reason = msg.reason or Reason.STOPPED_BY_AGENT
        if reason not in FINAL_END_REASONS:
            # The session could not continue (the agent went offline, stopped it, ...): the EV did not get what it
            # came for, so its request goes back in line, never "completed".
            if msg.energy_delivered_kwh is not None:
                session.delivered_wh = max(session.delivered_wh, msg.energy_delivered_kwh * 1000)
                session.accounted_at = now
            cause = Reason(reason) if reason in Reason._value2member_map_ else Reason.STOPPED_BY_AGENT
            effects = self._revoke(session, now, cause, f"substation {substation_id} ended the session ({reason})",
                                   stop_agent=False)
            return effects + self._serve_queue(now) + self._requeue_notices(now)
        self._remove_session(session)
        answer = self._answer(session.request, "completed", now, session=session, reason=reason)
        self._close(session.request.ev_id, answer, now)
        self.counters[f"completed:{reason}"] += 1
        return [ToEv(session.request.ev_id, answer), *self._serve_queue(now)]

    def _adopt_or_stop(self, substation_id: str, msg: SessionEvent, now: float) -> list[Effect]:
        """A session runs that this balancer does not know. Never seen (this balancer restarted since it was
        placed) and its EV has nothing else open: adopt it, so the EV keeps its session and the power counts.
        Otherwise (we ended it, the EV has moved on, or the event cannot say what it draws): stop it."""
        adoptable = (msg.session_id not in self._ended_sessions and msg.ev_id not in self._evs
                     and msg.granted_kw is not None)
        if not adoptable or msg.granted_kw is None:
            self.counters["unknown_session_stopped"] += 1
            return [ToSubstation(substation_id, SessionCommand(
                command="stop", session_id=msg.session_id, ev_id=msg.ev_id, ts=now, reason=Reason.UNKNOWN_SESSION))]
        granted_w = kw_to_w_down(msg.granted_kw)
        min_kw = msg.min_kw if msg.min_kw is not None else msg.granted_kw
        req = PendingRequest(
            ev_id=msg.ev_id, request_id=msg.request_id or self.new_request_id(), requested_w=granted_w,
            min_w=max(1, min(granted_w, kw_to_w_up(min_kw))), priority=msg.priority or 0,
            arrival=next(self._arrivals), received_at=now,
            duration_minutes=msg.duration_minutes or None, energy_kwh=msg.energy_kwh or None)
        sub = self.substation(substation_id, now)
        session = Session(msg.session_id, substation_id, req, granted_w, now, confirmed=True,
                          last_change_at=now, accounted_at=now)
        self._attach(sub, session)
        if msg.event == "running":
            sub.announced.add(session.session_id)
        self._evs[req.ev_id] = _EvState(req, self._answer(req, "assigned", now, session=session),
                                        session_id=session.session_id)
        self.counters["adopted"] += 1
        if sub.last_telemetry_at is None:
            return []  # capacity unknown yet: the first telemetry checks the limit (_reduce)
        # It was running when the last telemetry was measured, so its power is in that measurement: it moves from
        # "load we do not control" to "our grant" instead of counting twice (which revoked adopted sessions as
        # over the limit and re-placed them as second sessions, found by bench/faults.py). Never below the
        # reported base load (uncontrolled_w), so a session that was paused at the time costs nothing unsafe.
        sub.granted_at_telemetry_w += granted_w
        effects = self._reduce(sub, now)
        effects += self._serve_queue(now)  # a session it revoked may fit elsewhere at once
        return effects + self._requeue_notices(now)

    # ------------------------------------------------------------------ time
    def _tick(self, now: float) -> list[Effect]:
        """Periodic work: substations silent past ``lost_after_s`` lose their sessions; old answers expire."""
        effects: list[Effect] = []
        cfg = self.config
        for sub in self.substations.values():
            if not sub.stale and sub.last_telemetry_at is not None and not sub.is_fresh(now, cfg.stale_after_s):
                sub.stale = True
                sub.stale_transitions += 1
                self.counters["stale_telemetry"] += 1
            # Never heard from: silence counts from when we first learned of it (say, from a session
            # announced to a restarted balancer before the substation's first telemetry).
            heard = sub.last_telemetry_at if sub.last_telemetry_at is not None else sub.known_since
            silent = now - heard > cfg.lost_after_s
            if silent and not sub.lost and sub.sessions:
                sub.lost = True
                self.counters["substation_lost"] += 1
                effects += self._revoke_all(sub, now, Reason.SUBSTATION_LOST,
                                            f"no telemetry from substation {sub.id} for {cfg.lost_after_s:g} s",
                                            stop_agent=True)
            effects += self._offline_grace_over(sub, now)
        due = [sub for sub in self.substations.values() if now - sub.rebalanced_at >= cfg.rebalance_interval_s]
        for sub in due:
            effects += self._reduce(sub, now)
        effects += self._serve_queue(now)
        for sub in due:
            effects += self._raise(sub, now)
        effects += self._requeue_notices(now)
        if len(self.queue) and now - self._queue_updated_at >= cfg.queue_update_interval_s:
            self._queue_updated_at = now
            effects += self._queue_updates(now)
        while self._closed:
            key, closed = next(iter(self._closed.items()))
            if len(self._closed) <= cfg.answers_max and now - closed.at <= cfg.answer_ttl_s:
                break
            del self._closed[key]
        return effects

    def _queue_updates(self, now: float) -> list[Effect]:
        """Tell queued EVs whose place in line or estimated wait moved (at most every queue_update_interval_s)."""
        effects: list[Effect] = []
        ends = self.expected_ends()
        for position, req in enumerate(self.queue.items(), start=1):
            state = self._evs[req.ev_id]
            old = state.answer
            answer = self._answer(req, "queued", now, reason=old.reason, position=position, ends=ends)
            eta_moved = (old.eta_s is None) != (answer.eta_s is None) or (
                old.eta_s is not None and answer.eta_s is not None and abs(old.eta_s - answer.eta_s) > 30)
            if old.status != "queued" or old.position != position or eta_moved:
                state.answer = answer
                effects.append(ToEv(req.ev_id, answer))
        return effects

    # ------------------------------------------------------------------ public event handlers
    def on_request(self, ev_id: str, msg: ChargeRequest, now: float) -> list[Effect]:
        return self._coalesce(self._on_request(ev_id, msg, now))

    def on_release(self, ev_id: str, msg: Release, now: float) -> list[Effect]:
        return self._coalesce(self._on_release(ev_id, msg, now))

    def on_telemetry(self, msg: Telemetry, now: float) -> list[Effect]:
        return self._coalesce(self._on_telemetry(msg, now))

    def on_status(self, substation_id: str, state: str, now: float, *, inventory: bool = False) -> list[Effect]:
        return self._coalesce(self._on_status(substation_id, state, now, inventory=inventory))

    def on_session_event(self, substation_id: str, msg: SessionEvent, now: float) -> list[Effect]:
        return self._coalesce(self._on_session_event(substation_id, msg, now))

    def on_control(self, msg: ControlCommand, now: float) -> tuple[Reason | None, str, list[Effect]]:
        """An operator action on one substation. Returns (None if done else the reason it was refused, a
        detail, effects). Lowering the capacity below what runs reduces or moves sessions at once; ``forget``
        (a decommissioned substation) revokes its sessions, which are placed elsewhere or queued, and drops it."""
        sub = self.substations.get(msg.substation_id)
        if sub is None:
            return Reason.UNKNOWN_SUBSTATION, f"substation {msg.substation_id!r} has never been heard of", []
        self.counters[f"control:{msg.action}"] += 1
        effects: list[Effect] = []
        if msg.action == "drain":
            sub.draining = True
            detail = "no new sessions; running sessions finish"
        elif msg.action == "undrain":
            sub.draining = False
            effects = self._serve_queue(now)
            detail = "takes new sessions again"
        elif msg.action == "forget":
            moved = len(sub.sessions)
            sub.draining = True  # nothing new lands there while its sessions are moved
            effects = self._revoke_all(sub, now, Reason.DECOMMISSIONED, f"substation {sub.id} was decommissioned",
                                       stop_agent=True)
            del self.substations[sub.id]
            self._poll_snapshot.pop(sub.id, None)
            detail = f"forgotten; {moved} session(s) moved elsewhere or back in the queue"
        else:
            sub.capacity_limit_w = None if msg.capacity_kw is None else kw_to_w_down(msg.capacity_kw)
            sub.apply_capacity()
            effects = self._reduce(sub, now)
            effects += self._serve_queue(now)
            effects += self._raise(sub, now)
            effects += self._requeue_notices(now)
            detail = ("operator limit removed" if msg.capacity_kw is None
                      else f"planning with at most {msg.capacity_kw:g} kW")
        return None, detail, self._coalesce(effects)

    def tick(self, now: float) -> list[Effect]:
        """Periodic work: rebalancing, lost substations, queue updates, expiry of old answers."""
        return self._coalesce(self._tick(now))

    def _coalesce(self, effects: list[Effect]) -> list[Effect]:
        """One command and one answer per session per call. Admitting several requests in one call can squeeze
        a session started or reduced moments earlier in the same call: each later reduction is folded into
        that session's first command (a lower value, earlier: never less safe), and the EV hears only the
        final grant. An increase is never folded (it must stay after the reductions that make room)."""
        first_cmd: dict[str, int] = {}
        last_answer: dict[str, int] = {}
        out: list[Effect] = []
        for e in effects:
            if isinstance(e, ToSubstation):
                cmd = e.message
                at = first_cmd.get(cmd.session_id)
                if at is not None and cmd.command == "update" and cmd.reason != Reason.POWER_AVAILABLE:
                    first = out[at]
                    assert isinstance(first, ToSubstation)
                    if cmd.granted_kw <= first.message.granted_kw:
                        first.message.granted_kw = cmd.granted_kw
                        continue
                if cmd.command in ("start", "update"):
                    first_cmd.setdefault(cmd.session_id, len(out))
                out.append(e)
                continue
            answer = e.message
            at = last_answer.get(answer.ev_id)
            prev = out[at] if at is not None else None
            if (isinstance(prev, ToEv) and answer.status == "updated" and answer.reason != Reason.POWER_AVAILABLE
                    and prev.message.session_id == answer.session_id
                    and prev.message.status in ("assigned", "updated")):
                prev.message.granted_kw = answer.granted_kw  # the EV hears its final grant once
                state = self._evs.get(answer.ev_id)
                if state is not None and state.answer is answer:
                    state.answer = prev.message
                continue
            last_answer[answer.ev_id] = len(out)
            out.append(e)
        return out

    # ------------------------------------------------------------------ inspection
    def violations(self) -> list[str]:
        """Substations whose commitment exceeds their limit (guarantee 1). Empty when all is well."""
        margin = self.config.safety_margin_pct
        out = []
        for sub in self.substations.values():
            if sub.sessions and sub.committed_w() > sub.limit_w(margin):
                out.append(f"{sub.id}: base {sub.base_load_w} W + granted {sub.granted_w} W "
                           f"> limit {sub.limit_w(margin)} W")
            sessions = sub.sessions.values()
            if (sub.granted_w, sub.requested_w, sub.floors_w) != (
                    sum(s.granted_w for s in sessions), sum(s.request.requested_w for s in sessions),
                    sum(s.request.min_w for s in sessions)):
                out.append(f"{sub.id}: running totals out of step with its sessions")
        return out

    def open_requests(self) -> int:
        return len(self._evs)

    def session_count(self) -> int:
        return len(self._sessions)

    def ev_state(self, ev_id: str) -> Assignment | None:
        state = self._evs.get(ev_id)
        return state.answer if state else None

    def snapshot(self, now: float) -> dict[str, Any]:
        cfg = self.config
        subs = []
        for sub in sorted(self.substations.values(), key=lambda s: s.id):
            subs.append({
                "substation_id": sub.id,
                "capacity_kw": w_to_kw(sub.capacity_w),
                "limit_kw": w_to_kw(sub.limit_w(cfg.safety_margin_pct)),
                "base_load_kw": w_to_kw(sub.base_load_w),
                "load_kw": w_to_kw(sub.load_w),
                "granted_kw": w_to_kw(sub.granted_w),
                "headroom_kw": w_to_kw(sub.headroom_w(now, cfg.safety_margin_pct, cfg.stale_after_s)),
                "sessions": len(sub.sessions),
                "status": sub.status,
                "fresh": sub.is_fresh(now, cfg.stale_after_s),
                "lost": sub.lost,
            })
        return {"substations": subs, "queue_length": len(self.queue), "open_requests": len(self._evs),
                "sessions": len(self._sessions)}
