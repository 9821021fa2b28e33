"""Placement by scanning every substation: the reference the policies' indexes are tested against.

Each function looks at every substation, so its cost grows with the grid; the policies answer the same
questions from indexes they keep (see the property tests, which hold the two to the same decisions).
"""

from __future__ import annotations

from collections.abc import Iterable

from balancer.core.model import Substation


def least_utilised(substations: Iterable[Substation], requested_w: int, min_w: int, now: float,
                   margin_pct: float, stale_after_s: float) -> tuple[Substation, int] | None:
    """Largest grant available beyond the measured noise band (up to the request), then lowest utilisation after
    placement (the band counted as used), then id."""
    best: tuple[int, float, str] | None = None
    choice: tuple[Substation, int] | None = None
    for sub in substations:
        headroom = sub.placeable_w(now, margin_pct, stale_after_s)
        if headroom < min_w or headroom <= 0:
            continue
        grant = min(requested_w, headroom)
        utilisation = (sub.used_w() + sub.noise_band_w() + grant) / sub.capacity_w
        key = (-grant, utilisation, sub.id)
        if best is None or key < best:
            best = key
            choice = (sub, grant)
    return choice


def compressible_room_w(sub: Substation, now: float, margin_pct: float, stale_after_s: float) -> int:
    """Power a new session could get if every running session were squeezed to its minimum."""
    if not sub.is_available(now, stale_after_s):
        return 0
    return max(0, sub.limit_w(margin_pct) - sub.uncontrolled_w() - sub.floors_w)


def fair_placement(substations: Iterable[Substation], requested_w: int, min_w: int, now: float,
                   margin_pct: float, stale_after_s: float) -> Substation | None:
    """Where a squeezed-in session can get its minimum, the substation whose demand (base load plus what its
    sessions ask for) is lowest relative to its limit: the new EV will get the most there."""
    best: tuple[float, str] | None = None
    choice: Substation | None = None
    for sub in substations:
        if compressible_room_w(sub, now, margin_pct, stale_after_s) < min_w:
            continue
        demand = sub.base_load_w + sum(s.request.requested_w for s in sub.sessions.values()) + requested_w
        key = (demand / max(1, sub.limit_w(margin_pct)), sub.id)
        if best is None or key < best:
            best, choice = key, sub
    return choice


def baseline_candidates(substations: Iterable[Substation]) -> list[Substation]:
    """What a naive balancer would place on: every substation not reported offline, in id order."""
    return sorted((s for s in substations if s.status != "offline" and not s.draining and s.capacity_w > 0),
                  key=lambda s: s.id)
