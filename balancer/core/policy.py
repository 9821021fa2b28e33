"""Placement policy: which substation gets a new session, and how much power.

``least_utilised``: the largest grant available (up to the request), and among substations
offering it the one whose utilisation after placement is lowest; ties by id for determinism.
So full grants are preferred to partial ones, and load spreads evenly instead of piling on the
first substation in a list.
"""

from __future__ import annotations

from collections.abc import Iterable

from balancer.core.model import Substation


def least_utilised(substations: Iterable[Substation], requested_w: int, min_w: int, now: float,
                   margin_pct: float, stale_after_s: float) -> tuple[Substation, int] | None:
    best: tuple[int, float, str] | None = None
    choice: tuple[Substation, int] | None = None
    for sub in substations:
        headroom = sub.headroom_w(now, margin_pct, stale_after_s)
        if headroom < min_w or headroom <= 0:
            continue
        grant = min(requested_w, headroom)
        utilisation = (sub.used_w() + grant) / sub.capacity_w
        key = (-grant, utilisation, sub.id)
        if best is None or key < best:
            best = key
            choice = (sub, grant)
    return choice
