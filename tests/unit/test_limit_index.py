"""The limit index (balancer/core/limit_index.py): why a request waits, without visiting every substation, gives
the same answer as the full scan (``queue_reason_scan``) on random substations, schedules and times, including
after the remembered substation stops qualifying."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.core import Balancer, CoreConfig
from balancer.core.limit_effects import queue_reason, queue_reason_scan
from balancer.core.limits import Limit, Schedule, plan_with
from balancer.core.state import CoreState
from grid_protocol import ChargeRequest, LimitEntry, LimitSchedule, Telemetry
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
    for sub in state.substations.values():
        plan_with(sub, state.schedules.get(sub.id), now, state.config.limit_lead_s)


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
        replan(state, now)
        assert queue_reason(state, now) == queue_reason_scan(state, now)


def test_the_usual_answer_checks_one_substation() -> None:
    subs = [{"capacity_kw": 100, "operator_kw": None, "age_s": 0.0, "draining": False,
             "limits": [(-60.0, 3600.0, 50, "dso")] if i % 2 else []} for i in range(1000)]
    state = build(subs)
    replan(state, T0)
    assert queue_reason(state, T0) == (Reason.NO_HEADROOM, None)
    before = state.limit_index.checks
    for k in range(100):
        assert queue_reason(state, T0 + k * 0.01)[0] == Reason.NO_HEADROOM
    assert state.limit_index.checks - before == 100


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
