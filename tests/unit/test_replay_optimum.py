"""The offline optimum (an LP solved by HiGHS): instances small enough to solve by hand, edge cases, and a
random instance checked against an independent algorithm (maximum flow)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from replay.optimum import OptimumError, optimal_delivery


def test_two_evs_sharing_a_limit_by_hand() -> None:
    # Limit 10 kW. A: 0-2 h, 15 kWh at up to 7 kW. B: 1-2 h, 10 kWh at up to 7 kW.
    # First hour: only A, at most 7 kWh. Second hour: both, at most 10 kWh together. 17 of 25 kWh.
    opt = optimal_delivery([0, 1], [2, 2], [15, 10], [7, 7], 10)
    assert opt.delivered_kwh_total == pytest.approx(17.0)
    assert opt.delivered_share == pytest.approx(17 / 25)
    assert opt.delivered_kwh.sum() == pytest.approx(17.0)
    assert 7 <= opt.delivered_kwh[0] <= 14 and 3 <= opt.delivered_kwh[1] <= 7  # each within its own bounds
    assert (opt.intervals, opt.variables, opt.constraints) == (2, 3, 4)


def test_each_bound_can_be_the_binding_one() -> None:
    assert optimal_delivery([0], [1], [10], [6.6], 50).delivered_kwh_total == pytest.approx(6.6)  # the EV's rate
    assert optimal_delivery([0], [1], [2], [6.6], 50).delivered_kwh_total == pytest.approx(2.0)  # its energy
    assert optimal_delivery([0], [1], [10], [6.6], 4).delivered_kwh_total == pytest.approx(4.0)  # the site limit


def test_times_off_any_grid_are_exact() -> None:
    # Limit 5 kW; A 0-1.5 h wants 6 kWh at 5 kW; B 0.5-1 h wants 2 kWh at 4 kW.
    # Intervals [0, .5) A alone: 2.5; [.5, 1) both, 2.5 in all; [1, 1.5) A alone: 2.5. Total room 7.5 kWh,
    # demand 8 kWh; B can take at most 2 in its half hour, A what is left: 7.5 kWh.
    opt = optimal_delivery([0, 0.5], [1.5, 1], [6, 2], [5, 4], 5)
    assert opt.delivered_kwh_total == pytest.approx(7.5)
    assert opt.intervals == 3


def test_an_ev_that_cannot_finish_in_its_stay_gets_what_its_rate_allows() -> None:
    opt = optimal_delivery([0, 0], [0.5, 3], [10, 3], [6.6, 6.6], 100)
    assert opt.delivered_kwh.tolist() == pytest.approx([3.3, 3.0])


@pytest.mark.parametrize(("arrival", "departure", "energy", "rate", "limit", "total"), [
    ([], [], [], [], 10, 0.0),  # no sessions
    ([0], [1], [5], [6.6], 0, 0.0),  # a limit of 0: nothing can flow
    ([0], [1], [0], [6.6], 10, 0.0),  # nothing asked for
    ([0], [1], [5], [0], 10, 0.0),  # an EV that cannot draw
])
def test_degenerate_instances_deliver_nothing(arrival: list[float], departure: list[float], energy: list[float],
                                              rate: list[float], limit: float, total: float) -> None:
    opt = optimal_delivery(arrival, departure, energy, rate, limit)
    assert opt.delivered_kwh_total == total
    assert len(opt.delivered_kwh) == len(arrival)


@pytest.mark.parametrize(("args", "match"), [
    (([0], [1], [5], [6.6], -1), "limit_kw must be a finite number >= 0"),
    (([0], [1], [5], [6.6], float("nan")), "limit_kw must be a finite number >= 0"),
    (([0, 1], [1], [5], [6.6], 10), "one entry per session"),
    (([1], [1], [5], [6.6], 10), "session 0: departure is not after arrival"),
    (([0, 2], [1, 1], [5, 5], [6.6, 6.6], 10), "session 1: departure is not after arrival"),
    (([0], [float("inf")], [5], [6.6], 10), "departure_h has a value that is not a finite number"),
    (([0], [1], [-5], [6.6], 10), "energy_kwh and max_kw must be >= 0"),
])
def test_inputs_no_schedule_exists_for_are_refused(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        optimal_delivery(*args)


def test_a_solver_that_runs_out_of_time_is_an_error_not_a_number() -> None:
    rng = np.random.default_rng(3)
    n = 400
    arrival = rng.uniform(0, 200, n)
    with pytest.raises(OptimumError, match=r"did not reach an optimum.*[Tt]ime limit"):
        optimal_delivery(arrival, arrival + rng.uniform(0.5, 10, n), rng.uniform(1, 30, n), np.full(n, 6.6), 20,
                         time_limit_s=0)


def _max_flow_wh(arrival: list[int], departure: list[int], energy_wh: list[int], rate_w: list[int],
                 limit_w: int) -> int:
    """The same optimum as a maximum flow (whole hours, integer Wh): source -> EV (its energy) -> each hour it
    is plugged in (its rate) -> sink (the limit). An algorithm independent of the LP."""
    n, hours = len(arrival), max(departure)
    source, sink = 0, 1 + n + hours
    rows, cols, caps = [], [], []
    for i in range(n):
        rows.append(source), cols.append(1 + i), caps.append(energy_wh[i])
        for h in range(arrival[i], departure[i]):
            rows.append(1 + i), cols.append(1 + n + h), caps.append(rate_w[i])
    for h in range(hours):
        rows.append(1 + n + h), cols.append(sink), caps.append(limit_w)
    graph = csr_matrix((np.array(caps, dtype=np.int32), (rows, cols)), shape=(sink + 1, sink + 1))
    return int(maximum_flow(graph, source, sink).flow_value)


def test_a_random_instance_matches_an_independent_max_flow() -> None:
    rng = np.random.default_rng(7)
    n = 60
    arrival = rng.integers(0, 40, n).tolist()
    departure = [a + int(s) for a, s in zip(arrival, rng.integers(1, 12, n), strict=True)]
    energy_wh = rng.integers(500, 40_000, n).tolist()
    rate_w = rng.choice([3_300, 6_600, 11_000], n).tolist()
    for limit_w in (5_000, 20_000, 60_000):
        expected = _max_flow_wh(arrival, departure, energy_wh, rate_w, limit_w)
        opt = optimal_delivery(arrival, departure, [e / 1000 for e in energy_wh], [r / 1000 for r in rate_w],
                               limit_w / 1000)
        assert opt.delivered_kwh_total * 1000 == pytest.approx(expected, abs=1e-3)
        assert (opt.delivered_kwh <= np.array(energy_wh) / 1000 + 1e-9).all()


def test_a_time_varying_limit_by_hand() -> None:
    # One EV 0-3 h, 30 kWh at up to 10 kW; the limit is 10 kW, 2 kW from 1 h to 2 h (a DSO cut), 10 kW again:
    # 10 + 2 + 10 = 22 kWh. Steps off the session bounds become interval bounds.
    opt = optimal_delivery([0], [3], [30], [10], [(0, 10), (1, 2), (2, 10)])
    assert opt.delivered_kwh_total == pytest.approx(22.0)
    assert opt.intervals == 3 and opt.limit_kw == 2 and opt.limit_steps == ((0, 10), (1, 2), (2, 10))
    # the first step applies before its time too; steps outside the sessions change nothing
    assert optimal_delivery([0], [1], [30], [10], [(0.5, 4), (5, 0)]).delivered_kwh_total == pytest.approx(4.0)
    with pytest.raises(ValueError, match="increasing time"):
        optimal_delivery([0], [1], [1], [1], [(1, 4), (0.5, 2)])
