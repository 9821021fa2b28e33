"""Replay metrics on small hand-computed cases (every expected number is worked out in the comments)."""

from __future__ import annotations

import pytest

from replay.metrics import (
    Answer,
    EvRecord,
    SubstationTrace,
    Trace,
    compute_metrics,
    fair_shares,
    jain_index,
    overload,
    power_changes,
    queue_waits,
    utilisation_spread,
)


def sub(name: str, loads: list[float], cap: float | list[float] = 100.0, online: list[bool] | None = None
        ) -> SubstationTrace:
    caps = cap if isinstance(cap, list) else [cap] * len(loads)
    return SubstationTrace(name, loads, caps, online if online is not None else [True] * len(loads))


def ev(ev_id: str = "EV_1", *answers: Answer, requested_at: float = 0.0, departure: float = 7200.0,
       requested_kw: float = 10.0, energy_kwh: float = 20.0, delivered: float = 0.0,
       finished_at: float | None = None) -> EvRecord:
    return EvRecord(ev_id, requested_at, departure, requested_kw, energy_kwh, answers=list(answers),
                    delivered_kwh=delivered, finished_at=finished_at)


# ------------------------------------------------------------------------------------------ overload
def test_overload_counts_seconds_above_capacity_and_the_peak() -> None:
    # A: 101 and 105 are over 100 (100 itself is not): 2 samples of 2 s = 4 s, peak 5 kW, peak util 1.05.
    # B: 130 while offline does not count; 120 online counts: 2 s more, peak stays max(5, 20) = 20.
    trace = Trace(2.0, [sub("A", [90, 101, 105, 100]),
                        sub("B", [130, 120, 50, 50], cap=100.0, online=[False, True, True, True])])
    seconds, peak, peak_util = overload(trace)
    assert seconds == 6.0
    assert peak == pytest.approx(20.0)
    assert peak_util == pytest.approx(1.2)


def test_overload_uses_the_capacity_of_each_sample() -> None:
    # Capacity cut to 60 at sample 2: 70 > 60 is over (10 kW), 70 < 100 before it is not.
    trace = Trace(1.0, [sub("A", [70, 70, 70], cap=[100, 100, 60])])
    assert overload(trace)[:2] == (1.0, pytest.approx(10.0))


def test_no_overload() -> None:
    assert overload(Trace(1.0, [sub("A", [10, 20])])) == (0.0, 0.0, 0.2)


# ------------------------------------------------------------------------------------------ spread
def test_spread_is_time_weighted_max_minus_min_over_online_substations() -> None:
    # sample 0: utils 0.5, 0.7 -> 0.2; sample 1: 0.9, 0.3 -> 0.6; mean 0.4, max 0.6
    trace = Trace(1.0, [sub("A", [50, 90]), sub("B", [70, 30])])
    mean, worst = utilisation_spread(trace)
    assert mean == pytest.approx(0.4)
    assert worst == pytest.approx(0.6)


def test_spread_ignores_offline_substations_and_samples_with_none_online() -> None:
    # sample 0: 0.5 vs 0.7 -> 0.2; sample 1: only A online -> 0; sample 2: nobody online -> left out.
    # capacities differ: B has 200, so its 140 kW is 0.7.
    trace = Trace(1.0, [sub("A", [50, 90, 0], online=[True, True, False]),
                        sub("B", [140, 60, 0], cap=200.0, online=[True, False, False])])
    mean, worst = utilisation_spread(trace)
    assert mean == pytest.approx(0.1)
    assert worst == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------ Jain
@pytest.mark.parametrize(("xs", "expected"), [
    ([1.0, 1.0, 1.0, 1.0], 1.0),
    ([1.0, 0.0, 0.0, 0.0], 0.25),   # one EV gets everything: 1/n
    ([1.0, 0.5], 0.9),              # 1.5^2 / (2 * 1.25)
    ([0.2, 0.2], 1.0),              # equal shares, however small
    ([], None),
    ([0.0, 0.0], None),             # nobody got anything: undefined
])
def test_jain_index(xs: list[float], expected: float | None) -> None:
    result = jain_index(xs)
    assert result == (None if expected is None else pytest.approx(expected))


def test_fair_shares_average_power_over_the_time_power_was_wanted() -> None:
    shares = fair_shares([
        # 10 kWh over its 2 h stay at 10 kW requested: 5 kW average -> 0.5
        ev("EV_a", delivered=10.0),
        # got its 10 kWh within the first hour: window ends there -> 10 kW average -> 1.0
        ev("EV_b", delivered=10.0, finished_at=3600.0),
        # waited and left with nothing -> 0 (counted)
        ev("EV_c", Answer(0, "queued"), delivered=0.0),
        # rejected: not in the population
        ev("EV_d", Answer(0, "rejected", reason="queue_full")),
        # requested at 3600, left at 5400: 0.5 h; 3 kWh at 4 kW requested -> 6 kW average, capped at 1
        ev("EV_e", requested_at=3600.0, departure=5400.0, requested_kw=4.0, delivered=3.0),
    ])
    assert shares == pytest.approx([0.5, 1.0, 0.0, 1.0])


# ------------------------------------------------------------------------------------------ waits
def test_queue_waits_include_direct_assignments_as_zero() -> None:
    evs = [
        ev("EV_a", Answer(10, "assigned", 11.0), requested_at=10.0),                       # 0
        ev("EV_b", Answer(10, "queued"), Answer(70, "assigned", 11.0), requested_at=10.0),  # 60
        ev("EV_c", Answer(5, "queued"), Answer(905, "assigned", 7.4), requested_at=5.0),   # 900
        ev("EV_d", Answer(5, "queued"), Answer(100, "cancelled"), requested_at=5.0),       # never assigned
    ]
    every, queued = queue_waits(evs)
    assert every == [0.0, 60.0, 900.0]
    assert queued == [60.0, 900.0]


def test_the_first_assignment_counts_not_a_later_reassignment() -> None:
    record = ev("EV_a", Answer(0, "assigned", 11.0), Answer(50, "revoked", 11.0), Answer(50, "queued"),
                Answer(80, "assigned", 11.0))
    assert queue_waits([record]) == ([0.0], [])


# ------------------------------------------------------------------------------------------ flapping
def test_power_changes_count_every_change_of_granted_power_after_the_first_assignment() -> None:
    record = ev("EV_a",
                Answer(0, "queued"),
                Answer(5, "assigned", 11.0),
                Answer(6, "updated", 7.0),     # 1
                Answer(7, "updated", 7.0),     # same power: no change
                Answer(8, "updated", 11.0),    # 2
                Answer(9, "revoked", 11.0),    # 3 (to 0)
                Answer(9, "queued"),
                Answer(20, "assigned", 11.0),  # 4 (0 -> 11, elsewhere)
                Answer(90, "completed", 11.0))
    assert power_changes(record) == 4


def test_power_changes_none_when_never_assigned_and_zero_when_steady() -> None:
    assert power_changes(ev("EV_a", Answer(0, "queued"), Answer(9, "cancelled"))) is None
    assert power_changes(ev("EV_b", Answer(0, "assigned", 11.0), Answer(9, "completed", 11.0))) == 0


# ------------------------------------------------------------------------------------------ together
def test_compute_metrics_small_run() -> None:
    trace = Trace(1.0, [sub("A", [50, 101]), sub("B", [50, 50])])
    evs = [
        # assigned at once, got all 10 kWh in the first hour of a 2 h stay: x = 1, nothing missing
        ev("EV_a", Answer(0, "assigned", 10.0), Answer(3600, "completed", 10.0),
           energy_kwh=10.0, delivered=10.0, finished_at=3600.0),
        # queued 600 s, then 5 of 20 kWh over its 2 h: x = 2.5 kW / 10 = 0.25, 15 kWh missing, one update
        ev("EV_b", Answer(0, "queued"), Answer(600, "assigned", 10.0), Answer(700, "updated", 5.0),
           Answer(7200, "completed", 5.0), energy_kwh=20.0, delivered=5.0),
        # rejected: its 8 kWh count as not delivered
        ev("EV_c", Answer(0, "rejected", reason="exceeds_capacity"), energy_kwh=8.0),
        # queued and left empty-handed: x = 0, its 4 kWh missing
        ev("EV_d", Answer(0, "queued"), Answer(7200, "cancelled"), energy_kwh=4.0),
    ]
    m = compute_metrics(trace, evs)
    assert (m.evs, m.served, m.never_served, m.rejected) == (4, 2, 1, 1)
    assert m.rejected_by_reason == {"exceeds_capacity": 1}
    assert (m.overload_s, m.peak_overload_kw) == (1.0, pytest.approx(1.0))
    assert m.spread_mean == pytest.approx((0.0 + 0.51) / 2)
    # x = [1, 0.25, 0]: (1.25)^2 / (3 * 1.0625)
    assert m.jain == pytest.approx(1.5625 / 3.1875)
    assert m.energy_demand_kwh == 42.0
    assert m.energy_not_delivered_kwh == pytest.approx(15.0 + 8.0 + 4.0)
    assert m.energy_not_delivered_share == pytest.approx(27.0 / 42.0)
    assert (m.wait_p50_s, m.wait_p95_s) == (0.0, 600.0)
    assert (m.wait_queued_p50_s, m.wait_queued_p95_s) == (600.0, 600.0)
    assert (m.changes_mean, m.changes_max) == (0.5, 1)
    assert m.to_dict()["rejected_by_reason"] == {"exceeds_capacity": 1}


def test_compute_metrics_of_nothing() -> None:
    m = compute_metrics(Trace(1.0, []), [])
    assert (m.evs, m.overload_s, m.jain, m.energy_not_delivered_share, m.wait_p50_s, m.changes_mean) == (
        0, 0.0, None, None, None, None)
