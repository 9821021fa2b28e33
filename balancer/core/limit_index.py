"""Why a request waits, answered without visiting every substation (issue 10).

``queue_reason`` says ``limit_scheduled`` only when *every* open substation is held down by its schedule; one open
substation that is not is enough to answer ``no_headroom``. The index keeps that substation (the *witness*) from
the last answer and checks it first, so the usual answer costs one check; only when the witness no longer
qualifies does it look for another, stopping at the first found. The full scan is kept
(:func:`balancer.core.limit_effects.queue_reason_scan`) as the test oracle. Pure: time passed in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from balancer.core.model import Substation

if TYPE_CHECKING:
    from balancer.core.limits import Limit
    from balancer.core.state import CoreState


class LimitIndex:
    __slots__ = ("checks", "state", "witness")

    def __init__(self, state: CoreState) -> None:
        self.state = state
        self.witness: str | None = None  # an open substation not held down by its schedule, last seen
        self.checks = 0  # substations looked at (for tests and the bench)

    def _bound(self, sub: Substation, now: float) -> tuple[bool, Limit | None]:
        """(open, the schedule entry holding it down or None)."""
        st = self.state
        self.checks += 1
        if not sub.is_available(now, st.config.stale_after_s):
            return False, None
        schedule = st.schedules.get(sub.id)
        entry = schedule.planning(now, st.config.limit_lead_s) if schedule is not None else None
        if entry is None or sub.limit_source() != entry.source:
            return True, None
        return True, entry

    def free(self, now: float) -> bool:
        """Some open substation is not held down by its schedule (answer ``no_headroom``)."""
        st = self.state
        witness = st.substations.get(self.witness) if self.witness is not None else None
        if witness is not None:
            open_, entry = self._bound(witness, now)
            if open_ and entry is None:
                return True
        for sub in st.substations.values():
            if sub is witness:
                continue
            open_, entry = self._bound(sub, now)
            if open_ and entry is None:
                self.witness = sub.id
                return True
        self.witness = None
        return False
