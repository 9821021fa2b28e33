"""What the API knows about the grid: a pure store fed with decoded MQTT messages.

No I/O and no clock: every method that needs the time takes ``now`` (Unix epoch seconds), so the
store is tested with hand-made messages. The MQTT adapter (:mod:`api.mqtt_bridge`) decodes payloads
and calls the ``on_*`` methods; the routes call the query methods, which return plain JSON-ready dicts
(the response models in :mod:`api.schemas` describe them).

Sources, by trust:

* ``substation/{id}/state`` (retained, balancer): capacity, load, grants, headroom, draining, sessions.
* ``substation/{id}/status`` (retained, agent / its last will): online or offline.
* ``substation/{id}/telemetry`` (live): freshness (and load/capacity before the balancer published a state).
* ``balancer/status`` and ``balancer/queue`` (retained).
* ``ev/{id}/assignment`` (live): the latest answers, for the live page and ``GET /evs/{ev_id}``; an answer newer
  than its substation's retained state also corrects ``GET /sessions`` until the state catches up, so a client sees
  its own write at once.
* ``balancer/control/result`` (live): operator actions, for the event log; ``forget`` drops a substation.

Besides: the event log (:mod:`api.events`) and the 15-minute trends (:mod:`api.trends`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import msgspec

from api.events import EventLog
from api.trends import Trends
from grid_protocol.messages import (
    CHARGING_STATUSES,
    DEFAULT_REGION,
    Assignment,
    BalancerStatus,
    ChargeRequest,
    ControlResult,
    QueueState,
    ScheduleState,
    SessionEvent,
    SessionView,
    SubstationState,
    SubstationStatus,
    Telemetry,
)
from grid_protocol.reasons import Reason

#: Granted this close to requested counts as "charging" at full power.
_KW_EPS = 1e-3
#: Answers that are probe noise on the live page (a fleet's "release whatever I left open" before a request): hidden
#: from the latest answers unless asked for.
NOISE_REASONS = frozenset({Reason.NOTHING_TO_RELEASE})
#: Answers newer than their substation's state kept for GET /sessions, and requests sent through this API.
_FRESH_MAX = 5000
#: Decommissioned substations listed (the latest).
_DECOMMISSIONED_MAX = 50
#: Worst first: a substation's condition ranks first, then its utilisation (fullest first), then its id.
CONDITION_RANK = {"offline": 0, "stale": 1, "overloaded": 2, "draining": 3, "ok": 4}
#: The compact form of a substation (``GET /status?compact=true`` and the live feed): one array per substation,
#: in this order. kW to 0.1, utilisation to 0.001 (what a page shows); ``heard_at`` (when its latest measurement
#: was received) only while it is stale or offline, so a fresh substation's row changes only when its figures do.
COMPACT_FIELDS = ("substation_id", "region", "condition", "utilisation", "load_kw", "base_load_kw", "reserved_kw",
                  "capacity_kw", "limit_kw", "capacity_limit_kw", "granted_kw", "headroom_kw", "sessions_total",
                  "draining", "heard_at")
_COMPACT_KW = frozenset(f for f in COMPACT_FIELDS if f.endswith("_kw"))


def worst_first(view: dict[str, Any]) -> tuple[int, float, str]:
    """Sort key: offline, stale, overloaded, draining, ok; within each the fullest first (unknown last)."""
    utilisation = view["utilisation"]
    return (CONDITION_RANK[view["condition"]], -(utilisation if utilisation is not None else -1.0),
            view["substation_id"])


def compact_row(view: dict[str, Any]) -> tuple[Any, ...]:
    """A substation view as one array of :data:`COMPACT_FIELDS` (hashable: the live feed compares rows)."""
    out: list[Any] = []
    for name in COMPACT_FIELDS:
        value = view[name]
        if value is not None:
            if name in _COMPACT_KW:
                value = round(value, 1)
            elif name == "utilisation":
                value = round(value, 3)
            elif name == "heard_at":
                value = round(value, 1) if view["condition"] in ("stale", "offline") else None
        out.append(value)
    return tuple(out)


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(slots=True)
class SubstationEntry:
    id: str
    state: SubstationState | None = None
    status: SubstationStatus | None = None
    telemetry: Telemetry | None = None
    #: when the API received the latest telemetry (its own clock: the agent's may be off)
    telemetry_at: float | None = None

    def known(self) -> bool:
        return self.state is not None or self.status is not None or self.telemetry is not None

    def leftover(self) -> bool:
        """Known only by a retained ``offline`` status (the last will of an agent the balancer has no state for,
        and that this API has not heard telemetry from): a forgotten substation, or one of an earlier run. The
        balancer ignores such a status too; no view shows it."""
        return (self.state is None and self.telemetry is None and self.status is not None
                and self.status.state == "offline")

    def region(self) -> str:
        """The region of the agent's latest status, else the one the balancer carries, else ``default``."""
        if self.status is not None:
            return self.status.region
        return self.state.region if self.state is not None else DEFAULT_REGION


def _status_of(granted_kw: float, requested_kw: float) -> str:
    if granted_kw <= _KW_EPS:
        return "paused"
    if granted_kw + _KW_EPS < requested_kw:
        return "reduced"
    return "charging"


def session_status(s: SessionView) -> str:
    return _status_of(s.granted_kw, s.requested_kw)


def _session_dict(substation_id: str, s: SessionView) -> dict[str, Any]:
    return {
        "session_id": s.session_id, "ev_id": s.ev_id, "substation_id": substation_id,
        "request_id": s.request_id, "status": session_status(s), "granted_kw": s.granted_kw,
        "requested_kw": s.requested_kw, "min_kw": s.min_kw, "priority": s.priority,
        "started_at": s.started_at, "expected_end": s.expected_end,
    }


def _assignment_dict(a: Assignment) -> dict[str, Any]:
    return msgspec.structs.asdict(a)


#: Answers after which the session they name runs no more (completed, cancelled, or taken away and back in line).
_SESSION_GONE = frozenset({"completed", "cancelled", "revoked"})
#: Answers that start, change or end a session (what GET /sessions reflects before the retained state does).
_SESSION_ANSWERS = CHARGING_STATUSES | _SESSION_GONE


class StateStore:
    """The API's view of the grid, rebuilt from retained messages after a restart."""

    def __init__(self, *, stale_after_s: float = 5.0, recent_assignments: int = 50, ev_memory: int = 20_000,
                 started_at: float = 0.0, trend_step_s: float = 10.0) -> None:
        self.stale_after_s = stale_after_s
        self.started_at = started_at
        self.substations: dict[str, SubstationEntry] = {}
        #: the default region's balancer status and queue (what the views show without a region) ...
        self.balancer: BalancerStatus | None = None
        self.queue_state: QueueState | None = None
        #: ... and every region's (issue 12: one balancer per region, each with its retained status and queue)
        self.balancers: dict[str, BalancerStatus] = {}
        self.queues: dict[str, QueueState] = {}
        #: each substation's limit schedule (retained ``substation/{id}/schedule``)
        self.schedules: dict[str, ScheduleState] = {}
        #: the latest answers without probe noise (NOISE_REASONS), and with it
        self.recent: deque[Assignment] = deque(maxlen=recent_assignments)
        self.recent_all: deque[Assignment] = deque(maxlen=recent_assignments)
        #: per EV, its latest session answer that the retained state may not show yet (read-your-writes)
        self._fresh: OrderedDict[str, Assignment] = OrderedDict()
        #: requests sent through this API, by request_id: what a fresh session asked for
        self._requests: OrderedDict[str, ChargeRequest] = OrderedDict()
        #: substations forgotten (DELETE /substations/{id}, the balancer's forget), newest last
        self.decommissioned: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.events = EventLog()
        self.trends = Trends(step_s=trend_step_s)
        self._ev_memory = ev_memory
        self._evs: OrderedDict[str, Assignment] = OrderedDict()
        #: the latest answer that was not a rejection: a rejection leaves what the EV has open as it was
        self._open: OrderedDict[str, Assignment] = OrderedDict()
        self.last_message_at: float | None = None
        #: bumped on every change; the live page sends a snapshot when it moved
        self.version = 0
        #: payloads refused, by ``kind:reason``
        self.decode_errors: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()

    # ------------------------------------------------------------------ inbound
    def _touch(self, kind: str, now: float) -> None:
        self.version += 1
        self.last_message_at = now
        self.messages[kind] += 1

    def _entry(self, sid: str) -> SubstationEntry:
        entry = self.substations.get(sid)
        if entry is None:
            entry = self.substations[sid] = SubstationEntry(sid)
        return entry

    def _forget_if_empty(self, sid: str) -> None:
        entry = self.substations.get(sid)
        if entry is not None and not entry.known():
            del self.substations[sid]

    def on_substation_state(self, sid: str, msg: SubstationState | None, now: float) -> None:
        """``None``: the retained state was cleared (an empty retained message)."""
        if msg is None:
            if sid in self.substations:
                self.substations[sid].state = None
                self._forget_if_empty(sid)
        else:
            entry = self._entry(sid)
            if entry.state is not None and msg.ts < entry.state.ts:
                return  # older than what we have (a control result's snapshot can overtake)
            entry.state = msg
            self.decommissioned.pop(sid, None)  # (an agent with that id came back)
            for ev_id, answer in list(self._fresh.items()):  # the state shows these now
                if answer.substation_id == sid and answer.ts <= msg.ts:
                    del self._fresh[ev_id]
        self._touch("substation_state", now)

    def on_substation_status(self, sid: str, msg: SubstationStatus | None, now: float) -> None:
        if msg is None:
            if sid in self.substations:
                self.substations[sid].status = None
                self._forget_if_empty(sid)
        else:
            self._entry(sid).status = msg
            if msg.state == "online":  # (the last will of a decommissioned agent does not bring it back)
                self.decommissioned.pop(sid, None)
        self._touch("substation_status", now)

    def on_telemetry(self, sid: str, msg: Telemetry, now: float) -> None:
        entry = self._entry(sid)
        before = entry.telemetry
        if before is not None and abs(before.capacity_kw - msg.capacity_kw) > _KW_EPS:
            self.events.add(now, "capacity", f"{sid} reports a capacity of {msg.capacity_kw:g} kW "
                                             f"(was {before.capacity_kw:g} kW)", substation_id=sid)
        entry.telemetry = msg
        entry.telemetry_at = now
        self.decommissioned.pop(sid, None)
        limit = entry.state.limit_kw if entry.state is not None else None
        self.trends.sample(sid, now, msg.load_kw, msg.ev_load_kw, limit)
        self._touch("telemetry", now)

    def on_session_event(self, sid: str, msg: SessionEvent, now: float) -> None:
        # Sessions are read from the balancer's state; events only make the page refresh sooner.
        self._touch("session_event", now)

    def on_balancer_status(self, msg: BalancerStatus | None, now: float, region: str = DEFAULT_REGION) -> None:
        last = self.balancers.get(region)
        before = last.state if last is not None else None
        if msg is not None and before is not None and msg.state != before:
            whose = "the balancer" if region == DEFAULT_REGION else f"the balancer of region {region}"
            self.events.add(now, f"balancer_{msg.state}", f"{whose} is {msg.state}")
        if msg is None:
            self.balancers.pop(region, None)
        else:
            self.balancers[region] = msg
        if region == DEFAULT_REGION:
            self.balancer = msg
        self._touch("balancer_status", now)

    def on_queue(self, msg: QueueState | None, now: float, region: str = DEFAULT_REGION) -> None:
        last = self.queues.get(region)
        if msg is not None and last is not None and msg.ts < last.ts:
            return
        if msg is None:
            self.queues.pop(region, None)
        else:
            self.queues[region] = msg
        if region == DEFAULT_REGION:
            self.queue_state = msg
        self._touch("queue", now)

    def region_of(self, substation_id: str) -> str:
        """The region a substation belongs to, as its retained status or state says (``default`` if unknown):
        where operator commands for it go."""
        entry = self.substations.get(substation_id)
        return entry.region() if entry is not None else DEFAULT_REGION

    def on_assignment(self, msg: Assignment, now: float) -> None:
        self.recent_all.append(msg)
        if msg.reason not in NOISE_REASONS:
            self.recent.append(msg)
        for memory in (self._evs, self._open) if msg.status != "rejected" else (self._evs,):
            memory[msg.ev_id] = msg
            memory.move_to_end(msg.ev_id)
            while len(memory) > self._ev_memory:
                memory.popitem(last=False)
        if msg.session_id is not None and msg.substation_id is not None and msg.status in _SESSION_ANSWERS:
            self._fresh[msg.ev_id] = msg
            self._fresh.move_to_end(msg.ev_id)
            while len(self._fresh) > _FRESH_MAX:
                self._fresh.popitem(last=False)
        if msg.status == "revoked":
            self.events.revoked(now, msg.substation_id, msg.ev_id, msg.reason)
        self._touch("assignment", now)

    def note_request(self, request: ChargeRequest) -> None:
        """A request this API sent: a session placed for it shows what it asked for before the state does."""
        if request.request_id is not None:
            self._requests[request.request_id] = request
            while len(self._requests) > _FRESH_MAX:
                self._requests.popitem(last=False)

    def on_schedule(self, sid: str, msg: ScheduleState | None, now: float) -> None:
        """``None``: the retained schedule was cleared (the substation was forgotten)."""
        if msg is None or not msg.entries:
            self.schedules.pop(sid, None)
        elif msg.substation_id == sid:
            self.schedules[sid] = msg
        self._touch("schedule", now)

    def schedule_views(self, slots: int) -> dict[str, dict[str, Any]]:
        """Per substation with a limit schedule: the limit in force and its source, what sets the capacity the
        balancer plans with (``limit_source``), and the first ``slots`` intervals of the composite."""
        out: dict[str, dict[str, Any]] = {}
        for sid, sched in self.schedules.items():
            entry = self.substations.get(sid)
            state = entry.state if entry is not None else None
            out[sid] = {"limit_kw": sched.limit_kw, "source": sched.source,
                        "limit_source": state.limit_source if state is not None else None,
                        "composite": [{"start": c.start, "end": c.end, "limit_kw": c.limit_kw, "source": c.source}
                                      for c in sched.composite[:slots]]}
        return out

    def on_control_result(self, msg: ControlResult, now: float) -> None:
        if msg.state is not None and msg.state.substation_id == msg.substation_id:
            self.on_substation_state(msg.substation_id, msg.state, now)
        sid = msg.substation_id
        if not msg.ok or sid is None:
            return
        if msg.action == "drain":
            self.events.add(now, "drain", f"{sid} drained: no new sessions there", substation_id=sid)
        elif msg.action == "undrain":
            self.events.add(now, "undrain", f"{sid} takes new sessions again", substation_id=sid)
        elif msg.action == "set_capacity":
            limit = msg.state.capacity_limit_kw if msg.state is not None else None
            text = (f"{sid}: operator limit {limit:g} kW" if limit is not None
                    else f"{sid}: operator limit removed")
            self.events.add(now, "capacity", text, substation_id=sid)
        elif msg.action == "forget":
            self.forget_substation(sid, now, msg.detail)
        elif msg.action == "set_limits":
            if msg.schedule is not None:
                self.on_schedule(sid, msg.schedule, now)
            self.events.add(now, "schedule", f"{sid}: limit schedule: {msg.detail or 'changed'}", substation_id=sid)

    def forget_substation(self, sid: str, now: float, detail: str | None = None) -> None:
        """A decommissioned substation leaves every view and total; it is listed apart for a while."""
        entry = self.substations.pop(sid, None)
        if entry is None and sid in self.decommissioned:
            return  # (this replica removed it and then saw the balancer confirm it)
        capacity = None
        if entry is not None:
            capacity = (entry.state.capacity_kw if entry.state is not None
                        else entry.telemetry.capacity_kw if entry.telemetry is not None else None)
        self.decommissioned[sid] = {"substation_id": sid, "at": now, "capacity_kw": capacity}
        self.decommissioned.move_to_end(sid)
        while len(self.decommissioned) > _DECOMMISSIONED_MAX:
            self.decommissioned.popitem(last=False)
        self.trends.forget(sid)
        self.events.forget(sid)
        self.events.add(now, "decommissioned", f"{sid} decommissioned" + (f": {detail}" if detail else ""),
                        substation_id=sid)
        self._touch("forget", now)

    def decode_error(self, kind: str, reason: str) -> None:
        self.decode_errors[f"{kind}:{reason}"] += 1

    # ------------------------------------------------------------------ derived values
    def telemetry_age(self, entry: SubstationEntry, now: float) -> float | None:
        """Seconds since the substation's latest measurement: our own receipt of telemetry if we had one,
        else the balancer's figure carried forward from when it published its state."""
        ages: list[float] = []
        if entry.telemetry_at is not None:
            ages.append(max(0.0, now - entry.telemetry_at))
        state = entry.state
        if state is not None and state.telemetry_age_s is not None:
            ages.append(state.telemetry_age_s + max(0.0, now - state.ts))
        return min(ages) if ages else None

    @staticmethod
    def heard_at(entry: SubstationEntry) -> float | None:
        """When the substation's latest measurement was received (epoch s, this API's clock): the age of
        :meth:`telemetry_age` as a time, which stays put while nothing new arrives."""
        times: list[float] = []
        if entry.telemetry_at is not None:
            times.append(entry.telemetry_at)
        state = entry.state
        if state is not None and state.telemetry_age_s is not None:
            times.append(state.ts - state.telemetry_age_s)
        return max(times) if times else None

    def substation_view(self, sid: str, now: float) -> dict[str, Any] | None:
        entry = self.substations.get(sid)
        if entry is None or not entry.known():
            return None
        state, status, tele = entry.state, entry.status, entry.telemetry
        age = self.telemetry_age(entry, now)
        offline_by_status = status is not None and status.state == "offline"
        # The balancer's "offline" counts unless the agent announced itself online since.
        offline_by_state = (state is not None and not state.online
                            and (status is None or (status.ts or 0) <= state.ts))
        online = not (offline_by_status or offline_by_state)
        stale = age is None or age > self.stale_after_s
        if (state is not None and state.stale and not stale
                and (entry.telemetry_at is None or entry.telemetry_at <= state.ts)):
            stale = True  # the balancer says so and we have heard nothing newer
        heard = self.heard_at(entry)
        view: dict[str, Any] = {
            "substation_id": sid, "region": entry.region(), "online": online, "stale": stale,
            "draining": bool(state.draining) if state is not None else False,
            "source": "balancer" if state is not None else "telemetry" if tele is not None else "status",
            "telemetry_age_s": _r(age, 2), "heard_at": _r(heard, 3),
            "state_ts": state.ts if state is not None else None,
        }
        if state is not None:
            view.update(
                capacity_kw=state.capacity_kw, reported_capacity_kw=state.reported_capacity_kw,
                capacity_limit_kw=state.capacity_limit_kw, limit_kw=state.limit_kw, load_kw=state.load_kw,
                base_load_kw=state.base_load_kw, granted_kw=state.granted_kw, reserved_kw=state.reserved_kw,
                headroom_kw=state.headroom_kw, utilisation=state.utilisation, sessions_total=state.sessions_total,
                schedule_limit_kw=state.schedule_limit_kw, limit_source=state.limit_source,
            )
        else:
            capacity = tele.capacity_kw if tele is not None else (status.capacity_kw if status is not None else None)
            load = tele.load_kw if tele is not None else None
            view.update(
                capacity_kw=capacity, reported_capacity_kw=capacity, capacity_limit_kw=None, limit_kw=None,
                load_kw=load, base_load_kw=tele.base_load_kw if tele is not None else None, granted_kw=None,
                reserved_kw=None, headroom_kw=None,
                utilisation=_r(load / capacity, 4) if load is not None and capacity else None,
                sessions_total=tele.active_sessions if tele is not None else 0,
            )
        capacity_kw, load_kw = view["capacity_kw"], view["load_kw"]
        overloaded = bool(capacity_kw and load_kw is not None and load_kw > capacity_kw + _KW_EPS)
        view["overloaded"] = overloaded
        view["condition"] = ("offline" if not online else "stale" if stale else "overloaded" if overloaded
                             else "draining" if view["draining"] else "ok")
        return view

    def substation_views(self, now: float) -> list[dict[str, Any]]:
        """Every substation a view shows, by id: not the leftovers (:meth:`SubstationEntry.leftover`)."""
        out = []
        for sid in sorted(self.substations):
            if self.substations[sid].leftover():
                continue
            view = self.substation_view(sid, now)
            if view is not None:
                out.append(view)
        return out

    def balancer_view(self, now: float, region: str = DEFAULT_REGION) -> dict[str, Any]:
        b = self.balancers.get(region)
        if b is None:
            return {"state": "unknown", "ts": None, "version": None, "age_s": None}
        return {"state": b.state, "ts": b.ts, "version": b.version,
                "age_s": _r(max(0.0, now - b.ts), 2) if b.ts is not None else None}

    def sessions(self, *, substation_id: str | None = None, status: str | None = None,
                 ev_id: str | None = None) -> list[dict[str, Any]]:
        """Running sessions as the balancer last published them, by substation then start time, corrected by
        answers newer than that (a session placed, changed or ended within the last second)."""
        started, ended = self._fresh_sessions()
        out: list[dict[str, Any]] = []
        for sid in sorted(self.substations):
            if substation_id is not None and sid != substation_id:
                continue
            state = self.substations[sid].state
            rows = [] if state is None else [_session_dict(sid, s) for s in state.sessions
                                               if s.session_id not in ended]
            known = {row["session_id"] for row in rows}
            for row in started.get(sid, ()):
                if row["session_id"] in known:
                    old = next(r for r in rows if r["session_id"] == row["session_id"])
                    old["granted_kw"] = row["granted_kw"]
                    old["status"] = _status_of(row["granted_kw"], old["requested_kw"])
                else:
                    rows.append(row)
            for row in sorted(rows, key=lambda r: (r["started_at"], r["session_id"])):
                if ev_id is not None and row["ev_id"] != ev_id:
                    continue
                if status is not None and row["status"] != status:
                    continue
                out.append(row)
        return out

    def _fresh_sessions(self) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
        """From answers newer than their substation's state: sessions started or changed since (by substation),
        and the ids of sessions ended since."""
        started: dict[str, list[dict[str, Any]]] = {}
        ended: set[str] = set()
        for answer in self._fresh.values():
            sid, session_id = answer.substation_id, answer.session_id
            entry = self.substations.get(sid or "")
            if sid is None or session_id is None or entry is None:
                continue
            if entry.state is not None and answer.ts <= entry.state.ts:
                continue
            if answer.status in _SESSION_GONE:
                ended.add(session_id)
                continue
            granted = answer.granted_kw or 0.0
            request = self._requests.get(answer.request_id or "")
            requested = request.requested_kw if request is not None else granted
            started.setdefault(sid, []).append({
                "session_id": session_id, "ev_id": answer.ev_id, "substation_id": sid,
                "request_id": answer.request_id, "status": _status_of(granted, requested), "granted_kw": granted,
                "requested_kw": requested, "min_kw": request.min_kw or 0.0 if request is not None else 0.0,
                "priority": request.priority if request is not None else 0, "started_at": answer.ts,
                "expected_end": None})
        return started, ended

    def sessions_truncated(self) -> bool:
        return any(e.state is not None and e.state.sessions_truncated for e in self.substations.values())

    def find_session(self, session_id: str) -> dict[str, Any] | None:
        """A running session by id: from the retained states, else from a live answer that is newer than its
        substation's state (placed within the last second, or beyond the states' first 150 sessions)."""
        for sid in sorted(self.substations):
            state = self.substations[sid].state
            if state is None:
                continue
            for s in state.sessions:
                if s.session_id == session_id:
                    return _session_dict(sid, s)
        for answer in list(self._open.values()):
            if answer.session_id == session_id and self._open_answer_current(answer):
                return {"session_id": session_id, "ev_id": answer.ev_id, "substation_id": answer.substation_id,
                        "request_id": answer.request_id}
        return None

    def _open_answer_current(self, answer: Assignment) -> bool:
        """An ``assigned``/``updated``/``queued`` answer not (yet) in the retained state still describes the EV
        unless a retained state newer than it (and complete) leaves it out: then it ended while we did not look
        (an answer missed during a reconnect, or a balancer restart that forgot the request)."""
        if answer.status == "queued":
            q = self.queue_state
            return q is None or q.truncated or q.ts <= answer.ts
        if answer.status not in CHARGING_STATUSES or answer.substation_id is None:
            return False
        entry = self.substations.get(answer.substation_id)
        state = entry.state if entry is not None else None
        return state is None or state.sessions_truncated or state.ts <= answer.ts

    def queue_view(self, now: float, limit: int | None = None, region: str = DEFAULT_REGION) -> dict[str, Any]:
        q = self.queues.get(region)
        if q is None:
            return {"known": False, "ts": None, "length": 0, "truncated": False, "entries": []}
        entries = q.entries if limit is None else q.entries[:limit]
        return {"known": True, "ts": q.ts, "length": q.length,
                "truncated": q.truncated or len(entries) < q.length,
                "entries": [msgspec.structs.asdict(e) for e in entries]}

    def ev_view(self, ev_id: str, now: float) -> dict[str, Any] | None:
        """An EV's current session, queue place and latest answer; ``None`` when nothing is known of it."""
        sessions = self.sessions(ev_id=ev_id)
        session = sessions[0] if sessions else None
        entry = None
        if self.queue_state is not None:
            entry = next((msgspec.structs.asdict(e) for e in self.queue_state.entries if e.ev_id == ev_id), None)
        last = self._evs.get(ev_id)
        if session is None and entry is None and last is None:
            return None
        current = self._open.get(ev_id)
        # The retained states are published at most once a second; a newer answer wins over them.
        sub_state = self.substations[session["substation_id"]].state if session is not None else None
        state_ts = sub_state.ts if sub_state is not None else None
        queue_ts = self.queue_state.ts if self.queue_state is not None else None
        if (current is not None and session is not None and current.status in _SESSION_GONE
                and current.session_id == session["session_id"] and state_ts is not None and current.ts >= state_ts):
            session = None
        if (current is not None and entry is not None and current.status in ("assigned", "cancelled")
                and current.request_id == entry["request_id"] and queue_ts is not None and current.ts >= queue_ts):
            entry = None
        if session is not None:
            state = "charging"
        elif entry is not None:
            state = "queued"
        elif current is not None and self._open_answer_current(current):
            state = "charging" if current.status != "queued" else "queued"  # not in the retained state yet
        else:
            state = "idle"
        return {"ev_id": ev_id, "state": state, "session": session, "queue_entry": entry,
                "last_answer": _assignment_dict(last) if last is not None else None}

    def recent_assignments(self, limit: int, *, noise: bool = False) -> list[dict[str, Any]]:
        """The latest answers, newest first; ``noise``: with probe noise (``nothing_to_release``)."""
        items = list(self.recent_all if noise else self.recent)[-limit:]
        items.reverse()  # newest first
        return [_assignment_dict(a) for a in items]

    def totals(self, views: list[dict[str, Any]]) -> dict[str, Any]:
        """Totals over the substations that are online: an offline one's capacity and last load are not there to
        use, so they are counted apart (``offline_*``); decommissioned ones are in no view at all."""

        def total(key: str, rows: list[dict[str, Any]]) -> float:
            return round(sum(v[key] or 0.0 for v in rows), 3)

        online = [v for v in views if v["online"]]
        offline = [v for v in views if not v["online"]]
        # Sessions answered since the retained states were published count already (a client's own write).
        started, ended = self._fresh_sessions()
        fresh = 0
        for v in online:
            entry = self.substations[v["substation_id"]]
            listed = {s.session_id for s in entry.state.sessions} if entry.state is not None else set()
            fresh += sum(1 for row in started.get(v["substation_id"], ()) if row["session_id"] not in listed)
            fresh -= len(listed & ended)
        usable = [v for v in online if not v["stale"]]
        capacity = total("capacity_kw", online)
        load = total("load_kw", online)
        return {
            "substations": len(views), "online": len(online), "offline": len(offline),
            "stale": sum(1 for v in online if v["stale"]),
            "draining": sum(1 for v in online if v["draining"]),
            "overloaded": sum(1 for v in online if v["overloaded"]),
            "capacity_kw": capacity, "usable_capacity_kw": total("capacity_kw", usable), "load_kw": load,
            "granted_kw": total("granted_kw", online), "headroom_kw": total("headroom_kw", usable),
            "utilisation": round(load / capacity, 4) if capacity > 0 else None,
            "sessions": max(0, sum(int(v["sessions_total"] or 0) for v in online) + fresh),
            "queue_length": self.queue_state.length if self.queue_state is not None else 0,
            "offline_capacity_kw": total("capacity_kw", offline), "offline_load_kw": total("load_kw", offline),
            "decommissioned": len(self.decommissioned),
        }

    def overview(self, now: float, *, connected: bool, queue_limit: int = 10, assignments_limit: int = 10,
                 noise: bool = False, events_limit: int = 20, order: str = "name", region: str | None = None,
                 limit: int | None = None, compact: bool = False) -> dict[str, Any]:
        """``order`` ``worst``: worst first (:func:`worst_first`); ``region``: only its substations, and its
        balancer's status and queue (else the default region's); ``limit``: the first so many; ``compact``:
        substations as arrays of :data:`COMPACT_FIELDS`. Totals stay grid-wide."""
        views = self.substation_views(now)
        listed = views if region is None else [v for v in views if v["region"] == region]
        if order == "worst":
            listed = sorted(listed, key=worst_first)
        matched = len(listed)
        if limit is not None:
            listed = listed[:limit]
        subs: list[Any] = [list(compact_row(v)) for v in listed] if compact else listed
        extra: dict[str, Any] = {"fields": list(COMPACT_FIELDS)} if compact else {}
        return {
            "ts": now, "mqtt_connected": connected, "balancer": self.balancer_view(now, region or DEFAULT_REGION),
            "totals": self.totals(views), **extra, "substations": subs, "substations_matched": matched,
            "decommissioned": list(reversed(self.decommissioned.values())),
            "queue": self.queue_view(now, queue_limit, region or DEFAULT_REGION),
            "latest_assignments": self.recent_assignments(assignments_limit, noise=noise),
            "events": self.events.latest(events_limit),
        }

    def note_conditions(self, now: float, views: list[dict[str, Any]] | None = None) -> None:
        """Log substations whose condition changed (stale, offline, overloaded, and back): called periodically
        (with the views of ``now`` when the caller has them already)."""
        before = self.events.last_id
        self.events.conditions(now, self.substation_views(now) if views is None else views)
        if self.events.last_id != before:
            self.version += 1

    def readiness(self, now: float, *, connected: bool, max_age_s: float) -> dict[str, Any]:
        """Ready: connected to the broker and holding fresh substation data (a state or telemetry)."""
        freshest: float | None = None
        for entry in self.substations.values():
            age = self.telemetry_age(entry, now)
            if age is not None and (freshest is None or age < freshest):
                freshest = age
        fresh = freshest is not None and freshest <= max_age_s
        checks = {
            "mqtt_connected": connected,
            "substation_data": fresh,
            "substations_known": sum(1 for e in self.substations.values() if e.known()),
            "freshest_data_age_s": _r(freshest, 2),
            "balancer": self.balancer_view(now)["state"],
        }
        return {"ready": connected and fresh, "checks": checks}
