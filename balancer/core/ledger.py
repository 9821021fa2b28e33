"""Idempotency: each EV's one open request with its latest answer, final answers kept for redeliveries of the
same (ev_id, request_id), and the sessions this balancer ended (their agents' late events are expected)."""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from balancer.core.effects import ToEv
from balancer.core.model import PendingRequest, Session, w_to_kw
from balancer.core.state import CoreState
from grid_protocol.messages import Assignment, AssignmentStatus
from grid_protocol.reasons import Reason


class EvState(msgspec.Struct, gc=False):
    request: PendingRequest
    answer: Assignment
    session_id: str | None = None


class Closed(msgspec.Struct, gc=False):
    answer: Assignment
    at: float


class Ledger:
    def __init__(self, state: CoreState) -> None:
        self.state = state
        self.evs: dict[str, EvState] = {}
        self.closed: OrderedDict[tuple[str, str], Closed] = OrderedDict()
        #: ids of sessions this balancer ended (bounded): their agents' late "ended" events are expected
        self.ended_sessions: OrderedDict[str, None] = OrderedDict()

    def answer(self, req: PendingRequest, status: AssignmentStatus, now: float, *, session: Session | None = None,
               reason: str | None = None, detail: str | None = None, position: int | None = None,
               ends: list[float] | None = None) -> Assignment:
        eta_s = None if position is None else self.state.eta_s(position, now, ends)
        if session is not None:
            return Assignment(request_id=req.request_id, ev_id=req.ev_id, status=status, ts=now,
                              substation_id=session.substation_id, granted_kw=w_to_kw(session.granted_w),
                              session_id=session.session_id, reason=reason, detail=detail, position=position,
                              eta_s=eta_s)
        return Assignment(request_id=req.request_id, ev_id=req.ev_id, status=status, ts=now, reason=reason,
                          detail=detail, position=position, eta_s=eta_s)

    def close(self, ev_id: str, answer: Assignment, now: float) -> None:
        """The EV's request is finished; remember the final answer for redeliveries."""
        state = self.evs.pop(ev_id, None)
        if state is not None:
            self.closed[(ev_id, state.request.request_id)] = Closed(answer, now)
            self.closed.move_to_end((ev_id, state.request.request_id))

    def reject(self, ev_id: str, request_id: str | None, reason: Reason, detail: str, now: float, *,
               remember: bool = False) -> ToEv:
        """A ``rejected`` answer. ``remember`` keeps it for redeliveries of the same request id."""
        answer = Assignment(request_id=request_id, ev_id=ev_id, status="rejected", ts=now,
                            reason=reason, detail=detail)
        self.state.counters[f"rejected:{reason}"] += 1
        if remember and request_id is not None:
            self.closed[(ev_id, request_id)] = Closed(answer, now)
        return ToEv(ev_id, answer, in_reply=True)

    def session_ended(self, session_id: str) -> None:
        self.ended_sessions[session_id] = None
        if len(self.ended_sessions) > self.state.config.answers_max:
            self.ended_sessions.popitem(last=False)

    def expire(self, now: float) -> None:
        """Forget final answers past their time to live (or beyond the bound), oldest first."""
        cfg = self.state.config
        while self.closed:
            key, closed = next(iter(self.closed.items()))
            if len(self.closed) <= cfg.answers_max and now - closed.at <= cfg.answer_ttl_s:
                break
            del self.closed[key]
