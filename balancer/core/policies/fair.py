"""Policies that admit a request by squeezing running sessions toward their ``min_kw``:

- ``weighted-fair``: max-min fair shares weighted by ``priority + 1``; a waiting EV counts too.
- ``deadline``: admission like ``weighted-fair``; least laxity first: the EV with the least time to spare
  (departure less the time its remaining ``energy_kwh`` takes at full power, in ``laxity_step_s`` steps, then
  the earlier departure) gets all it can take, then the next; EVs that gave no departure share the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from balancer.core.allocation import laxity_share, water_fill
from balancer.core.model import PendingRequest, Session, Substation
from balancer.core.policies.index import SubstationIndex
from balancer.core.policies.names import PolicyName
from balancer.core.policies.scan import compressible_room_w

if TYPE_CHECKING:
    from balancer.core.config import CoreConfig


class _Compressible:
    """Placement from a :class:`SubstationIndex` ordered by demand (base load plus what its sessions ask for)
    within each capacity class, holding substations where squeezing makes room. ``scan.fair_placement`` is the
    reference."""

    rebalances = True

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        margin, stale = config.safety_margin_pct, config.stale_after_s

        def entry(s: Substation, now: float) -> tuple[int, tuple[int, str]] | None:
            room = compressible_room_w(s, now, margin, stale)
            return (room, (s.base_load_w + s.requested_w, s.id)) if room > 0 else None

        self.index = SubstationIndex(entry=entry, stale_after_s=stale)

    def refile(self, substation_id: str, sub: Substation | None, now: float) -> None:
        self.index.refile(substation_id, sub, now)

    def place(self, substations: Mapping[str, Substation], req: PendingRequest,
              now: float) -> tuple[Substation, int | None] | None:
        """Where a squeezed-in session can get its minimum, the substation whose demand is lowest relative to
        its limit: the new EV will get the most there. In a class the first with room enough is its best."""
        if self.index.max_room_w(substations, now) < req.min_w:
            return None  # (fits nowhere: one look, where the search below would walk every member of every class)
        margin = self.config.safety_margin_pct
        best: tuple[float, str] | None = None
        choice: Substation | None = None
        for members in self.index.group_members(substations, now):
            for sid in members:
                if self.index.room_w(sid) < req.min_w:
                    continue
                sub = substations[sid]
                demand = sub.base_load_w + sub.requested_w + req.requested_w
                key = (demand / max(1, sub.limit_w(margin)), sid)
                if best is None or key < best:
                    best, choice = key, sub
                break
        return None if choice is None else (choice, None)

    def max_room_w(self, substations: Mapping[str, Substation], now: float) -> int:
        return self.index.max_room_w(substations, now)

    def weight(self, session: Session) -> float:
        return session.request.priority + 1.0

    def forget(self, substation_id: str) -> None:
        pass


class WeightedFair(_Compressible):
    name = PolicyName.WEIGHTED_FAIR
    time_dependent = False
    water_filled = True  # weights priority + 1

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        return water_fill(available, floors, caps, [self.weight(s) for s in sessions])


def _seconds_left(_sessions: Sequence[Session], now: float) -> Callable[[float, float, int], float]:
    return lambda departure, _remaining_wh, _max_w: departure - now


class Deadline(_Compressible):
    name = PolicyName.DEADLINE
    time_dependent = True  # laxity falls as time passes
    water_filled = False
    #: (the substation's sessions, now) -> seconds until a departure as the policy should count them, given what
    #: the EV still needs and its rate. The engine sets one that counts the power a limit schedule will leave
    #: (balancer/core/limit_effects.py ``horizon``); without one, the seconds there are.
    horizon: Callable[[Sequence[Session], float], Callable[[float, float, int], float]] = staticmethod(_seconds_left)

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        urgency: list[tuple[float, float, int] | None] = []
        step = self.config.laxity_step_s
        left = self.horizon(sessions, now)
        for s in sessions:
            s.account(now)
            remaining, departure = s.remaining_wh(), s.request.departure
            if remaining is None or departure is None:
                urgency.append(None)
                continue
            left_s = max(1.0, left(departure, remaining, s.request.requested_w))
            laxity = left_s - remaining * 3600 / max(1, s.request.requested_w)
            urgency.append((math.floor(laxity / step), departure, s.request.arrival))
        return laxity_share(available, floors, caps, urgency)
