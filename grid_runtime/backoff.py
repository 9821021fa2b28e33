"""Back-off between retries, defined once for every reconnect and retry loop: tenacity's exponential wait.

Our loops (a transport staying connected, the recorder re-sending a batch) run until stopped and start a fresh
streak after a success, which tenacity's retry controllers do not model; so :class:`Backoff` drives tenacity's
wait strategy (``wait_exponential``) itself instead of wrapping a call in ``Retrying``.
"""

from __future__ import annotations

from tenacity import RetryCallState, Retrying, wait_exponential

__all__ = ["Backoff"]


class Backoff:
    """The delays of one failure streak: ``first_s``, twice that, four times, ... capped at ``max_s``.

    An iterator (``next(backoff)`` is the delay to wait now); :attr:`upcoming` says it without using it up (for a
    log line), :meth:`reset` starts a new streak after a success.
    """

    __slots__ = ("_state", "_wait")

    def __init__(self, first_s: float, max_s: float) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError(f"need 0 < first_s <= max_s, got {first_s!r}, {max_s!r}")
        self._wait = wait_exponential(multiplier=first_s, max=max_s)
        self._state = RetryCallState(Retrying(), None, (), {})

    @property
    def upcoming(self) -> float:
        return float(self._wait(self._state))

    def __iter__(self) -> Backoff:
        return self

    def __next__(self) -> float:
        delay = self.upcoming
        self._state.attempt_number += 1
        return delay

    def reset(self) -> None:
        self._state.attempt_number = 1
