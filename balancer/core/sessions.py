"""A session's life as the core records it: started, its grant changed, revoked (back in line), removed.
Each step keeps the substation's running totals and the ledger's answer in step, and returns its messages."""

from __future__ import annotations

from balancer.core import limit_effects
from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.ledger import EvState, Ledger
from balancer.core.model import PendingRequest, Session, Substation, w_to_kw
from balancer.core.shares import ShareTables
from balancer.core.state import CoreState
from grid_protocol.messages import SessionCommand
from grid_protocol.reasons import Reason


class SessionBook:
    def __init__(self, state: CoreState, ledger: Ledger) -> None:
        self.state = state
        self.ledger = ledger
        #: the sessions by share class, kept here as they start, change and end (set by the rebalancer that uses it)
        self.shares: ShareTables | None = None

    def new(self, sub: Substation, req: PendingRequest, grant: int, now: float) -> Session:
        session = Session(self.state.new_session_id(), sub.id, req, grant, now, last_change_at=now, accounted_at=now)
        self.attach(sub, session)
        return session

    def attach(self, sub: Substation, session: Session) -> None:
        st, sid, req = self.state, session.session_id, session.request
        sub.sessions[sid] = session
        sub.granted_w += session.granted_w
        sub.requested_w += req.requested_w
        sub.floors_w += req.min_w
        st.sessions[sid] = session
        st.ends.update(session)
        st.touched.add(sub.id)  # (CoreState.touch: once per placement, so inlined)
        sub.shares_version += 1
        sub.session_changed(sid)
        if self.shares is not None:
            self.shares.attach(session)

    def remove(self, session: Session) -> None:
        st, sid = self.state, session.session_id
        sub = st.substations[session.substation_id]
        if sub.sessions.pop(sid, None) is not None:
            req = session.request
            sub.granted_w -= session.granted_w
            sub.requested_w -= req.requested_w
            sub.floors_w -= req.min_w
            if self.shares is not None:
                self.shares.remove(session)
        st.sessions.pop(sid, None)
        st.ends.discard(sid)
        st.touched.add(sub.id)
        sub.shares_version += 1
        sub.session_changed(sid)
        self.ledger.session_ended(sid)

    def start_effects(self, session: Session, now: float, *, in_reply: bool) -> list[Effect]:
        req, sid, granted_w = session.request, session.session_id, session.granted_w
        ev_id = req.ev_id
        partial = granted_w < req.requested_w
        # told at once when scheduled limits keep it short (only a substation with a schedule can)
        short = limit_effects.shortfall(self.state, session, now) if self.state.schedules else None
        answer = self.ledger.answer(req, "assigned", now, session=session,
                                    reason=Reason.LIMIT_SHORTFALL if short else Reason.PARTIAL_GRANT if partial
                                    else None,
                                    detail=short or ("less than requested is available" if partial else None))
        state = self.ledger.evs.get(ev_id)
        if state is None:  # placed as it came: its first answer
            self.ledger.evs[ev_id] = EvState(req, answer, sid)
        else:
            state.answer = answer
            state.session_id = sid
        self.state.counters["assigned"] += 1
        command = self.start_command(session, now)
        # Decision order; the service batches agent commands per substation and publishes them after
        # the EV answers of the same pass (see balancer.service).
        return [ToSubstation(session.substation_id, command), ToEv(ev_id, answer, in_reply)]

    @staticmethod
    def start_command(session: Session, ts: float) -> SessionCommand:
        """The agent's ``start`` of ``session`` at its current grant. Sent again with the first one's ``ts`` it is the
        same start to the agent: one it runs or ran already changes nothing (grid_sim.substation)."""
        req = session.request
        return SessionCommand(
            command="start", session_id=session.session_id, ev_id=req.ev_id, ts=ts,
            granted_kw=w_to_kw(session.granted_w), energy_kwh=req.energy_kwh,
            duration_minutes=req.duration_minutes, request_id=req.request_id, min_kw=w_to_kw(req.min_w),
            priority=req.priority,
        )

    def set_grant(self, session: Session, grant: int, now: float, reason: Reason, detail: str) -> list[Effect]:
        sub = self.state.substations[session.substation_id]
        session.account(now)
        sub.granted_w += grant - session.granted_w
        session.granted_w = grant
        session.last_change_at = now
        session.changes += 1
        if self.shares is not None:
            self.shares.changed(session)
        self.state.ends.update(session)
        self.state.touch(sub)
        sub.shares_version += 1
        sub.session_changed(session.session_id)
        req = session.request
        answer = self.ledger.answer(req, "updated", now, session=session, reason=reason, detail=detail)
        self.ledger.evs[req.ev_id].answer = answer
        self.state.counters[f"updated:{reason}"] += 1
        return [ToSubstation(sub.id, SessionCommand(
                    command="update", session_id=session.session_id, ev_id=req.ev_id, ts=now,
                    granted_kw=w_to_kw(grant), reason=reason)),
                ToEv(req.ev_id, answer)]

    def revoke(self, session: Session, now: float, reason: Reason, detail: str, *,
               stop_agent: bool) -> list[Effect]:
        """Take a session away and put its request back in line (it was accepted: never dropped), asking
        only for what is left of its energy and duration."""
        session.account(now)
        self.remove(session)
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
        revoked = self.ledger.answer(req, "revoked", now, session=session, reason=reason,
                                     detail=detail + "; the request is back in the queue and will be re-assigned")
        effects.append(ToEv(req.ev_id, revoked))
        self.state.counters[f"revoked:{reason}"] += 1
        state = self.ledger.evs[req.ev_id]
        state.session_id = None
        position = self.state.queue.push(req, force=True)
        state.answer = self.ledger.answer(req, "queued", now, reason=reason, position=position)
        self.state.requeued.append(req.ev_id)
        return effects

    def requeue_notices(self, now: float) -> list[Effect]:
        """``queued`` (with the position) for revoked requests that did not find a new place at once."""
        effects: list[Effect] = []
        for ev_id in self.state.requeued:
            state = self.ledger.evs.get(ev_id)
            position = self.state.queue.position(ev_id)
            if state is not None and position is not None:
                state.answer = self.ledger.answer(state.request, "queued", now, reason=state.answer.reason,
                                                  position=position)
                effects.append(ToEv(ev_id, state.answer))
        self.state.requeued.clear()
        return effects
