"""What a live replay recorded, turned into the inputs of :mod:`replay.metrics` (pure: messages in, records out).

The live replay's observer records every message under the topic prefix with the wall time it arrived
(:class:`Recorded`). :func:`convert` rebuilds from them what the fast simulation measures directly:

* **actual load** per substation, sampled every ``step_s`` of scenario time: the last telemetry *measured*
  (its ``ts``, the agent's clock) at or before the sample, held until the next one. Telemetry is the agent's
  own measurement of its simulated load, so this is the physical load, sampled as often as the agents report.
  A substation is offline from the status ``offline`` (its last will) to the next ``online``; offline samples
  count as 0 kW and are left out of the metrics, as in the simulation. Right after it comes back and before
  its first measurement, the first measurement of the new connection stands in (never an old one: its sessions
  stopped when it went offline). **Capacity** is the physical one of the scenario (what overload means), not
  the reported one, which may announce a cut early.
* per EV: when its request arrived (first ``request`` message), every answer on its ``assignment`` topic
  (replays of the latest answer to a retried request are dropped, and so are ``nothing_to_release``
  rejections of a release that crossed the end of the session), its departure from the scenario, the energy
  from the agents' ``ended`` session events (a session still running when the recording ends is integrated
  from the balancer's ``start``/``update`` commands instead, and counted in ``notes``), and when it got all it
  asked for (an ``ended`` with ``energy_delivered``).

Times are converted to scenario seconds with the run's :class:`~grid_sim.timeline.Timebase`.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from grid_protocol.codec import PayloadError, decode
from grid_protocol.messages import (
    FINAL_STATUSES,
    MAX_COMMAND_PAYLOAD_BYTES,
    Assignment,
    SessionCommand,
    SessionCommands,
    SessionEvent,
    SubstationStatus,
    Telemetry,
)
from grid_protocol.reasons import Reason
from grid_protocol.topics import TopicKind, Topics
from grid_sim.scenario import EvSpec, Scenario
from grid_sim.timeline import Timebase, capacity_at, capacity_steps
from replay.metrics import Answer, EvRecord, SubstationTrace, Trace

__all__ = ["LiveData", "Recorded", "build_evs", "build_trace", "convert"]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Recorded:
    """One message the observer received: when (epoch seconds), where, what."""

    at: float
    topic: str
    payload: bytes


@dataclass(slots=True)
class LiveData:
    trace: Trace
    evs: list[EvRecord]
    counters: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)
    #: EVs not accounted for: request never seen, never answered, or not closed when the recording ended
    lost: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Parsed:
    """The recording sorted by kind (decoded), times still epoch seconds."""

    telemetry: dict[str, list[Telemetry]] = field(default_factory=lambda: defaultdict(list))
    status: dict[str, list[tuple[float, bool]]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[str, float] = field(default_factory=dict)
    releases: dict[str, float] = field(default_factory=dict)
    answers: dict[str, list[tuple[float, Assignment]]] = field(default_factory=lambda: defaultdict(list))
    sessions: list[tuple[float, str, SessionEvent]] = field(default_factory=list)
    commands: list[tuple[float, str, SessionCommands]] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    anomalies: Counter[str] = field(default_factory=Counter)


def _parse(messages: Iterable[Recorded], topics: Topics) -> _Parsed:
    out = _Parsed()
    for m in messages:
        parsed = topics.parse(m.topic)
        if parsed is None:
            out.counters["messages:other"] += 1
            continue
        kind, id_ = parsed
        out.counters[f"messages:{kind}"] += 1
        if id_ is None:
            continue
        try:
            if kind == TopicKind.SUBSTATION_TELEMETRY:
                out.telemetry[id_].append(decode(m.payload, Telemetry))
            elif kind == TopicKind.SUBSTATION_STATUS:
                if m.payload:
                    out.status[id_].append((m.at, decode(m.payload, SubstationStatus).state == "online"))
            elif kind == TopicKind.EV_REQUEST:
                out.requests.setdefault(id_, m.at)
            elif kind == TopicKind.EV_RELEASE:
                out.releases.setdefault(id_, m.at)
            elif kind == TopicKind.EV_ASSIGNMENT:
                out.answers[id_].append((m.at, decode(m.payload, Assignment)))
            elif kind == TopicKind.SUBSTATION_SESSION:
                out.sessions.append((m.at, id_, decode(m.payload, SessionEvent)))
            elif kind == TopicKind.SUBSTATION_COMMAND:
                batch = decode(m.payload, SessionCommands, max_bytes=MAX_COMMAND_PAYLOAD_BYTES)
                out.commands.append((m.at, id_, batch))
        except PayloadError:
            out.anomalies[f"undecodable:{kind}"] += 1
    return out


# ---------------------------------------------------------------------------------------------- trace
def _substation_trace(sub_id: str, telemetry: Sequence[Telemetry], status: Sequence[tuple[float, bool]],
                      caps: Sequence[tuple[float, float]], timebase: Timebase, step_s: float, n: int,
                      notes: Counter[str]) -> SubstationTrace:
    tel = sorted(telemetry, key=lambda x: x.ts)
    tel_t = [timebase.scenario(x.ts) for x in tel]
    changes = sorted((timebase.scenario(at), online) for at, online in status)
    loads: list[float] = []
    capacity: list[float] = []
    online_flags: list[bool] = []
    bases: list[float] = []
    k = 0  # statuses applied so far
    j = 0  # measurements at or before the sample
    online: bool | None = None  # None: no status heard yet (then: online once it reports)
    since = -math.inf  # start of the current connection
    for i in range(n):
        t = i * step_s
        while k < len(changes) and changes[k][0] <= t + _EPS:
            online, since = changes[k][1], changes[k][0]
            k += 1
        while j < len(tel_t) and tel_t[j] <= t + _EPS:
            j += 1
        cap = capacity_at(caps, t)
        chosen: Telemetry | None = None
        if online is not False:
            if j > 0 and tel_t[j - 1] >= since:
                chosen = tel[j - 1]
            elif online:
                # Back online, not measured yet: the first measurement of this connection (before the next change).
                first = bisect.bisect_left(tel_t, since)
                until = changes[k][0] if k < len(changes) else math.inf
                if first < len(tel) and tel_t[first] < until:
                    chosen = tel[first]
                    notes["samples_before_first_telemetry"] += 1
        if chosen is None:
            if online:
                notes["samples_online_without_telemetry"] += 1
            loads.append(0.0)
            online_flags.append(False)
            bases.append(0.0)
        else:
            loads.append(chosen.load_kw)
            online_flags.append(True)
            bases.append(chosen.base_load_kw)
        capacity.append(cap)
    return SubstationTrace(sub_id, loads, capacity, online_flags, bases)


def build_trace(parsed_telemetry: dict[str, list[Telemetry]], status: dict[str, list[tuple[float, bool]]],
                scenario: Scenario, timebase: Timebase, end_s: float, notes: Counter[str] | None = None) -> Trace:
    """Samples every ``scenario.step_s`` from 0 to ``end_s`` (scenario seconds) for every substation."""
    step = scenario.step_s
    n = max(1, math.floor(end_s / step + _EPS) + 1)
    notes = notes if notes is not None else Counter()
    subs = [_substation_trace(s.id, parsed_telemetry.get(s.id, []), status.get(s.id, []),
                              capacity_steps(scenario, s.id), timebase, step, n, notes)
            for s in scenario.substations]
    return Trace(step, subs)


# ---------------------------------------------------------------------------------------------- EVs
def _same(a: Assignment, b: Assignment) -> bool:
    return msgspec.structs.asdict(a) == msgspec.structs.asdict(b)


def _integrated_kwh(commands: Sequence[tuple[float, SessionCommand]], end_wall: float,
                    speedup: float) -> float:
    """Energy of a session from its commands' grants (kW held between commands), until it stopped or the end."""
    kwh = 0.0
    level = 0.0
    since: float | None = None
    for at, cmd in commands:
        if since is not None:
            kwh += level * (min(at, end_wall) - since) * speedup / 3600.0
        if cmd.command == "stop":
            return kwh
        level = cmd.granted_kw
        since = at
    if since is not None and end_wall > since:
        kwh += level * (end_wall - since) * speedup / 3600.0
    return kwh


def build_evs(parsed: _Parsed, evs: Sequence[EvSpec], timebase: Timebase, end_s: float,
              notes: Counter[str], anomalies: Counter[str]) -> tuple[list[EvRecord], list[str]]:
    """One :class:`EvRecord` per scenario EV, and the ids of the EVs not accounted for."""
    known = {ev.ev_id for ev in evs}
    for ev_id in parsed.answers:
        if ev_id not in known:
            anomalies["answer_for_unknown_ev"] += 1
    # Session events: energy per EV from the first ``ended`` of each session; sessions that never ended.
    ended: dict[str, SessionEvent] = {}
    started: dict[str, tuple[str, SessionEvent]] = {}
    for _at, sub_id, event in sorted(parsed.sessions, key=lambda x: (x[2].ts, x[0])):
        if event.event == "started":
            started.setdefault(event.session_id, (sub_id, event))
        elif event.event == "ended":
            if event.session_id in ended:
                notes["duplicate_session_events"] += 1
                continue
            ended[event.session_id] = event
    delivered: dict[str, float] = defaultdict(float)
    finished: dict[str, float] = {}
    for event in ended.values():
        delivered[event.ev_id] += event.energy_delivered_kwh or 0.0
        if event.reason == Reason.ENERGY_DELIVERED and event.ev_id not in finished:
            finished[event.ev_id] = timebase.scenario(event.ts)
    open_sessions = [sid for sid in started if sid not in ended]
    if open_sessions:
        by_session: dict[str, list[tuple[float, SessionCommand]]] = defaultdict(list)
        for at, _sub, batch in parsed.commands:
            for cmd in batch.commands:
                if cmd.session_id in started and cmd.session_id not in ended:
                    by_session[cmd.session_id].append((at, cmd))
        end_wall = timebase.wall(end_s)
        for sid in open_sessions:
            ev_id = started[sid][1].ev_id
            delivered[ev_id] += _integrated_kwh(by_session.get(sid, []), end_wall, timebase.speedup)
            notes["energy_integrated_sessions"] += 1
    # Overlapping sessions of one EV (a move whose start reached the new agent before the old agent's stop).
    running: dict[str, str] = {}
    for event in sorted((e for _, _, e in parsed.sessions if e.event in ("started", "ended")), key=lambda e: e.ts):
        if event.event == "started":
            if event.ev_id in running and running[event.ev_id] != event.session_id:
                notes["overlapping_sessions"] += 1
            running[event.ev_id] = event.session_id
        elif running.get(event.ev_id) == event.session_id:
            del running[event.ev_id]

    records: list[EvRecord] = []
    lost: list[str] = []
    for ev in evs:
        sent = parsed.requests.get(ev.ev_id)
        record = EvRecord(ev.ev_id, timebase.scenario(sent) if sent is not None else ev.arrival, ev.departure,
                          ev.requested_kw, ev.energy_kwh, ev.priority)
        previous: Assignment | None = None
        ours = f"r-{ev.ev_id}"
        for at, answer in parsed.answers.get(ev.ev_id, []):
            if answer.status == "rejected" and answer.reason == Reason.NOTHING_TO_RELEASE:
                notes["release_crossed_end"] += 1
                continue
            if answer.request_id is not None and answer.request_id != ours:
                anomalies["answer_for_other_request"] += 1
                continue
            if previous is not None and _same(previous, answer):
                notes["repeated_answers"] += 1
                continue
            if answer.status == "rejected" and record.answers:
                anomalies[f"late_rejection:{answer.reason}"] += 1
            previous = answer
            record.answers.append(Answer(timebase.scenario(at), answer.status, answer.granted_kw, answer.reason))
        record.delivered_kwh = delivered.get(ev.ev_id, 0.0)
        record.finished_at = finished.get(ev.ev_id)
        if sent is None:
            anomalies["ev_request_not_seen"] += 1
            lost.append(ev.ev_id)
        elif not record.answers:
            anomalies["ev_unanswered"] += 1
            lost.append(ev.ev_id)
        elif record.answers[-1].status not in FINAL_STATUSES:
            anomalies["ev_open_at_end"] += 1
            lost.append(ev.ev_id)
        if ev.ev_id in parsed.releases:
            notes["released_by_ev"] += 1
        records.append(record)
    return records, lost


def convert(messages: Iterable[Recorded], scenario: Scenario, evs: Sequence[EvSpec], timebase: Timebase, *,
            end_s: float, topics: Topics | None = None) -> LiveData:
    """The recording of one live run as a trace and EV records for :func:`replay.metrics.compute_metrics`."""
    parsed = _parse(messages, topics or Topics())
    notes: Counter[str] = Counter()
    anomalies = parsed.anomalies
    trace = build_trace(parsed.telemetry, parsed.status, scenario, timebase, end_s, notes)
    records, lost = build_evs(parsed, evs, timebase, end_s, notes, anomalies)
    counters = Counter(parsed.counters)
    for answers in parsed.answers.values():
        for _, a in answers:
            counters[f"answers:{a.status}"] += 1
    counters["commands"] = sum(len(b.commands) for _, _, b in parsed.commands)
    return LiveData(trace=trace, evs=records, counters=dict(sorted(counters.items())),
                    notes=dict(sorted(notes.items())), anomalies=dict(sorted(anomalies.items())), lost=lost)
