"""The balancer's edge (issue 9): per-sender admission, the startup gate, retained input and reply roots.

Pure pieces (:class:`Admission`, :class:`StartupGate`) with a hand-held clock, then the real
:class:`BalancerService` over an in-memory transport: what it holds, sheds, refuses and answers.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from balancer import service as service_module
from balancer.admission import REFUSED_COST, Admission
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from balancer.startup import StartupGate
from tests.unit.test_substation_agent_unit import FakeTransport

P = "grid/v1"


# ---------------------------------------------------------------------------- admission


def test_admission_allows_the_burst_then_the_rate() -> None:
    a = Admission(rate=10, burst=5)
    assert [a.admit("EV", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert a.admit("EV", 0.1)  # one token back after 1/rate s
    assert not a.admit("EV", 0.1)
    assert a.admit("OTHER", 0.1)  # budgets are per sender


def test_admission_notices_at_most_once_per_interval_with_the_count() -> None:
    a = Admission(rate=1, burst=1, notice_every_s=1.0)
    a.admit("EV", 0.0)
    shed = [a.admit("EV", 0.0) for _ in range(5)]
    assert shed == [False] * 5
    assert a.notice_due("EV", 0.0) == 5
    assert not a.admit("EV", 0.5)
    assert a.notice_due("EV", 0.5) == 0  # within the interval: silent, still counted
    assert not a.admit("EV", 0.9)
    assert a.notice_due("EV", 1.0) == 2


def test_refused_messages_cost_more_so_junk_runs_dry_first() -> None:
    honest, junk = Admission(rate=10, burst=20), Admission(rate=10, burst=20)
    served = {"honest": 0, "junk": 0}
    for i in range(200):  # 10 s at 20 messages a second each
        t = i * 0.05
        if honest.admit("H", t):
            served["honest"] += 1
        if junk.admit("J", t):
            served["junk"] += 1
            junk.charge("J", REFUSED_COST - 1)
    assert served["honest"] >= 100  # the burst and the whole rate
    assert served["junk"] <= 20 / REFUSED_COST + 10 * 10 / REFUSED_COST + 2


def test_sweep_forgets_refilled_buckets_only() -> None:
    a = Admission(rate=10, burst=10)
    a.admit("OLD", 0.0)
    a.admit("NEW", 0.95)
    a.sweep(1.0)
    assert len(a) == 1


def test_sweep_forgets_idle_buckets_behind_one_that_sent_again() -> None:
    """The first sender sends again: its bucket is not full, the idle one it arrived before is forgotten."""
    a = Admission(rate=10, burst=10)
    a.admit("A", 0.0)
    a.admit("B", 0.5)
    a.admit("A", 1.2)
    a.sweep(1.6)
    assert "A" in a and "B" not in a and len(a) == 1
    a.sweep(2.2)
    assert len(a) == 0


def test_sweep_keeps_a_bucket_with_a_notice_pending_and_forgets_the_idle_ones_after_it() -> None:
    a = Admission(rate=10, burst=1, notice_every_s=5.0)  # full again after 0.1 s, a notice at most every 5 s
    a.admit("FLOODER", 0.0)
    assert not a.admit("FLOODER", 0.0)
    assert a.notice_due("FLOODER", 0.0) == 1
    a.admit("IDLE", 0.5)
    a.sweep(1.0)
    assert "FLOODER" in a and "IDLE" not in a
    a.sweep(5.0)
    assert len(a) == 0


def test_a_sweep_in_slices_reads_no_more_than_its_limit_and_forgets_what_a_whole_sweep_does() -> None:
    """``limit``: at most that many buckets read a call, True while it stopped there; slice after slice forgets
    exactly the buckets one whole sweep forgets, keeps the one with a notice pending (behind the others, read once),
    and stops at the first bucket that is not full yet."""
    sliced, whole = Admission(rate=10, burst=1, notice_every_s=5.0), Admission(rate=10, burst=1, notice_every_s=5.0)
    for a in (sliced, whole):
        a.admit("FLOODER", 0.0)
        assert not a.admit("FLOODER", 0.0) and a.notice_due("FLOODER", 0.0) == 1
        for i in range(25):
            a.admit(f"EV{i}", 0.1 + i / 1000)
        a.admit("BUSY", 0.95)  # not full again at 1.0: the sweep stops here
    calls = []
    while True:
        before = len(sliced)
        more = sliced.sweep(1.0, limit=10)
        calls.append((before - len(sliced), more))
        if not more:
            break
    whole.sweep(1.0)
    assert calls == [(9, True), (10, True), (6, False)]  # the flooder read once (kept), then up to the busy one
    assert set(sliced._buckets) == set(whole._buckets) == {"FLOODER", "BUSY"}
    assert list(sliced._buckets) == ["BUSY", "FLOODER"]  # (kept behind the others)
    assert not whole.sweep(1.0) and not sliced.sweep(1.0, limit=1)


def test_the_service_sweeps_in_slices_and_reads_in_between() -> None:
    """20,000 idle EVs: the service's sweep (``sweep_in_steps``) yields to the loop between slices, so what arrives
    meanwhile is read before the sweep ends, and every idle bucket is forgotten by the end."""
    svc, _ = service(startup_wait_s=0)
    adm = svc._ev_admission
    for i in range(20_000):
        adm.admit(f"EV{i}", 0.0)
    order: list[str] = []

    async def main() -> None:
        svc._sweep_due = True
        sweep = asyncio.ensure_future(svc.sweep_in_steps())
        await asyncio.sleep(0)  # the first slice ran
        order.append(f"read while {len(adm)} left")
        await sweep
        order.append(f"swept, {len(adm)} left")

    assert service_module._SWEEP_STEP < 20_000
    asyncio.run(main())
    assert order[0] != "read while 0 left" and order[-1] == "swept, 0 left"


# ---------------------------------------------------------------------------- startup gate


def test_gate_opens_when_every_substation_online_in_the_snapshot_has_inventoried() -> None:
    gate: StartupGate[str] = StartupGate(started_at=0.0, max_wait_s=5.0, buffer_max=10)
    gate.substation_status("A", online=True, inventory=False)  # retained, from before
    gate.substation_status("B", online=True, inventory=False)
    gate.substation_status("C", online=False, inventory=False)  # its will: nothing will come
    assert gate.hold("release-1") and gate.hold("request-2")
    assert not gate.ready(0.1)  # the snapshot is not complete yet
    gate.own_status_seen()
    gate.substation_status("D", online=True, inventory=False)  # came online later: not waited for
    gate.substation_status("A", online=True, inventory=True)
    assert not gate.ready(0.2) and gate.missing() == {"B"}
    gate.substation_status("B", online=True, inventory=True)
    assert gate.ready(0.3)
    assert list(gate.release(0.3)) == ["release-1", "request-2"]
    assert gate.is_open and not gate.timed_out and list(gate.release(0.4)) == []


def test_gate_opens_after_max_wait_and_bounds_what_it_holds() -> None:
    gate: StartupGate[int] = StartupGate(started_at=0.0, max_wait_s=5.0, buffer_max=2)
    gate.substation_status("A", online=True, inventory=False)
    gate.own_status_seen()
    assert gate.hold(1) and gate.hold(2) and not gate.hold(3)
    assert not gate.ready(4.9)
    assert gate.ready(5.0) and gate.timed_out
    assert list(gate.release(5.0)) == [1, 2]


# ---------------------------------------------------------------------------- the service's edge


def service(**settings: object) -> tuple[BalancerService, FakeTransport]:
    transport = FakeTransport()
    svc = BalancerService(BalancerSettings(**settings), transport)  # type: ignore[arg-type]
    return svc, transport


def answers(transport: FakeTransport, ev: str) -> list[dict]:
    return [json.loads(p.payload) for p in transport.on(f"{P}/ev/{ev}/assignment")]


def telemetry(transport: FakeTransport, sid: str = "A", seq: int = 0) -> None:
    transport.deliver(f"{P}/substation/{sid}/telemetry", json.dumps({
        "substation_id": sid, "ts": 1.0, "seq": seq, "capacity_kw": 100, "load_kw": 0, "base_load_kw": 0,
        "ev_load_kw": 0, "active_sessions": 0}).encode())


def request(transport: FakeTransport, ev: str, rid: str, *, retain: bool = False) -> None:
    transport.deliver(f"{P}/ev/{ev}/request", json.dumps(
        {"request_id": rid, "requested_kw": 11, "duration_minutes": 60}).encode(), retain=retain)


def test_input_is_held_until_the_agents_have_inventoried_then_acted_on_in_order() -> None:
    svc, tr = service(startup_wait_s=30)
    tr.deliver(f"{P}/substation/A/status", b'{"state": "online", "substation_id": "A"}', retain=True)
    telemetry(tr)
    request(tr, "EV1", "r1")
    tr.deliver(f"{P}/ev/EV1/release", b"{}")
    assert answers(tr, "EV1") == [] and len(svc.startup.held) == 2
    status = {"state": "online", "instance": svc.instance}
    tr.deliver(f"{P}/balancer/status", json.dumps(status).encode())  # our own echo: the snapshot is complete
    assert not svc.startup.is_open
    tr.deliver(f"{P}/substation/A/session", json.dumps({  # the agent re-announces what runs there ...
        "event": "running", "session_id": "old-1", "ev_id": "EV9", "ts": 1.0, "granted_kw": 11.0}).encode())
    tr.deliver(f"{P}/substation/A/status", json.dumps({  # ... and closes its inventory
        "state": "online", "substation_id": "A", "announced_for": svc.instance, "sessions": 1}).encode())
    assert svc.startup.is_open
    assert [a["status"] for a in answers(tr, "EV1")] == ["assigned", "completed"]
    assert svc.core.session_count() == 1 and svc.core.ev_state("EV9") is not None  # adopted


def test_a_full_startup_buffer_refuses_with_reason_starting() -> None:
    _svc, tr = service(startup_wait_s=30, startup_buffer_max=1)
    tr.deliver(f"{P}/substation/A/status", b'{"state": "online"}', retain=True)
    request(tr, "EV1", "r1")
    request(tr, "EV2", "r2")
    assert answers(tr, "EV1") == []
    (refused,) = answers(tr, "EV2")
    assert (refused["status"], refused["reason"], refused["request_id"]) == ("rejected", "starting", "r2")


def test_retained_requests_are_refused_and_cleared() -> None:
    svc, tr = service(startup_wait_s=0)
    telemetry(tr)
    request(tr, "EV1", "r1", retain=True)
    (a,) = answers(tr, "EV1")
    assert (a["status"], a["reason"], a["request_id"]) == ("rejected", "retained", "r1")
    (clear,) = tr.on(f"{P}/ev/EV1/request")
    assert (clear.payload, clear.retain) == (b"", True)
    tr.deliver(f"{P}/ev/EV1/request", b"", retain=True)  # our own clear, echoed: nothing happens
    assert len(answers(tr, "EV1")) == 1 and svc.core.session_count() == 0
    assert svc.counters["bad_payload:ev_request:retained"] == 1


@pytest.mark.parametrize(("response_topic", "served"), [
    ("grid/v1/reply/EV1/x", True),
    ("grid/v1/reply/EV1/", False),
    ("grid/v1/reply/EV10/x", False),  # another account whose name starts with ours
    ("grid/v1/reply/api/x", False),
    ("grid/v1/reply/EV1/#", False),
    ("grid/v1/substation/A/command", False),
])
def test_replies_only_below_the_requesting_evs_reply_root(response_topic: str, served: bool) -> None:
    from grid_runtime.mqtt import InMessage

    svc, tr = service(startup_wait_s=0)
    telemetry(tr)
    assert tr.handler is not None
    tr.handler(InMessage(f"{P}/ev/EV1/request", json.dumps({"request_id": "r", "requested_kw": 7,
                                                              "energy_kwh": 5}).encode(), 1, False,
                         response_topic=response_topic, correlation_data=b"c"))
    replies = [p for p in tr.on(response_topic) if b'"status"' in p.payload]
    assert bool(replies) == served
    assert svc.counters["response_topic_refused"] == (0 if served else 1)


def test_a_flooding_ev_is_shed_and_told_once_per_second_others_are_served() -> None:
    svc, tr = service(startup_wait_s=0, ev_rate_per_s=10, ev_burst=5)
    telemetry(tr)
    for _ in range(1000):
        tr.deliver(f"{P}/ev/FLOOD/request", b'{"requested_kw": "lots"}')
    flood = answers(tr, "FLOOD")
    reasons = [a["reason"] for a in flood]
    # The burst is read and refused (each costs REFUSED_COST tokens: two empty the bucket of 5), the rest is shed;
    # the sender hears it when shedding starts, then at most once a second with the count since.
    assert reasons.count("invalid_field") == 2 and reasons.count("rate_limited") == 1
    assert flood[-1]["detail"].startswith("1 message(s) shed: more than 10 per second")
    assert svc.counters["bad_payload:ev_request:rate_limited"] == 998
    request(tr, "EV1", "r1")
    assert [a["status"] for a in answers(tr, "EV1")] == ["assigned"]


# ---------------------------------------------------------------------------- limit schedules at the edge
def results(transport: FakeTransport) -> list[dict]:
    return [json.loads(p.payload) for p in transport.on(f"{P}/balancer/control/result")]


def test_limit_schedules_are_answered_published_retained_and_bad_ones_refused() -> None:
    svc, tr = service(startup_wait_s=0)
    telemetry(tr)
    now = svc.clock()
    body = {"source": "dso-north", "request_id": "d1",
            "entries": [{"start": now + 3600, "end": now + 7200, "limit_kw": 50}]}
    tr.deliver(f"{P}/substation/A/limits", json.dumps(body).encode())
    (ok,) = results(tr)
    assert (ok["ok"], ok["action"], ok["substation_id"], ok["request_id"]) == (True, "set_limits", "A", "d1")
    (published,) = tr.on(f"{P}/substation/A/schedule")
    assert published.retain and json.loads(published.payload)["entries"][0]["source"] == "dso-north"
    for payload, reason, retain in [
        (json.dumps(body | {"request_id": "d2"}), "retained", True),  # would be replayed over newer schedules
        (json.dumps(body | {"request_id": "d3", "substation_id": "B"}), "id_mismatch", False),
        ('{"source": "dso", "request_id": "d4", "entries": [{"start": 2, "end": 1, "limit_kw": 1}]}',
         "invalid_field", False),
        ('{"source": "dso", "request_id": "d5", "entries": [], "source": "x"}', "duplicate_key", False),
        ('{"source": "dso", "request_id": "d6", "entries": [}', "malformed_json", False),
    ]:
        tr.deliver(f"{P}/substation/A/limits", payload.encode(), retain=retain)
        last = results(tr)[-1]
        assert (last["ok"], last["reason"], last["action"]) == (False, reason, "set_limits"), last
        assert last["request_id"] == json.loads(payload.replace("[}", "[]}"))["request_id"]
    clears = [p for p in tr.on(f"{P}/substation/A/limits") if p.retain and p.payload == b""]
    assert len(clears) == 1  # the retained one was cleared
    tr.deliver(f"{P}/substation/A/limits", b"", retain=True)  # our own clear, echoed: nothing happens
    assert len(results(tr)) == 6
    assert svc.counters["bad_payload:substation_limits:invalid_field"] == 1
    unknown = {"source": "dso", "request_id": "d7", "entries": []}
    tr.deliver(f"{P}/substation/Q/limits", json.dumps(unknown).encode())
    assert results(tr)[-1]["reason"] == "unknown_substation"


def test_a_restarted_balancer_reads_its_retained_schedule_back_and_ignores_live_echoes() -> None:
    first, tr1 = service(startup_wait_s=0)
    telemetry(tr1)
    now = first.clock()
    tr1.deliver(f"{P}/substation/A/limits", json.dumps({
        "source": "dso", "entries": [{"start": now - 1, "end": now + 3600, "limit_kw": 40}]}).encode())
    retained = tr1.on(f"{P}/substation/A/schedule")[-1].payload
    second, tr2 = service(startup_wait_s=30)
    tr2.deliver(f"{P}/substation/A/schedule", retained, retain=True)  # delivered on subscribe
    telemetry(tr2)
    assert second.core.substations["A"].capacity_w == 40_000
    assert second.core.substations["A"].limit_source() == "dso"
    third, tr3 = service(startup_wait_s=0)
    tr3.deliver(f"{P}/substation/A/schedule", retained)  # not retained: an echo of a live publication
    assert third.core.schedules == {}
