"""The operator's event log: what changed on the grid, in words, newest last (pure: time is passed in).

Fed by the state store: operator actions as the balancer confirmed them (drain, undrain, capacity limits,
decommissioning), capacity changes the agents report (their schedules), revocations, substations going stale,
offline, overloaded and back, the balancer going offline and back, and accounts this API added or removed.
Bounded (the latest ``size`` events). A burst of revocations on one substation for one reason (a substation going
offline with 50 sessions) is one event with a count, not 50 lines that push everything else out.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any

#: Revocations on one substation for one reason within this many seconds are counted in one event.
MERGE_WINDOW_S = 5.0
#: A substation seen for the first time settles this long before its condition is news (an agent that just
#: connected is "stale" until its first telemetry, and briefly offline in the balancer's first state).
SETTLE_S = 5.0


@dataclass(slots=True)
class Event:
    id: int
    ts: float
    kind: str
    text: str
    substation_id: str | None = None
    ev_id: str | None = None
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts, "kind": self.kind, "text": self.text,
                "substation_id": self.substation_id, "ev_id": self.ev_id, "count": self.count}


class EventLog:
    def __init__(self, size: int = 200) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._ids = itertools.count(1)
        #: the last condition seen per substation (ok, draining, overloaded, stale, offline), and when it was
        #: first seen
        self._conditions: dict[str, str] = {}
        self._first_seen: dict[str, float] = {}

    def add(self, now: float, kind: str, text: str, *, substation_id: str | None = None,
            ev_id: str | None = None) -> Event:
        event = Event(next(self._ids), now, kind, text, substation_id, ev_id)
        self._events.append(event)
        return event

    def revoked(self, now: float, substation_id: str | None, ev_id: str, reason: str | None) -> None:
        for event in reversed(self._events):
            if now - event.ts > MERGE_WINDOW_S:
                break
            if event.kind == "revoked" and event.substation_id == substation_id and event.text.endswith(
                    f"({reason})"):
                event.count += 1
                event.ev_id = None
                event.text = f"{event.count} sessions revoked on {substation_id} ({reason})"
                return
        self.add(now, "revoked", f"{ev_id}'s session revoked on {substation_id} ({reason})",
                 substation_id=substation_id, ev_id=ev_id)

    def conditions(self, now: float, views: list[dict[str, Any]]) -> None:
        """Note substations whose condition changed since the last call (the live hub calls this every cycle)."""
        seen = set()
        for view in views:
            sid, condition = view["substation_id"], view["condition"]
            seen.add(sid)
            first = self._first_seen.setdefault(sid, now)
            if now - first < SETTLE_S:
                continue  # settling: what it is after that counts
            before = self._conditions.get(sid)
            self._conditions[sid] = condition
            if before == condition or (before is None and condition in ("ok", "draining")):
                continue  # (a substation in a normal condition when first judged is not news)
            if condition in ("stale", "offline", "overloaded"):
                detail = {"stale": f"no telemetry for {view['telemetry_age_s']} s" if view["telemetry_age_s"]
                          is not None else "no telemetry", "offline": "its status is offline",
                          "overloaded": f"load {view['load_kw']} kW > capacity {view['capacity_kw']} kW"}[condition]
                self.add(now, condition, f"{sid} is {condition}: {detail}", substation_id=sid)
            elif before in ("stale", "offline", "overloaded"):
                self.add(now, "recovered", f"{sid} is {condition} again (was {before})", substation_id=sid)
        for sid in set(self._first_seen) - seen:  # forgotten: its removal was logged where it happened
            self._conditions.pop(sid, None)
            del self._first_seen[sid]

    def forget(self, sid: str) -> None:
        self._conditions.pop(sid, None)
        self._first_seen.pop(sid, None)

    def latest(self, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        return [e.to_dict() for e in list(self._events)[-limit:][::-1]]

    @property
    def last_id(self) -> int:
        return self._events[-1].id if self._events else 0

    def __len__(self) -> int:
        return len(self._events)
