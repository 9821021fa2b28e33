"""Placing a new session: the policy chooses the substation and grant; for the compressible policies the
running sessions there are squeezed to their new shares first (those reductions are published before the
new session starts, so the substation is never over its limit in between)."""

from __future__ import annotations

from sortedcontainers import SortedList

from balancer.core.effects import Effect
from balancer.core.model import PendingRequest, Session, Substation
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
        #: rated capacities (a multiset, without limit schedules) of the substations with one: the largest limit a
        #: request could ever get; capacities now of those not draining: the largest it could get now. No scan.
        self._rated: SortedList = SortedList()
        self._open_capacities: SortedList = SortedList()
        self._filed: dict[str, tuple[int, int, bool]] = {}  # id -> (rated_w, capacity_w, draining)
        #: their largest limits (rated, open now), read per request: set when the multisets change
        self._largest: tuple[int | None, int | None] = (None, None)

    def refresh(self, now: float) -> None:
        """Refile the substations touched since the last look (in the policy's index and the capacities)."""
        st = self.state
        if not st.touched:
            return
        touched, st.touched = st.touched, set()
        st.limit_index.note(touched)
        subs, refile, filed_by_id = st.substations, self.policy.refile, self._filed
        moved = False
        for sid in touched:
            sub = subs.get(sid)
            refile(sid, sub, now)
            filed = None if sub is None else (sub.rated_w(), sub.capacity_w, sub.draining)
            old = filed_by_id.get(sid)
            if filed == old:
                continue  # (most touches: a placement or telemetry moves no capacity)
            moved = True
            if old is not None:
                del self._filed[sid]
                if old[0] > 0:
                    self._rated.remove(old[0])
                if not old[2]:
                    self._open_capacities.remove(old[1])
            if filed is not None:
                rated, capacity, draining = filed
                if rated > 0:
                    self._rated.add(rated)
                if not draining:
                    self._open_capacities.add(capacity)
                self._filed[sid] = filed
        if moved:
            margin = st.config.safety_margin_pct
            self._largest = (Substation.limit_for(self._rated[-1], margin) if self._rated else None,
                             Substation.limit_for(self._open_capacities[-1], margin) if self._open_capacities
                             else None)

    def largest_limit_w(self, now: float, *, open_only: bool = False) -> int | None:
        """The largest substation limit: rated (a limit schedule passes), or with ``open_only`` the largest now of
        those not draining. None: no substation."""
        self.refresh(now)
        return self._largest[1] if open_only else self._largest[0]

    def place(self, req: PendingRequest, now: float) -> tuple[Session, list[Effect]] | None:
        """Choose a substation and a grant by the policy. Returns the new session and the reductions of
        other sessions that must be published before it starts (compressible policies)."""
        self.refresh(now)
        choice = self.policy.place(self.state.substations, req, now)
        if choice is None:
            return None
        sub, grant = choice
        if grant is not None:
            return self.book.new(sub, req, grant, now), []
        session = self.book.new(sub, req, 0, now)
        target = dict((s.session_id, t) for s, t in self.rebalancer.targets(sub, now))[session.session_id]
        # Make room for the new session's share: squeeze the others now (they are told first), no more than needed.
        free = sub.limit_w(self.state.config.safety_margin_pct) - self.rebalancer.band_w(sub) - sub.used_w()
        reductions = self.rebalancer.decrease(sub, now, shed=target - free, skip=session)
        # Targets fit the room the squeeze made; the min() only ever guards the capacity guarantee.
        grant = max(0, min(target, sub.limit_w(self.state.config.safety_margin_pct) - sub.used_w()))
        session.granted_w = grant
        sub.granted_w += grant
        self.state.ends.update(session)
        self.state.touch(sub)
        sub.shares_version += 1
        return session, reductions

    def max_room_w(self, now: float) -> int:
        """The most a new session could get anywhere now, under the policy (0: nothing can be placed)."""
        self.refresh(now)
        return self.policy.max_room_w(self.state.substations, now)
