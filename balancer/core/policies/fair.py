"""Policies that admit a request by squeezing running sessions toward their ``min_kw``:

- ``weighted-fair``: max-min fair shares weighted by ``priority + 1``; a waiting EV counts too.
- ``deadline``: admission like ``weighted-fair``; power goes first to what each EV needs to finish its
  ``energy_kwh`` by its ``departure``, most urgent first, and the rest is shared equally.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from balancer.core.allocation import deadline_share, water_fill
from balancer.core.model import PendingRequest, Session, Substation
from balancer.core.policies.names import PolicyName
from balancer.core.policies.scan import compressible_room_w, fair_placement

if TYPE_CHECKING:
    from balancer.core.config import CoreConfig


class _Compressible:
    rebalances = True

    def __init__(self, config: CoreConfig) -> None:
        self.config = config

    def place(self, substations: Collection[Substation], req: PendingRequest,
              now: float) -> tuple[Substation, int | None] | None:
        cfg = self.config
        sub = fair_placement(substations, req.requested_w, req.min_w, now, cfg.safety_margin_pct, cfg.stale_after_s)
        return None if sub is None else (sub, None)

    def max_room_w(self, substations: Collection[Substation], now: float) -> int:
        cfg = self.config
        return max((compressible_room_w(sub, now, cfg.safety_margin_pct, cfg.stale_after_s) for sub in substations),
                   default=0)

    def forget(self, substation_id: str) -> None:
        pass


class WeightedFair(_Compressible):
    name = PolicyName.WEIGHTED_FAIR

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        return water_fill(available, floors, caps, [s.request.priority + 1.0 for s in sessions])


class Deadline(_Compressible):
    name = PolicyName.DEADLINE

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        needs, slack = [], []
        for s in sessions:
            s.account(now)
            remaining, departure = s.remaining_wh(), s.request.departure
            if remaining is None or departure is None:
                needs.append(0)
                slack.append(float("inf"))
                continue
            left_s = max(1.0, departure - now)
            needs.append(int(remaining * 3600 / left_s) + 1)
            slack.append(left_s - remaining * 3600 / max(1, s.request.requested_w))
        return deadline_share(available, floors, caps, needs, slack)
