"""grid_runtime.backoff: the one back-off schedule of the transports' reconnects and the recorder's retries."""

from __future__ import annotations

import pytest

from grid_runtime.backoff import Backoff


def test_the_schedule_doubles_and_is_capped() -> None:
    backoff = Backoff(0.5, 30.0)
    assert [next(backoff) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert [next(Backoff(0.3, 0.3)) for _ in range(3)] == [0.3, 0.3, 0.3]


def test_the_reconnect_schedule_is_what_it_always_was() -> None:
    backoff = Backoff(0.2, 10.0)
    assert [next(backoff) for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]


def test_upcoming_does_not_use_a_delay_up_and_reset_starts_a_new_streak() -> None:
    backoff = Backoff(1.0, 8.0)
    assert backoff.upcoming == backoff.upcoming == 1.0
    assert next(backoff) == 1.0
    assert next(backoff) == 2.0
    assert backoff.upcoming == 4.0
    backoff.reset()
    assert next(backoff) == 1.0


@pytest.mark.parametrize(("first", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_schedule_needs_a_positive_first_wait_below_its_cap(first: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first, cap)
