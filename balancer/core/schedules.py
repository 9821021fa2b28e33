"""The balancer and its limit schedules: what the engine does when a schedule arrives, as time passes, and what it
tells EVs about it. The schedule itself (entries, precedence, composite) is :mod:`balancer.core.limits`.

* A substation plans with the lowest scheduled limit from now to ``limit_lead_s`` ahead, so sessions are reduced
  (reason ``limit_scheduled``) before a limit starts, never after; grants rise again once it is over.
* The deadline policy counts the power it will have until each EV's departure
  (:func:`balancer.core.limit_effects.horizon`).
* An EV that cannot get its energy by its departure because of the scheduled limits hears ``limit_shortfall``
  (when it is assigned, and when a new schedule makes it so); a request that waits because every substation that
  could take it is held down by a schedule is queued with ``limit_scheduled``.

Pure: time passed in. The hooks the rest of the core calls are in :mod:`balancer.core.limit_effects` (functions of the
shared state); :class:`LimitFollower` here handles schedules arriving and time passing.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from balancer.core.effects import Effect, ToEv
from balancer.core.limit_effects import describe, planning_entry, shortfall
from balancer.core.limits import Limit, Schedule, plan_with
from balancer.core.model import Substation, kw_to_w_down
from grid_protocol.messages import MAX_SCHEDULE_ENTRIES, LimitSchedule, ScheduleState
from grid_protocol.reasons import Reason

if TYPE_CHECKING:
    from balancer.core.ledger import Ledger
    from balancer.core.queue_service import QueueService
    from balancer.core.rebalancing import Rebalancer
    from balancer.core.sessions import SessionBook
    from balancer.core.state import CoreState


class LimitFollower:
    """Schedules arriving (an operator's, or read back at start) and time passing: each substation plans with its
    scheduled limit, and its sessions come down when that limit does."""

    def __init__(self, state: CoreState, ledger: Ledger, book: SessionBook, rebalancer: Rebalancer,
                 queue_service: QueueService) -> None:
        self.state = state
        self.ledger = ledger
        self.book = book
        self.rebalancer = rebalancer
        self.queue_service = queue_service
        #: when each schedule next needs a look (an entry starts, ends or enters the lead time; its published view
        #: changes), as a heap, so a tick visits only those due (issue 10); ``_when`` holds the current due time of
        #: each, older heap rows are skipped
        self._due: list[tuple[float, int, str]] = []
        self._when: dict[str, float] = {}
        self._seq = 0
        self.visits = 0  # schedules looked at by follow (for tests and the bench)

    def _push(self, sid: str, due: float) -> None:
        self._seq += 1
        self._when[sid] = due
        heapq.heappush(self._due, (due, self._seq, sid))

    def mark(self, sid: str) -> None:
        """``sid``'s schedule changed: look at it at the next tick."""
        self._push(sid, float("-inf"))

    def attach(self, sub: Substation, now: float) -> list[Effect]:
        """Bring the substation's planning limit up to date with its schedule (call when either changes). A lower
        limit reduces its sessions at once; a higher one lets the next rebalance raise them."""
        st = self.state
        before = sub.capacity_w
        lowered = plan_with(sub, st.schedules.get(sub.id), now, st.config.limit_lead_s)
        if sub.capacity_w != before:
            st.touch(sub)  # the placement index files substations by capacity
        st.limit_index.note((sub.id,))  # the limit index by the entry it plans with and when that moves
        return self.rebalancer.reduce(sub, now) if lowered and sub.last_telemetry_at is not None else []

    def follow(self, now: float) -> list[Effect]:
        """Every tick: drop entries that are over, move each substation's planning window on, and note the
        schedules whose published view changed (``schedule_dirty``). Only the schedules due are looked at: between
        its due times a schedule's look changes nothing (:meth:`follow_every`, the oracle, looks at all); those
        due are looked at in the order of ``schedules``, as the oracle does."""
        st = self.state
        when = self._when
        if len(when) != len(st.schedules):  # schedules set or dropped other than here (forget, tests)
            for sid in [sid for sid in when if sid not in st.schedules]:
                del when[sid]
            for sid in st.schedules:
                if sid not in when:
                    self.mark(sid)
        due: set[str] = set()
        heap = self._due
        while heap and heap[0][0] <= now:
            at, _, sid = heapq.heappop(heap)
            if when.get(sid) == at:
                due.add(sid)
        if not due:
            return []
        order = [sid for sid in st.schedules if sid in due] if len(due) > 1 else list(due)
        effects: list[Effect] = []
        lead_s = st.config.limit_lead_s
        for sid in order:
            schedule = st.schedules.get(sid)
            if schedule is None:
                when.pop(sid, None)
                continue
            effects += self._look(sid, schedule, now)
            if sid in st.schedules:
                self._push(sid, min(schedule.recheck_at, schedule.planning_until(now, lead_s)))
            else:
                when.pop(sid, None)
        return effects

    def follow_every(self, now: float) -> list[Effect]:
        """:meth:`follow` looking at every schedule (the test oracle)."""
        effects: list[Effect] = []
        for sid, schedule in list(self.state.schedules.items()):
            effects += self._look(sid, schedule, now)
        return effects

    def _look(self, sid: str, schedule: Schedule, now: float) -> list[Effect]:
        st = self.state
        self.visits += 1
        schedule.prune(now)
        if now >= schedule.recheck_at:
            st.schedule_dirty.add(sid)
            schedule.recheck_at = schedule.next_change(now) or float("inf")
        if not len(schedule):
            del st.schedules[sid]
        sub = st.substations.get(sid)
        return self.attach(sub, now) if sub is not None else []

    def notify_shortfalls(self, sub: Substation, now: float) -> list[Effect]:
        """After a schedule change: tell each EV on the substation that can no longer get its energy in time."""
        effects: list[Effect] = []
        for session in sub.sessions.values():
            detail = shortfall(self.state, session, now)
            state = self.ledger.evs.get(session.request.ev_id)
            if detail is None or state is None:
                continue
            state.answer = self.ledger.answer(session.request, "updated", now, session=session,
                                              reason=Reason.LIMIT_SHORTFALL, detail=detail)
            self.state.counters[f"updated:{Reason.LIMIT_SHORTFALL}"] += 1
            effects.append(ToEv(session.request.ev_id, state.answer))
        return effects

    def on_limits(self, substation_id: str, msg: LimitSchedule, now: float) -> tuple[Reason | None, str, list[Effect]]:
        """An operator's schedule for one source on one substation: replace that source's entries, follow at once."""
        st = self.state
        sub = st.substations.get(substation_id)
        if sub is None:
            return Reason.UNKNOWN_SUBSTATION, f"substation {substation_id!r} has never been heard of", []
        schedule = st.schedules.get(substation_id) or Schedule()
        total = schedule.count_without(msg.source) + len(msg.entries)
        if total > MAX_SCHEDULE_ENTRIES:
            return (Reason.SCHEDULE_FULL, f"substation {substation_id} would hold {total} entries, at most "
                    f"{MAX_SCHEDULE_ENTRIES}: withdraw a source or send fewer entries", [])
        limits = [Limit(e.start, e.end, kw_to_w_down(e.limit_kw), msg.source, e.priority) for e in msg.entries]
        dropped = schedule.replace(msg.source, limits, now)
        if len(schedule):
            st.schedules[substation_id] = schedule
        else:
            st.schedules.pop(substation_id, None)
        st.schedule_dirty.add(substation_id)
        self.mark(substation_id)
        st.counters["control:set_limits"] += 1
        effects = self.attach(sub, now)
        effects += self.queue_service.serve(now)
        effects += self.rebalancer.raise_(sub, now)
        effects += self.book.requeue_notices(now)
        effects += self.notify_shortfalls(sub, now)
        kept = len(msg.entries) - dropped
        detail = (f"{kept} entr{'y' if kept == 1 else 'ies'} from {msg.source}" if kept
                  else f"{msg.source} withdrawn")
        if dropped:
            detail += f"; {dropped} already over, dropped"
        binding = planning_entry(st, substation_id, now)
        detail += (f"; planning with {describe(binding)}" if binding is not None
                   else "; no scheduled limit applies now")
        return None, detail, effects

    def restore(self, state: ScheduleState, now: float) -> list[Effect]:
        """A restarted balancer re-reads its retained schedule: the entries not yet over, by source."""
        st = self.state
        schedule = Schedule()
        by_source: dict[str, list[Limit]] = {}
        for e in state.entries[:MAX_SCHEDULE_ENTRIES]:
            by_source.setdefault(e.source, []).append(
                Limit(e.start, e.end, kw_to_w_down(e.limit_kw), e.source, e.priority))
        for source, limits in by_source.items():
            schedule.replace(source, limits, now)
        if len(schedule):
            st.schedules[state.substation_id] = schedule
        else:
            st.schedules.pop(state.substation_id, None)
        st.schedule_dirty.add(state.substation_id)
        self.mark(state.substation_id)
        sub = st.substations.get(state.substation_id)
        return self.attach(sub, now) if sub is not None else []

    def forget(self, substation_id: str) -> None:
        self.state.schedules.pop(substation_id, None)
        self.state.schedule_dirty.discard(substation_id)
        self._when.pop(substation_id, None)
