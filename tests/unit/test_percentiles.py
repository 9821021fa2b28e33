"""grid_runtime.percentiles: the one percentile of every report (EV fleet, replay, benchmarks)."""

from __future__ import annotations

import math
import random

import pytest

from grid_runtime.percentiles import percentile, percentiles


@pytest.mark.parametrize(("values", "p", "expected"), [
    (list(range(1, 11)), 50, 5),    # ceil(0.5*10) = 5th smallest (the bench used to say 6)
    (list(range(1, 11)), 95, 10),   # ceil(9.5) = 10th
    (list(range(1, 11)), 10, 1),
    (list(range(1, 21)), 95, 19),   # ceil(19) = 19th
    (list(range(1, 101)), 0.5, 1),
    (list(range(1, 101)), 99, 99),
    (list(range(1, 101)), 100, 100),
    ([1, 2, 3, 4], 50, 2),
    ([1, 2, 3, 4], 51, 3),
    ([1, 2, 3, 4], 75, 3),
    ([1, 2, 3, 4], 76, 4),
    ([7.0], 50, 7.0),
    ([3, 1, 2], 100, 3),            # order of the input does not matter
    ([], 50, None),
])
def test_percentile_is_nearest_rank(values: list[float], p: float, expected: float | None) -> None:
    assert percentile(values, p) == expected


def test_always_a_measured_value_the_smallest_with_p_percent_at_or_below() -> None:
    rng = random.Random(7)
    for _ in range(300):
        values = [rng.random() for _ in range(rng.randint(1, 60))]
        p = rng.choice([50, 90, 95, 99, rng.uniform(0.1, 100)])
        got = percentile(values, p)
        assert got in values
        ordered = sorted(values)
        assert ordered[math.ceil(p / 100 * len(values)) - 1] == got


def test_several_at_once_are_the_same_as_one_by_one() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentiles(values, (50, 95, 99)) == [percentile(values, p) for p in (50, 95, 99)]
    assert percentiles([], (50, 99)) == [None, None]
    assert percentiles(iter(values), (100,)) == [5.0]  # any iterable, once


@pytest.mark.parametrize("p", [0, -1, 100.1])
def test_p_outside_0_100_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="not in"):
        percentile([1.0], p)
