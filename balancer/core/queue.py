"""Bounded waiting queue ordered by priority (highest first), then arrival.

Sorted containers (``sortedcontainers``): insert, remove, position and the n-th in line cost O(log n), so a
long queue costs no more per request than a short one; the smallest ``min_w`` waiting is kept too, so serving
the queue stops as soon as nothing waiting can fit. Waiting requests share a handful of ``min_w`` values (the
default minimum, a few chargers' own): counted per value, with a heap of the values present, so a request
joining or leaving costs a dict update, not a sorted insert.
"""

from __future__ import annotations

import heapq

from sortedcontainers import SortedList

from balancer.core.model import PendingRequest


class RequestQueue:
    __slots__ = ("_by_ev", "_first", "_keys", "_min_heap", "_min_ws", "maxlen")

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._keys: SortedList = SortedList()  # (-priority, arrival, ev_id)
        self._min_ws: dict[int, int] = {}  # min_w -> requests waiting with it
        self._min_heap: list[int] = []  # the values in _min_ws (and some that left it: dropped when met at the top)
        self._by_ev: dict[str, PendingRequest] = {}
        #: the head's key, kept (read per request: ``SortedList.__getitem__`` is a Python call)
        self._first: tuple[int, int, str] | None = None

    def __len__(self) -> int:
        return len(self._by_ev)  # (the same count as the keys', without SortedList.__len__'s Python call)

    def __contains__(self, ev_id: str) -> bool:
        return ev_id in self._by_ev

    def full(self) -> bool:
        return len(self._by_ev) >= self.maxlen

    def push(self, req: PendingRequest, *, force: bool = False) -> int:
        """Insert and return the 1-based position. ``force`` admits beyond ``maxlen`` (for requests
        the balancer already accepted and must not drop, e.g. a revoked session going back in line)."""
        if not force and self.full():
            raise OverflowError("queue full")
        key = (*req.queue_key, req.ev_id)
        self._keys.add(key)
        first = self._first
        if first is None or key < first:
            self._first = key
        self._add_min(req.min_w)
        self._by_ev[req.ev_id] = req
        return self._keys.bisect_left(key) + 1

    def head(self) -> PendingRequest | None:
        first = self._first
        return None if first is None else self._by_ev[first[2]]

    def at(self, index: int) -> PendingRequest:
        """The request at 0-based ``index`` in line."""
        key = self._first if index == 0 else None  # (serving reads the head first)
        return self._by_ev[(self._keys[index] if key is None else key)[2]]

    def pop_head(self) -> PendingRequest:
        return self.remove_at(0)

    def remove_at(self, index: int) -> PendingRequest:
        """Take the request at 0-based ``index`` in line out (serving the queue: it was just read with ``at``, so
        no search for its key)."""
        keys = self._keys
        key = keys.pop(index)
        req = self._by_ev.pop(key[2])
        if key == self._first:
            self._first = keys[0] if self._by_ev else None
        self._remove_min(req.min_w)
        return req

    def get(self, ev_id: str) -> PendingRequest | None:
        return self._by_ev.get(ev_id)

    def remove(self, ev_id: str) -> PendingRequest | None:
        req = self._by_ev.pop(ev_id, None)
        if req is not None:
            key = (*req.queue_key, ev_id)
            keys = self._keys
            keys.remove(key)
            if key == self._first:
                self._first = keys[0] if self._by_ev else None
            self._remove_min(req.min_w)
        return req

    def position(self, ev_id: str) -> int | None:
        req = self._by_ev.get(ev_id)
        if req is None:
            return None
        return self._keys.bisect_left((*req.queue_key, ev_id)) + 1

    def _add_min(self, min_w: int) -> None:
        count = self._min_ws.get(min_w, 0)
        self._min_ws[min_w] = count + 1
        if not count:
            heap = self._min_heap
            if len(heap) > 2 * len(self._min_ws) + 16:  # values that left below the top: rebuild (amortised O(1))
                heap[:] = self._min_ws
                heapq.heapify(heap)
            else:
                heapq.heappush(heap, min_w)

    def _remove_min(self, min_w: int) -> None:
        count = self._min_ws[min_w] - 1
        if count:
            self._min_ws[min_w] = count
        else:
            del self._min_ws[min_w]

    def smallest_min_w(self) -> int | None:
        """The least any waiting request can run with (None: nobody waits)."""
        heap, present = self._min_heap, self._min_ws
        while heap and heap[0] not in present:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def items(self) -> list[PendingRequest]:
        return [self._by_ev[k[2]] for k in self._keys]

    def first(self, n: int) -> list[PendingRequest]:
        """The first ``n`` in line (without copying the whole queue)."""
        return [self._by_ev[k[2]] for k in self._keys.islice(0, n)]
