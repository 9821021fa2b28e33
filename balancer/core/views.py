"""The balancer's retained state messages, built from the model (pure: time is passed in).

Readers such as the API learn the whole grid from these retained messages, so a restarted reader
(or several replicas) needs nothing from the balancer's memory.
"""

from __future__ import annotations

import math
from itertools import compress, islice, repeat
from operator import is_

from balancer.core.engine import Balancer
from balancer.core.model import Session, Substation, w_to_kw
from grid_protocol.messages import (
    MAX_STATE_QUEUE_ENTRIES,
    MAX_STATE_SESSIONS,
    QueueEntry,
    QueueState,
    SessionView,
    SubstationState,
)


def session_views(balancer: Balancer, sub: Substation) -> list[SessionView]:
    """The substation's sessions as its retained state lists them, oldest first, at most ``MAX_STATE_SESSIONS``.

    Kept between calls while ``shares_version`` stands (every start, end and grant change moves it): the state is
    rebuilt every second for every substation whose numbers moved, and building up to 150 session views each was
    most of the service's CPU at 1,000 substations (issue 10, session D). Not kept under a policy whose passes
    re-account sessions as time passes (``deadline``): an expected end may move without a grant change there.
    When the list is rebuilt, each session's view is still reused while what it is built from stands (grant,
    accounting, start): one grant change on a substation rebuilt all its views (~56 lists a second)."""
    cached = sub.session_views
    if cached is not None and cached[0] == sub.shares_version and not balancer.policy.time_dependent:
        return cached[1]  # type: ignore[return-value]
    # Two dicts, not (key, view) pairs: a pair holding a view stays tracked by the cyclic GC (the view's type is
    # a GC type), ~77k more objects for every full collection to scan; a tuple of numbers is untracked. Updated in
    # place (a rebuild visits ~80 sessions to find the one or two that changed), pruned when a listed session left.
    keys: dict[str, tuple[int, float, float, float]] = {}
    built: dict[str, SessionView] = {}
    if cached is not None:
        keys, built = cached[2], cached[3]  # type: ignore[assignment]
    changed = sub.sessions_changed
    sub.sessions_changed = set()
    if cached is not None and changed is not None and not balancer.policy.time_dependent:
        views = _kept_views(sub, changed, keys, built)
    else:
        views = []
        # Oldest first without sorting them all: sessions are kept in the order they were placed (or adopted), and
        # this runs every second on the balancer's loop (a sort of 26k sessions cost a 10 ms stall: bench p99).
        for s in islice(sub.sessions.values(), MAX_STATE_SESSIONS):
            sid = s.session_id
            key = (s.granted_w, s.accounted_at, s.delivered_wh, s.started_at)
            view = built.get(sid)
            if view is None or keys[sid] != key:
                view = built[sid] = _view(s)
                keys[sid] = key
            views.append(view)
    if len(built) != len(views):  # a session kept before is no longer listed (ended): only the listed ones stay
        built = {view.session_id: view for view in views}
        keys = {sid: keys[sid] for sid in built}
    sub.session_views = (sub.shares_version, views, keys, built)  # type: ignore[assignment]
    return views


def _view(s: Session) -> SessionView:
    r = s.request
    return SessionView(session_id=s.session_id, ev_id=r.ev_id, request_id=r.request_id,
                       granted_kw=w_to_kw(s.granted_w), requested_kw=w_to_kw(r.requested_w), min_kw=w_to_kw(r.min_w),
                       priority=r.priority, started_at=s.started_at, expected_end=s.expected_end())


def _kept_views(sub: Substation, changed: set[str], keys: dict[str, tuple[int, float, float, float]],
                built: dict[str, SessionView]) -> list[SessionView]:
    """The listed sessions' views when the sessions that changed since the last list are known
    (``Substation.sessions_changed``: SessionBook names every start, end and grant change; the views of the others
    were built from what still stands). Those are built again, the others looked up without a look at each session
    (issue 10: ~120 lists a grid-second were rebuilt at 1,000 x 100k, each visiting ~80 sessions for one or two that
    changed)."""
    for sid in changed:
        built.pop(sid, None)
    sids = list(islice(sub.sessions, MAX_STATE_SESSIONS))
    views: list[SessionView | None] = list(map(built.get, sids))
    sessions = sub.sessions
    # The new views, found by identity in C (``None in views`` compared each view with None through its ``__eq__``,
    # once per new view: ~a fifth of building a state's list), then built one by one.
    for i in list(compress(range(len(views)), map(is_, views, repeat(None)))):
        s = sessions[sids[i]]
        views[i] = built[s.session_id] = _view(s)
        keys[s.session_id] = (s.granted_w, s.accounted_at, s.delivered_wh, s.started_at)
    return views  # type: ignore[return-value]


#: What :func:`state_mark` gives under a policy whose session views move with time: no mark, always build.
TIME_DEPENDENT = None

StateMark = tuple[object, ...]


def state_mark(balancer: Balancer, sub: Substation, now: float) -> StateMark | None:
    """Plain data from which every field of ``sub``'s state but the clock fields (``ts``, ``telemetry_age_s``)
    and the measured numbers (:func:`state_measured`) follows: two looks with equal marks would build states that
    differ only there, with the very same session list (``session_views`` keeps it while ``shares_version``
    stands). The service builds a state only when the mark or the measured numbers moved (issue 10: at 1,000
    substations most states change only in their clock fields and noise within the dead-band, and building all
    1,000 every second was ~a fifth of the service's rebalance CPU). None (:data:`TIME_DEPENDENT`) under a policy
    whose session views move with time (``deadline``): those states are built every time."""
    if balancer.policy.time_dependent:
        return TIME_DEPENDENT
    cfg = balancer.config
    heard = sub.last_telemetry_at  # (Substation.is_fresh, inline: this runs for every substation every second)
    return (sub.known_since, sub.status, sub.lost, heard is None,
            heard is not None and now - heard <= cfg.stale_after_s, sub.draining, sub.capacity_w,
            sub.reported_capacity_w, sub.capacity_limit_w, sub.schedule_limit_w, sub.schedule_source, sub.granted_w,
            sub.granted_at_telemetry_w, len(sub.sessions), sub.region, sub.shares_version, cfg.safety_margin_pct)


def state_measured(balancer: Balancer, sub: Substation, now: float) -> tuple[float | None, float | None, float, float]:
    """The state's measured numbers, as it shows them: ``load_kw``, ``base_load_kw``, ``headroom_kw``,
    ``utilisation`` (held to the dead-band by the service). ``Substation.headroom_w`` and ``used_w`` written out
    (this runs for every substation every second; tests/unit/test_state_marks.py holds it to them)."""
    cfg = balancer.config
    heard = sub.last_telemetry_at
    capacity = sub.capacity_w
    used = max(sub.base_load_w, sub.load_w - sub.granted_at_telemetry_w) + sub.granted_w
    if (sub.status != "offline" and not sub.lost and not sub.draining and heard is not None
            and now - heard <= cfg.stale_after_s):
        headroom = max(0, math.floor(capacity * (1 - cfg.safety_margin_pct / 100)) - used)
    else:
        headroom = 0
    if heard is None:
        return None, None, headroom / 1000, round(min(1000.0, used / capacity), 4) if capacity > 0 else 0.0
    return (sub.load_w / 1000, sub.base_load_w / 1000, headroom / 1000,
            round(min(1000.0, used / capacity), 4) if capacity > 0 else 0.0)


def substation_state(balancer: Balancer, sub: Substation, now: float) -> SubstationState:
    cfg = balancer.config
    total = len(sub.sessions)
    views = session_views(balancer, sub)
    heard = sub.last_telemetry_at
    fresh = sub.is_fresh(now, cfg.stale_after_s)
    return SubstationState(
        substation_id=sub.id, ts=now,
        online=sub.status != "offline" and not sub.lost and heard is not None,
        stale=not fresh, draining=sub.draining,
        capacity_kw=w_to_kw(sub.capacity_w),
        reported_capacity_kw=w_to_kw(sub.reported_capacity_w) if heard is not None else None,
        capacity_limit_kw=w_to_kw(sub.capacity_limit_w) if sub.capacity_limit_w is not None else None,
        limit_kw=w_to_kw(max(0, sub.limit_w(cfg.safety_margin_pct))),
        load_kw=w_to_kw(sub.load_w) if heard is not None else None,
        base_load_kw=w_to_kw(sub.base_load_w) if heard is not None else None,
        granted_kw=w_to_kw(sub.granted_w), reserved_kw=w_to_kw(sub.reserved_w()),
        headroom_kw=w_to_kw(sub.headroom_w(now, cfg.safety_margin_pct, cfg.stale_after_s)),
        utilisation=round(min(1000.0, sub.used_w() / sub.capacity_w), 4) if sub.capacity_w > 0 else 0.0,
        telemetry_age_s=round(max(0.0, now - heard), 3) if heard is not None else None,
        sessions_total=total, sessions=views, sessions_truncated=total > MAX_STATE_SESSIONS, region=sub.region,
        schedule_limit_kw=w_to_kw(sub.schedule_limit_w) if sub.schedule_limit_w is not None else None,
        limit_source=sub.limit_source() if heard is not None else None,
    )


def queue_state(balancer: Balancer, now: float) -> QueueState:
    queue = balancer.queue
    length = len(queue)
    items = queue.first(MAX_STATE_QUEUE_ENTRIES)
    # The k-th ETA needs only the k earliest ends, kept in order as sessions change (balancer.core.ends).
    ends = balancer.state.ends.first(len(items))
    entries = [
        QueueEntry(ev_id=req.ev_id, request_id=req.request_id, position=position,
                   requested_kw=w_to_kw(req.requested_w), min_kw=w_to_kw(req.min_w), priority=req.priority,
                   waiting_since=req.received_at, eta_s=balancer.eta_s(position, now, ends))
        for position, req in enumerate(items, start=1)
    ]
    return QueueState(ts=now, length=length, entries=entries, truncated=length > MAX_STATE_QUEUE_ENTRIES)
