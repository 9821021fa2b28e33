"""Stateful property test of the allocation core: random event sequences, invariants after every step.

A hypothesis ``RuleBasedStateMachine`` drives one :class:`Balancer` with requests (random power,
minimum, priority, redeliveries of earlier request ids), telemetry (base load up and down, capacity
cuts and raises, out-of-order sequence numbers), session events, releases, offline/online status and
time passing (crossing the stale and lost thresholds). After every step it checks:

* guarantee 1 exactly (integer watts): ``violations() == []`` and ``base + granted <= limit`` where sessions run;
* every open request is either queued or backs exactly one session, never both, and no EV has two sessions;
* no request is lost: every request that was answered ``assigned``/``queued`` and has not been answered
  ``completed``/``cancelled`` is still open, and nothing else is;
* queue order (priority, then arrival) and positions are consistent, and the head cannot be placed
  anywhere (capacity that frees is used at once);
* effect ordering: no ``start`` for a substation before a ``stop``/``update`` for it in the same step;
* every effect is a valid contract message (it survives the strict codec);
* substations offline past the grace, or lost, hold no sessions; grants stay within ``[min, requested]``;
* an ``ended`` event completes the request only for a final reason (energy, duration, release); otherwise it is
  re-queued; an agent's inventory drops the confirmed sessions it left out.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from balancer.core import Balancer, CoreConfig, Effect, ToEv, ToSubstation
from balancer.core.model import kw_to_w_down, kw_to_w_up
from balancer.core.policies import COMPRESSIBLE
from balancer.core.policies.scan import compressible_room_w, least_utilised
from grid_protocol import (
    Assignment,
    ChargeRequest,
    Reason,
    Release,
    SessionCommand,
    SessionEvent,
    Telemetry,
    decode,
    encode,
)
from grid_protocol.reasons import FINAL_END_REASONS

SUBS = ("A", "B", "C")
EVS = tuple(f"EV{i}" for i in range(16))
RIDS = tuple(f"r{i}" for i in range(4))  # a small pool per EV: redeliveries and reuse happen often
T0 = 1_700_000_000.0

CONFIG = CoreConfig(safety_margin_pct=10.0, stale_after_s=5.0, lost_after_s=30.0, queue_max=4,
                    default_min_kw=1.4, answer_ttl_s=3600.0)

kw = st.sampled_from([0.5, 1.4, 3.7, 7.4, 11.0, 22.0, 50.0]) | st.floats(0.001, 120.0, allow_nan=False)
capacity = st.sampled_from([0.0, 0.0004, 10.0, 20.0, 30.0, 50.0, 100.0]) | st.floats(1.0, 200.0, allow_nan=False)


class CoreMachine(RuleBasedStateMachine):
    """The default policy (least-utilised); subclasses below run the same machine under the others."""

    policy = "least-utilised"

    def __init__(self) -> None:
        super().__init__()
        self.b = Balancer(dataclasses.replace(CONFIG, policy=self.policy))
        self.now = T0
        self.seq: dict[str, int] = {}
        self.last_tel: dict[str, tuple[float, float]] = {}
        self.open: dict[str, str] = {}  # ev -> request_id the model believes is open
        self.final: dict[tuple[str, str], tuple[Assignment, float]] = {}  # remembered final answers
        self.calls: list[list[Effect]] = []  # effects of each engine call made by the current rule
        self.step = ""
        self.prev_sessions: dict[str, tuple[str, str, int]] = {}  # session id -> (ev, substation, granted W)
        self.adopted: set[str] = set()
        self.announced: dict[str, tuple[str, int]] = {}  # sessions announced in this step -> (substation, W)

    # ------------------------------------------------------------------ helpers
    def _apply(self, step: str, effects: list[Effect]) -> list[Effect]:
        """Record effects and update the model of open requests from the lifecycle answers."""
        self.step = step
        self.calls.append(effects)
        for e in effects:
            if not isinstance(e, ToEv):
                continue
            a = e.message
            if a.status in ("completed", "cancelled") and a.request_id is not None \
                    and self.open.get(e.ev_id) == a.request_id:
                del self.open[e.ev_id]
                self.final[(e.ev_id, a.request_id)] = (a, self.now)
        return effects

    # ------------------------------------------------------------------ rules
    @initialize(caps=st.lists(capacity, min_size=3, max_size=3))
    def start(self, caps: list[float]) -> None:
        for sid, cap in zip(SUBS, caps, strict=True):
            self._telemetry(sid, cap, cap * 0.2, None)

    def _telemetry(self, sid: str, cap: float, base: float, seq_back: int | None) -> list[Effect]:
        nxt = self.seq.get(sid, -1) + 1
        seq = max(0, nxt - 1 - seq_back) if seq_back is not None else nxt
        if seq_back is None:
            self.seq[sid] = nxt
        msg = Telemetry(substation_id=sid, ts=self.now, seq=seq, capacity_kw=cap, load_kw=base, base_load_kw=base,
                        ev_load_kw=0.0, active_sessions=0)
        return self._apply(f"telemetry {sid} cap={cap} base={base} seq={seq}", self.b.on_telemetry(msg, self.now))

    @rule(sid=st.sampled_from(SUBS), data=st.data())
    def telemetry(self, sid: str, data: st.DataObject) -> None:
        cap, base = self.last_tel.get(sid, (100.0, 20.0))
        change = data.draw(st.sampled_from(["same", "base", "capacity", "both", "old_seq"]))
        if change in ("base", "both"):
            base = data.draw(st.floats(0.0, cap * 1.1, allow_nan=False))
        if change in ("capacity", "both"):
            cap = data.draw(capacity)
        if change == "old_seq":
            self._telemetry(sid, cap, data.draw(st.floats(0.0, cap * 1.1, allow_nan=False)),
                            data.draw(st.integers(0, 3)))
            return
        self.last_tel[sid] = (cap, base)
        self._telemetry(sid, cap, base, None)

    @rule(sid=st.sampled_from(SUBS), extra=st.floats(0.0, 60.0, allow_nan=False))
    def telemetry_with_unknown_load(self, sid: str, extra: float) -> None:
        """Measured load above the model (e.g. sessions the balancer does not know about)."""
        cap, base = self.last_tel.get(sid, (100.0, 20.0))
        nxt = self.seq.get(sid, -1) + 1
        self.seq[sid] = nxt
        committed = self.b.substations[sid].committed_w() / 1000
        msg = Telemetry(substation_id=sid, ts=self.now, seq=nxt, capacity_kw=cap, load_kw=committed + extra,
                        base_load_kw=base, ev_load_kw=0.0, active_sessions=0)
        self._apply(f"telemetry {sid} load+{extra}", self.b.on_telemetry(msg, self.now))

    @rule(ev=st.sampled_from(EVS), rid=st.sampled_from(RIDS), requested=kw,
          min_frac=st.sampled_from([None, 0.0, 0.5, 1.0]) | st.floats(0, 1),
          priority=st.integers(0, 3), energy=st.booleans(),
          body_ev=st.sampled_from(["same"] * 4 + ["none", "other"]))
    def request(self, ev: str, rid: str, requested: float, min_frac: float | None, priority: int, energy: bool,
                body_ev: str) -> None:
        msg = ChargeRequest(requested_kw=requested, request_id=rid, priority=priority,
                            ev_id={"same": ev, "none": None, "other": "EV_OTHER"}[body_ev],
                            min_kw=None if min_frac is None else requested * min_frac,
                            duration_minutes=None if energy else 30.0, energy_kwh=20.0 if energy else None,
                            departure=self.now + 3600 * (1 + priority) if energy else None)
        was_open = self.open.get(ev)
        final = self.final.get((ev, rid))
        if final is not None and self.now - final[1] > CONFIG.answer_ttl_s:
            del self.final[(ev, rid)]  # expired at the last tick: the request id may be used afresh
            final = None
        sessions_before = {s.session_id for s in self.b._sessions.values()}
        effects = self._apply(f"request {ev}/{rid} {requested:g} kW prio {priority} body {body_ev}",
                              self.b.on_request(ev, msg, self.now))
        replies = [e for e in effects if isinstance(e, ToEv) and e.in_reply]
        assert len(replies) == 1, f"exactly one direct answer expected: {effects}"
        (reply,) = replies
        a = reply.message
        assert reply.ev_id == ev and a.ev_id == ev and a.request_id == rid
        if body_ev == "other":
            assert (a.status, a.reason) == ("rejected", Reason.ID_MISMATCH)
            assert effects == [reply]
            return
        if was_open == rid:  # a redelivery of the open request: same answer, nothing else happens
            assert effects == [reply] and a.status in ("assigned", "queued", "updated")
            assert {s.session_id for s in self.b._sessions.values()} == sessions_before
        elif final is not None:  # a request id that got its final answer: that answer again
            assert effects == [ToEv(ev, final[0], in_reply=True)]
            return
        elif was_open is not None:
            assert (a.status, a.reason) == ("rejected", Reason.EV_BUSY) and effects == [reply], a
        else:  # a new request
            assert a.status in ("assigned", "queued") or (a.status, a.reason) in {
                ("rejected", Reason.QUEUE_FULL), ("rejected", Reason.EXCEEDS_CAPACITY)}, a
            if a.status == "rejected":
                assert effects == [reply]
            if a.reason == Reason.QUEUE_FULL:
                assert len(self.b.queue) >= CONFIG.queue_max
            if a.reason == Reason.EXCEEDS_CAPACITY:
                limits = [s.limit_w(CONFIG.safety_margin_pct) for s in self.b.substations.values() if s.capacity_w]
                assert limits and max(limits) < kw_to_w_up(msg.min_kw if msg.min_kw is not None else min(
                    requested, CONFIG.default_min_kw)), a
            if a.status == "queued":
                assert a.position == self.b.queue.position(ev)
        if a.status in ("assigned", "queued", "updated"):
            self.open[ev] = rid
        elif a.status == "rejected":  # ev_busy and queue_full are remembered for redeliveries
            self.final[(ev, rid)] = (a, self.now)

    @precondition(lambda self: bool(self.b._sessions))
    @rule(data=st.data(), reason=st.sampled_from([Reason.ENERGY_DELIVERED, Reason.DURATION_ELAPSED, Reason.RELEASED,
                                                  Reason.SUBSTATION_OFFLINE, Reason.STOPPED_BY_AGENT, "other", None]))
    def session_ended(self, data: st.DataObject, reason: str | None) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.b._sessions)))
        s = self.b._sessions[session_id]
        ev = s.request.ev_id
        msg = SessionEvent(event="ended", session_id=session_id, ev_id=ev, ts=self.now, reason=reason)
        effects = self._apply(f"ended {session_id} ({ev}, {reason})",
                              self.b.on_session_event(s.substation_id, msg, self.now))
        to_ev = [e.message.status for e in effects if isinstance(e, ToEv) and e.ev_id == ev]
        if reason in FINAL_END_REASONS:
            assert ev not in self.open, "the session's request must be finished"
            assert "completed" in to_ev
        else:  # the session could not continue: the EV is re-queued (maybe re-placed at once), never completed
            assert ev in self.open and session_id not in self.b._sessions
            assert to_ev[0] == "revoked" and "completed" not in to_ev, to_ev

    @precondition(lambda self: bool(self.b._sessions))
    @rule(data=st.data())
    def inventory(self, data: st.DataObject) -> None:
        """An agent (maybe restarted) re-announces the sessions it still runs, then closes its inventory: a
        confirmed session it left out is gone there (revoked, re-queued); the announced ones stay."""
        sid = data.draw(st.sampled_from(sorted({s.substation_id for s in self.b._sessions.values()})))
        sub = self.b.substations[sid]
        if sub.status == "offline":
            return  # an agent publishes its inventory with its online status (below)
        kept = data.draw(st.sets(st.sampled_from(sorted(sub.sessions))))
        announced = kept | sub.announced  # (running events since its last status count too: adopt() sends them)
        for session_id in sorted(kept):
            s = sub.sessions[session_id]
            msg = SessionEvent(event="running", session_id=session_id, ev_id=s.request.ev_id, ts=self.now,
                               granted_kw=s.granted_w / 1000)
            assert self._apply(f"running {session_id}", self.b.on_session_event(sid, msg, self.now)) == []
        before = {k: (s.request.ev_id, s.confirmed) for k, s in sub.sessions.items()}
        self._apply(f"inventory {sid} kept {sorted(kept)}", self.b.on_status(sid, "online", self.now, inventory=True))
        for session_id, (ev, confirmed) in before.items():
            if session_id in announced or not confirmed:
                assert session_id in self.b._sessions or session_id in self.b._ended_sessions
            else:
                assert session_id not in self.b._sessions and ev in self.open, (session_id, ev)

    @precondition(lambda self: bool(self.b._sessions))
    @rule(data=st.data())
    def session_started(self, data: st.DataObject) -> None:
        session_id = data.draw(st.sampled_from(sorted(self.b._sessions)))
        s = self.b._sessions[session_id]
        msg = SessionEvent(event="started", session_id=session_id, ev_id=s.request.ev_id, ts=self.now)
        assert self._apply(f"started {session_id}", self.b.on_session_event(s.substation_id, msg, self.now)) == []

    @rule(sid=st.sampled_from(SUBS), ev=st.sampled_from(EVS), event=st.sampled_from(["started", "ended"]),
          n=st.integers(1, 50))
    def ghost_session_event(self, sid: str, ev: str, event: str, n: int) -> None:
        """Events for sessions the balancer does not run there (revoked, ended, wrong substation)."""
        session_id = f"s{n}"
        known = self.b._sessions.get(session_id)
        if known is not None and known.substation_id == sid:
            return
        msg = SessionEvent(event=event, session_id=session_id, ev_id=ev, ts=self.now)  # type: ignore[arg-type]
        effects = self._apply(f"ghost {event} {session_id} on {sid}", self.b.on_session_event(sid, msg, self.now))
        stops = [(e.substation_id, e.message.command) for e in effects if isinstance(e, ToSubstation)]
        if event == "started":  # never placed here: stopped; ended by us already: the agent has its stop
            assert stops == [(sid, "stop")] or (stops == [] and session_id in self.b._ended_sessions)
        assert all(not (isinstance(e, ToEv) and e.message.status != "completed") for e in effects)

    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """The same request again (QoS 1 redelivery, EV retry), mostly of an open one."""
        ev = data.draw(st.sampled_from(sorted(self.open) or EVS))
        rid = self.open.get(ev) or data.draw(st.sampled_from(RIDS))
        self.request(ev, rid, 11.0, None, 0, False, "same")

    @rule(sid=st.sampled_from(SUBS), ev=st.sampled_from(EVS), n=st.integers(1, 30),
          event=st.sampled_from(["running", "started"]), granted=st.floats(0.5, 40.0, allow_nan=False),
          min_frac=st.none() | st.floats(0, 1), priority=st.none() | st.integers(0, 3),
          rid=st.none() | st.sampled_from(RIDS))
    def adopt(self, sid: str, ev: str, n: int, event: str, granted: float, min_frac: float | None,
              priority: int | None, rid: str | None) -> None:
        """An agent re-announces a session this balancer does not know (as after a balancer restart)."""
        session_id = f"old-{n}"
        sub = self.b.substations[sid]
        if session_id in self.b._sessions or sub.status == "offline" or sub.lost:
            return  # agents announce "online" first; a lost one sends no telemetry (see the report)
        msg = SessionEvent(event=event, session_id=session_id, ev_id=ev, ts=self.now,  # type: ignore[arg-type]
                           granted_kw=granted, min_kw=None if min_frac is None else granted * min_frac,
                           priority=priority, request_id=rid, energy_kwh=10.0)
        was_open = ev in self.open
        self.announced[session_id] = (sid, kw_to_w_down(granted))  # what it draws until a command says otherwise
        effects = self._apply(f"{event} (adopt?) {session_id} {ev} {granted:g} kW on {sid}",
                              self.b.on_session_event(sid, msg, self.now))
        if not was_open and ev in self.b._evs:  # adopted (possibly revoked at once to respect the limit)
            self.open[ev] = self.b._evs[ev].request.request_id
            self.adopted.add(session_id)
        else:
            assert any(isinstance(e, ToSubstation) and e.message.command == "stop" for e in effects) \
                or session_id in self.b._ended_sessions

    @rule(data=st.data(), by=st.sampled_from(["any", "rid", "other_rid", "session"]))
    def release(self, data: st.DataObject, by: str) -> None:
        pick_open = bool(self.open) and data.draw(st.integers(0, 4)) > 0  # mostly an EV with something open
        ev = data.draw(st.sampled_from(sorted(self.open) if pick_open else EVS))
        was_open = self.open.get(ev)
        session_id = next((s.session_id for s in self.b._sessions.values() if s.request.ev_id == ev), None)
        msg = Release(request_id={"rid": was_open, "other_rid": "zz"}.get(by),
                      session_id=session_id if by == "session" else None, ev_id=ev)
        effects = self._apply(f"release {ev} by {by}", self.b.on_release(ev, msg, self.now))
        first = effects[0]
        if was_open is None or by == "other_rid":  # (by "session" while queued names no session: releases all)
            assert isinstance(first, ToEv) and (first.message.status, first.message.reason) == (
                "rejected", Reason.NOTHING_TO_RELEASE)
            assert len(effects) == 1
        else:
            assert ev not in self.open
            if session_id is not None:
                assert isinstance(first, ToSubstation) and first.message.command == "stop"

    @precondition(lambda self: len(self.b.queue) > 0)
    @rule(data=st.data())
    def withdraw_queued(self, data: st.DataObject) -> None:
        """A waiting EV gives up (often the head, which may have been blocking smaller ones behind it)."""
        waiting = [r.ev_id for r in self.b.queue.items()]
        ev = data.draw(st.sampled_from(waiting[:1] * len(waiting) + waiting))
        effects = self._apply(f"withdraw {ev} (queue {waiting})", self.b.on_release(ev, Release(), self.now))
        assert isinstance(effects[0], ToEv) and effects[0].message.status == "cancelled"
        assert ev not in self.open

    @rule(sid=st.sampled_from(SUBS), state=st.sampled_from(["online", "offline"]))
    def status(self, sid: str, state: str) -> None:
        sub = self.b.substations[sid]
        held = dict(sub.sessions) if sub.status != "offline" else None
        effects = self._apply(f"status {sid} {state}", self.b.on_status(sid, state, self.now))
        if state == "offline":
            # Its sessions are kept through the grace (an agent may reconnect within its lease) ...
            if held is not None:
                assert sub.sessions == held
            assert not any(isinstance(e, ToSubstation) and e.substation_id == sid for e in effects)
            # ... and nothing new goes there meanwhile.
            assert sub.headroom_w(self.now, CONFIG.safety_margin_pct, CONFIG.stale_after_s) == 0

    @rule(dt=st.sampled_from([0.5, 2.0, 4.9, 5.5, 12.0, 31.0, 4000.0]), refresh=st.sets(st.sampled_from(SUBS)))
    def time_passes(self, dt: float, refresh: set[str]) -> None:
        """The clock moves; some substations report on time, the others fall silent. Then a tick."""
        self.now += dt
        for sid in sorted(refresh):
            cap, base = self.last_tel.get(sid, (100.0, 20.0))
            self._telemetry(sid, cap, base, None)
        self._apply(f"tick +{dt} (fresh: {sorted(refresh)})", self.b.tick(self.now))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def check(self) -> None:
        """All invariants, in a fixed order, after every rule; then forget the rule's effects."""
        self.capacity_never_exceeded()
        self.open_requests_queued_xor_running()
        self.no_request_lost()
        self.sessions_consistent()
        self.queue_ordered_and_nothing_placeable_waits()
        self.effects_ordered_and_valid()  # replays from the grants before the step: before prev_sessions moves on
        self.every_change_is_told()
        self.calls = []
        self.announced = {}

    def capacity_never_exceeded(self) -> None:
        assert self.b.violations() == [], (self.step, self.b.violations())
        for sub in self.b.substations.values():
            if sub.sessions:
                assert sub.base_load_w + sum(s.granted_w for s in sub.sessions.values()) <= sub.limit_w(
                    CONFIG.safety_margin_pct), self.step

    def open_requests_queued_xor_running(self) -> None:
        b = self.b
        by_ev = Counter(s.request.ev_id for s in b._sessions.values())
        assert all(n == 1 for n in by_ev.values()), f"an EV with two sessions: {by_ev} after {self.step}"
        queued = {r.ev_id for r in b.queue.items()}
        assert len(queued) == len(b.queue)
        for ev, state in b._evs.items():
            in_queue = ev in queued
            running = by_ev.get(ev, 0)
            assert in_queue + running == 1, f"{ev}: queued={in_queue} sessions={running} after {self.step}"
            if running:
                assert state.session_id is not None and b._sessions[state.session_id].request is state.request
                assert state.answer.status in ("assigned", "updated"), state.answer
            else:
                assert state.session_id is None and b.queue.get(ev) is state.request
                assert state.answer.status == "queued", state.answer
        assert set(by_ev) <= set(b._evs) and queued <= set(b._evs), self.step

    def no_request_lost(self) -> None:
        actual = {ev: st.request.request_id for ev, st in self.b._evs.items()}
        assert actual == self.open, f"open per model {self.open} vs balancer {actual} after {self.step}"

    def sessions_consistent(self) -> None:
        b = self.b
        on_subs = {sid: s for sub in b.substations.values() for sid, s in sub.sessions.items()}
        assert on_subs.keys() == b._sessions.keys()
        for sid, s in b._sessions.items():
            assert on_subs[sid] is s and b.substations[s.substation_id].sessions[sid] is s
            assert s.request.min_w <= s.granted_w <= s.request.requested_w or s.request.requested_w == 0, s
        for sub in b.substations.values():
            past_grace = (sub.status == "offline" and sub.offline_since is not None
                          and self.now - sub.offline_since >= CONFIG.offline_grace_s)
            if past_grace or sub.lost:
                assert not sub.sessions, f"{sub.id} offline/lost but holds sessions after {self.step}"

    def queue_ordered_and_nothing_placeable_waits(self) -> None:
        items = self.b.queue.items()
        keys = [r.queue_key for r in items]
        assert keys == sorted(keys)
        assert [self.b.queue.position(r.ev_id) for r in items] == list(range(1, len(items) + 1))
        # Capacity that frees is used at once: nothing waiting could be placed now. A head that has waited
        # past the overtake guard holds capacity for itself (nobody behind it is placed); before that,
        # later requests that fit overtake it.
        # (A head that fits nowhere even when empty, after a capacity cut, holds nothing back.)
        reserved = bool(items) and self.now - items[0].received_at >= CONFIG.overtake_guard_s and any(
            items[0].min_w <= sub.limit_w(CONFIG.safety_margin_pct) for sub in self.b.substations.values())
        subs = self.b.substations.values()
        for req in items[:1] if reserved else items:
            if self.policy in COMPRESSIBLE:  # room by squeezing running sessions to their minimum
                fits = [s.id for s in subs if compressible_room_w(s, self.now, CONFIG.safety_margin_pct,
                                                                  CONFIG.stale_after_s) >= req.min_w]
            else:
                choice = least_utilised(subs, req.requested_w, req.min_w, self.now,
                                        CONFIG.safety_margin_pct, CONFIG.stale_after_s)
                fits = [choice[0].id] if choice else []
            assert not fits, (f"{req.ev_id} (position {self.b.queue.position(req.ev_id)}) could go to "
                              f"{fits} but waits, after {self.step}")

    def every_change_is_told(self) -> None:
        """A session that appears was started (agent and EV told); one that disappears was ended or taken away
        with the EV told why; a grant that changes was updated on both sides, to the same value."""
        now = {sid: (s.request.ev_id, s.substation_id, s.granted_w) for sid, s in self.b._sessions.items()}
        to_ev: dict[str, list[Assignment]] = {}
        cmds: dict[str, list[SessionCommand]] = {}
        for e in (e for call in self.calls for e in call):
            if isinstance(e, ToEv):
                to_ev.setdefault(e.message.session_id or "", []).append(e.message)
            else:
                cmds.setdefault(e.message.session_id, []).append(e.message)
        for session_id, (_ev, _sid, granted) in now.items():
            before = self.prev_sessions.get(session_id)
            if before is None and session_id not in self.adopted:
                # Started in this step; a later engine call of the same step (another telemetry, the tick)
                # may already have changed it again. The last word matches the final grant.
                sent = cmds.get(session_id, [])
                assert [c.command for c in sent][:1] == ["start"] and all(
                    c.command == "update" for c in sent[1:]), (session_id, sent, self.step)
                assert round(sent[-1].granted_kw * 1000) == granted, (session_id, sent, self.step)
                heard = [a.status for a in to_ev.get(session_id, [])]
                assert heard[:1] == ["assigned"] and set(heard[1:]) <= {"updated"}, (session_id, heard, self.step)
            elif before is not None and before[2] != granted:
                # Rebalancing may lower or raise a grant, never outside [min_kw, requested_kw].
                request = self.b._sessions[session_id].request
                assert request.min_w <= granted <= request.requested_w, (session_id, granted, self.step)
                # One change per engine call (each call coalesces); a step of two calls (telemetry, then a
                # tick) may change a session twice. The last command and the EV's last answer agree.
                # An unconfirmed session's start may go again at its current grant (an inventory without it: the
                # start may have been lost); the agent ignores it if it runs the session.
                cmd = cmds[session_id][-1]
                resent = cmd.command == "start" and not self.b._sessions[session_id].confirmed
                assert cmd.command == "update" or resent, (session_id, cmds[session_id], self.step)
                assert round(cmd.granted_kw * 1000) == granted, (session_id, self.step)
                if len(cmds[session_id]) == 1 and not resent:
                    rose = cmd.reason == Reason.POWER_AVAILABLE
                    assert rose == (granted > before[2]), (session_id, before[2], granted, cmd.reason, self.step)
                told = [a for a in to_ev.get(session_id, []) if a.status == "updated"]
                assert told and told[-1].granted_kw == cmd.granted_kw, (session_id, told, self.step)
        for session_id, (ev, _sid, _granted) in self.prev_sessions.items():
            if session_id not in now:
                statuses = [a.status for a in to_ev.get(session_id, []) if a.ev_id == ev]
                assert statuses and statuses[-1] in ("completed", "revoked"), (session_id, statuses, self.step)
        self.prev_sessions = now

    def effects_ordered_and_valid(self) -> None:
        """Replay every substation's grants through this step's commands, in publish order: after any start or
        increase the substation is within its limit (reductions come first, so it never is over in between)."""
        # Sessions that went without a stop command ended outside the balancer before its effects (the agent
        # ended them, or their substation went offline): their power is already gone.
        stopped = {e.message.session_id for call in self.calls for e in call
                   if isinstance(e, ToSubstation) and e.message.command == "stop"}
        running: dict[str, dict[str, int]] = {}
        for session_id, (_ev, sid, granted) in self.prev_sessions.items():
            if session_id in self.b._sessions or session_id in stopped:
                running.setdefault(sid, {})[session_id] = granted
        # A session announced (and adopted) in this step was drawing its power before any command: a cut of it is
        # a reduction, not a start.
        for session_id, (sid, granted) in self.announced.items():
            if session_id not in self.prev_sessions and (session_id in self.b._sessions or session_id in stopped):
                running.setdefault(sid, {})[session_id] = granted
        for effects in self.calls:
            self._one_call_ordered_and_valid(effects, running)

    def _one_call_ordered_and_valid(self, effects: list[Effect], running: dict[str, dict[str, int]]) -> None:
        for e in effects:
            if isinstance(e, ToSubstation):
                cmd = decode(encode(e.message), SessionCommand)
                assert cmd == e.message
                grants = running.setdefault(e.substation_id, {})
                before = sum(grants.values())
                if cmd.command == "stop":
                    grants.pop(cmd.session_id, None)
                else:
                    grants[cmd.session_id] = round(cmd.granted_kw * 1000)
                after = sum(grants.values())
                if after > before:
                    sub = self.b.substations[e.substation_id]
                    limit = sub.limit_w(CONFIG.safety_margin_pct)
                    sent = [(x.substation_id, x.message.command, x.message.session_id, x.message.granted_kw)
                            for x in effects if isinstance(x, ToSubstation)]
                    assert sub.base_load_w + after <= limit, (
                        f"{cmd.command} {cmd.session_id} puts {e.substation_id} over its limit "
                        f"({sub.base_load_w} + {after} > {limit}) in {self.step}; before: {self.prev_sessions}; "
                        f"commands: {sent}")
            else:
                assert decode(encode(e.message), Assignment) == e.message
                if e.message.status == "assigned":
                    assert e.message.granted_kw is not None and e.message.substation_id is not None


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class WeightedFairMachine(CoreMachine):
    policy = "weighted-fair"


class DeadlineMachine(CoreMachine):
    policy = "deadline"


TestWeightedFairMachine = WeightedFairMachine.TestCase
TestWeightedFairMachine.settings = TestCoreMachine.settings
TestDeadlineMachine = DeadlineMachine.TestCase
TestDeadlineMachine.settings = TestCoreMachine.settings
