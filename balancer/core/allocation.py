"""How a substation's available power is shared among its sessions: pure functions over integers (watts).

Every function returns one target per session with ``floor_i <= target_i <= cap_i`` and
``sum(targets) <= available`` whenever ``sum(floors) <= available`` (the caller sheds sessions
first when even the floors do not fit). Rounding is always down, so the sum never exceeds.
"""

from __future__ import annotations

from collections.abc import Sequence


def water_fill(available: int, floors: Sequence[int], caps: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Weighted max-min fair shares: target_i = clamp(level * weight_i, floor_i, cap_i), with the highest
    water level whose targets still fit in ``available``.

    Max-min fairness: nobody's share can grow without shrinking a share that is already smaller
    (relative to its weight). Floors (each session's ``min_kw``) are honoured first. Exact, O(n log n):
    the total is piecewise linear in the level, with breakpoints where a share leaves its floor or
    reaches its cap.
    """
    n = len(floors)
    if n == 0:
        return []
    if sum(floors) >= available:
        return list(floors)
    if sum(caps) <= available:
        return list(caps)
    # Breakpoints: at level f/w a share starts to rise (+w per unit level); at c/w it stops (-w).
    events = sorted([(f / w, w) for f, w in zip(floors, weights, strict=True)]
                    + [(c / w, -w) for c, w in zip(caps, weights, strict=True)])
    base = float(sum(floors))  # total at level 0 (every share at its floor)
    slope = 0.0
    level_at = 0.0
    level = events[-1][0]
    for point, dw in events:
        reached = base + slope * (point - level_at)
        if reached >= available:
            level = level_at + (available - base) / slope if slope > 0 else level_at
            break
        base, level_at = reached, point
        slope += dw
    targets = [min(c, max(f, int(level * w))) for f, c, w in zip(floors, caps, weights, strict=True)]
    # Float rounding can leave the sum a few watts over: take them back from the largest shares.
    over = sum(targets) - available
    for i in sorted(range(n), key=lambda j: targets[j] - floors[j], reverse=True):
        if over <= 0:
            break
        take = min(over, targets[i] - floors[i])
        targets[i] -= take
        over -= take
    return targets


def equal_share(available: int, floors: Sequence[int], caps: Sequence[int]) -> list[int]:
    return water_fill(available, floors, caps, [1.0] * len(floors))


def laxity_share(available: int, floors: Sequence[int], caps: Sequence[int],
                 urgency: Sequence[tuple[float, ...] | None]) -> list[int]:
    """Least laxity first: every session's floor, then, most urgent first (smallest ``urgency`` key), as much as
    it can take (its cap) while power lasts; sessions without a key (no departure or energy given) share what is
    left equally.

    Concentrating power on the least laxity (time to spare at full power) is the textbook scheduler that
    delivers most energy by the departures (ACN-Sim's LLF); the caller rounds laxity into steps so that near
    ties do not swap power back and forth.
    """
    targets = list(floors)
    room = available - sum(floors)
    if room <= 0:
        return targets
    ranked = sorted((key, i) for i, key in enumerate(urgency) if key is not None)
    for _, i in ranked:
        give = min(caps[i] - targets[i], room)
        if give > 0:
            targets[i] += give
            room -= give
            if room <= 0:
                return targets
    return equal_share(available, targets, caps)


#: a class's breakpoints, sorted: (level, weight change, count); and the totals at the floors and at the caps
ClassEvents = tuple[list[tuple[float, float, int]], int, int]


def class_events(classes: Sequence[tuple[int, int, float, int]]) -> ClassEvents:
    """What :func:`water_fill_classes` needs of the classes, whatever the power (kept while the classes are)."""
    events = sorted([(f / w, w, k) for f, _, w, k in classes] + [(c / w, -w, k) for _, c, w, k in classes])
    return events, sum(f * k for f, _, _, k in classes), sum(c * k for _, c, _, k in classes)


def water_fill_classes(available: int, classes: Sequence[tuple[int, int, float, int]],
                       events: ClassEvents | None = None) -> list[int] | None:
    """:func:`water_fill` over classes of sessions, ``(floor, cap, weight, count)``: one target per class, the very
    targets water_fill gives each of the class's sessions, in O(classes). The level is found by the same steps (a
    class of ``count`` sessions is ``count`` equal breakpoints, which move the level nowhere); weights must be whole
    numbers so the slope's sums are exact as they are there. ``None`` when water_fill's float rounding would take a
    few watts back from some sessions (they would no longer share their class's target). ``events``: the classes'
    :func:`class_events`, when kept."""
    if not classes:
        return []
    points, floors, caps = events if events is not None else class_events(classes)
    if floors >= available:
        return [f for f, _, _, _ in classes]
    if caps <= available:
        return [c for _, c, _, _ in classes]
    base = float(floors)
    slope = 0.0
    level_at = 0.0
    level = points[-1][0]
    for point, dw, count in points:
        reached = base + slope * (point - level_at)
        if reached >= available:
            level = level_at + (available - base) / slope if slope > 0 else level_at
            break
        base, level_at = reached, point
        slope += dw * count
    targets = [min(c, max(f, int(level * w))) for f, c, w, _ in classes]
    if sum(t * k for t, (_, _, _, k) in zip(targets, classes, strict=True)) > available:
        return None
    return targets
