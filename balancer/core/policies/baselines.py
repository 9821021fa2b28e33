"""Baselines, for comparison in the replay only (they ignore capacity, as the original HTTP design did):

- ``round-robin``: substations in turn, full requested power.
- ``polled-least-loaded``: the substation with the fewest sessions in a periodically polled snapshot,
  full requested power. A burst herds onto whichever substation looked emptiest at the last poll.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from balancer.core.allocation import equal_share
from balancer.core.model import PendingRequest, Session, Substation
from balancer.core.policies.names import PolicyName
from balancer.core.policies.scan import baseline_candidates

if TYPE_CHECKING:
    from balancer.core.config import CoreConfig


class _Baseline:
    rebalances = False
    time_dependent = False
    water_filled = False

    def __init__(self, config: CoreConfig) -> None:
        self.config = config

    def max_room_w(self, substations: Mapping[str, Substation], now: float) -> int:
        return 1 << 40 if baseline_candidates(substations.values()) else 0

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        return equal_share(available, floors, caps)  # (never used: baselines do not rebalance)

    def weight(self, session: Session) -> float:
        return 1.0

    def forget(self, substation_id: str) -> None:
        pass

    def refile(self, substation_id: str, sub: Substation | None, now: float) -> None:
        pass  # (the baselines scan: replays only, a few substations)


class RoundRobin(_Baseline):
    name = PolicyName.ROUND_ROBIN

    def __init__(self, config: CoreConfig) -> None:
        super().__init__(config)
        self._next = 0

    def place(self, substations: Mapping[str, Substation], req: PendingRequest,
              now: float) -> tuple[Substation, int | None] | None:
        candidates = baseline_candidates(substations.values())
        if not candidates:
            return None
        sub = candidates[self._next % len(candidates)]
        self._next += 1
        return sub, req.requested_w


class PolledLeastLoaded(_Baseline):
    name = PolicyName.POLLED_LEAST_LOADED

    def __init__(self, config: CoreConfig) -> None:
        super().__init__(config)
        self._snapshot: dict[str, int] = {}
        self._polled_at = float("-inf")

    def place(self, substations: Mapping[str, Substation], req: PendingRequest,
              now: float) -> tuple[Substation, int | None] | None:
        candidates = baseline_candidates(substations.values())
        if not candidates:
            return None
        # The original design's choice, on a snapshot that goes stale.
        if now - self._polled_at >= self.config.poll_interval_s:
            self._snapshot = {s.id: len(s.sessions) for s in candidates}
            self._polled_at = now
        sub = min(candidates, key=lambda s: (self._snapshot.get(s.id, 0), s.id))
        return sub, req.requested_w

    def forget(self, substation_id: str) -> None:
        self._snapshot.pop(substation_id, None)
