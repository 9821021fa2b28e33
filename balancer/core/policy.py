"""Balancing policies: where a new session goes, and how each substation's power is shared.

Real policies (never exceed a limit):

- ``least-utilised``: the largest grant available now (down to ``min_kw``), then the substation least
  utilised after placement; running sessions converge to an equal share as the balancer rebalances.
- ``weighted-fair``: max-min fair shares weighted by ``priority + 1``. A waiting EV counts too: a new
  request is admitted wherever running sessions can be squeezed (toward their ``min_kw``) to make room.
- ``deadline``: like ``weighted-fair`` for admission; least laxity first: the EV with the least time to spare
  (departure less the time its remaining ``energy_kwh`` takes at full power, in 30-minute steps) gets all it
  can take, then the next; EVs that gave no departure share the rest equally.

Baselines, for comparison in the replay only (they ignore capacity, as the original HTTP design did):

- ``round-robin``: substations in turn, full requested power.
- ``polled-least-loaded``: the substation with the fewest sessions in a periodically polled snapshot,
  full requested power. A burst herds onto whichever substation looked emptiest at the last poll.
"""

from __future__ import annotations

from collections.abc import Iterable

from balancer.core.model import Substation

LEAST_UTILISED = "least-utilised"
WEIGHTED_FAIR = "weighted-fair"
DEADLINE = "deadline"
ROUND_ROBIN = "round-robin"
POLLED_LEAST_LOADED = "polled-least-loaded"

SAFE_POLICIES = (LEAST_UTILISED, WEIGHTED_FAIR, DEADLINE)
BASELINES = (ROUND_ROBIN, POLLED_LEAST_LOADED)
POLICIES = SAFE_POLICIES + BASELINES
#: Policies that admit a request by squeezing running sessions toward their minimum.
COMPRESSIBLE = (WEIGHTED_FAIR, DEADLINE)


def least_utilised(substations: Iterable[Substation], requested_w: int, min_w: int, now: float,
                   margin_pct: float, stale_after_s: float) -> tuple[Substation, int] | None:
    """Largest grant available (up to the request), then lowest utilisation after placement, then id."""
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
