"""The allocation engine: a state machine over plain data, with time passed in.

Every event handler returns the effects (messages) it decided on, in the order they must be
published: reductions and stops before any new grant, so a substation is never over its limit
in between. Guarantees (see docs/balancing.md and the tests):

1. capacity: on every substation, base load + power granted <= capacity less the safety margin;
   grants count from the moment they are made, before telemetry shows them;
2. placement: largest grant available (down to ``min_kw``), then least utilisation after placement;
3. no headroom: a bounded queue, priority then arrival, served as capacity frees;
4. stale/offline substations get nothing; sessions on an offline or lost one are revoked and re-queued;
5. idempotent: the same (ev_id, request_id) gets the same (latest) answer, one open request per EV.

:class:`Balancer` is a façade: each job lives in a module of its own (ledger, placement, rebalancing,
queue_service, liveness, agent_events, ev_requests, control, coalescing; policies in ``policies/``).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from balancer.core.agent_events import AgentEvents
from balancer.core.coalescing import coalesce
from balancer.core.config import CoreConfig
from balancer.core.control import OperatorControl
from balancer.core.effects import Effect, ToEv
from balancer.core.ev_requests import EvRequests
from balancer.core.ledger import Closed, EvState, Ledger
from balancer.core.limit_effects import horizon
from balancer.core.limits import Schedule
from balancer.core.liveness import Liveness
from balancer.core.model import OperatorSettings, Session, Substation, w_to_kw
from balancer.core.placement import Placement
from balancer.core.policies import make_policy
from balancer.core.policies.fair import Deadline
from balancer.core.queue import RequestQueue
from balancer.core.queue_service import QueueService
from balancer.core.rebalancing import Rebalancer
from balancer.core.schedules import LimitFollower
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState
from grid_protocol.messages import (
    Assignment,
    ChargeRequest,
    ControlCommand,
    LimitSchedule,
    Release,
    ScheduleState,
    SessionEvent,
    Telemetry,
)
from grid_protocol.reasons import Reason

__all__ = ["Balancer", "CoreConfig"]


def _counter_ids(prefix: str = "s") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


@dataclass
class Balancer:
    config: CoreConfig = field(default_factory=CoreConfig)
    new_session_id: Callable[[], str] = field(default_factory=_counter_ids)
    new_request_id: Callable[[], str] = field(default_factory=lambda: _counter_ids("auto-"))

    def __post_init__(self) -> None:
        self.policy = make_policy(self.config)
        self.state = st = CoreState(self.config, self.new_session_id, self.new_request_id)
        self.ledger = Ledger(st)
        self.book = SessionBook(st, self.ledger)
        self.rebalancer = Rebalancer(st, self.book, self.policy)
        self.placement = Placement(st, self.book, self.rebalancer, self.policy)
        self.queue_service = QueueService(st, self.ledger, self.book, self.placement)
        self.liveness = Liveness(st, self.book, self.rebalancer, self.queue_service)
        self.agent_events = AgentEvents(st, self.ledger, self.book, self.rebalancer, self.queue_service)
        self.ev_requests = EvRequests(st, self.ledger, self.book, self.placement, self.queue_service)
        self.control = OperatorControl(st, self.book, self.rebalancer, self.queue_service, self.liveness,
                                       self.policy)
        self.limits = LimitFollower(st, self.ledger, self.book, self.rebalancer, self.queue_service)
        if isinstance(self.policy, Deadline):  # it counts the power the substation's limit schedule will leave
            self.policy.horizon = lambda sessions, now: horizon(
                st, st.substations[sessions[0].substation_id], sessions, now) if sessions else (
                lambda departure, _r, _m: departure - now)

    # ------------------------------------------------------------------ shared state, by its old names
    @property
    def substations(self) -> dict[str, Substation]:
        return self.state.substations

    @property
    def schedules(self) -> dict[str, Schedule]:
        return self.state.schedules

    @property
    def schedule_dirty(self) -> set[str]:
        return self.state.schedule_dirty

    @property
    def queue(self) -> RequestQueue:
        return self.state.queue

    @property
    def counters(self) -> Counter[str]:
        return self.state.counters

    @property
    def queue_waits(self) -> deque[float]:
        return self.state.queue_waits

    @property
    def _sessions(self) -> dict[str, Session]:
        return self.state.sessions

    @property
    def _evs(self) -> dict[str, EvState]:
        return self.ledger.evs

    @property
    def _closed(self) -> OrderedDict[tuple[str, str], Closed]:
        return self.ledger.closed

    @property
    def _ended_sessions(self) -> OrderedDict[str, None]:
        return self.ledger.ended_sessions

    def substation(self, substation_id: str, now: float) -> Substation:
        return self.state.substation(substation_id, now)

    def session_ends(self) -> Iterator[float]:
        return self.state.session_ends()

    def expected_ends(self) -> list[float]:
        return self.state.expected_ends()

    def eta_s(self, position: int, now: float, ends: list[float] | None = None) -> float | None:
        return self.state.eta_s(position, now, ends)

    # ------------------------------------------------------------------ public event handlers
    def on_request(self, ev_id: str, msg: ChargeRequest, now: float) -> list[Effect]:
        return self._coalesce(self.ev_requests.on_request(ev_id, msg, now))

    def on_release(self, ev_id: str, msg: Release, now: float) -> list[Effect]:
        return self._coalesce(self.ev_requests.on_release(ev_id, msg, now))

    def on_telemetry(self, msg: Telemetry, now: float) -> list[Effect]:
        return self._coalesce(self.liveness.on_telemetry(msg, now))

    def on_status(self, substation_id: str, state: str, now: float, *, inventory: bool = False,
                  region: str | None = None, taken_at: float | None = None,
                  announced: int | None = None) -> list[Effect]:
        return self._coalesce(self.liveness.on_status(substation_id, state, now, inventory=inventory, region=region,
                                                      taken_at=taken_at, announced=announced))

    def on_session_event(self, substation_id: str, msg: SessionEvent, now: float) -> list[Effect]:
        return self._coalesce(self.agent_events.on_session_event(substation_id, msg, now))

    def on_control(self, msg: ControlCommand, now: float) -> tuple[Reason | None, str, list[Effect]]:
        """An operator action on one substation (see :class:`balancer.core.control.OperatorControl`)."""
        refused, detail, effects = self.control.on_control(msg, now)
        return refused, detail, self._coalesce(effects)

    def on_limits(self, substation_id: str, msg: LimitSchedule,
                  now: float) -> tuple[Reason | None, str, list[Effect]]:
        """An operator's limit schedule for one source (see :class:`balancer.core.schedules.LimitFollower`)."""
        refused, detail, effects = self.limits.on_limits(substation_id, msg, now)
        return refused, detail, self._coalesce(effects)

    def operator_settings(self) -> dict[str, OperatorSettings]:
        """Drains and capacity limits in force (see :meth:`OperatorControl.settings`): what must survive a restart."""
        return self.control.settings()

    def restore_operator(self, settings: dict[str, OperatorSettings], now: float) -> list[Effect]:
        """Operator settings read back from the store, before any input is acted on."""
        return self._coalesce(self.control.restore(settings, now))

    def restore_schedule(self, state: ScheduleState, now: float) -> list[Effect]:
        """The retained schedule a restarted balancer reads back."""
        return self._coalesce(self.limits.restore(state, now))

    def tick(self, now: float) -> list[Effect]:
        """Periodic work: rebalancing, lost substations, queue updates, expiry of old answers."""
        effects = self.limits.follow(now)  # scheduled limits move with time
        effects += self.liveness.tick(now)
        due = self.rebalancer.due(now)
        for sub in due:
            effects += self.rebalancer.reduce(sub, now)
        effects += self.queue_service.serve(now)
        for sub in due:
            effects += self.rebalancer.raise_(sub, now)
        effects += self.book.requeue_notices(now)
        effects += self.queue_service.updates_due(now)
        self.ledger.expire(now)
        return self._coalesce(effects)

    def reject(self, ev_id: str, request_id: str | None, reason: Reason, detail: str, now: float, *,
               remember: bool = False) -> ToEv:
        """A ``rejected`` answer. ``remember`` keeps it for redeliveries of the same request id."""
        return self.ledger.reject(ev_id, request_id, reason, detail, now, remember=remember)

    def _coalesce(self, effects: list[Effect]) -> list[Effect]:
        return coalesce(effects, self.ledger)

    # ------------------------------------------------------------------ inspection
    def violations(self) -> list[str]:
        """Substations whose commitment exceeds their limit (guarantee 1). Empty when all is well."""
        margin = self.config.safety_margin_pct
        out = []
        for sub in self.substations.values():
            if sub.sessions and sub.committed_w() > sub.limit_w(margin):
                out.append(f"{sub.id}: base {sub.base_load_w} W + granted {sub.granted_w} W "
                           f"> limit {sub.limit_w(margin)} W")
            sessions = sub.sessions.values()
            if (sub.granted_w, sub.requested_w, sub.floors_w) != (
                    sum(s.granted_w for s in sessions), sum(s.request.requested_w for s in sessions),
                    sum(s.request.min_w for s in sessions)):
                out.append(f"{sub.id}: running totals out of step with its sessions")
        return out

    def open_requests(self) -> int:
        return len(self.ledger.evs)

    def session_count(self) -> int:
        return len(self.state.sessions)

    def ev_state(self, ev_id: str) -> Assignment | None:
        state = self.ledger.evs.get(ev_id)
        return state.answer if state else None

    def snapshot(self, now: float) -> dict[str, Any]:
        cfg = self.config
        subs = []
        for sub in sorted(self.substations.values(), key=lambda s: s.id):
            subs.append({
                "substation_id": sub.id,
                "capacity_kw": w_to_kw(sub.capacity_w),
                "limit_kw": w_to_kw(sub.limit_w(cfg.safety_margin_pct)),
                "base_load_kw": w_to_kw(sub.base_load_w),
                "load_kw": w_to_kw(sub.load_w),
                "granted_kw": w_to_kw(sub.granted_w),
                "headroom_kw": w_to_kw(sub.headroom_w(now, cfg.safety_margin_pct, cfg.stale_after_s)),
                "sessions": len(sub.sessions),
                "status": sub.status,
                "fresh": sub.is_fresh(now, cfg.stale_after_s),
                "lost": sub.lost,
            })
        return {"substations": subs, "queue_length": len(self.queue), "open_requests": len(self.ledger.evs),
                "sessions": len(self.state.sessions)}

