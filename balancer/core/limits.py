"""Limit schedules: time-bounded limits on a substation (a DSO's import limits, OCPP ExternalConstraints, OpenADR
events) from several sources, and which one applies when.

Precedence, as in OCPP 2.0.1's composite schedule:

* within one source, where its entries overlap, the highest ``priority`` wins (OCPP's stack level: a source can lay
  an event over its own base schedule, tighter or looser); among its entries of that priority, the lowest limit;
* across sources the lowest limit wins, whatever the priorities: no source can lift another's limit;
* the substation's effective limit is the lowest of its rated capacity, the operator's limit and the schedule.

An entry applies from ``start`` (inclusive) to ``end`` (exclusive); one that is over drops out. The balancer plans
with the lowest limit from now to ``lead_s`` ahead (:meth:`Schedule.planning`): sessions are reduced before a
limit starts, so they have followed it when it does, and raised again only once it is over.

Pure: plain data, time passed in, power in integer watts.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from balancer.core.model import Substation
from grid_protocol.messages import CompositeSlot, ScheduleEntry, ScheduleState


@dataclass(frozen=True, slots=True)
class Limit:
    """One entry: at most ``limit_w`` on the substation in [start, end)."""

    start: float
    end: float
    limit_w: int
    source: str
    priority: int = 0

    def applies(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True, slots=True)
class Slot:
    """An interval of the composite schedule and the entry that binds in it."""

    start: float
    end: float
    binding: Limit


def _winner(candidates: Iterable[Limit]) -> Limit | None:
    """The binding entry among those that apply at one instant (see the module's precedence)."""
    top: dict[str, Limit] = {}
    for e in candidates:
        best = top.get(e.source)
        if best is None or (e.priority, -e.limit_w) > (best.priority, -best.limit_w):
            top[e.source] = e
    return min(top.values(), key=lambda e: (e.limit_w, e.source, e.start), default=None)


class Schedule:
    """The entries of one substation, by source."""

    __slots__ = ("_by_source", "_cache", "_times", "recheck_at")

    def __init__(self) -> None:
        self._by_source: dict[str, list[Limit]] = {}
        self._times: list[float] = []  # every start and end, sorted
        self._cache: tuple[float, float, float, Limit | None] | None = None  # (lead, from, until, result)
        #: when its published view may change next (the next start or end; -inf: it just changed)
        self.recheck_at = float("-inf")

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_source.values())

    def entries(self) -> list[Limit]:
        return sorted((e for v in self._by_source.values() for e in v), key=lambda e: (e.start, e.source, e.end))

    def sources(self) -> list[str]:
        return sorted(self._by_source)

    def count_without(self, source: str) -> int:
        """Entries held for every other source (to bound what a replacement may add)."""
        return len(self) - len(self._by_source.get(source, ()))

    def _changed(self) -> None:
        self._times = sorted({t for v in self._by_source.values() for e in v for t in (e.start, e.end)})
        self._cache = None
        self.recheck_at = float("-inf")

    def replace(self, source: str, limits: Iterable[Limit], now: float) -> int:
        """Every entry of ``source`` becomes ``limits`` (none: the source is withdrawn). Entries already over are
        dropped; returns how many."""
        given = list(limits)
        kept = sorted((e for e in given if e.end > now), key=lambda e: (e.start, e.end))
        if kept:
            self._by_source[source] = kept
        else:
            self._by_source.pop(source, None)
        self._changed()
        return len(given) - len(kept)

    def prune(self, now: float) -> bool:
        """Drop entries that are over. True when any was."""
        if not self._times or self._times[0] > now:
            return False  # nothing can have ended (the earliest start or end is still ahead)
        changed = False
        for source in list(self._by_source):
            entries = self._by_source[source]
            kept = [e for e in entries if e.end > now]
            if len(kept) != len(entries):
                changed = True
                if kept:
                    self._by_source[source] = kept
                else:
                    del self._by_source[source]
        if changed:
            self._changed()
        return changed

    def binding_at(self, t: float) -> Limit | None:
        """The entry whose limit applies at ``t`` (None: no entry applies)."""
        return _winner(e for v in self._by_source.values() for e in v if e.applies(t))

    def lowest_between(self, t0: float, t1: float) -> Limit | None:
        """The binding entry with the lowest limit anywhere in [t0, t1] (what to plan with over that window)."""
        times = self._times
        points = [t0, *times[bisect.bisect_right(times, t0):bisect.bisect_right(times, t1)]]
        found = [b for t in points if (b := self.binding_at(t)) is not None]
        return min(found, key=lambda e: (e.limit_w, e.start), default=None)

    def planning(self, now: float, lead_s: float) -> Limit | None:
        """The entry to plan with at ``now``: the lowest binding from now to ``lead_s`` ahead. Cached until the
        window's content can change (an entry ends, or one starts within ``lead_s``): a tick costs a comparison."""
        cache = self._cache
        if cache is not None and cache[0] == lead_s and cache[1] <= now < cache[2]:
            return cache[3]
        times = self._times
        after_now = times[bisect.bisect_right(times, now)] if times and times[-1] > now else float("inf")
        i = bisect.bisect_right(times, now + lead_s)
        entering = times[i] - lead_s if i < len(times) else float("inf")
        result = self.lowest_between(now, now + lead_s)
        self._cache = (lead_s, now, min(after_now, entering), result)
        return result

    def planning_until(self, now: float, lead_s: float) -> float:
        """Until when :meth:`planning` keeps its answer from ``now`` (an entry ends, or one starts within
        ``lead_s``)."""
        self.planning(now, lead_s)
        assert self._cache is not None
        return self._cache[2]

    def next_change(self, t: float) -> float | None:
        """The first start or end after ``t``."""
        i = bisect.bisect_right(self._times, t)
        return self._times[i] if i < len(self._times) else None

    def composite(self, t0: float) -> list[Slot]:
        """From ``t0`` on (the slot in force at ``t0`` included whole): where some entry applies, the binding entry,
        adjacent intervals with the same binding entry merged."""
        times = self._times
        slots: list[Slot] = []
        first = max(0, bisect.bisect_right(times, t0) - 1)
        for a, b in zip(times[first:], times[first + 1:], strict=False):
            if b <= t0:
                continue
            binding = self.binding_at(a)
            if binding is None:
                continue
            if slots and slots[-1].end == a and slots[-1].binding == binding:
                slots[-1] = Slot(slots[-1].start, b, binding)
            else:
                slots.append(Slot(a, b, binding))
        return slots


def plan_with(sub: Substation, schedule: Schedule | None, now: float, lead_s: float) -> bool:
    """Set the substation's scheduled limit to plan with (the lowest from now to ``lead_s`` ahead) and its
    capacity. True when the capacity went down (its sessions must come down too)."""
    binding = schedule.planning(now, lead_s) if schedule is not None else None
    limit_w = binding.limit_w if binding is not None else None
    source = binding.source if binding is not None else None
    if (limit_w, source) == (sub.schedule_limit_w, sub.schedule_source):
        return False
    before = sub.capacity_w
    sub.schedule_limit_w, sub.schedule_source = limit_w, source
    sub.apply_capacity()
    return sub.capacity_w < before


def available_steps(schedule: Schedule | None, now: float, until: float, rated_w: int,
                    margin_pct: float) -> list[tuple[float, float, int]]:
    """The substation's limit (less the safety margin) as steps ``(start, end, limit_w)`` covering [now, until]."""
    def cap(limit_w: int) -> int:
        return int(min(rated_w, limit_w) * (1 - margin_pct / 100))

    if schedule is None or until <= now:
        return [(now, max(now, until), cap(rated_w))]
    steps: list[tuple[float, float, int]] = []
    t = now
    while t < until:
        nxt = schedule.next_change(t)
        end = until if nxt is None else min(nxt, until)
        binding = schedule.binding_at(t)
        steps.append((t, end, cap(rated_w if binding is None else binding.limit_w)))
        t = end
    return steps


def expected_wh(steps: list[tuple[float, float, int]], until: float, other_w: int, max_w: int, sessions: int) -> float:
    """What one of ``sessions`` sessions can expect by ``until``: in each step its equal share of what the limit
    leaves beside ``other_w`` (base load), at most ``max_w``."""
    total = 0.0
    for start, end, limit_w in steps:
        if start >= until:
            break
        total += (min(end, until) - start) * min(max_w, max(0, limit_w - other_w) / max(1, sessions)) / 3600
    return total


def _kw(w: int) -> float:
    return w / 1000


def schedule_state(substation_id: str, schedule: Schedule, now: float) -> ScheduleState:
    """The retained view of a substation's schedule (``substation/{id}/schedule``)."""
    binding = schedule.binding_at(now)
    return ScheduleState(
        substation_id=substation_id, ts=now,
        limit_kw=_kw(binding.limit_w) if binding is not None else None,
        source=binding.source if binding is not None else None,
        entries=[ScheduleEntry(start=e.start, end=e.end, limit_kw=_kw(e.limit_w), source=e.source,
                               priority=e.priority) for e in schedule.entries()],
        composite=[CompositeSlot(start=s.start, end=s.end, limit_kw=_kw(s.binding.limit_w),
                                 source=s.binding.source, priority=s.binding.priority)
                   for s in schedule.composite(now)],
    )
