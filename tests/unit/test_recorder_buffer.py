"""The bounded buffer drops the oldest points when full, counts every one and logs (rate-limited)."""

from __future__ import annotations

import logging

import pytest

from grid_runtime.ratelimit import RateLimitedLog
from monitoring.recorder.buffer import PointBuffer
from monitoring.recorder.metrics import RecorderStats
from monitoring.recorder.points import Point, make_line


def pts(*seqs: int) -> list[str]:
    return [make_line("substation_telemetry", 1.0 + s, {"substation_id": "A"}, {"seq": s}) for s in seqs]


def seqs(points: list[str]) -> list[int]:
    return [int(Point.parse(p).field("seq") or 0) for p in points]


def test_full_buffer_drops_the_oldest_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    stats = RecorderStats()
    buf = PointBuffer(5, stats, log_interval_s=60)
    caplog.set_level(logging.WARNING)
    buf.add(pts(1, 2, 3))
    buf.add(pts(4, 5, 6, 7))
    buf.add(pts(8))
    assert len(buf) == 5 and stats.points_queued == 8
    assert stats.points_dropped["buffer_full"] == 3
    assert seqs(buf.take(10)) == [4, 5, 6, 7, 8]
    # one line for the first drop (2 points); the next (1 point) is held back by the rate limit ...
    lines = [r for r in caplog.records if r.getMessage() == "buffer_full_dropping_oldest"]
    assert [r.fields["count"] for r in lines] == [2]  # type: ignore[attr-defined]
    buf.flush_drop_log()  # ... and logged at shutdown, so no drop goes unlogged
    lines = [r for r in caplog.records if r.getMessage() == "buffer_full_dropping_oldest"]
    assert [r.fields["count"] for r in lines] == [2, 1]  # type: ignore[attr-defined]


def test_accounting_invariant_holds_under_any_mix() -> None:
    stats = RecorderStats()
    buf = PointBuffer(7, stats)
    taken = 0
    for i in range(50):
        buf.add(pts(*range(i % 5)))
        if i % 3 == 0:
            taken += len(buf.take(4))
        assert stats.points_queued == taken + stats.dropped_total() + len(buf)


def test_batch_ready_fires_when_the_batch_size_is_reached() -> None:
    fired: list[int] = []
    buf = PointBuffer(100, RecorderStats(), batch_size=3, on_batch_ready=lambda: fired.append(1))
    buf.add(pts(1, 2))
    assert not fired
    buf.add(pts(3))
    assert fired == [1]
    buf.add(pts(4))  # still above: no second wake-up until it fell below
    assert fired == [1]


def test_rate_limited_log_counts_what_it_holds_back() -> None:
    now = [0.0]
    lines: list[dict[str, object]] = []
    limited = RateLimitedLog(lambda event, **f: lines.append({"event": event, **f}), 10.0, clock=lambda: now[0])
    assert limited("k", "dropped", 5, why="full")
    assert not limited("k", "dropped", 3)
    assert limited("other", "bad", 1)  # keys are independent
    now[0] = 9.9
    assert not limited("k", "dropped", 2)
    assert limited.pending("k") == 5
    now[0] = 10.0
    assert limited("k", "dropped", 1)
    assert [(x["event"], x["count"]) for x in lines] == [("dropped", 5), ("bad", 1), ("dropped", 6)]
