"""Bounded waiting queue ordered by priority (highest first), then arrival."""

from __future__ import annotations

import bisect

from balancer.core.model import PendingRequest


class RequestQueue:
    __slots__ = ("_by_ev", "_keys", "maxlen")

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._keys: list[tuple[int, int, str]] = []  # (-priority, arrival, ev_id), kept sorted
        self._by_ev: dict[str, PendingRequest] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, ev_id: str) -> bool:
        return ev_id in self._by_ev

    def full(self) -> bool:
        return len(self._keys) >= self.maxlen

    def push(self, req: PendingRequest, *, force: bool = False) -> int:
        """Insert and return the 1-based position. ``force`` admits beyond ``maxlen`` (for requests
        the balancer already accepted and must not drop, e.g. a revoked session going back in line)."""
        if not force and self.full():
            raise OverflowError("queue full")
        key = (*req.queue_key, req.ev_id)
        idx = bisect.bisect_left(self._keys, key)
        self._keys.insert(idx, key)
        self._by_ev[req.ev_id] = req
        return idx + 1

    def head(self) -> PendingRequest | None:
        return self._by_ev[self._keys[0][2]] if self._keys else None

    def pop_head(self) -> PendingRequest:
        key = self._keys.pop(0)
        return self._by_ev.pop(key[2])

    def get(self, ev_id: str) -> PendingRequest | None:
        return self._by_ev.get(ev_id)

    def remove(self, ev_id: str) -> PendingRequest | None:
        req = self._by_ev.pop(ev_id, None)
        if req is not None:
            key = (*req.queue_key, ev_id)
            idx = bisect.bisect_left(self._keys, key)
            del self._keys[idx]
        return req

    def position(self, ev_id: str) -> int | None:
        req = self._by_ev.get(ev_id)
        if req is None:
            return None
        return bisect.bisect_left(self._keys, (*req.queue_key, ev_id)) + 1

    def items(self) -> list[PendingRequest]:
        return [self._by_ev[k[2]] for k in self._keys]

    def first(self, n: int) -> list[PendingRequest]:
        """The first ``n`` in line (without copying the whole queue)."""
        return [self._by_ev[k[2]] for k in self._keys[:n]]
