"""The limit index (balancer/core/limit_index.py): why a request waits, from each substation's standing refiled
only when it changed, gives the same answer as the full scan (``queue_reason_scan``) on random substations,
schedules and times, through the running core's own events (a change made without telling the index shows), and
an answer files nothing that did not change, on a grid where every substation is held down too."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.core import Balancer, CoreConfig
from balancer.core.limit_effects import queue_reason, queue_reason_scan
from balancer.core.limits import Limit, Schedule, plan_with
from balancer.core.state import CoreState
from grid_protocol import ChargeRequest, ControlCommand, LimitEntry, LimitSchedule, Telemetry
from grid_protocol.reasons import Reason
from tests.unit.test_core_table import T0, cfg

sub_st = st.fixed_dictionaries({
    "capacity_kw": st.integers(50, 400),
    "operator_kw": st.none() | st.integers(1, 400),
    "age_s": st.none() | st.floats(0, 10),
    "draining": st.booleans(),
    "limits": st.lists(st.tuples(st.floats(-3600, 7200), st.floats(60, 7200), st.integers(1, 450),
                                 st.sampled_from(["dso", "tso"])), max_size=3),
})


def build(subs: list[dict[str, object]]) -> CoreState:
    ids = itertools.count()
    state = CoreState(cfg(), lambda: f"s{next(ids)}", lambda: f"r{next(ids)}")
    for i, spec in enumerate(subs):
        sub = state.substation(f"sub{i}", T0)
        sub.reported_capacity_w = int(spec["capacity_kw"]) * 1000  # type: ignore[call-overload]
        op = spec["operator_kw"]
        sub.capacity_limit_w = None if op is None else int(op) * 1000  # type: ignore[call-overload]
        age = spec["age_s"]
        sub.last_telemetry_at = None if age is None else T0 - float(age)  # type: ignore[arg-type]
        sub.status = "online"
        sub.draining = bool(spec["draining"])
        limits = [Limit(T0 + s, T0 + s + d, kw * 1000, src) for s, d, kw, src in spec["limits"]]  # type: ignore[attr-defined]
        if limits:
            schedule = Schedule()
            for source in {x.source for x in limits}:
                schedule.replace(source, [x for x in limits if x.source == source], T0 - 7200)
            state.schedules[sub.id] = schedule
        sub.apply_capacity()
    return state


def replan(state: CoreState, now: float) -> None:
    """Each substation plans with its schedule, as ``LimitFollower.attach`` does (it tells the index)."""
    for sub in state.substations.values():
        plan_with(sub, state.schedules.get(sub.id), now, state.config.limit_lead_s)
        state.limit_index.note((sub.id,))


def settle(state: CoreState) -> None:
    """The placement index takes the touches, as ``Placement.refresh`` does before every placement."""
    state.limit_index.note(state.touched)
    state.touched.clear()


@settings(max_examples=400, deadline=None)
@given(st.lists(sub_st, min_size=0, max_size=8),
       st.lists(st.tuples(st.floats(0, 9000), st.integers(0, 7), st.sampled_from(["drain", "undrain", "age", "none"])),
                max_size=6))
def test_queue_reason_matches_the_full_scan(subs: list[dict[str, object]],
                                            steps: list[tuple[float, int, str]]) -> None:
    state = build(subs)
    now = T0
    replan(state, now)
    assert queue_reason(state, now) == queue_reason_scan(state, now)
    settle(state)
    for dt, i, change in steps:
        now = T0 + dt
        if state.substations and change != "none":
            sub = list(state.substations.values())[i % len(state.substations)]
            if change == "drain":
                sub.draining = True
            elif change == "undrain":
                sub.draining = False
            else:
                sub.last_telemetry_at = now - 100
            state.touch(sub)
        if i % 2:
            settle(state)
        replan(state, now)
        assert queue_reason(state, now) == queue_reason_scan(state, now)


def _grid(n: int, held: bool) -> CoreState:
    """``n`` open substations; every one held down by a schedule (``held``), or every other one."""
    subs = [{"capacity_kw": 100, "operator_kw": None, "age_s": 0.0, "draining": False,
             "limits": [(-60.0, 3600.0, 50, "dso")] if held or i % 2 else []} for i in range(n)]
    state = build(subs)
    replan(state, T0)
    settle(state)
    return state


@pytest.mark.parametrize("held", [False, True], ids=["some free", "all held"])
def test_an_answer_files_only_what_changed(held: bool) -> None:
    """Filed once; then an answer files nothing while nothing changes, one substation when one was touched:
    the same on a grid where every substation is held down (a grid-wide curtailment) as on a quiet one."""
    state = _grid(1000, held)
    want = queue_reason_scan(state, T0)
    assert want[0] == (Reason.LIMIT_SCHEDULED if held else Reason.NO_HEADROOM)
    assert queue_reason(state, T0) == want
    before = state.limit_index.checks
    for k in range(100):
        assert queue_reason(state, T0 + k * 0.01) == want
    assert state.limit_index.checks == before
    sub = state.substations["sub7"]
    sub.draining = True
    state.touch(sub)
    settle(state)
    assert queue_reason(state, T0 + 1.5) == queue_reason_scan(state, T0 + 1.5)
    assert state.limit_index.checks == before + 1


def test_time_alone_moves_the_answer() -> None:
    """No touch: the held substations' entries end, and the free ones' telemetry goes stale (due heap)."""
    state = _grid(10, held=False)
    stale = state.config.stale_after_s
    assert queue_reason(state, T0)[0] == Reason.NO_HEADROOM
    # the free ones fall silent: only the held ones are open
    for sub in state.substations.values():
        if state.schedules.get(sub.id) is None:
            sub.last_telemetry_at = T0 - stale + 1
            state.touch(sub)
    settle(state)
    assert queue_reason(state, T0)[0] == Reason.NO_HEADROOM
    assert queue_reason(state, T0 + 2) == queue_reason_scan(state, T0 + 2)
    assert queue_reason(state, T0 + 2)[0] == Reason.LIMIT_SCHEDULED
    # the entries end (the planning window moves): free again, though nothing touched them
    later = T0 + 3600 + 1
    for sub in state.substations.values():
        sub.last_telemetry_at = later
    assert queue_reason_scan(state, later)[0] == Reason.NO_HEADROOM
    replan(state, later)
    assert queue_reason(state, later) == queue_reason_scan(state, later)


# ============================================================================ the index in the running core
event_st = st.tuples(
    st.floats(0, 40),  # seconds since the last event
    st.integers(0, 5),  # which substation
    st.sampled_from(["telemetry", "telemetry", "telemetry", "offline", "online", "drain", "undrain", "limit_op",
                     "unlimit_op", "schedule", "withdraw", "request", "tick", "forget", "wait", "wait"]),
    st.integers(1, 400),  # kW (capacity, limits)
    st.floats(-600, 3600),  # schedule entry start, from now
    st.floats(1, 3600),  # schedule entry length
    st.sampled_from(["dso", "tso"]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=40))
def test_the_running_core_keeps_the_index_in_step(events: list[tuple[float, int, str, int, float, float, str]]
                                                   ) -> None:
    """Real events through the engine (telemetry, status, operator control, schedules, requests, ticks, time
    passing): after each, the index's answer is the full scan's. A change the core makes without telling the
    index (a missing touch) shows here."""
    b = Balancer(CoreConfig(stale_after_s=200, lost_after_s=600, offline_grace_s=20))
    now = T0
    seq = itertools.count(1)
    evs = itertools.count()
    for i in range(6):
        b.on_status(f"S{i}", "online", now)
        b.on_telemetry(Telemetry(substation_id=f"S{i}", ts=now, seq=next(seq), capacity_kw=100.0, load_kw=10.0,
                                 base_load_kw=10.0, ev_load_kw=0.0, active_sessions=0), now)
        b.on_limits(f"S{i}", LimitSchedule(source="dso", entries=[
            LimitEntry(start=now - 60, end=now + 600 * (i + 1), limit_kw=50.0)]), now)
    assert queue_reason(b.state, now) == queue_reason_scan(b.state, now)
    for dt, i, kind, kw, start, length, source in events:
        now += dt
        sid = f"S{i}"
        if kind == "telemetry":
            b.on_telemetry(Telemetry(substation_id=sid, ts=now, seq=next(seq), capacity_kw=float(kw),
                                     load_kw=5.0, base_load_kw=5.0, ev_load_kw=0.0, active_sessions=0), now)
        elif kind in ("offline", "online"):
            b.on_status(sid, kind, now)
        elif kind in ("drain", "undrain", "forget"):
            b.on_control(ControlCommand(action=kind, substation_id=sid), now)
        elif kind in ("limit_op", "unlimit_op"):
            b.on_control(ControlCommand(action="set_capacity", substation_id=sid,
                                        capacity_kw=float(kw) if kind == "limit_op" else None), now)
        elif kind in ("schedule", "withdraw"):
            entries = [LimitEntry(start=now + start, end=now + start + length, limit_kw=float(kw))]
            b.on_limits(sid, LimitSchedule(source=source, entries=entries if kind == "schedule" else []), now)
        elif kind == "request":
            b.on_request(f"EV{next(evs)}", ChargeRequest(request_id="r1", requested_kw=22.0, min_kw=1.4,
                                                          duration_minutes=60), now)
        elif kind == "tick":
            b.tick(now)
        # The placement index takes the touches (as a request does): the limit index sees only what it was told
        # (left in ``CoreState.touched``, a touch from an earlier event would hide a change made without one).
        b.placement.refresh(now)
        assert queue_reason(b.state, now) == queue_reason_scan(b.state, now), (kind, sid)


# ============================================================================ LimitFollower.follow: the due heap
def _engine(specs: list[tuple[float, float, int]], every: bool) -> Balancer:
    b = Balancer(CoreConfig(stale_after_s=1e9, lost_after_s=1e9))
    for i in range(4):
        b.on_status(f"S{i}", "online", T0)
        b.on_telemetry(Telemetry(substation_id=f"S{i}", ts=T0, seq=1, capacity_kw=100.0, load_kw=10.0,
                                 base_load_kw=10.0, ev_load_kw=0.0, active_sessions=0), T0)
    for k in range(6):
        b.on_request(f"EV{k}", ChargeRequest(request_id="r1", requested_kw=11.0, min_kw=1.4, duration_minutes=600),
                     T0)
    for i, (start, length, kw) in enumerate(specs):
        b.on_limits(f"S{i % 4}", LimitSchedule(source=f"dso{i % 2}", entries=[
            LimitEntry(start=T0 + start, end=T0 + start + length, limit_kw=kw)]), T0)
    if every:
        b.limits.follow = b.limits.follow_every  # type: ignore[method-assign]
    return b


@pytest.mark.instruments_compiled
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 3000), st.floats(1, 3000), st.integers(1, 120)), max_size=8),
       st.lists(st.floats(0.1, 400), min_size=1, max_size=20))
def test_follow_due_heap_matches_looking_at_every_schedule(specs: list[tuple[float, float, int]],
                                                           gaps: list[float]) -> None:
    fast, slow = _engine(specs, False), _engine(specs, True)
    now = T0
    for gap in gaps:
        now += gap
        a, b = fast.tick(now), slow.tick(now)
        assert sorted(map(repr, a)) == sorted(map(repr, b))
        assert fast.state.schedule_dirty == slow.state.schedule_dirty
        assert fast.schedules.keys() == slow.schedules.keys()
        for sid, sub in fast.substations.items():
            other = slow.substations[sid]
            assert (sub.capacity_w, sub.schedule_limit_w, sub.schedule_source, sub.granted_w) == \
                (other.capacity_w, other.schedule_limit_w, other.schedule_source, other.granted_w)
        fast.state.schedule_dirty.clear()
        slow.state.schedule_dirty.clear()


def test_a_tick_looks_only_at_the_schedules_due() -> None:
    b = _engine([(-60.0, 86400.0, 50)] * 4, False)
    b.tick(T0 + 1)
    before = b.limits.visits
    for k in range(2, 100):
        b.tick(T0 + k)
    assert b.limits.visits == before


def test_a_schedule_set_ahead_holds_every_substation_when_it_comes() -> None:
    """Schedules that start later, nothing touched meanwhile: once their lead time comes every substation is held
    down, and the index follows each planning window as it moves, and each change of the source planned with
    (the same limit from another source moves no capacity, so no touch: the follower tells the index)."""
    b = Balancer(CoreConfig(stale_after_s=1e6, lost_after_s=1e7))
    lead = b.config.limit_lead_s
    for i in range(4):
        b.on_status(f"S{i}", "online", T0)
        b.on_telemetry(Telemetry(substation_id=f"S{i}", ts=T0, seq=1, capacity_kw=100.0, load_kw=10.0,
                                 base_load_kw=10.0, ev_load_kw=0.0, active_sessions=0), T0)
    assert queue_reason(b.state, T0) == (Reason.NO_HEADROOM, None)
    for i in range(4):
        b.on_limits(f"S{i}", LimitSchedule(source="dso", entries=[
            LimitEntry(start=T0 + 1000 + i, end=T0 + 4000 + i, limit_kw=40.0)]), T0)
        b.on_limits(f"S{i}", LimitSchedule(source="tso", entries=[
            LimitEntry(start=T0 + 1000 + i, end=T0 + 5000 + i, limit_kw=40.0)]), T0)
    assert queue_reason(b.state, T0 + 1) == (Reason.NO_HEADROOM, None)
    b.tick(T0 + 1003 - lead)  # the follower plans with them (their capacity drops: touched)
    steps = [(T0 + 1003.5 - lead, Reason.LIMIT_SCHEDULED, False),
             # dso's entries are over, the follower has not ticked: planning with tso, limited by dso (free)
             (T0 + 4004, Reason.NO_HEADROOM, False),
             # the follower plans with tso's entries: the same 40 kW, so no capacity moved
             (T0 + 4005, Reason.LIMIT_SCHEDULED, True)]
    for at, want, tick in steps:
        if tick:
            b.tick(at)
        b.placement.refresh(at)  # (the placement index takes the touches: the limit index sees only what it is told)
        assert queue_reason_scan(b.state, at)[0] == want
        assert queue_reason(b.state, at) == queue_reason_scan(b.state, at)


def test_staleness_is_seen_at_the_very_time_it_starts() -> None:
    """``heard + stale_after_s`` rounds up on an epoch clock (0.7 s is no binary fraction): at that sum the free
    substation is already stale (``now - heard > stale_after_s``), so only the held one is open. The index looks at
    that very time, not one step later (found by review: it answered ``no_headroom`` there)."""
    stale = 0.7
    b = Balancer(CoreConfig(stale_after_s=stale, lost_after_s=600, offline_grace_s=20))

    def report(sid: str, now: float, seq: int) -> None:
        b.on_telemetry(Telemetry(substation_id=sid, ts=now, seq=seq, capacity_kw=100.0, load_kw=100.0,
                                 base_load_kw=100.0, ev_load_kw=0.0, active_sessions=0), now)

    for sid in ("S0", "S1"):
        b.on_status(sid, "online", T0)
        report(sid, T0, 1)
    b.on_limits("S1", LimitSchedule(source="dso", entries=[
        LimitEntry(start=T0 - 60, end=T0 + 3600, limit_kw=50.0)]), T0)
    report("S1", T0 + 0.25, 2)
    b.placement.refresh(T0 + 0.25)
    assert queue_reason(b.state, T0 + 0.25)[0] == Reason.NO_HEADROOM  # S0 is free
    at = T0 + stale
    assert at - T0 > stale  # (the premise: the sum rounded up)
    b.placement.refresh(at)
    assert queue_reason_scan(b.state, at)[0] == Reason.LIMIT_SCHEDULED
    assert queue_reason(b.state, at) == queue_reason_scan(b.state, at)
    b.on_request("EV1", ChargeRequest(request_id="r1", requested_kw=22.0, min_kw=1.4, duration_minutes=60), at)
    answer = b.ev_state("EV1")
    assert answer is not None and answer.status == "queued" and answer.reason == Reason.LIMIT_SCHEDULED
