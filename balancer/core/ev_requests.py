"""An EV's requests and releases: duplicates get the same answer, one open request per EV; a new request is
placed at once, queued, or rejected with the reason."""

from __future__ import annotations

from balancer.core import limit_effects
from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.ledger import EvState, Ledger
from balancer.core.model import PendingRequest, kw_to_w_down, kw_to_w_up, w_to_kw
from balancer.core.placement import Placement
from balancer.core.queue_service import QueueService
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState
from grid_protocol.messages import ChargeRequest, Release, SessionCommand
from grid_protocol.reasons import Reason


class EvRequests:
    def __init__(self, state: CoreState, ledger: Ledger, book: SessionBook, placement: Placement,
                 queue_service: QueueService) -> None:
        self.state = state
        self.ledger = ledger
        self.book = book
        self.placement = placement
        self.queue_service = queue_service

    def on_request(self, ev_id: str, msg: ChargeRequest, now: float) -> list[Effect]:
        st, ledger, queue = self.state, self.ledger, self.state.queue
        request_id = msg.request_id or st.new_request_id()
        if msg.ev_id is not None and msg.ev_id != ev_id:
            return [ledger.reject(ev_id, request_id, Reason.ID_MISMATCH,
                                  f"body ev_id {msg.ev_id!r} differs from the topic's {ev_id!r}", now)]
        state = ledger.evs.get(ev_id)
        if state is not None and state.request.request_id == request_id:
            st.counters["duplicate"] += 1
            return [ToEv(ev_id, state.answer, in_reply=True)]
        closed = ledger.closed.get((ev_id, request_id))
        if closed is not None:
            st.counters["duplicate"] += 1
            return [ToEv(ev_id, closed.answer, in_reply=True)]
        if msg.expires_at is not None and now > msg.expires_at:
            # Only a request not known yet: a redelivery of one already answered gets that answer (above). Not
            # remembered: a fresh copy with the same id and a later expires_at may still be placed.
            return [ledger.reject(ev_id, request_id, Reason.EXPIRED,
                                  f"received {now - msg.expires_at:.1f} s after its expires_at: nobody waits for "
                                  "the answer any more; send a new request", now)]
        if state is not None:
            return [ledger.reject(ev_id, request_id, Reason.EV_BUSY,
                                  f"EV already has open request {state.request.request_id!r}; "
                                  "release it first", now, remember=True)]
        requested_w = max(1, kw_to_w_down(msg.requested_kw))  # never a grant of 0 W
        min_kw = msg.min_kw if msg.min_kw is not None else min(msg.requested_kw, st.config.default_min_kw)
        req = PendingRequest(
            ev_id=ev_id, request_id=request_id, requested_w=requested_w,
            min_w=max(1, min(requested_w, kw_to_w_up(min_kw))), priority=msg.priority,
            arrival=next(st.arrivals), received_at=now,
            duration_minutes=msg.duration_minutes, energy_kwh=msg.energy_kwh, departure=msg.departure,
        )
        # (the rated limits, without schedules: a request that fits once a scheduled limit passes waits for it)
        largest = self.placement.largest_limit_w(now)
        if largest is not None and req.min_w > largest:
            return [ledger.reject(ev_id, request_id, Reason.EXCEEDS_CAPACITY,
                                  f"min_kw {w_to_kw(req.min_w):g} exceeds the largest substation limit "
                                  f"({w_to_kw(largest):g} kW): it could never be placed", now,
                                  remember=True)]  # guarantee 5: a redelivery gets this same answer
        reserved = self.queue_service.head_reserved(now)
        if not reserved:
            placed = self.placement.place(req, now)
            if placed is not None:  # (start_effects files the EV's state with its answer)
                return placed[1] + self.book.start_effects(placed[0], now, in_reply=True)
        if queue.full():
            return [ledger.reject(ev_id, request_id, Reason.QUEUE_FULL,
                                  f"no headroom and {len(queue)} requests already waiting", now, remember=True)]
        position: int | None = queue.push(req)
        effects: list[Effect] = []
        # Nothing else changed, so nothing else waiting can fit now: no need to serve the queue. Unless it
        # went ahead of a head that held capacity (higher priority): the hold is gone, the new head may fit.
        if reserved and queue.head() is req:
            ledger.evs[ev_id] = EvState(req, ledger.answer(req, "queued", now))  # (serving may place it)
            effects = self.queue_service.serve(now, replying_to=ev_id)
            position = queue.position(ev_id)
            if position is None:
                return effects
        why, detail = limit_effects.queue_reason(st, now)  # no_headroom, or limit_scheduled (until when)
        answer = ledger.answer(req, "queued", now, reason=why, detail=detail, position=position)
        ledger.evs[ev_id] = EvState(req, answer)
        st.counters["queued"] += 1
        effects.append(ToEv(ev_id, answer, in_reply=True))
        return effects

    def on_release(self, ev_id: str, msg: Release, now: float) -> list[Effect]:
        st, ledger = self.state, self.ledger
        state = ledger.evs.get(ev_id)
        matches = state is not None and (
            (msg.request_id is None or msg.request_id == state.request.request_id)
            and (msg.session_id is None or msg.session_id == state.session_id))
        if state is None or not matches:
            return [ledger.reject(ev_id, msg.request_id, Reason.NOTHING_TO_RELEASE,
                                  "no open request or session matches this release", now)]
        if state.session_id is None:
            st.queue.remove(ev_id)
            answer = ledger.answer(state.request, "cancelled", now, reason=Reason.RELEASED)
            ledger.close(ev_id, answer, now)
            st.counters["cancelled"] += 1
            # The withdrawn request may have been the head that blocked the ones behind it.
            return [ToEv(ev_id, answer, in_reply=True), *self.queue_service.serve(now)]
        session = st.sessions[state.session_id]
        self.book.remove(session)
        answer = ledger.answer(state.request, "completed", now, session=session, reason=Reason.RELEASED)
        ledger.close(ev_id, answer, now)
        st.counters["completed:released"] += 1
        effects: list[Effect] = [
            ToSubstation(session.substation_id, SessionCommand(
                command="stop", session_id=session.session_id, ev_id=ev_id, ts=now, reason=Reason.RELEASED)),
            ToEv(ev_id, answer, in_reply=True),
        ]
        return effects + self.queue_service.serve(now)
