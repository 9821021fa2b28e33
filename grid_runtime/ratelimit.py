"""Rate-limited logging: a flood (a full buffer, a misbehaving publisher) costs one log line per interval,
each saying how many occurrences it stands for, so nothing is silent and the log stays readable."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """Calls ``emit(event, count=<since last line>, **fields)`` at most once per ``interval_s`` per key."""

    def __init__(self, emit: Callable[..., None], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._interval = interval_s
        self._clock = clock
        self._last: dict[object, float] = {}
        self._pending: dict[object, int] = {}

    def __call__(self, key: object, event: str, n: int = 1, **fields: Any) -> bool:
        """Count ``n`` occurrences; log now if the key's interval has passed. True when a line was logged."""
        count = self._pending.get(key, 0) + n
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._pending[key] = count
            return False
        self._last[key] = now
        self._pending[key] = 0
        self._emit(event, count=count, **fields)
        return True

    def pending(self, key: object) -> int:
        """Occurrences counted but not logged yet (logged at the next line for that key)."""
        return self._pending.get(key, 0)
