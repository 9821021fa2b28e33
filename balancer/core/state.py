"""The data every part of the core shares: substations, running sessions, the waiting queue, counters."""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator

from balancer.core.config import CoreConfig
from balancer.core.ends import SessionEnds
from balancer.core.limit_index import LimitIndex
from balancer.core.limits import Schedule, plan_with
from balancer.core.model import OperatorSettings, Session, Substation
from balancer.core.queue import RequestQueue


class CoreState:
    def __init__(self, config: CoreConfig, new_session_id: Callable[[], str],
                 new_request_id: Callable[[], str]) -> None:
        self.config = config
        self.new_session_id = new_session_id
        self.new_request_id = new_request_id
        self.substations: dict[str, Substation] = {}
        self.sessions: dict[str, Session] = {}
        self.queue = RequestQueue(config.queue_max)
        self.arrivals = itertools.count(1)
        self.requeued: list[str] = []  # revoked in this step, waiting for a queued notice
        #: decisions and events by outcome/reason, for the adapter's metrics and logs
        self.counters: Counter[str] = Counter()
        #: how long requests placed from the queue waited (seconds); the adapter drains it into a histogram
        self.queue_waits: deque[float] = deque(maxlen=10_000)
        #: expected ends of the running sessions, in order (queue ETAs)
        self.ends = SessionEnds()
        #: substations whose numbers changed since the placement index last looked (see Placement.refresh)
        self.touched: set[str] = set()
        #: limit schedules by substation (balancer/core/schedules.py), and those whose published view changed
        self.schedules: dict[str, Schedule] = {}
        self.schedule_dirty: set[str] = set()
        #: operator settings restored from the store for substations not heard of yet (applied when they are)
        self.operator_pending: dict[str, OperatorSettings] = {}
        #: why a request waits, without visiting every substation (balancer/core/limit_index.py)
        self.limit_index = LimitIndex(self.substations, self.schedules, config)

    def touch(self, sub: Substation) -> None:
        """``sub``'s load, grants, capacity or availability changed: the indexes refile it before they answer."""
        self.touched.add(sub.id)

    def substation(self, substation_id: str, now: float) -> Substation:
        sub = self.substations.get(substation_id)
        if sub is None:
            sub = self.substations[substation_id] = Substation(substation_id, known_since=now)
            self.touched.add(substation_id)
            # a schedule read back at start may be waiting for it
            plan_with(sub, self.schedules.get(substation_id), now, self.config.limit_lead_s)
            # and the operator's drain and capacity limit, restored from the store at start
            restored = self.operator_pending.pop(substation_id, None)
            if restored is not None:
                sub.draining = restored.draining
                sub.capacity_limit_w = restored.capacity_limit_w
                sub.apply_capacity()
        return sub

    # ------------------------------------------------------------------ expected ends (queue ETAs)
    def session_ends(self) -> Iterator[float]:
        """Expected ends of the running sessions, earliest first."""
        return iter(self.ends)

    def expected_ends(self) -> list[float]:
        return list(self.session_ends())

    def eta_s(self, position: int, now: float, ends: list[float] | None = None) -> float | None:
        """Rough wait for the ``position``-th in line: the position-th earliest expected end of a running
        session (each end frees room for about one session). None when too few ends are known.
        ``ends`` (earliest first) lets a pass over the queue read them once."""
        if ends is not None:
            return round(max(0.0, ends[position - 1] - now), 1) if position <= len(ends) else None
        end = self.ends.kth(position - 1)
        return None if end is None else round(max(0.0, end - now), 1)
