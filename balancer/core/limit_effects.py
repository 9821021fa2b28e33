"""What scheduled limits mean for the rest of the core: why grants come down (``limit_scheduled``), how the
deadline policy counts the power it will have, when an EV is told it will fall short (``limit_shortfall``) and
why a request waits. Pure functions of the shared :class:`~balancer.core.state.CoreState`, time passed in; the
schedules themselves are :mod:`balancer.core.limits`, their arrival and the passing of time
:mod:`balancer.core.schedules`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from balancer.core.limits import Limit, available_steps, expected_wh
from balancer.core.model import Session, Substation, w_to_kw
from grid_protocol.reasons import Reason

if TYPE_CHECKING:
    from balancer.core.state import CoreState


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(limit: Limit) -> str:
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
    return Reason.LIMIT_SCHEDULED, f"scheduled limit on substation {sub.id} ({when}): {describe(binding)}"


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
            f"departure ({_at(departure)}): scheduled limit {describe(worst)}")


def queue_reason(st: CoreState, now: float) -> tuple[Reason, str | None]:
    """Why a request waits: ``limit_scheduled`` when every substation that takes new sessions is held down by its
    schedule (the detail says until when), else ``no_headroom``. The limit index (:mod:`balancer.core.limit_index`)
    keeps each substation's standing and refiles only those that changed, so no answer visits every substation."""
    index = st.limit_index
    if not st.schedules:
        index.reset()
        return Reason.NO_HEADROOM, None
    until = index.held_until(now, st.touched)
    if until is None:
        return Reason.NO_HEADROOM, None
    return Reason.LIMIT_SCHEDULED, f"every open substation is held to a scheduled limit until at least {_at(until)}"


def queue_reason_scan(st: CoreState, now: float) -> tuple[Reason, str | None]:
    """:func:`queue_reason` by visiting every substation (the test oracle)."""
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
