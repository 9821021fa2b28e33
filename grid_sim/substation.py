"""One simulated substation: capacity, base load and the EV sessions the balancer started on it.

Pure domain code: simulated time is passed in, nothing here does I/O, so the energy accounting is
tested exactly. The caller (the agent) steps the simulation up to "now" before applying a command,
so energy is accounted up to the moment the command arrives.

Commands arrive at least once (MQTT QoS 1), so they are applied idempotently:

* ``start`` of a session that is running is ignored; a redelivered ``start`` of a session that has
  already ended (same session id, EV and command timestamp) is ignored too, so it cannot restart
  charging; a ``start`` reusing the id of an ended session with another timestamp is a new session
  (the balancer's session ids may repeat after it restarts);
* ``update``/``stop`` of an unknown session change nothing and are reported as ``unknown_session``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from grid_protocol.lease import LeaseHolder
from grid_protocol.messages import SessionCommand, Telemetry
from grid_protocol.reasons import Reason

__all__ = ["ApplyResult", "EvSession", "Outcome", "SessionEnd", "SubstationSim"]

#: Ended sessions remembered to recognise redelivered ``start`` commands.
ENDED_MEMORY = 4096

Outcome = Literal["started", "duplicate_start", "conflicting_start", "already_ended", "updated", "stopped",
                  "unknown_session"]


@dataclass(slots=True)
class EvSession:
    """A charging EV. ``energy_kwh``/``duration_s`` are the targets; either ends the session."""

    session_id: str
    ev_id: str
    granted_kw: float
    energy_kwh: float | None
    duration_s: float | None
    started_at_sim: float
    command_ts: float
    delivered_kwh: float = 0.0
    elapsed_s: float = 0.0
    request_id: str | None = None
    min_kw: float | None = None
    priority: int = 0

    @property
    def energy_left_kwh(self) -> float | None:
        return None if self.energy_kwh is None else max(0.0, self.energy_kwh - self.delivered_kwh)

    @property
    def minutes_left(self) -> float | None:
        return None if self.duration_s is None else max(0.0, (self.duration_s - self.elapsed_s) / 60.0)


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """A session that finished (``energy_delivered``/``duration_elapsed``) or was stopped."""

    session_id: str
    ev_id: str
    reason: str
    energy_delivered_kwh: float
    at_sim: float


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What a command did; ``ended`` is set when it stopped a session."""

    outcome: Outcome
    session_id: str
    ev_id: str
    ended: SessionEnd | None = None

    @property
    def changed(self) -> bool:
        """True when the command changed the substation (started, updated or stopped a session)."""
        return self.outcome in ("started", "updated", "stopped")


class SubstationSim:
    """State of one substation. ``base_load`` maps simulated seconds to base load in kW."""

    def __init__(self, substation_id: str, capacity_kw: float, base_load: Callable[[float], float],
                 now_sim: float = 0.0) -> None:
        if not capacity_kw > 0:
            raise ValueError(f"capacity_kw must be > 0, got {capacity_kw!r}")
        self.substation_id = substation_id
        self.capacity_kw = capacity_kw
        self._base_load = base_load
        self.now_sim = now_sim
        self.base_load_kw = base_load(now_sim)
        self.sessions: dict[str, EvSession] = {}
        self._ended: OrderedDict[tuple[str, str, float], None] = OrderedDict()
        #: The balancer's lease on these sessions (``grid_protocol.lease``): lapsed, they draw 0 kW until renewed.
        self.lease = LeaseHolder()

    # ------------------------------------------------------------------ queries
    @property
    def paused(self) -> bool:
        """The lease lapsed: every session draws 0 kW (and charges nothing) until a batch renews it."""
        return self.lease.paused

    @property
    def ev_load_kw(self) -> float:
        return 0.0 if self.paused else sum(s.granted_kw for s in self.sessions.values())

    @property
    def load_kw(self) -> float:
        return self.base_load_kw + self.ev_load_kw

    def telemetry(self, seq: int, ts: float) -> Telemetry:
        """The current measurement (rounded to watts, so ``load_kw == base_load_kw + ev_load_kw``)."""
        base = round(self.base_load_kw, 3)
        ev = round(self.ev_load_kw, 3)
        return Telemetry(
            substation_id=self.substation_id, ts=ts, seq=seq, capacity_kw=self.capacity_kw,
            load_kw=round(base + ev, 3), base_load_kw=base, ev_load_kw=ev, active_sessions=len(self.sessions),
        )

    # ------------------------------------------------------------------ commands
    def apply(self, command: SessionCommand, now_sim: float) -> ApplyResult:
        """Apply a balancer command at simulated time ``now_sim`` (step up to it first)."""
        sid = command.session_id
        session = self.sessions.get(sid)
        if command.command == "start":
            if session is not None:
                same = session.ev_id == command.ev_id and session.command_ts == command.ts
                return ApplyResult("duplicate_start" if same else "conflicting_start", sid, command.ev_id)
            if (sid, command.ev_id, command.ts) in self._ended:
                return ApplyResult("already_ended", sid, command.ev_id)
            self.sessions[sid] = EvSession(
                session_id=sid, ev_id=command.ev_id, granted_kw=command.granted_kw,
                energy_kwh=command.energy_kwh,
                duration_s=command.duration_minutes * 60.0 if command.duration_minutes is not None else None,
                started_at_sim=now_sim, command_ts=command.ts, request_id=command.request_id,
                min_kw=command.min_kw, priority=command.priority,
            )
            return ApplyResult("started", sid, command.ev_id)
        if session is None:
            return ApplyResult("unknown_session", sid, command.ev_id)
        if command.command == "update":
            session.granted_kw = command.granted_kw
            if command.energy_kwh is not None:
                session.energy_kwh = command.energy_kwh
            if command.duration_minutes is not None:
                session.duration_s = command.duration_minutes * 60.0
            return ApplyResult("updated", sid, session.ev_id)
        # A stop without a reason is still the balancer taking the session away.
        end = self._end(session, command.reason or Reason.RELEASED, now_sim)
        return ApplyResult("stopped", sid, session.ev_id, end)

    def stop_all(self, reason: str, now_sim: float) -> list[SessionEnd]:
        """End every session (e.g. after losing the broker, when the balancer has revoked them all)."""
        return [self._end(s, reason, now_sim) for s in list(self.sessions.values())]

    def _end(self, session: EvSession, reason: str, at_sim: float) -> SessionEnd:
        del self.sessions[session.session_id]
        self._ended[(session.session_id, session.ev_id, session.command_ts)] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        return SessionEnd(session.session_id, session.ev_id, str(reason), session.delivered_kwh, at_sim)

    # ------------------------------------------------------------------ time
    def step(self, dt_sim_s: float, now_sim: float) -> list[SessionEnd]:
        """Advance by ``dt_sim_s`` simulated seconds ending at ``now_sim``; return the sessions that ended.

        Each session draws exactly its ``granted_kw``. A session ends when its energy target is
        reached or its duration has elapsed, whichever comes first within the step; energy is counted
        only up to that moment. Sessions with neither target run until stopped.
        """
        ended: list[SessionEnd] = []
        if dt_sim_s > 0:
            step_start = now_sim - dt_sim_s
            for session in list(self.sessions.values()):
                end = self._advance(session, dt_sim_s, step_start)
                if end is not None:
                    ended.append(end)
        self.now_sim = now_sim
        self.base_load_kw = self._base_load(now_sim)
        return ended

    def _advance(self, s: EvSession, dt: float, step_start: float) -> SessionEnd | None:
        power = 0.0 if self.paused else s.granted_kw
        time_left = s.duration_s - s.elapsed_s if s.duration_s is not None else math.inf
        if s.energy_kwh is not None and power > 0:
            energy_time = max(0.0, s.energy_kwh - s.delivered_kwh) / power * 3600.0
        else:
            energy_time = math.inf
        until_end = min(time_left, energy_time)
        if until_end > dt:
            s.delivered_kwh += power * dt / 3600.0
            s.elapsed_s += dt
            return None
        until_end = max(0.0, until_end)
        s.elapsed_s += until_end
        if energy_time <= time_left and s.energy_kwh is not None:
            # Exactly the target, not the float sum of the steps (more only if an update lowered it).
            s.delivered_kwh = max(s.delivered_kwh, s.energy_kwh)
            reason = Reason.ENERGY_DELIVERED
        else:
            s.delivered_kwh += power * until_end / 3600.0
            reason = Reason.DURATION_ELAPSED
        return self._end(s, reason, step_start + until_end)
