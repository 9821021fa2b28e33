"""Why a request waits, answered without visiting any substation per request (issue 10).

``queue_reason`` says ``limit_scheduled`` only when *every* open substation is held down by its schedule (the
detail names the earliest end of what holds them); one open substation that is not is enough for ``no_headroom``.
The index keeps each substation's standing while limit schedules exist: not open, open and *free* (not held down),
or *held* by a schedule entry. A substation is refiled only when something it depends on may have moved: the core
touched it (``CoreState.touched``: telemetry, status, operator control, a new grant or capacity), its schedule
changed (``LimitFollower.attach``), or a time it depends on came (its telemetry goes stale, its planning window
moves: a due heap). The answer is then a count and the first of a sorted list: a grid-wide curtailment, where every
substation is held down, costs a request what a quiet grid does (the scan it replaced visited all 1,000).

The full scan is kept as the test oracle (:func:`balancer.core.limit_effects.queue_reason_scan`). Pure: time passed in.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

from sortedcontainers import SortedList

from balancer.core.config import CoreConfig
from balancer.core.limits import Limit, Schedule
from balancer.core.model import Substation


class LimitIndex:
    __slots__ = ("checks", "config", "dirty", "due", "free", "held", "schedules", "seen_at", "standing",
                 "substations", "when")

    def __init__(self, substations: dict[str, Substation], schedules: dict[str, Schedule],
                 config: CoreConfig) -> None:
        self.substations = substations
        self.schedules = schedules
        self.config = config
        #: id -> True (open, not held down) or the entry holding it down; absent: not open. None: not built (no
        #: schedule exists, or the clock stepped back): the next answer files every substation
        self.standing: dict[str, Limit | bool] | None = None
        self.free: set[str] = set()
        self.held: SortedList = SortedList()  # (end of the entry holding it down, id)
        self.dirty: set[str] = set()  # to refile before the next answer
        self.due: list[tuple[float, str]] = []  # (when to refile, id): a heap; ``when`` holds each id's live row
        self.when: dict[str, float] = {}
        self.seen_at = -math.inf
        self.checks = 0  # substations filed (for tests and the bench)

    def reset(self) -> None:
        """Forget every filing (no schedule is left: nothing to answer from it until one comes)."""
        if self.standing is not None:
            self.standing = None
            self.free.clear()
            self.held.clear()
            self.dirty.clear()
            self.due.clear()
            self.when.clear()

    def note(self, ids: Iterable[str]) -> None:
        """These substations changed (the core touched them, or their schedule or the limit they plan with
        changed): refile them before the next answer."""
        if self.standing is not None:
            self.dirty.update(ids)

    def held_until(self, now: float, touched: Iterable[str] = ()) -> float | None:
        """None when some open substation is not held down by its schedule, or none is open (answer
        ``no_headroom``); else the earliest end of the entries holding the open ones down. ``touched``: the
        core's touches the placement index has not taken yet."""
        if self.standing is None or now < self.seen_at:
            self._build(now)
        else:
            self.dirty.update(touched)
            due, when, dirty = self.due, self.when, self.dirty
            while due and due[0][0] <= now:
                at, sid = heapq.heappop(due)
                if when.get(sid) == at:
                    del when[sid]
                    dirty.add(sid)
            if dirty:
                for sid in dirty:
                    self._file(sid, now)
                dirty.clear()
        self.seen_at = now
        if self.free or not self.held:
            return None
        return float(self.held[0][0])

    def _build(self, now: float) -> None:
        self.reset()
        self.standing = {}
        for sid in self.substations:
            self._file(sid, now)

    def _file(self, sid: str, now: float) -> None:
        standing = self.standing
        assert standing is not None
        old = standing.pop(sid, None)
        if old is True:
            self.free.discard(sid)
        elif isinstance(old, Limit):
            self.held.remove((old.end, sid))
        sub = self.substations.get(sid)
        if sub is None:
            self.when.pop(sid, None)
            return
        self.checks += 1
        cfg = self.config
        heard = sub.last_telemetry_at
        schedule = self.schedules.get(sid)
        entry = schedule.planning(now, cfg.limit_lead_s) if schedule is not None else None
        if sub.is_available(now, cfg.stale_after_s):
            if entry is None or sub.limit_source() != entry.source:
                standing[sid] = True
                self.free.add(sid)
            else:
                standing[sid] = entry
                self.held.add((entry.end, sid))
        # When its standing may change with no touch: its telemetry goes stale, its planning window moves.
        at = math.inf
        if heard is not None and now - heard <= cfg.stale_after_s:
            # (``heard + stale_after_s`` may round up to a time already stale: look then; still fresh there, the
            # look below moves the row one step on)
            at = heard + cfg.stale_after_s
        if schedule is not None:
            at = min(at, schedule.planning_until(now, cfg.limit_lead_s))
        if at < math.inf:
            at = max(at, math.nextafter(now, math.inf))  # (float rounding: never due at a time already seen)
            pending = self.when.get(sid)
            if pending is None or at < pending:  # an earlier row stands: it refiles and pushes this one then
                self.when[sid] = at
                heapq.heappush(self.due, (at, sid))
