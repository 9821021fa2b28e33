"""Running sessions' expected ends, kept in order as sessions start, change grant and end: the k-th in line's
ETA is the k-th earliest end, read in O(log n) instead of sorting every session's end per answer."""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedList

from balancer.core.model import Session


class SessionEnds:
    __slots__ = ("_by_session", "_ends")

    def __init__(self) -> None:
        self._ends: SortedList = SortedList()  # (expected end, session id)
        self._by_session: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self) -> Iterator[float]:
        return (end for end, _ in self._ends)

    def update(self, session: Session) -> None:
        """(Re)file the session at its current expected end (after a start or a grant change)."""
        self.discard(session.session_id)
        end = session.expected_end()
        if end is not None:
            self._ends.add((end, session.session_id))
            self._by_session[session.session_id] = end

    def discard(self, session_id: str) -> None:
        end = self._by_session.pop(session_id, None)
        if end is not None:
            self._ends.remove((end, session_id))

    def kth(self, k: int) -> float | None:
        """The k-th earliest end (0-based); None when fewer are known."""
        return self._ends[k][0] if k < len(self._ends) else None

    def first(self, n: int) -> list[float]:
        """The ``n`` earliest ends, in order."""
        return [end for end, _ in self._ends.islice(0, n)]
