"""Rate-limited logging: a flood (a full buffer, a misbehaving publisher) costs one log line per interval,
each saying how many occurrences it stands for, so nothing is silent and the log stays readable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """Calls ``emit(event, count=<since last line>, **fields)`` at most once per ``interval_s`` per key.

    Occurrences held back are logged when the key's interval ends (a timer on the running asyncio loop), so a
    burst that stops is still reported within one interval, not only at the next occurrence; outside a loop
    they wait for the next line of that key (or :meth:`pending`, at shutdown).
    """

    def __init__(self, emit: Callable[..., None], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._interval = interval_s
        self._clock = clock
        self._last: dict[object, float] = {}
        self._pending: dict[object, int] = {}
        self._held: dict[object, tuple[str, dict[str, Any]]] = {}  # the latest held-back line per key
        self._timers: dict[object, asyncio.TimerHandle] = {}

    def __call__(self, key: object, event: str, n: int = 1, **fields: Any) -> bool:
        """Count ``n`` occurrences; log now if the key's interval has passed. True when a line was logged."""
        count = self._pending.get(key, 0) + n
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._pending[key] = count
            self._held[key] = (event, fields)
            self._schedule(key, self._interval - (now - last))
            return False
        self._last[key] = now
        self._pending[key] = 0
        self._emit(event, count=count, **fields)
        return True

    def pending(self, key: object) -> int:
        """Occurrences counted but not logged yet."""
        return self._pending.get(key, 0)

    def _schedule(self, key: object, delay_s: float) -> None:
        if key in self._timers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a plain caller or a test): the next line of this key carries the count
        self._timers[key] = loop.call_later(max(0.0, delay_s), self.flush, key)

    def flush(self, key: object) -> None:
        """Log what is held back for ``key`` now (at shutdown, so no count goes unlogged)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        count = self._pending.get(key, 0)
        if count:
            event, fields = self._held[key]
            self._last[key] = self._clock()
            self._pending[key] = 0
            self._emit(event, count=count, **fields)
