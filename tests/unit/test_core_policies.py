"""Policies and rebalancing of the pure core: shares, hysteresis and hold, queue ETAs, baselines."""

from __future__ import annotations

import pytest

from balancer.core import Balancer, CoreConfig, ToEv, ToSubstation
from balancer.core.allocation import deadline_share, equal_share, water_fill
from grid_protocol import ChargeRequest, Reason, SessionEvent, Telemetry

T0 = 1_700_000_000.0


class Grid:
    def __init__(self, **cfg: object) -> None:
        config = {"safety_margin_pct": 10.0, "hysteresis_kw": 1.0, "min_hold_s": 10.0, **cfg}
        self.b = Balancer(CoreConfig(**config))  # type: ignore[arg-type]
        self.now = T0
        self.seq: dict[str, int] = {}

    def tel(self, sid: str, capacity: float = 100.0, base: float = 0.0) -> list:
        self.seq[sid] = self.seq.get(sid, -1) + 1
        return self.b.on_telemetry(Telemetry(substation_id=sid, ts=self.now, seq=self.seq[sid], capacity_kw=capacity,
                                             load_kw=base, base_load_kw=base, ev_load_kw=0.0, active_sessions=0),
                                   self.now)

    def req(self, ev: str, kw: float, **kw_args: object) -> list:
        body = {"energy_kwh": 40.0, **kw_args}
        return self.b.on_request(ev, ChargeRequest(requested_kw=kw, request_id="r", **body), self.now)  # type: ignore[arg-type]

    def grants(self) -> dict[str, float]:
        return {s.request.ev_id: s.granted_w / 1000 for s in self.b._sessions.values()}


def test_water_fill_is_max_min_fair_with_weights_floors_and_caps() -> None:
    assert equal_share(90, [0, 0, 0], [100, 100, 100]) == [30, 30, 30]
    assert equal_share(90, [0, 0, 0], [10, 100, 100]) == [10, 40, 40]  # a small demand frees the rest
    assert equal_share(90, [50, 0, 0], [100, 100, 100]) == [50, 20, 20]  # floors first
    assert water_fill(90, [0, 0], [100, 100], [1.0, 2.0]) == [30, 60]  # weights
    assert sum(water_fill(10_000, [1] * 7, [9_999] * 7, [1, 2, 3, 4, 5, 6, 7])) <= 10_000
    # deadline: the urgent EV's need (40) first, then the rest shared equally
    assert deadline_share(100, [5, 5, 5], [50, 50, 50], [40, 0, 0], [10.0, 1e9, 1e9]) == [40, 30, 30]


def test_weighted_fair_shares_by_priority_plus_one() -> None:
    g = Grid(policy="weighted-fair")
    g.tel("A", 100, 10)  # limit 90, 80 for EVs, less a 1 kW band: 79
    g.req("LOW", 60, priority=0)
    g.req("HIGH", 60, priority=2, min_kw=5)
    assert g.grants() == pytest.approx({"LOW": 19.75, "HIGH": 59.25}, abs=0.01)  # 1 : 3 of 79 kW
    assert g.b.violations() == []


def test_deadline_gives_the_urgent_ev_what_it_needs_to_finish_in_time() -> None:
    g = Grid(policy="deadline")
    g.tel("A", 100, 60)  # 29 kW for EVs (limit 90, band 1)
    g.req("RELAXED", 50, energy_kwh=20, departure=T0 + 10 * 3600)  # needs 2 kW
    g.req("URGENT", 50, energy_kwh=20, departure=T0 + 3600)  # needs 20 kW for an hour
    grants = g.grants()
    # Needs first (20 and 2), then the 7 kW left shared equally: 20 / 9.
    assert grants == pytest.approx({"URGENT": 20.0, "RELAXED": 9.0}, abs=0.01)


def test_hysteresis_and_hold_time_stop_flapping_but_the_limit_always_wins() -> None:
    g = Grid()
    g.tel("A", 100, 30)
    g.req("E1", 22, min_kw=5)
    g.req("E2", 22, min_kw=5)
    g.req("E3", 22, min_kw=5)  # admission fills up to the limit: 22 + 22 + 16
    before = g.grants()
    g.now += 1
    first = g.tel("A", 100, 30.4)  # the first noise: one step down into the 1 kW band below the limit
    assert {e.message.reason for e in first if isinstance(e, ToSubstation)} == {Reason.CAPACITY_REDUCED}
    g.now += 1
    assert g.tel("A", 100, 30.8) == []  # more noise inside the band: nothing changes
    assert g.tel("A", 100, 30.1) == []
    g.now += 1
    effects = g.tel("A", 100, 40)  # over the limit: reductions at once, despite the hold time
    reasons = {e.message.reason for e in effects if isinstance(e, ToSubstation)}
    assert reasons == {Reason.CAPACITY_REDUCED} and sum(g.grants().values()) <= 90 - 40
    g.now += 2
    assert g.tel("A", 100, 20) == []  # room again, but within the hold time: no increase yet
    g.now += 10
    raised = g.tel("A", 100, 20)
    assert {e.message.reason for e in raised if isinstance(e, ToSubstation)} == {Reason.POWER_AVAILABLE}
    # 90 - 20 - 1 (band) = 69 kW of room for 66 kW of requests: everyone is back at what it asked for.
    assert g.grants() == pytest.approx({"E1": 22.0, "E2": 22.0, "E3": 22.0})
    assert before == pytest.approx({"E1": 22.0, "E2": 22.0, "E3": 16.0})
    assert g.b.violations() == []


def test_queued_answers_carry_eta_and_move_up_as_the_queue_moves() -> None:
    g = Grid(queue_update_interval_s=5.0)
    g.tel("A", 50, 0)  # limit 45
    g.req("E1", 22, min_kw=22, energy_kwh=11)  # 30 min at 22 kW
    g.req("E2", 22, min_kw=22, energy_kwh=22)  # 60 min
    first = [e.message for e in g.req("W1", 22, min_kw=22) if isinstance(e, ToEv)]
    second = [e.message for e in g.req("W2", 22, min_kw=22) if isinstance(e, ToEv)]
    assert (first[-1].status, first[-1].position, first[-1].eta_s) == ("queued", 1, 1800.0)
    assert (second[-1].position, second[-1].eta_s) == (2, 3600.0)
    g.now += 60
    g.tel("A", 50, 0)  # still reporting (60 s of silence would make it lost)
    e1 = next(s for s in g.b._sessions.values() if s.request.ev_id == "E1")
    g.b.on_session_event("A", SessionEvent(event="ended", session_id=e1.session_id, ev_id="E1", ts=g.now,
                                           reason="energy_delivered"), g.now)
    updates = [e.message for e in g.b.tick(g.now) if isinstance(e, ToEv) and e.message.status == "queued"]
    assert [(a.ev_id, a.position) for a in updates] == [("W2", 1)]  # W1 was placed; W2 moved up


@pytest.mark.parametrize("policy", ["round-robin", "polled-least-loaded"])
def test_baselines_refuse_to_run_unless_allowed(policy: str) -> None:
    with pytest.raises(ValueError, match="baseline"):
        Balancer(CoreConfig(policy=policy))
    b = Balancer(CoreConfig(policy=policy, allow_baselines=True))
    assert b.config.policy == policy


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        Balancer(CoreConfig(policy="fastest"))
