"""Why a request waits, answered without visiting every substation in the usual case (issue 10).

``queue_reason`` says ``limit_scheduled`` only when *every* open substation is held down by its schedule; one open
substation that is not is enough to answer ``no_headroom``. The index keeps that substation (the *witness*) from
the last answer and checks it first, so the usual answer costs one check; only when the witness no longer
qualifies does it look for another, stopping at the first found. When none is found the same single pass has
collected what holds each one down (the detail's "until"). The full scan is kept
(:func:`balancer.core.limit_effects.queue_reason_scan`) as the test oracle. Pure: time passed in.
"""

from __future__ import annotations

from balancer.core.config import CoreConfig
from balancer.core.limits import Limit, Schedule
from balancer.core.model import Substation


class LimitIndex:
    __slots__ = ("checks", "config", "schedules", "substations", "witness")

    def __init__(self, substations: dict[str, Substation], schedules: dict[str, Schedule],
                 config: CoreConfig) -> None:
        self.substations = substations
        self.schedules = schedules
        self.config = config
        self.witness: str | None = None  # an open substation not held down by its schedule, last seen
        self.checks = 0  # substations looked at (for tests and the bench)

    def _holding(self, sub: Substation, now: float) -> Limit | bool:
        """False: not open; True: open and not held down; else the schedule entry holding it down."""
        self.checks += 1
        cfg = self.config
        if not sub.is_available(now, cfg.stale_after_s):
            return False
        schedule = self.schedules.get(sub.id)
        entry = schedule.planning(now, cfg.limit_lead_s) if schedule is not None else None
        if entry is None or sub.limit_source() != entry.source:
            return True
        return entry

    def held(self, now: float) -> list[Limit] | None:
        """None when some open substation is not held down by its schedule (answer ``no_headroom``); else the
        entries holding each open one down (empty: no substation is open)."""
        witness = self.substations.get(self.witness) if self.witness is not None else None
        if witness is not None and self._holding(witness, now) is True:
            return None
        bound: list[Limit] = []
        for sub in self.substations.values():
            got = self._holding(sub, now) if sub is not witness else False
            if got is True:
                self.witness = sub.id
                return None
            if isinstance(got, Limit):
                bound.append(got)
        if witness is not None and isinstance(entry := self._holding(witness, now), Limit):
            bound.append(entry)
        self.witness = None
        return bound
