"""``least-utilised``: the largest grant available now beyond the substation's noise band (down to ``min_kw``),
then the substation least utilised after placement (the band counted as used); running sessions converge to an
equal share as the balancer rebalances."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from balancer.core.allocation import equal_share
from balancer.core.model import PendingRequest, Session, Substation
from balancer.core.policies.index import Entry, SubstationIndex
from balancer.core.policies.names import PolicyName

if TYPE_CHECKING:
    from balancer.core.config import CoreConfig


class LeastUtilised:
    """Placement from a :class:`SubstationIndex` ordered by room beyond the noise band within each capacity class:
    in a class the most room is also the least utilisation after placement (same limit), so each class's first is
    its best and a request looks at one substation per class. ``scan.least_utilised`` is the reference.

    The measured noise band (``Substation.noise_band_w``) is not placed into: the rebalancer keeps it free under
    running sessions, and a grant in it is shed by the next upward wobble of the base load (place-then-shed)."""

    name = PolicyName.LEAST_UTILISED
    rebalances = True
    time_dependent = False
    water_filled = True  # equal_share: water_fill with every weight 1

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.index = SubstationIndex(entry=_entry(config.safety_margin_pct, config.stale_after_s),
                                     stale_after_s=config.stale_after_s, by_room=True)

    def refile(self, substation_id: str, sub: Substation | None, now: float) -> None:
        self.index.refile(substation_id, sub, now)

    def place(self, substations: Mapping[str, Substation], req: PendingRequest,
              now: float) -> tuple[Substation, int | None] | None:
        """Largest grant available beyond the band (up to the request), then lowest utilisation after placement
        (the band counted), then id."""
        best: tuple[int, float, str] | None = None
        choice: tuple[Substation, int | None] | None = None
        min_w, requested_w = req.min_w, req.requested_w
        for sid, headroom in self.index.group_heads(substations, now):
            if headroom < min_w:
                continue
            sub = substations[sid]
            grant = requested_w if requested_w < headroom else headroom
            key = (-grant, (_committed_w(sub) + grant) / sub.capacity_w, sid)
            if best is None or key < best:
                best, choice = key, (sub, grant)
        return choice

    def max_room_w(self, substations: Mapping[str, Substation], now: float) -> int:
        return self.index.max_room_w(substations, now)

    def targets(self, sessions: Sequence[Session], available: int, floors: Sequence[int], caps: Sequence[int],
                now: float) -> list[int]:
        return equal_share(available, floors, caps)

    def weight(self, session: Session) -> float:
        return 1.0

    def forget(self, substation_id: str) -> None:
        pass


def _entry(margin_pct: float, stale_after_s: float) -> Entry:
    """The index's entry for a substation: its room beyond the band (``Substation.placeable_w``) and its order
    (the most room first: what it carries, the band counted, less its limit), from one read of its numbers.
    ``placeable_w`` stays the definition (``scan.least_utilised`` and the property tests hold the index to it);
    this runs per refile, i.e. per placement and per telemetry message."""
    keep = 1 - margin_pct / 100  # (Substation.limit_w: the same float expression, so the same watts)

    def entry(sub: Substation, now: float) -> tuple[int, tuple[int, str]] | None:
        at = sub.last_telemetry_at
        if (at is None or now - at > stale_after_s or sub.status == "offline" or sub.lost
                or sub.draining):
            return None  # (not available: no headroom)
        noise = sub.noise_w
        committed = (max(sub.base_load_w, sub.load_w - sub.granted_at_telemetry_w) + sub.granted_w
                     + (0 if noise is None else math.ceil(noise)))
        limit = math.floor(sub.capacity_w * keep)
        room = limit - committed
        return (room, (-room, sub.id)) if room > 0 else None
    return entry


def _committed_w(sub: Substation) -> int:
    """What the substation carries plus its measured noise band: the power not available for a new session."""
    return sub.used_w() + sub.noise_band_w()
