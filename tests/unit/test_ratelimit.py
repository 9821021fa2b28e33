"""Rate-limited logging: one line per interval per key, each with the count it stands for, none lost."""

from __future__ import annotations

import asyncio
from typing import Any

from grid_runtime.ratelimit import RateLimitedLog


def test_a_burst_that_stops_is_still_reported_when_its_interval_ends() -> None:
    lines: list[dict[str, Any]] = []

    async def burst() -> None:
        limited = RateLimitedLog(lambda event, **f: lines.append({"event": event, **f}), 0.2)
        for _ in range(5):
            limited("k", "dropped", reason="full")
        limited("other", "refused")
        assert [line["count"] for line in lines] == [1, 1]  # first of each key at once, the rest held back
        await asyncio.sleep(0.35)  # the burst stopped: the held-back four are logged by the timer
        assert lines[-1] == {"event": "dropped", "count": 4, "reason": "full"}
        assert limited.pending("k") == 0

    asyncio.run(burst())
    assert len(lines) == 3


def test_without_a_loop_the_next_line_carries_the_held_back_count() -> None:
    now = [0.0]
    lines: list[int] = []
    limited = RateLimitedLog(lambda event, **f: lines.append(f["count"]), 10.0, clock=lambda: now[0])
    for _ in range(3):
        limited("k", "x")
    assert lines == [1] and limited.pending("k") == 2
    now[0] = 11.0
    limited("k", "x")
    assert lines == [1, 3]
