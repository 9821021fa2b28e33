"""An index of the substations that can take a new session, kept by the policy so placement does not scan the
grid: refiled when a substation's numbers change (its id in ``CoreState.touched``), not per request.

Substations are grouped by capacity; within a group they are ordered by the policy's key, so a group's best
candidate is its first and a placement looks at one entry per capacity class (a real grid has a handful:
transformer sizes), not at every substation. A second order holds every substation by its room, the most
first (the most any new session could get now), unless the groups are ordered by room already (``by_room``).
Telemetry going stale is a matter of time, not of an event: an entry found stale is dropped when a query meets
it, and refiled by the next telemetry.

Upkeep is per refile, so it must cost less than the scan it replaces even on a grid of four: every placement and
most telemetry move a substation's key, but rarely past a neighbour's. The orders are plain lists kept sorted
(bisect in C; a list of a few thousand entries moves in a microsecond): a moved key that keeps its place is
written over in place, and a refile that moves nothing (same class, key and room) touches nothing.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from balancer.core.model import Substation

#: a substation's order within its capacity group; the last element is its id
OrderKey = tuple[int, str]
#: what a new session could get there now and its order key, in one call (a refile runs per placement and per
#: telemetry message: both come from the same few numbers); None when nothing could be placed there
Entry = Callable[[Substation, float], "tuple[int, OrderKey] | None"]


class SubstationIndex:
    __slots__ = ("_entry", "_filed", "_groups", "_heads", "_heads_at", "_rooms", "stale_after_s")

    def __init__(self, entry: Entry, stale_after_s: float, *, by_room: bool = False) -> None:
        """``by_room``: the order key is ``(-room, id)``, so each group's first fresh member is also its most
        room, and the most room anywhere is the most among the group heads: no second order to keep."""
        self._entry = entry
        self.stale_after_s = stale_after_s
        self._groups: dict[int, list[OrderKey]] = {}  # capacity_w -> order keys, sorted
        self._rooms: list[tuple[int, str]] | None = None if by_room else []  # (-room, id), sorted
        self._filed: dict[str, tuple[int, OrderKey, int]] = {}  # id -> (capacity_w, order key, room)
        #: the group heads as last read and when: read again at the same time and with no refile between, they are
        #: the same (a request reads them two or three times: the most room, then placing, then the most room again)
        self._heads: list[tuple[str, int]] | None = None
        self._heads_at = 0.0

    def __len__(self) -> int:
        return len(self._filed)

    def refile(self, substation_id: str, sub: Substation | None, now: float) -> None:
        """File ``sub`` at its current numbers (``None``: it is gone)."""
        old = self._filed.get(substation_id)
        entry = None if sub is None else self._entry(sub, now)
        if entry is None or sub is None:
            if old is not None:
                self._heads = None
                del self._filed[substation_id]
                capacity, key, old_room = old
                group = self._groups[capacity]
                _remove(group, key)
                if not group:
                    del self._groups[capacity]
                if self._rooms is not None:
                    _remove(self._rooms, (-old_room, substation_id))
            return
        room, key = entry
        capacity = sub.capacity_w
        rooms = self._rooms
        if old is None:
            self._heads = None
            insort(self._groups.setdefault(capacity, []), key)
            if rooms is not None:
                insort(rooms, (-room, substation_id))
        else:
            old_capacity, old_key, old_room = old
            if old_capacity == capacity and old_key == key and old_room == room:
                return  # (the heads kept stay true: nothing moved)
            self._heads = None
            if old_capacity == capacity:
                _move(self._groups[capacity], old_key, key)
            else:
                group = self._groups[old_capacity]
                _remove(group, old_key)
                if not group:
                    del self._groups[old_capacity]
                insort(self._groups.setdefault(capacity, []), key)
            if old_room != room and rooms is not None:
                _move(rooms, (-old_room, substation_id), (-room, substation_id))
        self._filed[substation_id] = (capacity, key, room)

    def room_w(self, substation_id: str) -> int:
        return self._filed[substation_id][2]

    def _fresh(self, substation_id: str, subs: Mapping[str, Substation], now: float) -> bool:
        """Still fresh; a stale one is dropped (its next telemetry refiles it)."""
        sub = subs.get(substation_id)
        if sub is not None and (at := sub.last_telemetry_at) is not None and now - at <= self.stale_after_s:
            return True  # (Substation.is_fresh, inlined: a query checks one or two per placement)
        self.refile(substation_id, None, now)
        return False

    def max_room_w(self, subs: Mapping[str, Substation], now: float) -> int:
        rooms = self._rooms
        if rooms is None:
            most = 0
            for _, room in self.group_heads(subs, now):
                if room > most:
                    most = room
            return most
        while rooms:
            neg_room, sid = rooms[0]
            if self._fresh(sid, subs, now):
                return -neg_room
        return 0

    def group_heads(self, subs: Mapping[str, Substation], now: float) -> list[tuple[str, int]]:
        """Each capacity group's first fresh substation, with its room (kept between reads at the same ``now`` with
        no refile between: the caller must not change the list)."""
        heads = self._heads
        if heads is not None and now == self._heads_at:
            return heads
        heads = self._read_heads(subs, now)
        self._heads, self._heads_at = heads, now
        return heads

    def _read_heads(self, subs: Mapping[str, Substation], now: float) -> list[tuple[str, int]]:
        heads = []
        filed, stale_after_s = self._filed, self.stale_after_s
        for group in list(self._groups.values()):
            while group:  # (a stale head's refile deletes it from this same list)
                sid = group[0][-1]
                sub = subs.get(sid)
                if sub is not None and (at := sub.last_telemetry_at) is not None and now - at <= stale_after_s:
                    heads.append((sid, filed[sid][2]))
                    break
                self.refile(sid, None, now)
        return heads

    def group_members(self, subs: Mapping[str, Substation], now: float) -> Iterator[Iterator[str]]:
        """Each capacity group's fresh substations, in order (stale ones met are dropped afterwards)."""
        for capacity in list(self._groups):
            group = self._groups.get(capacity)
            if group is None:
                continue
            stale: list[str] = []
            yield self._members(group, subs, now, stale)
            for sid in stale:
                self.refile(sid, None, now)

    def _members(self, group: list[tuple[int, str]], subs: Mapping[str, Substation], now: float,
                 stale: list[str]) -> Iterator[str]:
        for key in group:
            sid = key[-1]
            sub = subs.get(sid)
            if sub is not None and sub.is_fresh(now, self.stale_after_s):
                yield sid
            else:
                stale.append(sid)


def _remove(keys: list[Any], key: Any) -> None:
    """Remove ``key`` (present: keys are unique, their last element an id) from the sorted list."""
    del keys[bisect_left(keys, key)]


def _move(keys: list[Any], old: Any, new: Any) -> None:
    """Replace ``old`` by ``new`` in the sorted list: in place when it keeps its position (the usual case)."""
    i = bisect_left(keys, old)
    if (i == 0 or keys[i - 1] < new) and (i + 1 == len(keys) or new < keys[i + 1]):
        keys[i] = new
        return
    del keys[i]
    insort(keys, new)
