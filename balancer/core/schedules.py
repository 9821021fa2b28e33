"""The balancer and its limit schedules: what the engine does when a schedule arrives, as time passes, and what it
tells EVs about it. The schedule itself (entries, precedence, composite) is :mod:`balancer.core.limits`.

* A substation plans with the lowest scheduled limit from now to ``limit_lead_s`` ahead, so sessions are reduced
  (reason ``limit_scheduled``) before a limit starts, never after; grants rise again once it is over.
* The deadline policy counts the power it will have until each EV's departure (:func:`horizon`).
* An EV that cannot get its energy by its departure because of the scheduled limits hears ``limit_shortfall``
  (when it is assigned, and when a new schedule makes it so); a request that waits because every substation that
  could take it is held down by a schedule is queued with ``limit_scheduled``.

Pure: time passed in. Functions take the engine (:class:`~balancer.core.engine.Balancer`) and use its helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from balancer.core.effects import Effect, ToEv
from balancer.core.limits import (
    Limit,
    Schedule,
    available_steps,
    expected_wh,
)
from balancer.core.model import Session, Substation, kw_to_w_down, w_to_kw
from grid_protocol.messages import MAX_SCHEDULE_ENTRIES, LimitSchedule, ScheduleState
from grid_protocol.reasons import Reason

if TYPE_CHECKING:
    from balancer.core.engine import Balancer


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(limit: Limit) -> str:
    return f"{w_to_kw(limit.limit_w):g} kW from {limit.source}, {_at(limit.start)} to {_at(limit.end)}"


def planning_entry(b: Balancer, substation_id: str, now: float) -> Limit | None:
    schedule = b.schedules.get(substation_id)
    return schedule.planning(now, b.config.limit_lead_s) if schedule is not None else None


def attach(b: Balancer, sub: Substation, now: float) -> list[Effect]:
    """Bring the substation's planning limit up to date with its schedule (call when either changes). A lower limit
    reduces its sessions at once; a higher one lets the next rebalance raise them."""
    binding = planning_entry(b, sub.id, now)
    limit_w = binding.limit_w if binding is not None else None
    source = binding.source if binding is not None else None
    if (limit_w, source) == (sub.schedule_limit_w, sub.schedule_source):
        return []
    before = sub.capacity_w
    sub.schedule_limit_w, sub.schedule_source = limit_w, source
    sub.apply_capacity()
    return b._reduce(sub, now) if sub.capacity_w < before and sub.last_telemetry_at is not None else []


def follow(b: Balancer, now: float) -> list[Effect]:
    """Every tick: drop entries that are over, move each substation's planning window on, and note the schedules
    whose published view changed (``b.schedule_dirty``)."""
    effects: list[Effect] = []
    for sid, schedule in list(b.schedules.items()):
        schedule.prune(now)
        if now >= schedule.recheck_at:
            b.schedule_dirty.add(sid)
            schedule.recheck_at = schedule.next_change(now) or float("inf")
        if not len(schedule):
            del b.schedules[sid]
        sub = b.substations.get(sid)
        if sub is not None:
            effects += attach(b, sub, now)
    return effects


def cut_reason(b: Balancer, sub: Substation, now: float) -> tuple[Reason, str] | None:
    """Why a substation's grants must come down when the schedule is what binds (None: another limit does)."""
    binding = planning_entry(b, sub.id, now)
    if binding is None or sub.limit_source() != binding.source:
        return None
    when = "in force" if binding.start <= now else "starts within the planning lead time"
    return Reason.LIMIT_SCHEDULED, f"scheduled limit on substation {sub.id} ({when}): {_describe(binding)}"


def horizon(b: Balancer, sub: Substation, sessions: Iterable[Session],
            now: float) -> Callable[[float, float, int], float]:
    """Seconds until a departure as the deadline policy should count them, given what the EV still needs
    (``remaining_wh``) and its rate (``max_w``): when the limit will change before the departure, what the EV can
    expect after the change (its equal share of the room then, at most its rate) is subtracted from what it needs,
    and the rest must come before the change. The deadline policy divides the energy by these seconds, so it
    counts the capacity it will have, not only the capacity it has now: an EV leaving during an evening cut is
    given its energy before it. Never more seconds than there are (never less urgent than without a schedule)."""
    schedule = b.schedules.get(sub.id)
    if schedule is None:
        return lambda departure, _remaining_wh, _max_w: departure - now
    listed = list(sessions)
    until = max((d for s in listed if (d := s.request.departure) is not None), default=now)
    steps = available_steps(schedule, now, until, sub.rated_w(), b.config.safety_margin_pct)
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


def shortfall(b: Balancer, session: Session, now: float) -> str | None:
    """A detail for the EV when the scheduled limits keep it from its energy by its departure (None: they do not,
    or it gave no energy and departure). What it can expect: in each step of the limit, its equal share of the room
    the limit leaves (beside base load), at most its rate; told only when it would get its energy without the
    schedule and does not with it."""
    req = session.request
    remaining, departure = session.remaining_wh(), req.departure
    schedule = b.schedules.get(session.substation_id)
    if schedule is None or remaining is None or departure is None or departure <= now:
        return None
    sub = b.substations[session.substation_id]
    margin = b.config.safety_margin_pct
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


def notify_shortfalls(b: Balancer, sub: Substation, now: float) -> list[Effect]:
    """After a schedule change: tell each EV on the substation that can no longer get its energy in time."""
    effects: list[Effect] = []
    for session in sub.sessions.values():
        detail = shortfall(b, session, now)
        state = b._evs.get(session.request.ev_id)
        if detail is None or state is None:
            continue
        state.answer = b._answer(session.request, "updated", now, session=session, reason=Reason.LIMIT_SHORTFALL,
                                 detail=detail)
        b.counters[f"updated:{Reason.LIMIT_SHORTFALL}"] += 1
        effects.append(ToEv(session.request.ev_id, state.answer))
    return effects


def queue_reason(b: Balancer, now: float) -> tuple[Reason, str | None]:
    """Why a request waits: ``limit_scheduled`` when every substation that takes new sessions is held down by its
    schedule (the detail says until when), else ``no_headroom``."""
    cfg = b.config
    open_ = [sub for sub in b.substations.values() if sub.is_available(now, cfg.stale_after_s)]
    bound = [entry for sub in open_ if (entry := planning_entry(b, sub.id, now)) is not None
             and sub.limit_source() == entry.source]
    if not open_ or len(bound) < len(open_):
        return Reason.NO_HEADROOM, None
    until = min(entry.end for entry in bound)
    return Reason.LIMIT_SCHEDULED, f"every open substation is held to a scheduled limit until at least {_at(until)}"


def on_limits(b: Balancer, substation_id: str, msg: LimitSchedule,
              now: float) -> tuple[Reason | None, str, list[Effect]]:
    """An operator's schedule for one source on one substation: replace that source's entries, follow at once."""
    sub = b.substations.get(substation_id)
    if sub is None:
        return Reason.UNKNOWN_SUBSTATION, f"substation {substation_id!r} has never been heard of", []
    schedule = b.schedules.get(substation_id) or Schedule()
    total = schedule.count_without(msg.source) + len(msg.entries)
    if total > MAX_SCHEDULE_ENTRIES:
        return (Reason.SCHEDULE_FULL, f"substation {substation_id} would hold {total} entries, at most "
                f"{MAX_SCHEDULE_ENTRIES}: withdraw a source or send fewer entries", [])
    limits = [Limit(e.start, e.end, kw_to_w_down(e.limit_kw), msg.source, e.priority) for e in msg.entries]
    dropped = schedule.replace(msg.source, limits, now)
    if len(schedule):
        b.schedules[substation_id] = schedule
    else:
        b.schedules.pop(substation_id, None)
    b.schedule_dirty.add(substation_id)
    b.counters["control:set_limits"] += 1
    effects = attach(b, sub, now)
    effects += b._serve_queue(now)
    effects += b._raise(sub, now)
    effects += b._requeue_notices(now)
    effects += notify_shortfalls(b, sub, now)
    kept = len(msg.entries) - dropped
    detail = (f"{kept} entr{'y' if kept == 1 else 'ies'} from {msg.source}" if kept
              else f"{msg.source} withdrawn")
    if dropped:
        detail += f"; {dropped} already over, dropped"
    binding = planning_entry(b, substation_id, now)
    detail += f"; planning with {_describe(binding)}" if binding is not None else "; no scheduled limit applies now"
    return None, detail, b._coalesce(effects)


def restore(b: Balancer, state: ScheduleState, now: float) -> list[Effect]:
    """A restarted balancer re-reads its retained schedule: the entries not yet over, by source."""
    schedule = Schedule()
    by_source: dict[str, list[Limit]] = {}
    for e in state.entries[:MAX_SCHEDULE_ENTRIES]:
        by_source.setdefault(e.source, []).append(
            Limit(e.start, e.end, kw_to_w_down(e.limit_kw), e.source, e.priority))
    for source, limits in by_source.items():
        schedule.replace(source, limits, now)
    if len(schedule):
        b.schedules[state.substation_id] = schedule
    else:
        b.schedules.pop(state.substation_id, None)
    b.schedule_dirty.add(state.substation_id)
    sub = b.substations.get(state.substation_id)
    return attach(b, sub, now) if sub is not None else []


def forget(b: Balancer, substation_id: str) -> None:
    b.schedules.pop(substation_id, None)
    b.schedule_dirty.discard(substation_id)
