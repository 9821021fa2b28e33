"""The recorder benchmark's traffic: what 1,000 substations and 100,000 EVs send that the recorder keeps.

Pure and deterministic (a seeded RNG; time passed in): a list of ``(topic, payload, qos)`` with the contract's
models and QoS (telemetry 0, everything else 1). Per EV, as the balancer and agents would answer it:

* 70 %: ``assigned`` → session ``started`` → session ``ended`` (energy delivered or duration elapsed) →
  ``completed``: four messages;
* 20 %: ``queued`` (position, ETA);
* 10 %: ``rejected`` (exceeds capacity, queue full or invalid field).

Substations report telemetry ``ticks`` times each (once a second in production). The balancer's retained
views (``substation/{id}/state``, ``balancer/queue``) are left out: the ``loadtest`` account may not publish
them, and at most one per substation per second they are a small share of the traffic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from grid_protocol import Topics, encode
from grid_protocol.messages import Assignment, SessionEvent, SubstationStatus, Telemetry
from grid_protocol.reasons import Reason

Message = tuple[str, bytes, int]  # topic, payload, QoS


@dataclass(frozen=True, slots=True)
class Workload:
    substations: int = 1_000
    evs: int = 100_000
    ticks: int = 30
    seed: int = 15

    def substation_ids(self) -> list[str]:
        return [f"S{i:04d}" for i in range(1, self.substations + 1)]

    def ev_ids(self) -> list[str]:
        return [f"EV_{i:06d}" for i in range(1, self.evs + 1)]


def status_messages(w: Workload, topics: Topics, now: float) -> list[Message]:
    return [(topics.substation_status(sid), encode(SubstationStatus(state="online", substation_id=sid, ts=now,
                                                                    capacity_kw=1000.0)), 1)
            for sid in w.substation_ids()]


def telemetry_messages(w: Workload, topics: Topics, now: float) -> Iterator[Message]:
    rng = random.Random(w.seed)
    for tick in range(w.ticks):
        for sid in w.substation_ids():
            base = 300.0 + rng.random() * 400.0
            ev = rng.random() * 200.0
            t = Telemetry(substation_id=sid, ts=now + tick, seq=tick, capacity_kw=1000.0, load_kw=base + ev,
                          base_load_kw=base, ev_load_kw=ev, active_sessions=int(ev // 11))
            yield topics.telemetry(sid), encode(t), 0


def ev_messages(w: Workload, topics: Topics, now: float) -> Iterator[Message]:
    """Every EV's answers and session events, EVs interleaved over time as a busy grid would send them."""
    rng = random.Random(w.seed + 1)
    sids = w.substation_ids()
    span = max(1.0, float(w.ticks))
    for n, ev_id in enumerate(w.ev_ids()):
        ts = now + span * n / w.evs
        sid = sids[rng.randrange(len(sids))]
        rid = f"r{n}"
        answer = topics.assignment(ev_id)
        roll = rng.random()
        if roll < 0.7:
            kw = rng.choice((7.4, 11.0, 22.0))
            session = f"s-{n}"
            yield answer, encode(Assignment(request_id=rid, ev_id=ev_id, status="assigned", ts=ts,
                                            substation_id=sid, granted_kw=kw, session_id=session)), 1
            events = topics.session_events(sid)
            yield events, encode(SessionEvent(event="started", session_id=session, ev_id=ev_id, ts=ts + 0.01,
                                              substation_id=sid, request_id=rid, granted_kw=kw)), 1
            reason = rng.choice((Reason.ENERGY_DELIVERED, Reason.DURATION_ELAPSED))
            yield events, encode(SessionEvent(event="ended", session_id=session, ev_id=ev_id, ts=ts + 0.5,
                                              substation_id=sid, reason=reason,
                                              energy_delivered_kwh=round(kw * 0.5, 3))), 1
            yield answer, encode(Assignment(request_id=rid, ev_id=ev_id, status="completed", ts=ts + 0.51,
                                            substation_id=sid, granted_kw=0.0, session_id=session,
                                            reason=reason)), 1
        elif roll < 0.9:
            pos = rng.randrange(1, 200)
            yield answer, encode(Assignment(request_id=rid, ev_id=ev_id, status="queued", ts=ts, position=pos,
                                            eta_s=pos * 30.0)), 1
        else:
            reason = rng.choice((Reason.EXCEEDS_CAPACITY, Reason.QUEUE_FULL, Reason.INVALID_FIELD))
            yield answer, encode(Assignment(request_id=rid, ev_id=ev_id, status="rejected", ts=ts,
                                            reason=reason)), 1


def messages(w: Workload, topics: Topics, now: float) -> list[Message]:
    """Status first (retained, as at start-up), then telemetry and EV traffic interleaved."""
    tele = list(telemetry_messages(w, topics, now))
    evs = list(ev_messages(w, topics, now))
    out = status_messages(w, topics, now)
    # interleave proportionally so every chunk of the run has the same mix
    i = j = 0
    total = len(tele) + len(evs)
    for k in range(total):
        if j >= len(evs) or (i < len(tele) and i * total <= k * len(tele)):
            out.append(tele[i])
            i += 1
        else:
            out.append(evs[j])
            j += 1
    return out
