"""The balancer and its limit schedules: what the engine does when a schedule arrives, as time passes, and what it
tells EVs about it. The schedule itself (entries, precedence, composite) is :mod:`balancer.core.limits`.

* A substation plans with the lowest scheduled limit from now to ``limit_lead_s`` ahead, so sessions are reduced
  (reason ``limit_scheduled``) before a limit starts, never after; grants rise again once it is over.
* The deadline policy counts the power it will have until each EV's departure (:func:`horizon`).
* An EV that cannot get its energy by its departure because of the scheduled limits hears ``limit_shortfall``
  (when it is assigned, and when a new schedule makes it so); a request that waits because every substation that
  could take it is held down by a schedule is queued with ``limit_scheduled``.

Pure: time passed in. The hooks the rest of the core calls are functions of the shared
:class:`~balancer.core.state.CoreState`; :class:`LimitFollower` handles schedules arriving and time passing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from balancer.core.effects import Effect, ToEv
from balancer.core.limits import Limit, Schedule, available_steps, expected_wh, plan_with
from balancer.core.model import Session, Substation, kw_to_w_down, w_to_kw
from grid_protocol.messages import MAX_SCHEDULE_ENTRIES, LimitSchedule, ScheduleState
from grid_protocol.reasons import Reason

if TYPE_CHECKING:
    from balancer.core.ledger import Ledger
    from balancer.core.queue_service import QueueService
    from balancer.core.rebalancing import Rebalancer
    from balancer.core.sessions import SessionBook
    from balancer.core.state import CoreState


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(limit: Limit) -> str:
    return f"{w_to_kw(limit.limit_w):g} kW from {limit.source}, {_at(limit.start)} to {_at(limit.end)}"


def planning_entry(st: CoreState, substation_id: str, now: float) -> Limit | None:
    schedule = st.schedules.get(substation_id)
    return schedule.planning(now, st.config.limit_lead_s) if schedule is not None else None


def cut_reason(st: CoreState, sub: Substation, now: float) -> tuple[Reason, str] | None:
    """Why a substation's grants must come down when the schedule is what binds (None: another limit does)."""
    binding = planning_entry(st, sub.id, now)
    if binding is None or sub.limit_source() != binding.source:
        return None
    when = "in force" if binding.start <= now else "starts within the planning lead time"
    return Reason.LIMIT_SCHEDULED, f"scheduled limit on substation {sub.id} ({when}): {_describe(binding)}"


def horizon(st: CoreState, sub: Substation, sessions: Iterable[Session],
            now: float) -> Callable[[float, float, int], float]:
    """Seconds until a departure as the deadline policy should count them, given what the EV still needs
    (``remaining_wh``) and its rate (``max_w``): when the limit will change before the departure, what the EV can
    expect after the change (its equal share of the room then, at most its rate) is subtracted from what it needs,
    and the rest must come before the change. The deadline policy divides the energy by these seconds, so it
    counts the capacity it will have, not only the capacity it has now: an EV leaving during an evening cut is
    given its energy before it. Never more seconds than there are (never less urgent than without a schedule)."""
    schedule = st.schedules.get(sub.id)
    if schedule is None:
        return lambda departure, _remaining_wh, _max_w: departure - now
    listed = list(sessions)
    until = max((d for s in listed if (d := s.request.departure) is not None), default=now)
    steps = available_steps(schedule, now, until, sub.rated_w(), st.config.safety_margin_pct)
    other, n = sub.uncontrolled_w(), max(1, len(listed))

    def left(departure: float, remaining_wh: float, max_w: int) -> float:
        near = steps[0][1] - now
        if len(steps) <= 1 or steps[0][1] >= departure or near <= 0 or remaining_wh <= 0:
            return departure - now
        later = sum((min(end, departure) - start) * min(max_w, max(0, lim - other) / n)
                    for start, end, lim in steps[1:] if start < departure) / 3600
        if later >= remaining_wh:
            return departure - now
        return min(departure - now, near * remaining_wh / (remaining_wh - later))

    return left


def shortfall(st: CoreState, session: Session, now: float) -> str | None:
    """A detail for the EV when the scheduled limits keep it from its energy by its departure (None: they do not,
    or it gave no energy and departure). What it can expect: in each step of the limit, its equal share of the room
    the limit leaves (beside base load), at most its rate; told only when it would get its energy without the
    schedule and does not with it."""
    req = session.request
    remaining, departure = session.remaining_wh(), req.departure
    schedule = st.schedules.get(session.substation_id)
    if schedule is None or remaining is None or departure is None or departure <= now:
        return None
    sub = st.substations[session.substation_id]
    margin = st.config.safety_margin_pct
    other, n = sub.uncontrolled_w(), max(1, len(sub.sessions))
    scheduled = available_steps(schedule, now, departure, sub.rated_w(), margin)
    expected = expected_wh(scheduled, departure, other, req.requested_w, n)
    if expected >= remaining - 1e-6:
        return None
    unscheduled = available_steps(None, now, departure, sub.rated_w(), margin)
    if expected_wh(unscheduled, departure, other, req.requested_w, n) < remaining - 1e-6:
        return None  # short anyway: not the schedule's doing
    cuts = [lim for t, _, _ in scheduled if (lim := schedule.binding_at(t)) is not None]
    worst = min(cuts, key=lambda lim: lim.limit_w)
    return (f"about {expected / 1000:.1f} of the {remaining / 1000:.1f} kWh asked for can be delivered by "
            f"departure ({_at(departure)}): scheduled limit {_describe(worst)}")


def queue_reason(st: CoreState, now: float) -> tuple[Reason, str | None]:
    """Why a request waits: ``limit_scheduled`` when every substation that takes new sessions is held down by its
    schedule (the detail says until when), else ``no_headroom``."""
    if not st.schedules:
        return Reason.NO_HEADROOM, None
    cfg = st.config
    open_ = [sub for sub in st.substations.values() if sub.is_available(now, cfg.stale_after_s)]
    bound = [entry for sub in open_ if (entry := planning_entry(st, sub.id, now)) is not None
             and sub.limit_source() == entry.source]
    if not open_ or len(bound) < len(open_):
        return Reason.NO_HEADROOM, None
    until = min(entry.end for entry in bound)
    return Reason.LIMIT_SCHEDULED, f"every open substation is held to a scheduled limit until at least {_at(until)}"


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

    def attach(self, sub: Substation, now: float) -> list[Effect]:
        """Bring the substation's planning limit up to date with its schedule (call when either changes). A lower
        limit reduces its sessions at once; a higher one lets the next rebalance raise them."""
        st = self.state
        lowered = plan_with(sub, st.schedules.get(sub.id), now, st.config.limit_lead_s)
        return self.rebalancer.reduce(sub, now) if lowered and sub.last_telemetry_at is not None else []

    def follow(self, now: float) -> list[Effect]:
        """Every tick: drop entries that are over, move each substation's planning window on, and note the
        schedules whose published view changed (``schedule_dirty``)."""
        st = self.state
        effects: list[Effect] = []
        for sid, schedule in list(st.schedules.items()):
            schedule.prune(now)
            if now >= schedule.recheck_at:
                st.schedule_dirty.add(sid)
                schedule.recheck_at = schedule.next_change(now) or float("inf")
            if not len(schedule):
                del st.schedules[sid]
            sub = st.substations.get(sid)
            if sub is not None:
                effects += self.attach(sub, now)
        return effects

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
        detail += (f"; planning with {_describe(binding)}" if binding is not None
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
        sub = st.substations.get(state.substation_id)
        return self.attach(sub, now) if sub is not None else []

    def forget(self, substation_id: str) -> None:
        self.state.schedules.pop(substation_id, None)
        self.state.schedule_dirty.discard(substation_id)
