"""``expires_at`` (the replacement of MQTT 5 message expiry on 3.1.1): the balancer refuses a new charge
request received after it, answers a retry of a request it already answered as before, and does not remember
the refusal (a fresh copy of the same request id may still be placed); a late operator action is refused too."""

from __future__ import annotations

import asyncio
import json
import time

from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from grid_protocol import Reason
from tests.unit.test_balancer_edge import answers, telemetry
from tests.unit.test_substation_agent_unit import FakeTransport

P = "grid/v1"
NOW = 1_800_000_000.0


def _service() -> tuple[BalancerService, FakeTransport]:
    transport = FakeTransport()
    return BalancerService(BalancerSettings(startup_wait_s=0), transport, clock=lambda: NOW), transport


def _request(tr: FakeTransport, ev: str, rid: str, expires_at: float | None) -> None:
    body: dict[str, object] = {"request_id": rid, "requested_kw": 11, "duration_minutes": 60}
    if expires_at is not None:
        body["expires_at"] = expires_at
    tr.deliver(f"{P}/ev/{ev}/request", json.dumps(body).encode())


def _commands(tr: FakeTransport) -> list[dict]:
    return [c for p in tr.on(f"{P}/substation/A/command") for c in json.loads(p.payload)["commands"]]


def test_a_request_received_after_its_expires_at_is_refused_not_placed() -> None:
    svc, tr = _service()
    telemetry(tr)
    _request(tr, "EV1", "late", NOW - 0.5)
    svc._flush_commands()
    [answer] = answers(tr, "EV1")
    assert (answer["status"], answer["reason"], answer["request_id"]) == ("rejected", Reason.EXPIRED, "late")
    assert "0.5 s after its expires_at" in answer["detail"]
    assert svc.core.counters[f"rejected:{Reason.EXPIRED}"] == 1
    assert _commands(tr) == []  # no session was opened
    assert svc.core.session_count() == 0

    # Not remembered: the same request id sent again with a later expires_at is placed.
    _request(tr, "EV1", "late", NOW + 30)
    svc._flush_commands()
    assert answers(tr, "EV1")[-1]["status"] == "assigned"
    assert [c["command"] for c in _commands(tr)] == ["start"]


def test_a_retry_of_an_answered_request_gets_its_answer_even_when_expired() -> None:
    svc, tr = _service()
    telemetry(tr)
    _request(tr, "EV2", "r1", NOW + 10)
    first = answers(tr, "EV2")[-1]
    assert first["status"] == "assigned"
    _request(tr, "EV2", "r1", NOW - 100)  # a late copy of the same request: the duplicate's answer, not expired
    again = answers(tr, "EV2")[-1]
    assert (again["status"], again["session_id"]) == ("assigned", first["session_id"])
    assert svc.core.counters[f"rejected:{Reason.EXPIRED}"] == 0


def test_without_expires_at_nothing_changes() -> None:
    _svc, tr = _service()
    telemetry(tr)
    _request(tr, "EV3", "r1", None)
    assert answers(tr, "EV3")[-1]["status"] == "assigned"


def test_ev_client_stamps_its_request_with_the_moment_it_gives_up_and_each_poll_afresh() -> None:
    """Every copy sent while waiting for the first answer carries the same ``expires_at`` (when the EV gives up:
    retry_after_s x max_attempts after the first send); a later state query (poll) carries a fresh one."""
    from tests.unit.test_ev_client import FakeTransport as EvFake
    from tests.unit.test_ev_client import _charge

    def script(kind: str, msg: object, fake: EvFake) -> None:
        requests = fake.requests()
        if kind == "request" and len(requests) == 2:  # answer the second copy: queued, then silence (polls)
            fake.send(request_id=requests[0].request_id, status="queued", reason="no_headroom", position=1)
        elif kind == "release":
            fake.send(request_id=requests[0].request_id, status="cancelled", reason="released")

    before = time.time()
    _record, fake, _ = asyncio.run(_charge(script, retry_after_s=0.05, max_attempts=5, timeout_s=0.3,
                                           poll_after_s=0.1))
    sent = fake.requests()
    first, second, polls = sent[0], sent[1], sent[2:]
    assert first.expires_at is not None and first.expires_at == second.expires_at
    assert before + 0.249 <= first.expires_at <= time.time() + 0.251  # 0.05 s x 5 attempts after the first send
    assert polls and all(p.expires_at is not None and p.expires_at > first.expires_at for p in polls)


def _results(tr: FakeTransport) -> list[dict]:
    return [json.loads(p.payload) for p in tr.on(f"{P}/balancer/control/result")]


def test_a_late_operator_action_is_refused_expired_and_not_applied() -> None:
    svc, tr = _service()
    telemetry(tr)
    drain = {"action": "drain", "substation_id": "A", "request_id": "op-1"}
    tr.deliver(f"{P}/balancer/control", json.dumps({**drain, "expires_at": NOW - 2}).encode())
    [late] = _results(tr)
    assert (late["ok"], late["reason"], late["request_id"], late["action"], late["substation_id"]) == (
        False, Reason.EXPIRED, "op-1", "drain", "A")
    assert not svc.core.substations["A"].draining
    assert svc.counters[f"bad_payload:balancer_control:{Reason.EXPIRED}"] == 1
    tr.deliver(f"{P}/balancer/control", json.dumps({**drain, "expires_at": NOW + 2}).encode())
    assert _results(tr)[-1]["ok"] and svc.core.substations["A"].draining

    limits = {"source": "dso", "entries": [{"start": NOW, "end": NOW + 600, "limit_kw": 50}], "request_id": "l-1"}
    tr.deliver(f"{P}/substation/A/limits", json.dumps({**limits, "expires_at": NOW - 2}).encode())
    late = _results(tr)[-1]
    assert (late["ok"], late["action"], late["reason"]) == (False, "set_limits", Reason.EXPIRED)
    assert "A" not in svc.core.schedules
    tr.deliver(f"{P}/substation/A/limits", json.dumps({**limits, "expires_at": NOW + 2}).encode())
    assert _results(tr)[-1]["ok"] and "A" in svc.core.schedules
