"""The pure parts of the live replay: scenario timelines, the balancer's scaled settings, and the conversion of
recorded MQTT messages into the inputs of ``replay.metrics`` (``replay.recording``)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from ev_clients.scenario_fleet import request_for
from grid_protocol.messages import SessionCommand
from grid_protocol.topics import Topics
from grid_sim.scenario import generate_evs, load_scenario, parse_scenario
from grid_sim.timeline import (
    StepSampled,
    Timebase,
    auto_speedup,
    capacity_at,
    capacity_steps,
    event_labels,
    grid_actions,
    scenario_base_load,
    shorten,
)
from replay.live import balancer_env, plan_live
from replay.metrics import compute_metrics
from replay.recording import Recorded, convert
from replay.sim import run
from substation_agents.scenario_agents import EvBatteries

T = Topics()

CONV = """
name: conv
description: two substations, three EVs, a cut with notice and an outage
duration_s: 100
seed: 1
start_hour: 0
substations:
  - {id: a, capacity_kw: 100, base_load: {profile: points, points: [[0, 50]]}}
  - {id: b, capacity_kw: 50, base_load: {profile: points, points: [[0, 10]]}}
arrivals:
  explicit:
    - {at: 10, ev_id: EV_A, requested_kw: 11, energy_kwh: 1, stay: 50}
    - {at: 20, ev_id: EV_B, requested_kw: 22, energy_kwh: 5, stay: 60}
    - {at: 90, ev_id: EV_C, requested_kw: 11, energy_kwh: 5, stay: 5}
events:
  - {type: capacity, at: 50, substation: a, capacity_kw: 60, notice_s: 10}
  - {type: offline, at: 30, substation: b}
  - {type: online, at: 60, substation: b}
"""

TB = Timebase(t0=1000.0, speedup=10.0)


def rec(t: float, topic: str, payload: dict[str, Any] | bytes) -> Recorded:
    """A message that arrived at scenario time ``t``."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Recorded(TB.wall(t), topic, body)


def tel(sub: str, t: float, seq: int, load: float, base: float, capacity: float) -> Recorded:
    return rec(t + 0.05, T.telemetry(sub), {
        "substation_id": sub, "ts": TB.wall(t), "seq": seq, "capacity_kw": capacity, "load_kw": load,
        "base_load_kw": base, "ev_load_kw": load - base, "active_sessions": 0})


def status(sub: str, t: float, state: str) -> Recorded:
    return rec(t, T.substation_status(sub), {"state": state, "substation_id": sub})


def answer(ev: str, t: float, status_: str, **fields: Any) -> Recorded:
    doc = {"request_id": f"r-{ev}", "ev_id": ev, "status": status_, "ts": TB.wall(t), "substation_id": None,
           "granted_kw": None, "session_id": None, "reason": None, "detail": None, "position": None, "eta_s": None}
    doc.update(fields)
    return rec(t, T.assignment(ev), doc)


def session(sub: str, t: float, event: str, sid: str, ev: str, **fields: Any) -> Recorded:
    return rec(t + 0.01, T.session_events(sub), {"event": event, "session_id": sid, "ev_id": ev, "ts": TB.wall(t),
                                                  "substation_id": sub, **fields})


def command(sub: str, t: float, *cmds: dict[str, Any]) -> Recorded:
    return rec(t, T.command(sub), {"ts": TB.wall(t), "commands": [{"ts": TB.wall(t), **c} for c in cmds],
                                   "valid_until": TB.wall(t) + 10})


def recording() -> list[Recorded]:
    return [
        status("a", -1, "online"), status("b", -1, "online"),
        tel("a", 0, 0, 50, 50, 100), tel("b", 0, 0, 10, 10, 50),
        rec(10.2, T.request("EV_A"), b'{"requested_kw": 11}'), rec(12, T.request("EV_A"), b'{"requested_kw": 11}'),
        answer("EV_A", 10.3, "assigned", substation_id="a", granted_kw=11.0, session_id="s1"),
        answer("EV_A", 12.1, "assigned", substation_id="a", granted_kw=11.0, session_id="s1",
               ts=TB.wall(10.3)),  # the balancer's latest answer again, for the retried request
        session("a", 10.4, "started", "s1", "EV_A", granted_kw=11.0),
        tel("a", 15, 1, 61, 50, 100),
        session("a", 19.9, "ended", "s1", "EV_A", reason="energy_delivered", energy_delivered_kwh=1.0),
        session("a", 19.9, "ended", "s1", "EV_A", reason="energy_delivered", energy_delivered_kwh=1.0),  # again
        answer("EV_A", 20, "completed", substation_id="a", granted_kw=11.0, session_id="s1",
               reason="energy_delivered"),
        rec(20, T.request("EV_B"), b'{"requested_kw": 22}'),
        answer("EV_B", 20.1, "queued", reason="no_headroom", position=1),
        status("b", 30, "offline"),  # the last will
        answer("EV_B", 40, "assigned", substation_id="a", granted_kw=22.0, session_id="s2"),
        command("a", 40, {"command": "start", "session_id": "s2", "ev_id": "EV_B", "granted_kw": 22.0}),
        session("a", 40, "started", "s2", "EV_B", granted_kw=22.0),
        tel("a", 40, 2, 83, 50, 60),  # reports the announced cut; the physical one comes at 50
        command("a", 60, {"command": "update", "session_id": "s2", "ev_id": "EV_B", "granted_kw": 11.0}),
        status("b", 60.5, "online"),
        tel("b", 63, 1, 10, 10, 50),
        rec(80, T.release("EV_B"), b"{}"),
        answer("EV_B", 80.1, "rejected", reason="nothing_to_release"),
    ]


@pytest.fixture(scope="module")
def conv() -> Any:
    scenario = parse_scenario(CONV)
    evs = generate_evs(scenario)
    return scenario, evs, convert(recording(), scenario, evs, TB, end_s=100)


# ---------------------------------------------------------------------------------------------- recordings
def test_trace_holds_the_last_measurement_and_uses_the_physical_capacity(conv: Any) -> None:
    _, _, data = conv
    a = data.trace.substations[0]
    assert data.trace.step_s == 1 and len(a.load_kw) == 101
    assert a.load_kw[0] == a.load_kw[14] == 50 and a.load_kw[15] == a.load_kw[39] == 61 and a.load_kw[40] == 83
    assert a.base_kw[40] == 50
    assert a.capacity_kw[49] == 100 and a.capacity_kw[50] == 60  # not the 60 telemetry announced from t=40
    assert all(a.online)


def test_trace_is_offline_between_the_will_and_the_return_and_never_holds_an_old_measurement(conv: Any) -> None:
    _, _, data = conv
    b = data.trace.substations[1]
    assert b.online[29] and b.load_kw[29] == 10
    assert not any(b.online[30:61]) and set(b.load_kw[30:61]) == {0.0}
    # back at 60.5, first measured at 63: the first measurement of the new connection stands in
    assert b.online[61] and b.load_kw[61] == 10 and b.online[63]
    assert data.notes["samples_before_first_telemetry"] == 2


def test_ev_records_answers_energy_and_accounting(conv: Any) -> None:
    _, _, data = conv
    ev_a, ev_b, ev_c = data.evs
    assert ev_a.requested_at == pytest.approx(10.2)  # the first request, not its retry
    assert [x.status for x in ev_a.answers] == ["assigned", "completed"]  # the replay is dropped
    assert ev_a.answers[0].t == pytest.approx(10.3) and ev_a.answers[0].granted_kw == 11.0
    assert ev_a.delivered_kwh == 1.0 and ev_a.finished_at == pytest.approx(19.9)  # the duplicate ended is not
    assert (ev_a.departure, ev_a.requested_kw, ev_a.energy_kwh) == (60, 11, 1)
    # EV_B: the rejection of its release is not an answer to its request; its session never ended, so its
    # energy is integrated from the commands: 22 kW for 20 s, then 11 kW for 40 s (scenario seconds)
    assert [x.status for x in ev_b.answers] == ["queued", "assigned"]
    assert ev_b.delivered_kwh == pytest.approx((22 * 20 + 11 * 40) / 3600)
    assert ev_c.answers == [] and ev_c.requested_at == 90
    assert data.lost == ["EV_B", "EV_C"]
    assert data.anomalies == {"ev_open_at_end": 1, "ev_request_not_seen": 1}
    assert data.notes["repeated_answers"] == 1 and data.notes["duplicate_session_events"] == 1
    assert data.notes["energy_integrated_sessions"] == 1 and data.notes["release_crossed_end"] == 1
    assert data.counters["messages:substation_telemetry"] == 5 and data.counters["answers:assigned"] == 3


def test_converted_recording_feeds_the_metrics(conv: Any) -> None:
    _, _, data = conv
    m = compute_metrics(data.trace, data.evs)
    assert m.evs == 3 and m.served == 2 and m.never_served == 1
    assert m.overload_s == 51 and m.peak_overload_kw == 23  # 83 kW on a, cut to 60 kW from t=50 to t=100
    assert m.wait_p95_s == pytest.approx(20.0)  # EV_B: requested at 20, assigned at 40


def test_garbage_on_a_topic_is_counted_not_raised() -> None:
    scenario = parse_scenario(CONV)
    data = convert([rec(1, T.telemetry("a"), b"{nope"), rec(2, "elsewhere/x", b"1")], scenario,
                   generate_evs(scenario), TB, end_s=5)
    assert data.anomalies["undecodable:substation_telemetry"] == 1
    assert data.counters["messages:other"] == 1
    assert not any(data.trace.substations[0].online)  # never measured: no load is made up


# ---------------------------------------------------------------------------------------------- timelines
def test_timebase_maps_scenario_time_to_the_wall_clock() -> None:
    assert TB.wall(100) == 1010 and TB.scenario(1010) == 100
    with pytest.raises(ValueError):
        Timebase(0, 0)


def test_grid_actions_announce_a_cut_early_and_a_raise_when_it_happens() -> None:
    scenario = load_scenario("capacity_cut")
    actions = [(a.at, a.substation, a.kind, a.capacity_kw) for a in grid_actions(scenario)]
    assert actions == [(3570, "central", "announce", 195), (3600, "central", "capacity", 195),
                       (7200, "central", "capacity", 300)]
    steps = capacity_steps(scenario, "central")
    assert [capacity_at(steps, t) for t in (0, 3599, 3600, 7199, 7200)] == [300, 300, 195, 195, 300]
    assert capacity_steps(scenario, "north") == [(0, 400)]
    assert [label for _, label in event_labels(parse_scenario(CONV))] == [
        "b offline", "a capacity 60 kW", "b online"]


def test_shorten_drops_later_arrivals_and_events_and_keeps_the_rest() -> None:
    scenario = load_scenario("substation_loss")
    short = shorten(scenario, 1800)
    assert short.duration_s == 1800 and short.events == []
    assert [(w.start, w.end) for w in short.arrivals.rate] == [(0, 1800)]
    assert shorten(scenario, 1e9) is scenario
    evs = generate_evs(short)
    assert evs and max(ev.arrival for ev in evs) < 1800
    with pytest.raises(ValueError):
        shorten(scenario, 0)


def test_auto_speedup_fits_the_run_into_the_wall_time() -> None:
    assert auto_speedup(19578, 40) == 490
    assert auto_speedup(111956, 40) == 2800
    assert auto_speedup(30, 40) == 1
    for span in (500.0, 7633.6, 86400.0):
        assert span / auto_speedup(span, 40) <= 40


DAILY = """
name: daily
description: noisy daily curves
duration_s: 20m
seed: 5
start_hour: 18
substations:
  - {id: a, capacity_kw: 300, base_load: {profile: daily, peak_pct: 80}}
  - {id: b, capacity_kw: 200, base_load: {profile: daily, peak_pct: 70, residential_share: 0.9, noise_pct: 5}}
  - {id: c, capacity_kw: 100, base_load: {profile: points, points: [[0, 20], [10m, 60]]}}
"""


def test_agents_base_load_is_the_simulations_sample_for_sample() -> None:
    """However irregularly an agent asks, it gets the simulation's base load (same noise, draw for draw)."""
    scenario = parse_scenario(DAILY)
    result = run(scenario)
    rng = random.Random(3)
    for sub, spec in zip(result.trace.substations, scenario.substations, strict=True):
        curve = scenario_base_load(scenario, spec)
        t = 0.0
        while t < len(sub.base_kw) - 1:
            assert curve(18 * 3600 + t) == sub.base_kw[int(t)], (spec.id, t)
            t += rng.uniform(0.05, 20)


def test_step_sampled_evaluates_each_grid_point_once_in_order() -> None:
    asked: list[float] = []
    f = StepSampled(lambda t: asked.append(t) or t, origin=100, step=2)
    assert f(50) == 100 and f(104.5) == 104 and f(104.9) == 104 and f(101) == 104  # never goes back
    assert asked == [100, 102, 104]


# ---------------------------------------------------------------------------------------------- settings
def test_balancer_settings_are_scenario_seconds_sped_up_within_wall_clock_bounds() -> None:
    fast = balancer_env("round-robin", 500, 0.01)
    assert fast["BALANCER_POLICY"] == "round-robin" and fast["BALANCER_ALLOW_BASELINES"] == "true"
    assert float(fast["BALANCER_MIN_HOLD_S"]) == pytest.approx(10 / 500)
    assert float(fast["BALANCER_OVERTAKE_GUARD_S"]) == pytest.approx(30 / 500)
    assert float(fast["BALANCER_STALE_AFTER_S"]) == 0.25  # several reports, never below a quarter second
    assert float(fast["BALANCER_LEASE_S"]) == 2 and float(fast["BALANCER_TICK_INTERVAL_S"]) == 0.05
    slow = balancer_env("least-utilised", 1, 1.0)
    assert [float(slow[k]) for k in ("BALANCER_STALE_AFTER_S", "BALANCER_LOST_AFTER_S", "BALANCER_MIN_HOLD_S",
                                     "BALANCER_LEASE_S", "BALANCER_TICK_INTERVAL_S")] == [10, 40, 10, 10, 1]


def test_plan_picks_the_speedup_the_evs_and_the_telemetry_interval() -> None:
    scenario = load_scenario("burst_1000")
    plan = plan_live(scenario, "least-utilised")
    assert plan.speedup == auto_speedup(plan.span_s) and plan.expected_wall_s <= 40
    assert len(plan.evs) == 1014 and plan.seed == scenario.seed
    assert plan.telemetry_interval_s == 0.01  # 1 s / 200 is faster than the floor
    other = plan_live(scenario, "round-robin", speedup=50, seed=9)
    assert other.speedup == 50 and other.seed == 9 and other.scenario.seed == 9
    assert [e.requested_kw for e in other.evs[:20]] != [e.requested_kw for e in plan.evs[:20]]
    assert other.telemetry_interval_s == 0.02


def test_ev_request_carries_departure_on_the_wall_clock() -> None:
    ev = generate_evs(parse_scenario(CONV))[1]
    request = request_for(ev, TB)
    assert request.request_id == "r-EV_B" and request.ev_id == "EV_B"
    assert request.departure == TB.wall(80) and request.energy_kwh == 5 and request.requested_kw == 22


def test_batteries_cap_a_start_to_what_the_ev_still_needs() -> None:
    batteries = EvBatteries({"EV_1": 10.0})
    start = SessionCommand(command="start", session_id="s", ev_id="EV_1", ts=0, granted_kw=11, energy_kwh=10)
    assert batteries.cap(start) is start
    batteries.add("EV_1", 7.5)
    assert batteries.cap(start).energy_kwh == pytest.approx(2.5)
    update = SessionCommand(command="update", session_id="s", ev_id="EV_1", ts=0, granted_kw=5, energy_kwh=10)
    assert batteries.cap(update) is update
    stranger = SessionCommand(command="start", session_id="t", ev_id="EV_9", ts=0, granted_kw=5, energy_kwh=99)
    assert batteries.cap(stranger) is stranger
    batteries.add("EV_9", 1.0)  # not one of the scenario's EVs: ignored
    assert batteries.left("EV_9") is None
