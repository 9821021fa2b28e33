"""Placing a new session: the policy chooses the substation and grant; for the compressible policies the
running sessions there are squeezed to their new shares first (those reductions are published before the
new session starts, so the substation is never over its limit in between)."""

from __future__ import annotations

from balancer.core.effects import Effect
from balancer.core.model import PendingRequest, Session
from balancer.core.policies import Policy
from balancer.core.rebalancing import Rebalancer
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState


class Placement:
    def __init__(self, state: CoreState, book: SessionBook, rebalancer: Rebalancer, policy: Policy) -> None:
        self.state = state
        self.book = book
        self.rebalancer = rebalancer
        self.policy = policy

    def place(self, req: PendingRequest, now: float) -> tuple[Session, list[Effect]] | None:
        """Choose a substation and a grant by the policy. Returns the new session and the reductions of
        other sessions that must be published before it starts (compressible policies)."""
        choice = self.policy.place(self.state.substations.values(), req, now)
        if choice is None:
            return None
        sub, grant = choice
        if grant is not None:
            return self.book.new(sub, req, grant, now), []
        session = self.book.new(sub, req, 0, now)
        target = dict((s.session_id, t) for s, t in self.rebalancer.targets(sub, now))[session.session_id]
        # Make room for the new session's share: squeeze the others now (they are told first).
        reductions = self.rebalancer.decrease(sub, now, mandatory=True, skip=session)
        # Targets fit the room the squeeze made; the min() only ever guards the capacity guarantee.
        grant = max(0, min(target, sub.limit_w(self.state.config.safety_margin_pct) - sub.used_w()))
        session.granted_w = grant
        sub.granted_w += grant
        return session, reductions

    def max_room_w(self, now: float) -> int:
        """The most a new session could get anywhere now, under the policy (0: nothing can be placed)."""
        return self.policy.max_room_w(self.state.substations.values(), now)
