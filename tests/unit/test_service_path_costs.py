"""What the service path keeps or skips to cut its cost per grid-second (issue 10, session E), each against the
computation done afresh: the queue's position updates build an answer only for the EVs they tell, a rebuilt
session list re-encodes only its new views (the payloads themselves: tests/unit/test_state_encoding.py), and the
rebalancer's no-cuts proof outlives a moved noise band (against a core that re-shares on every pass)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.core import Balancer, CoreConfig, ToEv
from balancer.core.effects import Effect
from balancer.core.model import Substation
from balancer.core.rebalancing import ByClass
from balancer.core.shares import ShareTable
from grid_protocol import ChargeRequest, Release, Telemetry
from tests.unit.test_core_indexes import _against_every_session_pass, _lockstep
from tests.unit.test_state_encoding import service_with_sessions

T0 = 1_700_000_000.0
P = "grid/v1"


def reference_updates(b: Balancer, now: float) -> list[tuple[str, object]]:
    """Position updates as every answer built afresh says them (the pass before session E), nothing changed."""
    told = []
    items = b.queue.items()
    ends = b.state.ends.first(len(items))
    for position, req in enumerate(items, start=1):
        old = b.ledger.evs[req.ev_id].answer
        answer = b.ledger.answer(req, "queued", now, reason=old.reason, position=position, ends=ends)
        eta_moved = (old.eta_s is None) != (answer.eta_s is None) or (
            old.eta_s is not None and answer.eta_s is not None and abs(old.eta_s - answer.eta_s) > 30)
        if old.status != "queued" or old.position != position or eta_moved:
            told.append((req.ev_id, answer))
    return told


step = st.one_of(
    st.tuples(st.just("request"), st.integers(0, 30), st.sampled_from([7.4, 11.0, 22.0])),
    st.tuples(st.just("release"), st.integers(0, 30), st.just(0.0)),
    st.tuples(st.just("telemetry"), st.integers(0, 2), st.floats(0.0, 60.0)),
    st.tuples(st.just("time"), st.just(0), st.sampled_from([1.0, 5.0, 40.0, 120.0])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=50))
def test_queue_updates_tell_what_every_answer_built_afresh_tells(steps: list[tuple[str, int, float]]) -> None:
    b = Balancer(CoreConfig(queue_update_interval_s=5.0))
    now = T0
    for sid in ("A", "B", "C"):
        b.on_status(sid, "online", now)
    for seq, (kind, index, arg) in enumerate(steps):
        if kind == "request":
            b.on_request(f"E{index}", ChargeRequest(request_id=f"r{seq}", requested_kw=arg, min_kw=arg / 2,
                                                    energy_kwh=20.0 + index), now)
        elif kind == "release":
            b.on_release(f"E{index}", Release(), now)
        elif kind == "telemetry":
            sid = "ABC"[index]
            granted = b.substations[sid].granted_w / 1000 if sid in b.substations else 0.0
            b.on_telemetry(Telemetry(substation_id=sid, ts=now, seq=seq, capacity_kw=60.0, load_kw=arg + granted,
                                     base_load_kw=arg, ev_load_kw=granted, active_sessions=0), now)
        else:
            now += arg
        expected = reference_updates(b, now)
        effects: list[Effect] = b.queue_service.updates(now)
        assert [(e.ev_id, e.message) for e in effects if isinstance(e, ToEv)] == expected
        assert all(b.ledger.evs[ev].answer is answer for ev, answer in
                   ((e.ev_id, e.message) for e in effects if isinstance(e, ToEv)))
        assert reference_updates(b, now) == []  # what moved was told (and is the EV's answer now)


def test_a_rebuilt_session_list_reencodes_only_its_new_views() -> None:
    """One session's grant changes: the list is rebuilt and only that session's view is encoded again."""
    clock = [1000.0]
    svc, transport = service_with_sessions(5, clock)
    topic = f"{P}/substation/A/state"
    svc.publish_states(clock[0])
    first = svc._state_sent[topic]
    sub = svc.core.substations["A"]
    changed = list(sub.sessions.values())[2]
    clock[0] += 30.0
    svc.core.book.set_grant(changed, 7_000, clock[0], "rebalanced", "test")  # type: ignore[arg-type]
    svc.publish_states(clock[0])
    second = svc._state_sent[topic]
    assert second.views is not first.views and second.raw != first.raw
    assert first.parts is not None and second.parts is not None
    reused = [i for i, chunk in enumerate(second.parts) if chunk is first.parts[i]]
    assert reused == [0, 1, 3, 4]  # the four views that did not change keep their bytes; only the third is new
    body = json.loads([p for p in transport.sent if p.topic == topic][-1].payload)
    assert [s["granted_kw"] for s in body["sessions"]][2] == 7.0


@pytest.mark.instruments_compiled
def test_the_no_cuts_proof_holds_across_a_moved_noise_band() -> None:
    """The proof (``Rebalancer._no_cuts``) is drawn with the step of the pass that uses it: a noise band that moved
    since (it decays with every telemetry window) no longer voids it. A saturated substation whose base load wanders
    for ten minutes while EVs come and go, against a core that looks at every session on every pass: passes are
    skipped under a step other than the proving pass's, and every effect is the one of the core that skips none."""
    cores = _against_every_session_pass(CoreConfig())
    rebalancer = cores[0].rebalancer
    proved_at: dict[int, int] = {}  # share table -> the step when its proof was taken
    skipped, skipped_moved = [0], [0]
    prove, no_cuts = rebalancer._prove_no_cuts, rebalancer._no_cuts

    def proving(sub: Substation, by_class: ByClass, available: int) -> None:
        prove(sub, by_class, available)
        proved_at[id(by_class[0])] = max(1, rebalancer.step_w(sub))

    def counting(table: ShareTable, available: int, least: int) -> bool:
        out = no_cuts(table, available, least)
        skipped[0] += out
        skipped_moved[0] += out and proved_at.get(id(table)) != least
        return out

    rebalancer._prove_no_cuts = proving  # type: ignore[method-assign]
    rebalancer._no_cuts = counting  # type: ignore[method-assign]
    both = _lockstep(cores)
    now, base = T0, 40.0
    both("on_status", "A", "online", now)
    for seq in range(600):
        if seq == 0 or seq % 10 == 5:
            for i in range(3):
                both("on_request", f"E{seq}-{i}", ChargeRequest(request_id="r", requested_kw=(7.4, 11.0, 22.0)[i % 3],
                                                                min_kw=1.4, duration_minutes=600), now)
        if seq % 10 == 9 and seq > 200:
            ev = min(cores[0]._evs, key=lambda e: cores[0]._evs[e].request.arrival)
            both("on_release", ev, Release(), now)
        base += 0.8 * ((seq * 7919) % 3 - 1) + (3.0 if seq % 97 == 0 else 0.0)  # now and then a jump: a wider band
        granted = cores[0].substations["A"].granted_w / 1000
        both("on_telemetry", Telemetry(substation_id="A", ts=now, seq=seq, capacity_kw=250.0, load_kw=base + granted,
                                       base_load_kw=base, ev_load_kw=granted, active_sessions=0), now)
        if seq % 2:
            both("tick", now)
        now += 1.0
        assert not cores[0].violations()
    assert skipped_moved[0] > 0 and skipped[0] > skipped_moved[0]
