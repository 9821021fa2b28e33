"""What a balancing policy decides: where a new session goes (``place``) and how a substation's power is
shared among its sessions (``targets``). The engine does the rest (ordering, limits, hysteresis)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from balancer.core.model import PendingRequest, Session, Substation
from balancer.core.policies.names import PolicyName


class Policy(Protocol):
    name: PolicyName
    #: False for the baselines: they never change a grant once made, nor shed sessions over a limit.
    rebalances: bool
    #: True when the shares move with time alone (deadline): they are recomputed on every pass.
    time_dependent: bool
    #: True when ``targets`` is ``water_fill`` by ``weight`` (whole numbers): sessions alike in floor, cap and weight
    #: share alike, so the rebalancer keeps them by class (balancer/core/shares.py) instead of re-sharing each one.
    water_filled: bool

    def place(self, substations: Mapping[str, Substation], req: PendingRequest,
              now: float) -> tuple[Substation, int | None] | None:
        """The substation for ``req`` and its grant; grant ``None``: squeeze running sessions to the policy's
        shares to make room (the engine does it). ``None``: nowhere now."""
        ...

    def max_room_w(self, substations: Mapping[str, Substation], now: float) -> int:
        """The most a new session could get anywhere now (0: nothing can be placed)."""
        ...

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        """Each session's share of ``available`` watts, within its floor and cap."""
        ...

    def weight(self, session: Session) -> float:
        """The session's weight in the water-filling shares (1 for equal shares)."""
        ...

    def refile(self, substation_id: str, sub: Substation | None, now: float) -> None:
        """The substation's numbers changed (``None``: it is gone): update what the policy keeps about it."""
        ...

    def forget(self, substation_id: str) -> None:
        """The substation was decommissioned: drop what the policy kept about it."""
        ...
