"""Who may call which route: every route against every role (anonymous, a wrong token, an EV token for its own
and for another EV, a viewer, an operator), with reads closed (the default) and open; refusals are problem
details with ``WWW-Authenticate`` and publish nothing over MQTT. A fake transport plays the balancer."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient
from test_api_app import FakeTransport, assert_problem, feed, make_client, sub_state

from api.tokens import TokenEntry, TokenFile, hash_token, write_token_file
from grid_protocol import encode
from grid_protocol.messages import Assignment, ChargeRequest, ControlCommand, ControlResult, Release, SessionView

OPERATOR = "operator-token-1"
EV_TOKEN = "ev-0001-token"  # EV_0001 only
CP_TOKEN = "charge-point-token"  # a charge-point backend: CP7_000 .. CP7_999
VIEWER = "viewer-token"
WRONG = "nobody-holds-this"
OWN, OTHER = "EV_0001", "EV_0002"
SESSION_OF = {OWN: "s-1", OTHER: "s-2"}

ROLES = {"anonymous": None, "wrong token": WRONG, "ev": EV_TOKEN, "viewer": VIEWER, "operator": OPERATOR}


def tokens_file(path: Path) -> Path:
    write_token_file(path, TokenFile(tokens=[
        TokenEntry(name="ev-0001", role="ev", ev_ids=[OWN], sha256=hash_token(EV_TOKEN)),
        TokenEntry(name="cp-7", role="ev", ev_pattern="CP7_[0-9]{3}", sha256=hash_token(CP_TOKEN)),
        TokenEntry(name="wall", role="viewer", sha256=hash_token(VIEWER)),
    ]))
    return path


def balancer(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
    """Answers every request (assigned), release (completed) and control command (ok)."""
    now = time.time()
    if topic.endswith("/request"):
        req = msgspec.json.decode(payload, type=ChargeRequest)
        assert req.ev_id is not None
        a = Assignment(request_id=req.request_id, ev_id=req.ev_id, status="assigned", ts=now, substation_id="A",
                       granted_kw=11.0, session_id="s-new")
        return [(f"grid/v1/ev/{req.ev_id}/assignment", encode(a))]
    if topic.endswith("/release"):
        rel = msgspec.json.decode(payload, type=Release)
        ev_id = topic.split("/")[-2]
        status = "completed" if rel.session_id else "cancelled"
        a = Assignment(request_id=rel.request_id or "r", ev_id=ev_id, status=status, ts=now,
                       session_id=rel.session_id, reason="released")
        return [(f"grid/v1/ev/{ev_id}/assignment", encode(a))]
    if topic.endswith("/control"):
        cmd = msgspec.json.decode(payload, type=ControlCommand)
        result = ControlResult(ok=True, action=cmd.action, substation_id=cmd.substation_id, ts=now,
                               request_id=cmd.request_id, state=sub_state(cmd.substation_id))
        return [("grid/v1/balancer/control/result", encode(result))]
    return []


@pytest.fixture
def auth_client(tmp_path: Path) -> Iterator[tuple[TestClient, FakeTransport]]:
    fake = FakeTransport()
    fake.responder = balancer
    with make_client(fake, token=OPERATOR, tokens_file=tokens_file(tmp_path / "tokens.json")) as client:
        sessions = [SessionView(session_id=SESSION_OF[ev], ev_id=ev, request_id=f"r-{ev}", granted_kw=11,
                                requested_kw=11, min_kw=1.4, priority=0, started_at=time.time()) for ev in (OWN, OTHER)]
        feed(client, fake, "grid/v1/substation/A/state", sub_state("A", sessions))
        yield client, fake


Call = Callable[[str], tuple[str, str, dict[str, Any] | None]]  # EV id -> method, path, JSON body

CHARGE: Call = lambda ev: ("POST", "/charge", {"ev_id": ev, "requested_kw": 11, "duration_minutes": 60})  # noqa: E731
WRITES: dict[str, Call] = {
    "POST /charge": CHARGE,
    "DELETE /sessions/{id}": lambda ev: ("DELETE", f"/sessions/{SESSION_OF[ev]}", None),
    "DELETE /evs/{id}/request": lambda ev: ("DELETE", f"/evs/{ev}/request", None),
}
OPERATOR_ROUTES: dict[str, Call] = {
    "POST drain": lambda _ev: ("POST", "/substations/A/drain", None),
    "POST undrain": lambda _ev: ("POST", "/substations/A/undrain", None),
    "PUT capacity": lambda _ev: ("PUT", "/substations/A/capacity", {"capacity_kw": 300}),
}
GRID_READS: dict[str, Call] = {
    "GET /status": lambda _ev: ("GET", "/status", None),
    "GET /substations": lambda _ev: ("GET", "/substations", None),
    "GET /substations/{id}": lambda _ev: ("GET", "/substations/A", None),
    "GET /queue": lambda _ev: ("GET", "/queue", None),
    "GET /sessions": lambda _ev: ("GET", "/sessions", None),
}
EV_READS: dict[str, Call] = {
    "GET /evs/{id}": lambda ev: ("GET", f"/evs/{ev}", None),
    "GET /sessions?ev_id=": lambda ev: ("GET", f"/sessions?ev_id={ev}", None),
}
OPEN: dict[str, Call] = {
    "GET /health": lambda _ev: ("GET", "/health", None),
    "GET /metrics": lambda _ev: ("GET", "/metrics", None),
    "GET /": lambda _ev: ("GET", "/", None),
    "GET /static/app.js": lambda _ev: ("GET", "/static/app.js", None),
    "GET /openapi.json": lambda _ev: ("GET", "/openapi.json", None),
    "GET /docs": lambda _ev: ("GET", "/docs", None),
}


def call(client: TestClient, fake: FakeTransport, route: Call, ev_id: str, token: str | None) -> Any:
    method, path, body = route(ev_id)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    before = len(fake.published)
    response = client.request(method, path, json=body, headers=headers)
    response.published = fake.published[before:]  # type: ignore[attr-defined]
    return response


def expect_refused(response: Any, status: int, role: str) -> None:
    body = assert_problem(response, status)
    assert response.published == [], f"a refused request reached MQTT: {response.published}"
    header = response.headers.get("www-authenticate", "")
    if status == 401:
        assert body["type"] == "urn:gridlb:problem:unauthorized"
        assert header.startswith('Bearer realm="gridlb"')
        assert ('error="invalid_token"' in header) == (role == "wrong token"), header
    else:
        assert body["type"] == "urn:gridlb:problem:forbidden"
        assert header == 'Bearer realm="gridlb", error="insufficient_scope"'


def expected_write(role: str, own: bool) -> int:
    return {"anonymous": 401, "wrong token": 401, "ev": 200 if own else 403, "viewer": 403, "operator": 200}[role]


def test_every_write_against_every_role(auth_client: tuple[TestClient, FakeTransport]) -> None:
    client, fake = auth_client
    seen = 0
    for name, route in WRITES.items():
        for role, token in ROLES.items():
            for ev_id in (OWN, OTHER):
                r = call(client, fake, route, ev_id, token)
                want = expected_write(role, ev_id == OWN)
                if role == "operator":
                    want = 200
                where = f"{name} as {role} for {ev_id}: {r.text}"
                if want == 200:
                    assert r.status_code == 200, where
                    topic = r.published[0][0]
                    assert topic.startswith(f"grid/v1/ev/{ev_id}/"), where  # published for that EV, no other
                else:
                    assert r.status_code == want, where
                    expect_refused(r, want, role)
                seen += 1
    assert seen == 3 * 5 * 2


def test_operator_routes_only_for_operators(auth_client: tuple[TestClient, FakeTransport]) -> None:
    client, fake = auth_client
    for name, route in OPERATOR_ROUTES.items():
        for role, token in ROLES.items():
            r = call(client, fake, route, OWN, token)
            want = {"anonymous": 401, "wrong token": 401, "ev": 403, "viewer": 403, "operator": 200}[role]
            assert r.status_code == want, f"{name} as {role}: {r.text}"
            if want == 200:
                assert [t for t, _ in r.published] == ["grid/v1/balancer/control"]
            else:
                expect_refused(r, want, role)
    r = call(client, fake, OPERATOR_ROUTES["POST drain"], OWN, EV_TOKEN)
    assert r.json()["detail"] == "operator actions need an operator token; 'ev-0001' is an ev token"


def test_reads_are_closed_by_default(auth_client: tuple[TestClient, FakeTransport]) -> None:
    client, fake = auth_client
    for name, route in GRID_READS.items():
        for role, token in ROLES.items():
            r = call(client, fake, route, OWN, token)
            want = {"anonymous": 401, "wrong token": 401, "ev": 403, "viewer": 200, "operator": 200}[role]
            assert r.status_code == want, f"{name} as {role}: {r.text}"
            if want != 200:
                expect_refused(r, want, role)
    for name, route in EV_READS.items():
        for role, token in ROLES.items():
            for ev_id in (OWN, OTHER):
                r = call(client, fake, route, ev_id, token)
                want = expected_write(role, ev_id == OWN)
                if role in ("viewer", "operator"):
                    want = 200
                assert r.status_code == want, f"{name} as {role} for {ev_id}: {r.text}"
                if want != 200:
                    expect_refused(r, want, role)
    # an EV token reads only its own EVs' sessions
    page = call(client, fake, EV_READS["GET /sessions?ev_id="], OWN, EV_TOKEN).json()
    assert [s["ev_id"] for s in page["items"]] == [OWN]
    # the live feed refuses before it starts streaming (an allowed stream: tests/integration/test_api_e2e.py)
    for role, want in (("anonymous", 401), ("wrong token", 401), ("ev", 403)):
        r = call(client, fake, lambda _ev: ("GET", "/events", None), OWN, ROLES[role])
        expect_refused(r, want, role)
    for name, route in OPEN.items():
        for role, token in ROLES.items():
            assert call(client, fake, route, OWN, token).status_code == 200, f"{name} as {role}"
    assert fake.published == []


def test_public_reads_open_every_read_and_no_write(tmp_path: Path) -> None:
    fake = FakeTransport()
    fake.responder = balancer
    with make_client(fake, token=OPERATOR, tokens_file=tokens_file(tmp_path / "t.json"), public_reads=True) as client:
        feed(client, fake, "grid/v1/substation/A/state", sub_state("A", [SessionView(
            session_id="s-1", ev_id=OWN, request_id="r", granted_kw=11, requested_kw=11, min_kw=1.4, priority=0,
            started_at=time.time())]))
        for name, route in {**GRID_READS, **EV_READS}.items():
            for role, token in ROLES.items():  # a token is not looked at: even a wrong one reads
                for ev_id in (OWN, OTHER):
                    r = call(client, fake, route, ev_id, token)
                    assert r.status_code == (404 if name == "GET /evs/{id}" and ev_id == OTHER else 200), \
                        f"{name} as {role}: {r.text}"
        for name, route in WRITES.items():
            if name == "DELETE /sessions/{id}":
                continue  # only s-1 is running here; writes are covered above
            for role, token in ROLES.items():
                r = call(client, fake, route, OTHER, token)
                want = {"anonymous": 401, "wrong token": 401, "ev": 403, "viewer": 403, "operator": 200}[role]
                assert r.status_code == want, f"{name} as {role}: {r.text}"


def test_a_charge_point_token_acts_for_the_ids_its_pattern_matches_in_full(
        auth_client: tuple[TestClient, FakeTransport]) -> None:
    client, fake = auth_client
    assert call(client, fake, CHARGE, "CP7_042", CP_TOKEN).status_code == 200
    for ev_id in ("CP7_0420", "XCP7_042", "CP7_04", OWN):
        r = call(client, fake, CHARGE, ev_id, CP_TOKEN)
        expect_refused(r, 403, "ev")
        assert "CP7_[0-9]{3}" in r.json()["detail"] and ev_id in r.json()["detail"]


def test_refusals_are_counted_and_writes_audited(auth_client: tuple[TestClient, FakeTransport],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    client, fake = auth_client
    caplog.set_level(logging.INFO)
    call(client, fake, CHARGE, OWN, None)
    for _ in range(3):
        call(client, fake, CHARGE, OWN, WRONG)
    call(client, fake, CHARGE, OTHER, EV_TOKEN)
    assert call(client, fake, CHARGE, OWN, EV_TOKEN).status_code == 200
    metrics = client.get("/metrics").text
    for reason, n in (("missing_token", 1), ("invalid_token", 3), ("forbidden", 1), ("not_configured", 0)):
        assert f'gridlb_api_auth_refused_total{{reason="{reason}"}} {n}.0' in metrics, reason
    lines = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    refused = [f for m, f in lines if m == "api_auth_refused"]
    assert [f["reason"] for f in refused] == ["missing_token", "invalid_token", "forbidden"]  # rate-limited
    assert refused[2]["principal"] == "ev-0001" and refused[2]["path"] == "/charge"
    audit = [f for m, f in lines if m == "api_write"]
    assert audit == [{"action": "charge", "principal": "ev-0001", "role": "ev", "ev_id": OWN,
                      "request_id": audit[0]["request_id"]}]
    logged = json.dumps(lines, default=str)
    assert WRONG not in logged and EV_TOKEN not in logged  # tokens are never logged
