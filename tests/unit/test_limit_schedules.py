"""Limit schedules (DSO limits): precedence of entries (balancer/core/limits.py) and timing in the engine
(balancer/core/schedules.py): reduced before a limit starts, restored after it ends, expired entries drop out.
Pure core: no broker, the clock is passed in."""

from __future__ import annotations

import pytest

from balancer.core.limits import Limit, Schedule, schedule_state
from balancer.core.views import substation_state
from grid_protocol import ChargeRequest, LimitEntry, LimitSchedule, PayloadError, Reason, ScheduleState, decode, encode
from tests.unit.test_core_table import T0, Harness, answer, answers, assert_healthy, cfg, commands

H = 3600.0


def lim(start: float, end: float, kw: float, source: str = "dso", priority: int = 0) -> Limit:
    return Limit(T0 + start, T0 + end, int(kw * 1000), source, priority)


def schedule(*limits: Limit) -> Schedule:
    s = Schedule()
    by: dict[str, list[Limit]] = {}
    for x in limits:
        by.setdefault(x.source, []).append(x)
    for source, xs in by.items():
        s.replace(source, xs, T0)
    return s


# ============================================================================ precedence
def test_lowest_limit_wins_across_sources_and_its_source_is_shown() -> None:
    s = schedule(lim(0, 3 * H, 250, "dso-north"), lim(H, 2 * H, 180, "openadr"), lim(0, 4 * H, 300, "tso"))
    assert s.binding_at(T0 + 10) == lim(0, 3 * H, 250, "dso-north")
    assert s.binding_at(T0 + 1.5 * H) == lim(H, 2 * H, 180, "openadr")
    assert s.binding_at(T0 + 3.5 * H) == lim(0, 4 * H, 300, "tso")
    assert s.binding_at(T0 + 4 * H) is None  # end is exclusive
    state = schedule_state("north", s, T0 + 1.5 * H)
    assert (state.limit_kw, state.source) == (180.0, "openadr")
    # the composite from ts on: the slot in force whole, past ones left out
    assert [(c.start - T0, c.end - T0, c.limit_kw, c.source) for c in state.composite] == [
        (H, 2 * H, 180.0, "openadr"), (2 * H, 3 * H, 250.0, "dso-north"), (3 * H, 4 * H, 300.0, "tso")]
    assert next((c.start - T0, c.limit_kw) for c in schedule_state("north", s, T0).composite) == (0, 250.0)


def test_priority_overrides_within_a_source_but_never_lifts_another_source() -> None:
    base, event = lim(0, 4 * H, 200, "dso", 0), lim(H, 2 * H, 350, "dso", 1)
    s = schedule(base, event)
    assert s.binding_at(T0 + 1.5 * H) == event  # the source's own higher-priority entry relaxes its base limit
    assert s.binding_at(T0 + 2.5 * H) == base
    s.replace("tso", [lim(0, 4 * H, 300, "tso", 0)], T0)
    assert s.binding_at(T0 + 1.5 * H) == lim(0, 4 * H, 300, "tso")  # a priority counts within its source only
    # equal priority within a source: the lowest
    assert schedule(lim(0, H, 200), lim(0, H, 150)).binding_at(T0) == lim(0, H, 150)


def test_replacing_a_source_keeps_the_others_and_an_empty_list_withdraws_it() -> None:
    s = schedule(lim(0, H, 100, "a"), lim(0, H, 200, "b"))
    s.replace("a", [lim(0, H, 300, "a")], T0)
    assert s.binding_at(T0) == lim(0, H, 200, "b")
    s.replace("b", [], T0)
    assert s.sources() == ["a"] and s.binding_at(T0) == lim(0, H, 300, "a")


def test_expired_entries_drop_out_and_are_not_accepted() -> None:
    s = schedule(lim(0, H, 100), lim(2 * H, 3 * H, 50))
    assert not s.prune(T0 + 10)
    assert s.prune(T0 + H) and len(s) == 1
    assert s.replace("dso", [lim(0, H, 10), lim(2 * H, 3 * H, 50)], T0 + H) == 1  # one already over: dropped


def test_planning_window_takes_the_lowest_limit_ahead_and_is_cached_until_it_can_change() -> None:
    s = schedule(lim(H, 2 * H, 100))
    assert s.planning(T0, 60) is None
    assert s.planning(T0 + H - 60, 60) == lim(H, 2 * H, 100)  # the window reaches the start: plan with it
    assert s.planning(T0 + H - 61, 60) is None
    assert s.planning(T0 + 2 * H - 1, 60) == lim(H, 2 * H, 100)
    assert s.planning(T0 + 2 * H, 60) is None  # over: restored at the end, not before


# ============================================================================ contract
def test_limit_schedule_boundary_validation() -> None:
    ok = decode(b'{"source":"dso-north","entries":[{"start":1,"end":2,"limit_kw":250}]}', LimitSchedule)
    assert ok.entries[0].priority == 0
    for bad, words in [
        (b'{"source":"dso","entries":[{"start":2,"end":2,"limit_kw":250}]}', "end must be after start"),
        (b'{"source":"dso","entries":[{"start":1,"end":2,"limit_kw":-1}]}', ">= 0"),
        (b'{"source":"capacity","entries":[]}', "reserved"),
        (b'{"source":"a/b","entries":[]}', "source"),
        (b'{"source":"dso","entries":[{"start":1,"end":2,"limit_kw":1,"priority":10}]}', "<= 9"),
    ]:
        with pytest.raises(PayloadError) as err:
            decode(bad, LimitSchedule)
        assert err.value.reason == Reason.INVALID_FIELD and words in err.value.detail, err.value.detail


# ============================================================================ engine timing
def limits(h: Harness, sid: str, *entries: tuple[float, float, float], source: str = "dso",
           priority: int = 0):  # type: ignore[no-untyped-def]
    msg = LimitSchedule(source=source, entries=[LimitEntry(start=T0 + a, end=T0 + b, limit_kw=kw, priority=priority)
                                                for a, b, kw in entries])
    return h.b.on_limits(sid, msg, h.now)


def lead_harness(**kw: object) -> Harness:
    return Harness(config=cfg(queue_max=100, limit_lead_s=30.0, min_hold_s=10.0, **kw))


def test_sessions_are_reduced_before_the_limit_starts_never_after_and_restored_after_it_ends() -> None:
    h = lead_harness()
    h.tel("A", capacity_kw=100)  # limit 90 kW with the 10 % margin
    for i in range(4):
        h.req(f"EV_{i}", 20)
    assert sum(h.sessions_on("A").values()) == 80_000
    reason, detail, effects = limits(h, "A", (H, 2 * H, 50))  # from T0+1h to T0+2h at most 50 kW (45 with margin)
    assert reason is None and "1 entry from dso" in detail and effects == []  # nothing to do yet
    cut_at = None
    t = 0.0
    while t < 2 * H + 60:
        h.advance(0.5)
        t += 0.5
        fx = h.tick()
        if t % 5 == 0:
            fx += h.refresh()
        if commands(fx, "update") and cut_at is None:
            cut_at = t
            assert {c.reason for _, c in commands(fx, "update")} == {Reason.LIMIT_SCHEDULED}
            assert all("dso" in (a.detail or "") for a in answers(fx))
        if H <= t < 2 * H:  # the limit applies: the grants are within it the whole time
            assert sum(h.sessions_on("A").values()) <= 45_000
        assert_healthy(h)
    assert cut_at is not None and H - 30 <= cut_at < H  # reduced within the lead time before the start
    assert sum(h.sessions_on("A").values()) == 80_000  # restored after the end
    # never raised while the limit applied: the first rise comes at its end
    h2 = lead_harness()
    h2.tel("A", capacity_kw=100)
    h2.req("EV_1", 80)
    limits(h2, "A", (H, 2 * H, 50))
    h2.now = T0 + H - 29
    h2.refresh()
    h2.tick()
    assert h2.session("EV_1").granted_w <= 45_000
    h2.now = T0 + 2 * H - 1
    assert commands(h2.refresh() + h2.tick()) == []
    h2.now = T0 + 2 * H + 0.5
    fx = h2.tick()
    assert [c.reason for _, c in commands(fx, "update")] == [Reason.POWER_AVAILABLE]


def test_limit_in_force_cuts_at_once_and_state_shows_the_binding_source() -> None:
    h = lead_harness()
    h.tel("A", capacity_kw=100)
    h.req("EV_1", 40)
    h.req("EV_2", 40)
    reason, _, effects = limits(h, "A", (-60, H, 50), source="dso-north")
    assert reason is None
    assert {c.reason for _, c in commands(effects, "update")} == {Reason.LIMIT_SCHEDULED}
    assert sum(h.sessions_on("A").values()) <= 45_000
    state = substation_state(h.b, h.b.substations["A"], h.now)
    assert (state.capacity_kw, state.schedule_limit_kw, state.limit_source) == (50.0, 50.0, "dso-north")
    assert (state.reported_capacity_kw, state.capacity_limit_kw) == (100.0, None)
    # a higher scheduled limit than the rated capacity does not bind: the capacity does
    limits(h, "A", (-60, H, 500), source="dso-north")
    state = substation_state(h.b, h.b.substations["A"], h.now)
    assert (state.capacity_kw, state.limit_source) == (100.0, "capacity")


def test_expired_entries_drop_out_of_the_engine_and_are_republished() -> None:
    h = lead_harness()
    h.tel("A")
    limits(h, "A", (0, 60, 50))
    h.b.schedule_dirty.clear()
    h.advance(61)
    h.tick()
    assert "A" not in h.b.schedules and "A" in h.b.schedule_dirty
    assert h.b.substations["A"].capacity_w == 100_000


def test_unknown_substation_and_a_full_schedule_are_refused() -> None:
    h = lead_harness()
    h.tel("A")
    reason, detail, _ = limits(h, "nowhere", (0, 60, 50))
    assert reason == Reason.UNKNOWN_SUBSTATION and "nowhere" in detail
    limits(h, "A", *[(i * 60.0, i * 60.0 + 30, 50) for i in range(100)], source="a")
    reason, detail, _ = limits(h, "A", (0, 60, 50), source="b")
    assert reason == Reason.SCHEDULE_FULL and "101" in detail


def test_zero_limit_revokes_and_queues_with_the_reason_and_nothing_is_rejected_as_too_big() -> None:
    h = lead_harness()
    h.tel("A")
    h.req("EV_1", 20)
    _, _, effects = limits(h, "A", (-1, H, 0))
    revoked = answers(effects, "EV_1")[0]
    assert (revoked.status, revoked.reason) == ("revoked", Reason.LIMIT_SCHEDULED)
    queued = answer(h.req("EV_2", 20), "EV_2")  # waits for the limit to end: never exceeds_capacity
    assert (queued.status, queued.reason) == ("queued", Reason.LIMIT_SCHEDULED)
    assert "until at least" in (queued.detail or "")
    h.now = T0 + H + 1
    assert {a.status for a in answers(h.refresh() + h.tick())} == {"assigned"}


def test_ev_that_cannot_get_its_energy_before_the_cut_is_told_so() -> None:
    h = lead_harness(policy="deadline")
    h.tel("A", capacity_kw=100)
    limits(h, "A", (H, 4 * H, 0))  # evening cut: nothing from T0+1h to T0+4h
    msg = ChargeRequest(requested_kw=11, request_id="r1", energy_kwh=30, departure=T0 + 5 * H)
    got = answer(h.b.on_request("EV_1", msg, h.now), "EV_1")
    # 11 kW for 1 h before the cut (less the lead) and 1 h after it: about 22 kWh of the 30
    assert (got.status, got.reason) == ("assigned", Reason.LIMIT_SHORTFALL)
    assert "of the 30.0 kWh" in (got.detail or "") and "dso" in (got.detail or "")
    fine = ChargeRequest(requested_kw=11, request_id="r2", energy_kwh=10, departure=T0 + 5 * H)
    assert answer(h.b.on_request("EV_2", fine, h.now), "EV_2").reason is None
    # a schedule that arrives later tells the sessions it leaves short
    h2 = lead_harness(policy="deadline")
    h2.tel("A", capacity_kw=100)
    h2.b.on_request("EV_1", msg, h2.now)
    _, _, effects = limits(h2, "A", (H, 4 * H, 0))
    told = answer(effects, "EV_1")
    assert (told.status, told.reason) == ("updated", Reason.LIMIT_SHORTFALL)


def test_a_schedule_that_cuts_a_grant_and_leaves_it_short_says_both() -> None:
    """A schedule in force at once cuts EV_1 to 3.5 kW for four hours: 25 of its 30 kWh by departure. The EV hears
    the cut and the shortfall; the answer it is left with (what a redelivery gets) says it falls short."""
    h = lead_harness(policy="deadline")
    h.tel("A", capacity_kw=100)
    h.b.on_request("EV_1", ChargeRequest(requested_kw=11, request_id="r1", energy_kwh=30, departure=T0 + 5 * H),
                   h.now)
    _, _, effects = limits(h, "A", (-1, 4 * H, 5))
    told = answers(effects, "EV_1")
    assert [a.granted_kw for a in told] == [3.5] * len(told)
    assert Reason.LIMIT_SHORTFALL in {a.reason for a in told}, told
    assert h.b.ledger.evs["EV_1"].answer.reason == Reason.LIMIT_SHORTFALL


def test_deadline_policy_counts_the_capacity_it_will_have() -> None:
    """Two EVs share 45 kW now (least laxity first). EV_1 needs 120 kWh by T0+6h, EV_2 20 kWh by T0+2h: without a
    schedule EV_2 has less slack (1.5 h against 3 h) and comes first. A cut to 10 kW (9 with margin) from T0+1h to
    T0+5h leaves EV_1 3 h of room at its rate before it leaves, less than it needs: counting the capacity it will
    have, EV_1 comes first now, before the cut."""
    def grants(with_cut: bool) -> int:
        h = lead_harness(policy="deadline")
        h.tel("A", capacity_kw=50)
        if with_cut:
            limits(h, "A", (H, 5 * H, 10))
        h.b.on_request("EV_1", ChargeRequest(requested_kw=40, request_id="a", energy_kwh=120, departure=T0 + 6 * H),
                       h.now)
        h.b.on_request("EV_2", ChargeRequest(requested_kw=40, request_id="b", energy_kwh=20, departure=T0 + 2 * H),
                       h.now)
        h.advance(11)
        h.refresh()
        h.tick()
        assert_healthy(h)
        return int(h.session("EV_1").granted_w)
    without, with_cut = grants(False), grants(True)
    assert with_cut > without + 5_000, (without, with_cut)


def test_retained_schedule_is_restored_on_start_and_decodes() -> None:
    h = lead_harness()
    h.tel("A")
    limits(h, "A", (H, 2 * H, 50), (3 * H, 4 * H, 20), source="dso")
    limits(h, "A", (H, 2 * H, 40), source="openadr")
    state = decode(encode(schedule_state("A", h.b.schedules["A"], h.now)), ScheduleState)
    assert len(state.entries) == 3
    fresh = lead_harness()
    fresh.b.restore_schedule(state, fresh.now)  # before the substation is heard of: waits for it
    fresh.tel("A")
    fresh.now = T0 + H
    fresh.tick()
    assert fresh.b.substations["A"].capacity_w == 40_000
    assert fresh.b.substations["A"].limit_source() == "openadr"


def test_operator_limit_and_schedule_together_the_lowest_binds() -> None:
    from grid_protocol import ControlCommand
    h = lead_harness()
    h.tel("A", capacity_kw=100)
    limits(h, "A", (-1, H, 60))
    h.b.on_control(ControlCommand(action="set_capacity", substation_id="A", capacity_kw=50), h.now)
    sub = h.b.substations["A"]
    assert (sub.capacity_w, sub.limit_source()) == (50_000, "operator")
    h.b.on_control(ControlCommand(action="set_capacity", substation_id="A", capacity_kw=None), h.now)
    assert (sub.capacity_w, sub.limit_source()) == (60_000, "dso")
