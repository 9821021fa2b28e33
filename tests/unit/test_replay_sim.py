"""The fast replay: the pure core against simulated substations and EVs, with a simulated clock.

Runs are deterministic for a seed and cached per (scenario, policy), so each runs once per test session.
Policy assertions follow ``balancer.core.POLICIES``: a policy the core does not have yet is skipped, and its
assertions apply as soon as it appears.
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest

from grid_protocol.messages import SessionCommand, SessionCommands
from grid_sim.scenario import CapacityEvent, Scenario, load_scenario, parse_scenario, shipped_scenarios
from replay.sim import ALL_POLICIES, BASELINE_POLICIES, DEFAULT_POLICY, RunResult, _Run, available_policies, run

SAFE_POLICIES = tuple(p for p in ALL_POLICIES if p not in BASELINE_POLICIES)
AVAILABLE = available_policies()
SCENARIOS = shipped_scenarios()

TINY = """
name: tiny
description: two small substations, EVs enough to queue
duration_s: 40m
seed: 11
telemetry: {interval_s: 1, lag_s: 2}
start_hour: 18
substations:
  - {id: a, capacity_kw: 60, base_load: {profile: points, points: [[0, 20], [40m, 30]]}}
  - {id: b, capacity_kw: 40, base_load: {profile: daily, peak_pct: 40}}
arrivals:
  ev: {requested_kw: {11: 2, 22: 1}, min_kw_share: 0.3, energy_kwh: [2, 6], stay: [10m, 30m], priority: {0: 3, 5: 1}}
  rate: [{from: 0, to: 30m, per_hour: 40}]
events:
  - {type: burst, at: 5m, count: 8}
  - {type: offline, at: 15m, substation: b}
  - {type: online, at: 20m, substation: b}
  - {type: capacity, at: 25m, substation: a, capacity_kw: 45, notice_s: 20}
  - {type: capacity, at: 30m, substation: a, capacity_kw: 60}
"""


def needs(policy: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(policy not in AVAILABLE, reason=f"{policy!r} not in balancer.core.POLICIES yet")


@cache
def scenario(name: str) -> Scenario:
    return parse_scenario(TINY) if name == "tiny" else load_scenario(name)


def replay(name: str, policy: str = DEFAULT_POLICY) -> RunResult:
    return _replay(name, policy)  # one cache key per (name, policy), however it is called


@cache
def _replay(name: str, policy: str) -> RunResult:
    return run(scenario(name), policy)


def answers_with(result: RunResult, statuses: tuple[str, ...], reason: str) -> int:
    """How many answers the EVs got with one of ``statuses`` and ``reason`` (what the protocol shows)."""
    return sum(1 for ev in result.evs for a in ev.answers if a.status in statuses and a.reason == reason)


def assert_every_ev_accounted(result: RunResult) -> None:
    m = result.metrics
    assert m.evs == len(result.evs) > 0
    assert m.served + m.never_served + m.rejected == m.evs
    for ev in result.evs:
        assert ev.answers, f"{ev.ev_id} never got an answer"
        # every EV ends in a final state: rejected, done charging, or released (completed/cancelled) when it left
        assert ev.answers[-1].status in ("rejected", "completed", "cancelled"), (ev.ev_id, ev.answers[-3:])
        assert ev.delivered_kwh <= ev.energy_kwh + 1e-6
        if ev.first_assigned_at is None:
            assert ev.delivered_kwh == 0
    assert result.open_requests_at_end == 0, "the balancer still holds requests of EVs that are gone"
    assert result.anomalies == {}


# ---------------------------------------------------------------------------------------------- basics
def test_a_run_is_deterministic_for_a_seed() -> None:
    first, second = run(scenario("tiny")), run(scenario("tiny"))
    assert first.metrics == second.metrics
    assert [e.answers for e in first.evs] == [e.answers for e in second.evs]
    assert first.trace.substations[0].load_kw == second.trace.substations[0].load_kw
    other = run(scenario("tiny"), seed=12)
    assert [e.requested_at for e in other.evs] != [e.requested_at for e in first.evs]


def test_tiny_scenario_exercises_every_event_and_accounts_every_ev() -> None:
    result = replay("tiny")
    assert_every_ev_accounted(result)
    assert answers_with(result, ("revoked",), "substation_offline") > 0  # b went offline with sessions
    assert result.metrics.wait_queued_p50_s is not None  # some EVs waited
    assert result.metrics.overload_s == 0
    assert result.core_violations == 0
    b = next(s for s in result.trace.substations if s.substation_id == "b")
    assert not all(b.online) and any(b.online)
    assert [label for _, label in result.events] == [
        "burst of 8", "b offline", "b online", "a capacity 45 kW", "a capacity 60 kW"]


def test_energy_is_what_the_substations_delivered() -> None:
    result = replay("tiny")
    ev_energy = sum(e.delivered_kwh for e in result.evs)
    # EV draw integrated over the trace (load - base), sample by sample
    step = result.trace.step_s
    drawn = sum((load - base) * step / 3600 for s in result.trace.substations
                for load, base, online in zip(s.load_kw, s.base_kw, s.online, strict=True) if online)
    assert ev_energy == pytest.approx(drawn, rel=0.02)


def test_command_delay_still_accounts_every_ev() -> None:
    result = run(scenario("tiny"), command_delay_s=2.0)
    assert_every_ev_accounted(result)


def test_a_lapsed_lease_pauses_the_substation_until_the_next_command() -> None:
    runner = _Run(scenario("tiny"), DEFAULT_POLICY, 1, 0.0)
    sim = runner.sims["a"]
    sim.apply(SessionCommand(command="start", session_id="s-x", ev_id="EV_x", ts=runner.now, granted_kw=11.0,
                             energy_kwh=5.0), runner.now)
    runner._command("a", SessionCommands(ts=runner.now, commands=[], valid_until=runner.now + 10))
    runner.t = 10.0
    runner._check_lease("a")
    assert not sim.paused and sim.ev_load_kw == 11.0  # valid up to and including its deadline
    runner.t = 11.0
    runner._check_lease("a")
    assert sim.paused and sim.ev_load_kw == 0.0
    runner._command("a", SessionCommands(ts=runner.now, commands=[], valid_until=runner.now + 10))
    assert not sim.paused
    assert runner.notes == {"lease_lapsed": 1, "lease_resumed": 1}


def test_leases_are_renewed_in_time_unless_commands_arrive_too_late() -> None:
    assert "lease_lapsed" not in replay("tiny").notes
    late = run(scenario("tiny"), command_delay_s=4.0, lease_s=3.0)  # every lease has lapsed when it arrives
    assert late.notes["lease_lapsed"] > 0
    assert_every_ev_accounted(late)
    assert late.metrics.overload_s == 0
    assert sum(e.delivered_kwh for e in late.evs) < sum(e.delivered_kwh for e in replay("tiny").evs)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="polic"):
        run(scenario("tiny"), "first-come")


# ---------------------------------------------------------------------------------------------- shipped
@pytest.mark.parametrize("name", SCENARIOS)
def test_shipped_scenario_runs_with_the_default_policy_and_accounts_every_ev(name: str) -> None:
    result = replay(name)
    assert_every_ev_accounted(result)
    assert result.core_violations == 0
    # base load alone stays below the limit: any overload is caused by EV charging, which a policy can avoid
    for sub in result.trace.substations:
        worst = max(base / cap for base, cap in zip(sub.base_kw, sub.capacity_kw, strict=True))
        assert worst < 0.95, (sub.substation_id, worst)


def test_evening_peak_really_pushes_the_grid() -> None:
    m = replay("evening_peak").metrics
    assert m.peak_utilisation > 0.94
    assert m.wait_queued_p50_s is not None and m.wait_queued_p50_s > 600
    assert m.energy_not_delivered_share is not None and m.energy_not_delivered_share > 0.3


def test_capacity_cut_goes_below_the_load_it_meets() -> None:
    sc = scenario("capacity_cut")
    cut = next(e for e in sc.events if isinstance(e, CapacityEvent))
    assert cut.capacity_pct is not None
    new_kw = sc.capacity_kw(cut.substation) * cut.capacity_pct / 100
    result = replay("capacity_cut")
    central = next(s for s in result.trace.substations if s.substation_id == cut.substation)
    before = int((cut.at - cut.notice_s - 1) / result.trace.step_s)
    assert central.load_kw[before] > new_kw * 1.2
    assert answers_with(result, ("updated", "revoked"), "capacity_reduced") > 0


def test_substation_loss_strands_sessions() -> None:
    result = replay("substation_loss")
    assert answers_with(result, ("revoked",), "substation_offline") >= 5
    stranded = 0  # revoked by the loss and found no place elsewhere at once: back in the queue
    for ev in result.evs:
        for before, after in itertools.pairwise(ev.answers):
            if before.status == "revoked" and before.reason == "substation_offline" and after.status == "queued":
                stranded += 1
    assert stranded >= 3


def test_burst_queues_most_of_the_thousand() -> None:
    m = replay("burst_1000").metrics
    assert m.evs >= 1000
    assert m.never_served + sum(1 for e in replay("burst_1000").evs if e.queued_first) > 500


# ---------------------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("policy", [pytest.param(p, marks=needs(p)) for p in SAFE_POLICIES])
@pytest.mark.parametrize("name", SCENARIOS)
def test_real_policies_never_overload(name: str, policy: str) -> None:
    result = replay(name, policy)
    assert result.metrics.overload_s == 0, (result.metrics.overload_s, result.metrics.peak_overload_kw)
    assert result.core_violations == 0
    assert_every_ev_accounted(result)


@pytest.mark.parametrize("policy", [pytest.param(p, marks=needs(p)) for p in BASELINE_POLICIES])
@pytest.mark.parametrize("name", ["burst_1000", "evening_peak"])
def test_baselines_do_overload(name: str, policy: str) -> None:
    m = replay(name, policy).metrics
    assert m.overload_s > 60
    assert m.peak_overload_kw > 50


# ---------------------------------------------------------------------------------------------- DSO limits
def test_dso_evening_cut_is_met_before_it_starts_and_scored_against_the_optimum() -> None:
    from grid_sim.scenario import LimitsEvent
    from replay.trace_optimum import trace_optimum

    sc = scenario("dso_evening_cut")
    limits = next(e for e in sc.events if isinstance(e, LimitsEvent))
    window = limits.entries[0]
    result = replay("dso_evening_cut", "weighted-fair")
    north = result.trace.substations[0]
    step = result.trace.step_s
    # the trace measures overload against the DSO limit while it applies, the capacity outside it
    assert north.capacity_kw[int(window.start / step) - 1] == sc.capacity_kw("north")
    assert north.capacity_kw[int(window.start / step)] == window.limit_kw
    assert north.capacity_kw[int(window.end / step)] == sc.capacity_kw("north")
    # it bites: the EVs carried more than the cut allows just before it (and less from its start)
    assert north.load_kw[int((window.start - limits.at) / 2 / step)] > window.limit_kw
    assert result.metrics.overload_s == 0
    assert answers_with(result, ("updated", "revoked"), "limit_scheduled") > 0
    assert answers_with(result, ("assigned", "updated"), "limit_shortfall") > 0
    # the optimum bounds what was delivered; the margin's optimum is below the limit's
    delivered = sum(e.delivered_kwh for e in result.evs)
    at_limit, within = trace_optimum(result), trace_optimum(result, margin_pct=5)
    assert delivered <= within.delivered_kwh_total + 1e-6 <= at_limit.delivered_kwh_total + 1e-6
    assert delivered > 0.8 * within.delivered_kwh_total


def test_without_the_lead_time_a_command_delay_overloads_at_the_start_of_the_cut() -> None:
    """Reducing when the limit starts is too late once commands take time to act; planning ahead is not."""
    sc = scenario("dso_evening_cut")
    late = run(sc, "least-utilised", command_delay_s=2.0, core={"limit_lead_s": 0.0})
    ahead = run(sc, "least-utilised", command_delay_s=2.0)
    assert late.metrics.overload_s > 0
    assert ahead.metrics.overload_s == 0
