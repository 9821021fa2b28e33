"""Session events from substation agents: a session started, runs (re-announced after a restart), or ended.
An unknown running session is adopted (this balancer restarted since it was placed) or stopped."""

from __future__ import annotations

from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.ledger import EvState, Ledger
from balancer.core.model import PendingRequest, Session, kw_to_w_down, kw_to_w_up
from balancer.core.queue_service import QueueService
from balancer.core.rebalancing import Rebalancer
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState
from grid_protocol.messages import Assignment, SessionCommand, SessionEvent
from grid_protocol.reasons import FINAL_END_REASONS, Reason


class AgentEvents:
    def __init__(self, state: CoreState, ledger: Ledger, book: SessionBook, rebalancer: Rebalancer,
                 queue_service: QueueService) -> None:
        self.state = state
        self.ledger = ledger
        self.book = book
        self.rebalancer = rebalancer
        self.queue_service = queue_service

    def on_session_event(self, substation_id: str, msg: SessionEvent, now: float) -> list[Effect]:
        st, ledger = self.state, self.ledger
        session = st.sessions.get(msg.session_id)
        if session is None or session.substation_id != substation_id:
            if msg.event == "started" and msg.session_id in ledger.ended_sessions:
                return []  # ended (released, revoked) before it started: the agent has its stop already
            if msg.event in ("started", "running"):
                return self._adopt_or_stop(substation_id, msg, now)
            if msg.session_id not in ledger.ended_sessions and msg.ev_id not in ledger.evs:
                # A session from before a balancer restart ended: its EV still deserves to hear it.
                st.counters["completed:unknown_session"] += 1
                return [ToEv(msg.ev_id, Assignment(
                    request_id=None, ev_id=msg.ev_id, status="completed", ts=now, substation_id=substation_id,
                    session_id=msg.session_id, reason=msg.reason or Reason.STOPPED_BY_AGENT))]
            return []
        if msg.event != "ended":
            session.confirmed = True
            if msg.event == "started":
                session.confirmed_ts = msg.ts
            if msg.event == "running":
                st.substation(substation_id, now).announced.add(msg.session_id)
            return []
        reason = msg.reason or Reason.STOPPED_BY_AGENT
        if reason not in FINAL_END_REASONS:
            # The session could not continue (the agent went offline, stopped it, ...): the EV did not get what it
            # came for, so its request goes back in line, never "completed".
            if msg.energy_delivered_kwh is not None:
                session.delivered_wh = max(session.delivered_wh, msg.energy_delivered_kwh * 1000)
                session.accounted_at = now
            cause = Reason(reason) if reason in Reason._value2member_map_ else Reason.STOPPED_BY_AGENT
            effects = self.book.revoke(session, now, cause,
                                       f"substation {substation_id} ended the session ({reason})", stop_agent=False)
            return effects + self.queue_service.serve(now) + self.book.requeue_notices(now)
        self.book.remove(session)
        answer = ledger.answer(session.request, "completed", now, session=session, reason=reason)
        ledger.close(session.request.ev_id, answer, now)
        st.counters[f"completed:{reason}"] += 1
        return [ToEv(session.request.ev_id, answer), *self.queue_service.serve(now)]

    def _adopt_or_stop(self, substation_id: str, msg: SessionEvent, now: float) -> list[Effect]:
        """A session runs that this balancer does not know. Never seen (this balancer restarted since it was
        placed) and its EV has nothing else open: adopt it, so the EV keeps its session and the power counts.
        Otherwise (we ended it, the EV has moved on, or the event cannot say what it draws): stop it."""
        st, ledger = self.state, self.ledger
        adoptable = (msg.session_id not in ledger.ended_sessions and msg.ev_id not in ledger.evs
                     and msg.granted_kw is not None)
        if not adoptable or msg.granted_kw is None:
            st.counters["unknown_session_stopped"] += 1
            return [ToSubstation(substation_id, SessionCommand(
                command="stop", session_id=msg.session_id, ev_id=msg.ev_id, ts=now, reason=Reason.UNKNOWN_SESSION))]
        granted_w = kw_to_w_down(msg.granted_kw)
        min_kw = msg.min_kw if msg.min_kw is not None else msg.granted_kw
        req = PendingRequest(
            ev_id=msg.ev_id, request_id=msg.request_id or st.new_request_id(), requested_w=granted_w,
            min_w=max(1, min(granted_w, kw_to_w_up(min_kw))), priority=msg.priority or 0,
            arrival=next(st.arrivals), received_at=now,
            duration_minutes=msg.duration_minutes or None, energy_kwh=msg.energy_kwh or None)
        sub = st.substation(substation_id, now)
        session = Session(msg.session_id, substation_id, req, granted_w, now, confirmed=True,
                          last_change_at=now, accounted_at=now)
        self.book.attach(sub, session)
        if msg.event == "running":
            sub.announced.add(session.session_id)
        ledger.evs[req.ev_id] = EvState(req, ledger.answer(req, "assigned", now, session=session),
                                        session_id=session.session_id)
        st.counters["adopted"] += 1
        if sub.last_telemetry_at is None:
            return []  # capacity unknown yet: the first telemetry checks the limit (reduce)
        # It was running when the last telemetry was measured, so its power is in that measurement: it moves from
        # "load we do not control" to "our grant" instead of counting twice (which revoked adopted sessions as
        # over the limit and re-placed them as second sessions, found by bench/faults.py). Never below the
        # reported base load (uncontrolled_w), so a session that was paused at the time costs nothing unsafe.
        sub.granted_at_telemetry_w += granted_w
        st.touch(sub)
        effects = self.rebalancer.reduce(sub, now)
        effects += self.queue_service.serve(now)  # a session it revoked may fit elsewhere at once
        return effects + self.book.requeue_notices(now)
