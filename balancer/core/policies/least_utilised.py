"""``least-utilised``: the largest grant available now (down to ``min_kw``), then the substation least
utilised after placement; running sessions converge to an equal share as the balancer rebalances."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from balancer.core.allocation import equal_share
from balancer.core.model import PendingRequest, Session, Substation
from balancer.core.policies.names import PolicyName
from balancer.core.policies.scan import least_utilised

if TYPE_CHECKING:
    from balancer.core.config import CoreConfig


class LeastUtilised:
    name = PolicyName.LEAST_UTILISED
    rebalances = True

    def __init__(self, config: CoreConfig) -> None:
        self.config = config

    def place(self, substations: Collection[Substation], req: PendingRequest,
              now: float) -> tuple[Substation, int | None] | None:
        cfg = self.config
        return least_utilised(substations, req.requested_w, req.min_w, now, cfg.safety_margin_pct,
                              cfg.stale_after_s)

    def max_room_w(self, substations: Collection[Substation], now: float) -> int:
        cfg = self.config
        return max((sub.headroom_w(now, cfg.safety_margin_pct, cfg.stale_after_s) for sub in substations),
                   default=0)

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        return equal_share(available, floors, caps)

    def forget(self, substation_id: str) -> None:
        pass
