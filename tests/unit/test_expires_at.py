"""``ChargeRequest.expires_at`` (the replacement of MQTT 5 message expiry on 3.1.1): the balancer refuses a new
request received after it, answers a retry of a request it already answered as before, and does not remember
the refusal (a fresh copy of the same request id may still be placed)."""

from __future__ import annotations

import json

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


def test_ev_client_stamps_its_request_with_the_moment_it_gives_up() -> None:
    from ev_clients.ev import EvBehaviour

    b = EvBehaviour(retry_after_s=5.0, max_attempts=6)
    assert b.answer_window_s == 30.0
