"""Serving the waiting queue: place waiting requests in order as capacity frees (a request that does not fit
may be overtaken until it has waited ``overtake_guard_s``), and tell queued EVs when their place moves."""

from __future__ import annotations

from balancer.core.effects import Effect, ToEv
from balancer.core.ledger import Ledger
from balancer.core.model import PendingRequest
from balancer.core.placement import Placement
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState


class QueueService:
    def __init__(self, state: CoreState, ledger: Ledger, book: SessionBook, placement: Placement) -> None:
        self.state = state
        self.ledger = ledger
        self.book = book
        self.placement = placement
        self._updated_at = float("-inf")

    def holds_capacity(self, req: PendingRequest, now: float) -> bool:
        """``req`` (at the head) has waited past the overtake guard and some substation could take it once
        enough frees. One that fits nowhere even when empty (capacity was cut) holds nothing back."""
        if now - req.received_at < self.state.config.overtake_guard_s:
            return False
        largest = self.placement.largest_limit_w(now, open_only=True)
        return largest is not None and req.min_w <= largest

    def head_reserved(self, now: float) -> bool:
        """The head has waited past the overtake guard: capacity is held for it."""
        head = self.state.queue.head()
        return head is not None and self.holds_capacity(head, now)

    def serve(self, now: float, replying_to: str | None = None) -> list[Effect]:
        """Place waiting requests in queue order. A request that does not fit is passed over (later ones
        that fit go first) unless it is the head and has waited past the overtake guard."""
        effects: list[Effect] = []
        queue = self.state.queue
        if not len(queue):
            return effects
        room = self.placement.max_room_w(now)
        at_head = True
        i = 0  # the queue's order is kept while we go: a placed request leaves it, the next takes its index
        while i < len(queue) and room > 0:
            smallest = queue.smallest_min_w()
            if smallest is None or smallest > room:
                break  # nothing waiting can run on the room there is
            req = queue.at(i)
            placed = self.placement.place(req, now) if req.min_w <= room else None
            if placed is not None:
                queue.remove_at(i)
                self.state.queue_waits.append(max(0.0, now - req.received_at))  # (the wall clock may step back)
                effects += placed[1] + self.book.start_effects(placed[0], now, in_reply=req.ev_id == replying_to)
                room = self.placement.max_room_w(now)
                continue
            if at_head and self.holds_capacity(req, now):
                break
            at_head = False
            i += 1
        return effects

    def updates_due(self, now: float) -> list[Effect]:
        """Position/ETA updates, at most every ``queue_update_interval_s``."""
        if not len(self.state.queue) or now - self._updated_at < self.state.config.queue_update_interval_s:
            return []
        self._updated_at = now
        return self.updates(now)

    def updates(self, now: float) -> list[Effect]:
        """Tell queued EVs whose place in line or estimated wait moved. The answer is built only for those: at
        1,000 x 100k, 10,000 wait and about half of them have not moved in 5 s."""
        effects: list[Effect] = []
        items = self.state.queue.items()
        ends = self.state.ends.first(len(items))
        evs, eta_s = self.ledger.evs, self.state.eta_s
        for position, req in enumerate(items, start=1):
            state = evs[req.ev_id]
            old = state.answer
            if old.status == "queued" and old.position == position:  # the same place: told only if the wait moved
                eta = eta_s(position, now, ends)  # (the answer's eta_s, as Ledger.answer computes it)
                if (old.eta_s is None) == (eta is None) and (
                        old.eta_s is None or eta is None or abs(old.eta_s - eta) <= 30):
                    continue
            state.answer = answer = self.ledger.answer(req, "queued", now, reason=old.reason, position=position,
                                                       ends=ends)
            effects.append(ToEv(req.ev_id, answer))
        return effects
