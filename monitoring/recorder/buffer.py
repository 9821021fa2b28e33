"""The bounded point buffer between the MQTT side (producer) and the writer (consumer).

A point is one line of line protocol (``points.py`` builds it on the MQTT side, so the writer only joins).

Adding never blocks and never fails: when the buffer is full the **oldest** points are dropped (while the
database is away, the newest data is the most useful when it comes back), counted as
``points_dropped{reason="buffer_full"}`` and logged at most once per interval with how many went.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from grid_runtime.logs import get_logger
from grid_runtime.ratelimit import RateLimitedLog
from monitoring.recorder.metrics import RecorderStats

log = get_logger("recorder.buffer")


class PointBuffer:
    def __init__(self, max_points: int, stats: RecorderStats, *, log_interval_s: float = 10.0,
                 batch_size: int = 1, on_batch_ready: Callable[[], None] | None = None) -> None:
        if max_points < 1:
            raise ValueError("max_points must be >= 1")
        self.max_points = max_points
        self.stats = stats
        self._points: deque[str] = deque()
        self._batch_size = batch_size
        self._on_batch_ready = on_batch_ready
        self._drop_log = RateLimitedLog(log.warning, log_interval_s)

    def __len__(self) -> int:
        return len(self._points)

    def add(self, points: Iterable[str]) -> None:
        """Append ``points``; drop (and count) the oldest beyond ``max_points``."""
        before = len(self._points)
        self._points.extend(points)
        added = len(self._points) - before
        self.stats.points_queued += added
        overflow = len(self._points) - self.max_points
        if overflow > 0:
            for _ in range(overflow):
                self._points.popleft()
            self.stats.points_dropped["buffer_full"] += overflow
            self._drop_log("buffer_full", "buffer_full_dropping_oldest", overflow, max_points=self.max_points,
                           dropped_total=self.stats.points_dropped["buffer_full"])
        if self._on_batch_ready is not None and len(self._points) >= self._batch_size > before:
            self._on_batch_ready()

    def take(self, n: int) -> list[str]:
        """Remove and return up to ``n`` of the oldest points."""
        n = min(n, len(self._points))
        return [self._points.popleft() for _ in range(n)]

    def flush_drop_log(self) -> None:
        """Log drops that the rate limit held back (called at shutdown so no count goes unlogged)."""
        self._drop_log.flush("buffer_full")
