"""Each substation's sessions kept by share class, so a sharing pass costs O(classes), not O(sessions) (issue 10).

Under a water-filling policy every session with the same (floor, cap, weight) gets the same share: a class's
sessions are kept in one :class:`ShareClass` ordered by their grant, so the sessions a pass must change (at least a
step above their share, or below it while power is free) are found by bisection, and the pass touches only those.
Sessions changed within the hold time are kept apart (``held``, with a heap of when each change was made) until
their hold ends: a pass never looks at them, where the full pass skipped them one by one.

Kept in step by :class:`~balancer.core.sessions.SessionBook` (a session starts, its grant changes, it ends); a held
session's grant is read from the session itself, so a grant written at once by placement (a new session is held)
is never out of step. :meth:`ShareTables.check` compares the whole against the sessions (tests).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from sortedcontainers import SortedList

from balancer.core.allocation import ClassEvents
from balancer.core.model import Session, Substation

#: (floor W, cap W, weight)
ClassKey = tuple[int, int, float]


class ShareClass:
    """The sessions of one (floor, cap, weight) on one substation; ``ready`` holds those past their hold time as
    (grant, attach order, session id), ascending."""

    __slots__ = ("cap", "count", "floor", "ready", "weight")

    def __init__(self, key: ClassKey) -> None:
        self.floor, self.cap, self.weight = key
        self.count = 0
        self.ready: SortedList = SortedList()


class ShareTable:
    """One substation's sessions by share class."""

    __slots__ = ("classes", "events", "filed", "held", "holds", "no_cuts", "seen_at", "shares", "version")

    def __init__(self) -> None:
        self.classes: dict[ClassKey, ShareClass] = {}
        #: session id -> (class key, attach order, the grant it is filed under in ``ready``, or None while held)
        self.filed: dict[str, tuple[ClassKey, int, int | None]] = {}
        self.held: dict[str, Session] = {}
        self.holds: list[tuple[float, int, str]] = []  # (last change, attach order, session id): a heap
        self.seen_at = float("-inf")  # the latest time a pass looked (a clock that steps back: see ready_at)
        self.version = 0  # bumped when a session comes or goes (the classes' counts change)
        #: (version, power shared, least room below a cut line less the step, each class's cut line less the step
        #: there): no pass without shedding cuts anyone down to a floor drawn from them while the classes are the
        #: same (see ``Rebalancer._no_cuts``); a session whose hold ends is folded in (``ready_at``)
        self.no_cuts: tuple[int, int, int, dict[ClassKey, int]] | None = None
        #: the rebalancer's last answer: (version, power shared, the classes, each class's share or None)
        self.shares: tuple[int, int, list[ShareClass], list[int] | None] | None = None
        #: (version, the classes as (floor, cap, weight, count), their breakpoints, None when a weight is not whole)
        #: while the classes stay the same
        self.events: tuple[int, list[tuple[int, int, float, int]], ClassEvents | None] | None = None

    def __len__(self) -> int:
        return len(self.filed)

    def add(self, session: Session, key: ClassKey, order: int) -> None:
        cls = self.classes.get(key)
        if cls is None:
            cls = self.classes[key] = ShareClass(key)
        cls.count += 1
        self.version += 1
        self.filed[session.session_id] = (key, order, None)
        self._hold(session, order)

    def _hold(self, session: Session, order: int) -> None:
        self.held[session.session_id] = session
        heapq.heappush(self.holds, (session.last_change_at, order, session.session_id))
        if len(self.holds) > 2 * len(self.filed) + 16:
            # A substation with room for all its sessions has no pass to move them on (ready_at): drop the entries
            # of sessions gone or changed since, so the heap never outgrows its sessions.
            self.holds = [(s.last_change_at, self.filed[sid][1], sid) for sid, s in self.held.items()]
            heapq.heapify(self.holds)

    def discard(self, session: Session) -> None:
        entry = self.filed.pop(session.session_id, None)
        if entry is None:
            return
        key, order, grant = entry
        cls = self.classes[key]
        cls.count -= 1
        self.version += 1
        if grant is not None:
            cls.ready.remove((grant, order, session.session_id))
        else:
            self.held.pop(session.session_id, None)  # (its heap entry goes when it surfaces)
        if not cls.count:
            del self.classes[key]

    def changed(self, session: Session) -> None:
        """Its grant (and the time of its last change) moved: held again."""
        entry = self.filed.get(session.session_id)
        if entry is None:
            return
        key, order, grant = entry
        if grant is not None:
            self.classes[key].ready.remove((grant, order, session.session_id))
            self.filed[session.session_id] = (key, order, None)
        self._hold(session, order)

    def ready_at(self, now: float, hold_s: float) -> bool:
        """Move the sessions whose hold has ended by ``now`` into their classes' ``ready`` order. False when the
        clock stepped back past a pass already made (a ready session may be held again): then use the full pass."""
        if now < self.seen_at:
            return False
        self.seen_at = now
        holds, held, filed = self.holds, self.held, self.filed
        proof = self.no_cuts
        if proof is not None and proof[0] != self.version:
            proof = None
        room = proof[2] if proof is not None else 0
        while holds and now - holds[0][0] >= hold_s:
            last_change, order, sid = heapq.heappop(holds)
            session = held.get(sid)
            if session is None or session.last_change_at != last_change:
                continue  # ended, or changed again since (a later entry stands for it)
            del held[sid]
            key = filed[sid][0]
            filed[sid] = (key, order, session.granted_w)
            self.classes[key].ready.add((session.granted_w, order, sid))
            if proof is not None:  # (its room below the cut line the proof drew for its class)
                room = min(room, proof[3][key] - session.granted_w)
        if proof is not None and room != proof[2]:
            self.no_cuts = (proof[0], proof[1], room, proof[3])
        return True


class ShareTables:
    """The tables of every substation, kept by the session book; ``key`` gives a session's share class."""

    def __init__(self, key: Callable[[Session], ClassKey]) -> None:
        self.key = key
        self.tables: dict[str, ShareTable] = {}
        self._order = 0

    def table(self, substation_id: str) -> ShareTable | None:
        return self.tables.get(substation_id)

    def attach(self, session: Session) -> None:
        table = self.tables.get(session.substation_id)
        if table is None:
            table = self.tables[session.substation_id] = ShareTable()
        self._order += 1
        table.add(session, self.key(session), self._order)

    def remove(self, session: Session) -> None:
        table = self.tables.get(session.substation_id)
        if table is not None:
            table.discard(session)
            if not len(table):
                del self.tables[session.substation_id]

    def changed(self, session: Session) -> None:
        table = self.tables.get(session.substation_id)
        if table is not None:
            table.changed(session)

    def forget(self, substation_id: str) -> None:
        self.tables.pop(substation_id, None)

    def check(self, sub: Substation) -> Iterator[str]:
        """Where ``sub``'s table is out of step with its sessions (nothing: all is well). For tests."""
        table = self.tables.get(sub.id)
        filed = table.filed if table is not None else {}
        if set(filed) != set(sub.sessions):
            yield f"{sub.id}: sessions filed {sorted(filed)} != {sorted(sub.sessions)}"
            return
        if table is None:
            return
        counts: dict[ClassKey, int] = {}
        for sid, (key, order, grant) in filed.items():
            session = sub.sessions[sid]
            counts[key] = counts.get(key, 0) + 1
            if key != self.key(session):
                yield f"{sid}: filed in class {key}, is {self.key(session)}"
            if grant is None:
                if table.held.get(sid) is not session:
                    yield f"{sid}: neither ready nor held"
            elif grant != session.granted_w or (grant, order, sid) not in table.classes[key].ready:
                yield f"{sid}: filed at {grant} W, granted {session.granted_w} W"
        if {k: c.count for k, c in table.classes.items()} != counts:
            yield f"{sub.id}: class counts out of step"
