"""Fast replay: the pure allocation core driven by a simulated clock (a whole day in seconds).

Everything runs in one process and one thread. One :class:`SubstationSim` per substation plays the
agent, EVs are plain records, and messages that would cross the broker are handed over directly:

* EVs send their request at arrival and a ``Release`` at departure if still charging or waiting
  (the charger stops at once: the car is unplugged, whatever the balancer does);
* ``ToSubstation`` commands reach the sims after ``command_delay_s`` (default 0), in order; a
  ``started`` session and every ended one become ``SessionEvent``\\ s for the balancer;
* leases, with the MQTT adapter's and the agent's own code (``grid_protocol.lease``): every command carries
  ``valid_until = now + lease_s``, substations with sessions get an empty renewal every ``lease_s / 3``, and a
  sim whose lease has lapsed at a telemetry instant pauses its sessions (0 kW) until the next command arrives;
* every ``telemetry.interval_s`` each online sim is measured; the balancer gets it ``lag_s`` later;
* offline: the sim's sessions stop, it stops reporting and the balancer gets status ``offline``;
* capacity change: the sim's physical capacity changes at ``at``; telemetry reports a cut from
  ``at - notice_s`` (never a raise before it happens);
* limit schedule (a DSO's limits): at ``at`` the balancer gets the ``LimitSchedule``; from then on the
  substation's limit is the lowest of its capacity and the schedule's limit in force (what overload is measured
  against), while its telemetry keeps reporting the physical capacity (the agent knows nothing of the DSO);
* the balancer's ``tick`` runs every step (``step_s``, 1 s by default), substations are stepped and
  sampled (actual base + EV load against physical capacity) every step.

Inputs for the balancer (requests, events, telemetry) go through one FIFO inbox, as through the
broker: effects of one decision are all delivered before the next input is handled.

The simulated clock is epoch seconds from ``EPOCH_MIDNIGHT`` + ``start_hour`` for both the balancer and
the sims (``departure`` and lease times are epoch seconds on the wire); results use seconds from the start.
The run lasts ``duration_s`` and then until no EV has an open request (each has its energy or has left),
so every EV is accounted for.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

import balancer.core as core
from balancer.core import Balancer, CoreConfig, Effect, ToEv, ToSubstation
from balancer.core.limits import Limit, Schedule
from grid_protocol.lease import LeaseIssuer
from grid_protocol.messages import (
    FINAL_STATUSES,
    Assignment,
    ChargeRequest,
    LimitEntry,
    LimitSchedule,
    Release,
    SessionCommand,
    SessionCommands,
    SessionEvent,
)
from grid_protocol.reasons import Reason
from grid_sim.scenario import (
    BurstEvent,
    DailyBaseLoad,
    EvSpec,
    LimitsEvent,
    Scenario,
    SubstationSpec,
    generate_evs,
)
from grid_sim.substation import SessionEnd, SubstationSim
from grid_sim.timeline import daily_curve, grid_actions, points_curve
from replay.metrics import Answer, EvRecord, Metrics, SubstationTrace, Trace, compute_metrics

__all__ = ["DEFAULT_POLICY", "EPOCH_MIDNIGHT", "RunResult", "available_policies", "make_balancer", "run"]

#: 2026-01-01T00:00:00Z: midnight of day 0 of every replay.
EPOCH_MIDNIGHT = 1_767_225_600.0
DEFAULT_POLICY = "least-utilised"
ALL_POLICIES = core.POLICIES
BASELINE_POLICIES = core.BASELINES
#: The adapter's default lease (``BALANCER_LEASE_S``): commands are valid this long unless renewed.
LEASE_S = 10.0


def available_policies() -> tuple[str, ...]:
    """The policies this balancer core implements (``balancer.core.POLICIES``)."""
    return core.POLICIES


def make_balancer(policy: str = DEFAULT_POLICY, core: Mapping[str, Any] | None = None) -> Balancer:
    """A balancer with default settings and ``policy``; baselines are allowed (this is a replay).
    ``core`` overrides other ``CoreConfig`` fields (e.g. ``safety_margin_pct``); unknown names are an error."""
    names = {f.name for f in dataclasses.fields(CoreConfig)}
    unknown = sorted(set(core or {}) - names)
    if unknown:
        raise ValueError(f"unknown CoreConfig field(s): {', '.join(unknown)}")
    if "policy" not in names:
        if policy != DEFAULT_POLICY:
            raise ValueError(f"policy {policy!r} is not implemented by this balancer core yet")
        return Balancer(CoreConfig(**(core or {})))
    kwargs: dict[str, Any] = {**(core or {}), "policy": policy}
    if "allow_baselines" in names:
        kwargs["allow_baselines"] = True
    return Balancer(CoreConfig(**kwargs))


@dataclass(frozen=True, slots=True)
class RunResult:
    """One scenario x policy run: what happened (trace, EVs) and what it scores (metrics)."""

    scenario: str
    policy: str
    seed: int
    start_hour: float
    #: the scenario's duration; the run goes on after it until every EV is done
    duration_s: float
    trace: Trace
    evs: list[EvRecord]
    metrics: Metrics
    #: scenario events for plots: (seconds from start, label)
    events: list[tuple[float, str]]
    counters: dict[str, int]
    #: things that must not happen (answers for unknown EVs, a second session for one EV, ...)
    anomalies: dict[str, int]
    #: things that may happen, counted: lease lapses, commands lost to an offline agent, a start for an EV that
    #: left (command delay), ``core:...`` gaps in the balancer core that the replay works around
    notes: dict[str, int]
    #: samples at which the core reported its own limit broken (``Balancer.violations()``)
    core_violations: int
    open_requests_at_end: int
    sim_seconds: float
    wall_seconds: float


class _Run:
    def __init__(self, scenario: Scenario, policy: str, seed: int, command_delay_s: float,
                 lease_s: float = LEASE_S, core: Mapping[str, Any] | None = None) -> None:
        self.sc = scenario
        self.policy = policy
        self.seed = seed
        self.delay = command_delay_s
        self.lease_s = lease_s
        self.epoch0 = EPOCH_MIDNIGHT + scenario.start_hour * 3600.0
        self.balancer = make_balancer(policy, core)
        self.sims: dict[str, SubstationSim] = {}
        for spec in scenario.substations:
            self.sims[spec.id] = SubstationSim(spec.id, spec.capacity_kw, self._base_load(spec), now_sim=self.epoch0)
        self.online = dict.fromkeys(self.sims, True)
        self.physical = {s.id: s.capacity_kw for s in scenario.substations}
        self.announced = dict(self.physical)
        #: the grid operator's limit schedules as sent so far (the same precedence as the balancer's)
        self.grid_limits: dict[str, Schedule] = {}
        self.seq = dict.fromkeys(self.sims, 0)
        self.leases = LeaseIssuer(lease_s)  # the balancer's end; each sim holds the agent's
        self.t = 0.0
        self._pending: list[tuple[float, int, Callable[[], None]]] = []  # delayed deliveries (heap)
        self._order = itertools.count()
        self._inbox: deque[Callable[[], list[Effect]]] = deque()
        self._draining = False
        self.evs = generate_evs(scenario, seed)
        self.records = {ev.ev_id: EvRecord(ev.ev_id, ev.arrival, ev.departure, ev.requested_kw, ev.energy_kwh,
                                           ev.priority) for ev in self.evs}
        self.open: set[str] = set()  # EVs with an open request (accepted, not finished)
        self.left: set[str] = set()
        self.plugged: dict[str, tuple[str, str]] = {}  # ev_id -> (substation, session) charging physically
        self.anomalies: Counter[str] = Counter()  # must not happen (tests assert none)
        self.notes: Counter[str] = Counter()  # may happen (races with command delay, lease lapses, core gaps)
        self.loads: dict[str, list[float]] = {i: [] for i in self.sims}
        self.caps: dict[str, list[float]] = {i: [] for i in self.sims}
        self.onl: dict[str, list[bool]] = {i: [] for i in self.sims}
        self.bases: dict[str, list[float]] = {i: [] for i in self.sims}
        self.violation_samples = 0

    def _base_load(self, spec: SubstationSpec) -> Callable[[float], float]:
        """Base load as a function of the sim's (epoch) clock."""
        load = spec.base_load
        if isinstance(load, DailyBaseLoad):
            curve = daily_curve(spec, load, self.seed)
            offset = self.sc.start_hour * 3600.0 - self.epoch0  # epoch -> seconds since midnight of day 0
            return lambda now: curve(now + offset)
        points = points_curve(load)
        return lambda now: points(now - self.epoch0)

    # ------------------------------------------------------------------ plumbing
    @property
    def now(self) -> float:
        return self.epoch0 + self.t

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._pending, (self.t + delay, next(self._order), action))

    def _to_balancer(self, call: Callable[[], list[Effect]]) -> None:
        self._inbox.append(call)
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox:
                for effect in self._inbox.popleft()():
                    self._effect(effect)
        finally:
            self._draining = False

    def _effect(self, effect: Effect) -> None:
        if isinstance(effect, ToEv):
            self._answer(effect.ev_id, effect.message)
        elif isinstance(effect, ToSubstation):  # one batch per command: no read pass gathers them here
            for batch in self.leases.batches(effect.substation_id, [effect.message], self.now):
                self._send(effect.substation_id, batch)
        else:
            self.anomalies[f"unknown_effect:{type(effect).__name__}"] += 1

    def _send(self, sub_id: str, batch: SessionCommands) -> None:
        """Balancer -> agent, after the command delay."""
        if self.delay > 0:
            self._later(self.delay, lambda: self._command(sub_id, batch))
        else:
            self._command(sub_id, batch)

    def _renew_leases(self) -> None:
        """What the adapter does on its tick: an empty batch for each substation with sessions not renewed lately."""
        with_sessions = [sub_id for sub_id, sub in self.balancer.substations.items() if sub.sessions]
        for sub_id, batch in self.leases.renewals(with_sessions, self.now):
            self._send(sub_id, batch)

    # ------------------------------------------------------------------ substation side
    def _command(self, sub_id: str, batch: SessionCommands) -> None:
        sim = self.sims.get(sub_id)
        if sim is None:
            self.anomalies["command_to_unknown_substation"] += 1
            return
        if not self.online[sub_id]:
            self.notes["commands_lost_offline"] += len(batch.commands)  # the agent is cut off
            return
        if sim.lease.on_batch(batch):
            self.notes["lease_resumed"] += 1
        for command in batch.commands:
            self._apply(sim, command)

    def _check_lease(self, sub_id: str) -> None:
        """The agent's check at each measurement: no renewal in time, so its sessions draw nothing."""
        sim = self.sims[sub_id]
        if sim.lease.must_pause(self.now, has_sessions=bool(sim.sessions)):
            sim.lease.pause()
            self.notes["lease_lapsed"] += 1

    def _apply(self, sim: SubstationSim, command: SessionCommand) -> None:
        if command.command == "start" and command.ev_id in self.left:
            self.notes["start_after_departure"] += 1  # nobody plugged in: the charger cannot start
            return
        record = self.records.get(command.ev_id)
        if command.command == "start" and record is not None and command.energy_kwh is not None:
            # The car stops when its battery has what it came for, whatever target a re-placed session carries.
            needed = max(1e-6, record.energy_kwh - record.delivered_kwh)
            if command.energy_kwh > needed:
                self.notes["core:start_energy_above_need"] += 1
                command = msgspec.structs.replace(command, energy_kwh=needed)
        result = sim.apply(command, self.now)
        if result.outcome == "started":
            if command.ev_id in self.plugged:
                self.anomalies["second_session_for_ev"] += 1
            self.plugged[command.ev_id] = (sim.substation_id, command.session_id)
            event = SessionEvent(event="started", session_id=command.session_id, ev_id=command.ev_id, ts=self.now,
                                 substation_id=sim.substation_id, request_id=command.request_id,
                                 granted_kw=command.granted_kw)
            self._to_balancer(lambda: self.balancer.on_session_event(sim.substation_id, event, self.now))
        elif result.ended is not None:
            self._ended(sim.substation_id, result.ended, report=True)

    def _ended(self, sub_id: str, end: SessionEnd, *, report: bool) -> None:
        record = self.records.get(end.ev_id)
        if record is not None:
            record.delivered_kwh += end.energy_delivered_kwh
            if end.reason == Reason.ENERGY_DELIVERED:
                record.finished_at = end.at_sim - self.epoch0
        if self.plugged.get(end.ev_id) == (sub_id, end.session_id):
            del self.plugged[end.ev_id]
        if report:
            event = SessionEvent(event="ended", session_id=end.session_id, ev_id=end.ev_id, ts=self.now,
                                 substation_id=sub_id, reason=end.reason,
                                 energy_delivered_kwh=round(end.energy_delivered_kwh, 6))
            self._to_balancer(lambda: self.balancer.on_session_event(sub_id, event, self.now))

    def _telemetry(self, sub_id: str) -> None:
        sim = self.sims[sub_id]
        sim.capacity_kw = min(self.physical[sub_id], self.announced[sub_id])
        msg = sim.telemetry(self.seq[sub_id], self.now)
        self.seq[sub_id] += 1
        deliver = lambda: self._to_balancer(lambda: self.balancer.on_telemetry(msg, self.now))  # noqa: E731
        if self.sc.telemetry.lag_s > 0:
            self._later(self.sc.telemetry.lag_s, deliver)
        else:
            deliver()

    # ------------------------------------------------------------------ EV side
    def _answer(self, ev_id: str, a: Assignment) -> None:
        record = self.records.get(ev_id)
        if record is None:
            self.anomalies["answer_for_unknown_ev"] += 1
            return
        record.answers.append(Answer(self.t, a.status, a.granted_kw, a.reason))
        if a.status in ("assigned", "queued") and ev_id not in self.left:
            self.open.add(ev_id)
        elif a.status in FINAL_STATUSES:
            if a.status == "rejected" and len(record.answers) > 1:
                self.anomalies[f"late_rejection:{a.reason}"] += 1
            self.open.discard(ev_id)

    def _arrive(self, ev: EvSpec) -> None:
        request = ChargeRequest(requested_kw=ev.requested_kw, request_id=f"r-{ev.ev_id}", ev_id=ev.ev_id,
                                energy_kwh=ev.energy_kwh, min_kw=ev.min_kw, priority=ev.priority,
                                departure=self.epoch0 + ev.departure)
        self.records[ev.ev_id].requested_at = self.t
        self._to_balancer(lambda: self.balancer.on_request(ev.ev_id, request, self.now))

    def _depart(self, ev: EvSpec) -> None:
        self.left.add(ev.ev_id)
        if ev.ev_id not in self.open:
            return
        unplugged: SessionEnd | None = None
        plug = self.plugged.get(ev.ev_id)
        if plug is not None:
            stop = SessionCommand(command="stop", session_id=plug[1], ev_id=ev.ev_id, ts=self.now,
                                  reason=Reason.RELEASED)
            unplugged = self.sims[plug[0]].apply(stop, self.now).ended
        release = Release(request_id=f"r-{ev.ev_id}", ev_id=ev.ev_id)
        self._to_balancer(lambda: self.balancer.on_release(ev.ev_id, release, self.now))
        if plug is not None and unplugged is not None:
            self._ended(plug[0], unplugged, report=True)

    # ------------------------------------------------------------------ scenario events
    def _schedule(self) -> list[tuple[float, int, Callable[[], None], str | None]]:
        """Scenario events as (time, order, action, plot label), in time order."""
        # The same timing the live agents apply (grid_sim.timeline), so sim and live mean the same scenario.
        out: list[tuple[float, int, Callable[[], None], str | None]] = []
        for i, action in enumerate(grid_actions(self.sc)):
            if action.kind == "offline":
                act: Callable[[], None] = partial(self._offline, action.substation)
            elif action.kind == "online":
                act = partial(self._online, action.substation)
            else:
                kw = action.capacity_kw
                assert kw is not None  # grid_actions sets it for every announce and capacity action
                act = partial(self._announce if action.kind == "announce" else self._capacity, action.substation, kw)
            out.append((action.at, i, act, action.label))
        first = len(out)
        for j, limits in enumerate(e for e in self.sc.events if isinstance(e, LimitsEvent)):
            windows = ", ".join(f"{w.limit_kw:g} kW {w.start / 3600:g}-{w.end / 3600:g} h" for w in limits.entries)
            out.append((limits.at, first + j, partial(self._limits, limits),
                        f"{limits.substation}: {limits.source} {windows or 'withdrawn'}"))
        n = len(out)
        for j, event in enumerate(e for e in self.sc.events if isinstance(e, BurstEvent)):
            out.append((event.at, n + j, lambda: None, f"burst of {event.count}"))  # the EVs' business: a label
        out.sort(key=lambda x: (x[0], x[1]))
        return out

    def _offline(self, sub_id: str) -> None:
        self.online[sub_id] = False
        self.sims[sub_id].lease.drop()  # it starts clean when it comes back
        for end in self.sims[sub_id].stop_all(Reason.SUBSTATION_OFFLINE, self.now):
            self._ended(sub_id, end, report=False)  # the agent is cut off: nobody hears these
        self._to_balancer(lambda: self.balancer.on_status(sub_id, "offline", self.now))

    def _online(self, sub_id: str) -> None:
        self.online[sub_id] = True
        self._to_balancer(lambda: self.balancer.on_status(sub_id, "online", self.now))

    def _announce(self, sub_id: str, kw: float) -> None:
        self.announced[sub_id] = kw

    def _limits(self, event: LimitsEvent) -> None:
        entries = [LimitEntry(start=self.epoch0 + w.start, end=self.epoch0 + w.end, limit_kw=w.limit_kw,
                              priority=w.priority) for w in event.entries]
        schedule = self.grid_limits.setdefault(event.substation, Schedule())
        schedule.replace(event.source, [Limit(e.start, e.end, math.floor(e.limit_kw * 1000), event.source,
                                              e.priority) for e in entries], self.now)
        message = LimitSchedule(source=event.source, entries=entries, request_id=f"limits-{event.source}")

        def send() -> list[Effect]:
            reason, _detail, effects = self.balancer.on_limits(event.substation, message, self.now)
            if reason is not None:
                self.anomalies[f"limits_refused:{reason}"] += 1
            return effects
        self._to_balancer(send)

    def _limit_kw(self, sub_id: str) -> float:
        """The substation's limit now: its physical capacity, or the grid operator's lower limit in force."""
        schedule = self.grid_limits.get(sub_id)
        binding = schedule.binding_at(self.now) if schedule is not None else None
        physical = self.physical[sub_id]
        return physical if binding is None else min(physical, binding.limit_w / 1000)

    def _capacity(self, sub_id: str, kw: float) -> None:
        self.physical[sub_id] = kw
        self.announced[sub_id] = kw

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunResult:
        started = time.perf_counter()
        sc = self.sc
        step = sc.step_s
        telemetry_every = max(1, round(sc.telemetry.interval_s / step))
        end_t = max(sc.duration_s, max((ev.departure for ev in self.evs), default=0.0))
        n_steps = math.ceil(end_t / step - 1e-9) + 1
        schedule = self._schedule()
        labels = [(t, label) for t, _, _, label in schedule if label is not None]
        arrivals = deque(self.evs)
        departures = sorted(self.evs, key=lambda e: (e.departure, e.ev_id))
        next_departure = 0
        next_event = 0
        for sub_id in self.sims:
            self._to_balancer(partial(self.balancer.on_status, sub_id, "online", self.now))
        for k in range(n_steps):
            self.t = t = k * step
            due = t + 1e-9
            if k:
                for sub_id, sim in self.sims.items():
                    for end in sim.step(step, self.now):
                        self._ended(sub_id, end, report=self.online[sub_id])
            while self._pending and self._pending[0][0] <= due:
                heapq.heappop(self._pending)[2]()
            while next_event < len(schedule) and schedule[next_event][0] <= due:
                schedule[next_event][2]()
                next_event += 1
            while arrivals and arrivals[0].arrival <= due:
                self._arrive(arrivals.popleft())
            while next_departure < len(departures) and departures[next_departure].departure <= due:
                self._depart(departures[next_departure])
                next_departure += 1
            if k % telemetry_every == 0:
                for sub_id in self.sims:
                    if self.online[sub_id]:
                        self._check_lease(sub_id)
                        self._telemetry(sub_id)
            self._to_balancer(lambda: self.balancer.tick(self.now))
            self._renew_leases()
            self._sample()
            if k % 60 == 0 and self.balancer.violations():
                self.violation_samples += 1
            if t >= sc.duration_s and not arrivals and not self.open:
                break  # every EV has left or has its energy: nothing more can happen to them
        for sim in self.sims.values():  # still charging at the very end (only if an EV never left)
            for session in sim.sessions.values():
                record = self.records.get(session.ev_id)
                if record is not None:
                    record.delivered_kwh += session.delivered_kwh
        trace = Trace(step, [SubstationTrace(i, self.loads[i], self.caps[i], self.onl[i], self.bases[i])
                             for i in self.sims])
        evs = [self.records[ev.ev_id] for ev in self.evs]
        return RunResult(
            scenario=sc.name, policy=self.policy, seed=self.seed, start_hour=sc.start_hour, duration_s=sc.duration_s,
            trace=trace, evs=evs,
            metrics=compute_metrics(trace, evs), events=labels, counters=dict(sorted(self.balancer.counters.items())),
            anomalies=dict(sorted(self.anomalies.items())), notes=dict(sorted(self.notes.items())),
            core_violations=self.violation_samples,
            open_requests_at_end=self.balancer.open_requests(), sim_seconds=self.t,
            wall_seconds=time.perf_counter() - started,
        )

    def _sample(self) -> None:
        for sub_id, sim in self.sims.items():
            online = self.online[sub_id]
            self.loads[sub_id].append(sim.base_load_kw + sim.ev_load_kw if online else 0.0)
            self.caps[sub_id].append(self._limit_kw(sub_id))
            self.onl[sub_id].append(online)
            self.bases[sub_id].append(sim.base_load_kw)


def run(scenario: Scenario, policy: str = DEFAULT_POLICY, *, seed: int | None = None,
        command_delay_s: float = 0.0, lease_s: float = LEASE_S, core: Mapping[str, Any] | None = None) -> RunResult:
    """Replay ``scenario`` against a fresh balancer with ``policy``; deterministic for a given seed.
    ``core``: ``CoreConfig`` fields to override (the session benchmark sets the safety margin)."""
    if command_delay_s < 0 or lease_s <= 0:
        raise ValueError("command_delay_s must be >= 0 and lease_s > 0")
    return _Run(scenario, policy, scenario.seed if seed is None else seed, command_delay_s, lease_s, core).run()

