"""The HTTP app without a broker: a fake transport plays the balancer (routes, problem details, auth,
waiting for answers, timeouts, metrics, OpenAPI, the live hub)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.live import LiveHub
from api.settings import ApiSettings
from api.state import COMPACT_FIELDS, StateStore
from grid_protocol import encode
from grid_protocol.messages import (
    Assignment,
    ChargeRequest,
    ControlCommand,
    ControlResult,
    Release,
    SessionView,
    SubstationState,
    Telemetry,
)
from grid_runtime.mqtt import Handler, InMessage, TransportStats

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # the operator's (API_TOKEN)
Responder = Callable[[str, bytes], list[tuple[str, bytes]]]


class FakeTransport:
    """A Transport without a broker: records publishes; ``responder`` answers them like the balancer."""

    def __init__(self) -> None:
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        self.handler: Handler = lambda _m: None
        self.subscriptions: dict[str, int] = {}
        self.published: list[tuple[str, bytes]] = []
        self.expiries: list[int | None] = []
        self.responder: Responder | None = None
        self._stop: asyncio.Event | None = None

    def set_handler(self, handler: Handler) -> None:
        self.handler = handler

    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        self.subscriptions[topic_filter] = qos

    def on_connect(self, callback: Callable[[], None]) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, expiry_s: int | None = None) -> None:
        self.published.append((topic, payload))
        self.expiries.append(expiry_s)
        self.stats.published += 1
        if self.responder is not None:
            loop = asyncio.get_running_loop()
            for t, p in self.responder(topic, payload):
                loop.call_soon(self.deliver, t, p)

    def deliver(self, topic: str, payload: bytes | dict[str, Any] | msgspec.Struct, retain: bool = False) -> None:
        if isinstance(payload, msgspec.Struct):
            payload = encode(payload)
        elif isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.stats.received += 1
        self.handler(InMessage(topic, payload, 1, retain))

    async def run(self) -> None:
        self._stop = asyncio.Event()
        self.connected.set()
        self.stats.connects += 1
        await self._stop.wait()

    async def close(self, timeout: float = 2.0) -> None:
        self.connected.clear()
        if self._stop is not None:
            self._stop.set()


def sub_state(sid: str = "A", sessions: list[SessionView] | None = None, **kw: Any) -> SubstationState:
    sessions = sessions or []
    fields: dict[str, Any] = dict(
        substation_id=sid, ts=time.time(), online=True, stale=False, draining=False, capacity_kw=400.0,
        reported_capacity_kw=400.0, capacity_limit_kw=None, limit_kw=380.0, load_kw=200.0, base_load_kw=156.0,
        granted_kw=sum(s.granted_kw for s in sessions), reserved_kw=0.0, headroom_kw=180.0, utilisation=0.5,
        telemetry_age_s=0.1, sessions_total=len(sessions), sessions=sessions)
    fields.update(kw)
    return SubstationState(**fields)


@pytest.fixture
def fake() -> FakeTransport:
    return FakeTransport()


def make_client(fake: FakeTransport, **settings: Any) -> TestClient:
    settings.setdefault("request_timeout_s", 1.0)
    app = create_app(ApiSettings(**settings), transport=fake)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(fake: FakeTransport) -> Iterator[TestClient]:
    """Reads open (API_PUBLIC_READS), writes with ``AUTH``: the tests of what routes do. Who may call them:
    the auth tests below (default settings: reads closed)."""
    with make_client(fake, token=TOKEN, public_reads=True) as c:
        assert c.portal is not None
        yield c


def feed(client: TestClient, fake: FakeTransport, topic: str, payload: Any) -> None:
    assert client.portal is not None
    client.portal.call(_deliver, fake, topic, payload)


async def _deliver(fake: FakeTransport, topic: str, payload: Any) -> None:
    fake.deliver(topic, payload)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    assert "Traceback" not in response.text
    return body


# ---------------------------------------------------------------------------------------------- problems
def test_unknown_route_wrong_method_and_validation_are_problem_details(client: TestClient) -> None:
    assert_problem(client.get("/sessions/"), 404)  # no redirects: a strict API
    assert_problem(client.delete("/sessions/"), 404)
    body = assert_problem(client.get("/nope"), 404)
    assert body["instance"] == "/nope" and body["type"] == "urn:gridlb:problem:not-found"
    r = client.put("/status")
    assert_problem(r, 405)
    assert "GET" in r.headers["allow"]
    body = assert_problem(client.get("/substations/bad$id"), 422)
    assert body["errors"][0]["loc"] == ["path", "substation_id"]
    body = assert_problem(client.post("/charge", json={"ev_id": "EV_1", "requested_kw": -1}, headers=AUTH), 422)
    assert {tuple(e["loc"]) for e in body["errors"]} >= {("body", "requested_kw")}
    assert_problem(client.post("/charge", content=b"{not json", headers={"content-type": "application/json"} | AUTH),
                   422)
    body = assert_problem(client.post("/charge", json={"ev_id": "EV_1", "requested_kw": 5}, headers=AUTH), 422)
    assert "duration_minutes or energy_kwh" in body["detail"]
    assert_problem(client.get("/sessions", params={"limit": 0}), 422)


def test_an_unexpected_error_is_a_500_problem_without_a_stack_trace(fake: FakeTransport) -> None:
    app = create_app(ApiSettings(), transport=fake)

    async def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        body = assert_problem(c.get("/boom"), 500)
        assert "secret internals" not in json.dumps(body)


# ---------------------------------------------------------------------------------------------- reads
def test_health_ready_and_reads_from_fed_messages(client: TestClient, fake: FakeTransport) -> None:
    assert client.get("/health").json()["status"] == "ok"
    body = assert_problem(client.get("/ready"), 503)
    assert body["checks"]["mqtt_connected"] is True and body["checks"]["substation_data"] is False
    session = SessionView(session_id="s-1", ev_id="EV_0001", request_id="r1", granted_kw=11, requested_kw=22,
                          min_kw=1.4, priority=0, started_at=time.time())
    feed(client, fake, "grid/v1/substation/A/state", sub_state("A", [session]))
    feed(client, fake, "grid/v1/balancer/status", {"state": "online", "ts": time.time(), "version": "0.1.0"})
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    status = client.get("/status").json()
    assert status["balancer"]["state"] == "online"
    assert status["substations"][0]["substation_id"] == "A" and status["totals"]["sessions"] == 1
    assert status["substations"][0]["region"] == "default" and status["substations_matched"] == 1
    feed(client, fake, "grid/v1/substation/B/state", sub_state("B", [], utilisation=0.2))
    compact = client.get("/status", params={"compact": "true", "order": "worst", "limit": 1}).json()
    fields = compact["fields"]
    assert compact["substations_matched"] == 2 and len(compact["substations"]) == 1
    assert compact["substations"][0][fields.index("substation_id")] == "A"  # the fuller one first
    assert client.get("/status", params={"region": "west"}).json()["substations"] == []
    assert_problem(client.get("/status", params={"order": "best"}), 422)
    assert_problem(client.get("/status", params={"region": "a/b"}), 422)
    assert client.get("/substations").json()[0]["capacity_kw"] == 400
    assert client.get("/substations/A").json()["headroom_kw"] == 180
    assert_problem(client.get("/substations/Z"), 404)
    page = client.get("/sessions", params={"status": "reduced"}).json()
    assert page["total"] == 1 and page["items"][0]["session_id"] == "s-1" and page["next_offset"] is None
    assert client.get("/sessions", params={"status": "paused"}).json()["total"] == 0
    assert client.get("/evs/EV_0001").json()["state"] == "charging"
    assert_problem(client.get("/evs/EV_0099"), 404)
    assert client.get("/queue").json()["known"] is False


def test_bad_payloads_are_counted_never_raised(client: TestClient, fake: FakeTransport,
                                              caplog: pytest.LogCaptureFixture) -> None:
    feed(client, fake, "grid/v1/substation/A/state", b"{not json")
    feed(client, fake, "grid/v1/substation/A/telemetry", {"substation_id": "B", "ts": 1, "seq": 1,
                                                          "capacity_kw": 1, "load_kw": 0, "base_load_kw": 0,
                                                          "ev_load_kw": 0, "active_sessions": 0})
    feed(client, fake, "grid/v1/ev/EV_1/assignment", b'{"status": "bogus"}')
    feed(client, fake, "grid/v1/balancer/queue", b"")  # cleared retained queue: fine
    assert client.get("/status").status_code == 200
    metrics = client.get("/metrics").text
    assert 'gridlb_api_payloads_refused_total{kind="substation_state",reason="malformed_json"} 1.0' in metrics
    assert 'gridlb_api_payloads_refused_total{kind="substation_telemetry",reason="id_mismatch"} 1.0' in metrics
    assert 'gridlb_api_payloads_refused_total{kind="ev_assignment",reason="invalid_field"} 1.0' in metrics
    assert [r for r in caplog.records if "api_payload_refused" in r.getMessage()]  # the first ones are logged
    caplog.clear()
    for _ in range(100):  # a flood: every one counted, the log not flooded (one line per kind and reason)
        feed(client, fake, "grid/v1/substation/A/state", b"{not json")
    assert [r for r in caplog.records if "api_payload_refused" in r.getMessage()] == []  # within 10 s of the first
    metrics = client.get("/metrics").text
    assert 'gridlb_api_payloads_refused_total{kind="substation_state",reason="malformed_json"} 101.0' in metrics


# ---------------------------------------------------------------------------------------------- charge
def balancer_answering(status: str, **extra: Any) -> Responder:
    def respond(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        if not topic.endswith("/request"):
            return []
        req = msgspec.json.decode(payload, type=ChargeRequest)
        assert req.ev_id is not None
        a = Assignment(request_id=req.request_id, ev_id=req.ev_id, status=status, ts=time.time(),  # type: ignore[arg-type]
                       **extra)
        other = Assignment(request_id="someone-else", ev_id=req.ev_id, status="assigned", ts=time.time())
        return [(f"grid/v1/ev/{req.ev_id}/assignment", encode(other)),  # not ours: ignored
                (f"grid/v1/ev/{req.ev_id}/assignment", encode(a))]
    return respond


def test_charge_assigned_queued_rejected(client: TestClient, fake: FakeTransport) -> None:
    body = {"ev_id": "EV_1234", "requested_kw": 22, "duration_minutes": 120}
    fake.responder = balancer_answering("assigned", substation_id="A", granted_kw=22.0, session_id="s-9")
    r = client.post("/charge", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "assigned" and r.json()["session_id"] == "s-9"
    topic, payload = fake.published[-1]
    assert topic == "grid/v1/ev/EV_1234/request"
    sent = json.loads(payload)
    assert sent["ev_id"] == "EV_1234" and sent["request_id"].startswith("api-") and sent["duration_minutes"] == 120

    fake.responder = balancer_answering("queued", position=3, reason="no_headroom")
    r = client.post("/charge", json=body | {"request_id": "mine-1"}, headers=AUTH)
    assert r.status_code == 202 and r.json()["position"] == 3 and r.json()["request_id"] == "mine-1"

    fake.responder = balancer_answering("rejected", reason="ev_busy", detail="already charging")
    p = assert_problem(client.post("/charge", json=body, headers=AUTH), 409)
    assert p["reason"] == "ev_busy" and p["answer"]["status"] == "rejected"
    fake.responder = balancer_answering("rejected", reason="exceeds_capacity")
    p = assert_problem(client.post("/charge", json=body, headers=AUTH), 422)
    assert p["type"] == "urn:gridlb:problem:rejected-exceeds_capacity"
    assert_problem(client.post("/charge", json=body | {"ev_id": "balancer"}, headers=AUTH), 422)


def test_charge_times_out_with_504_and_the_request_id_to_retry(fake: FakeTransport) -> None:
    with make_client(fake, token=TOKEN, request_timeout_s=0.2) as client:
        t0 = time.monotonic()
        p = assert_problem(client.post("/charge", json={"ev_id": "EV_1", "requested_kw": 7, "energy_kwh": 10},
                                       headers=AUTH), 504)
        assert time.monotonic() - t0 < 2
        assert p["request_id"].startswith("api-") and p["type"] == "urn:gridlb:problem:balancer-timeout"
        metrics = client.get("/metrics").text
        assert 'gridlb_api_balancer_answers_total{operation="charge",outcome="timeout"} 1.0' in metrics
        # The request expires with the wait: a late copy (balancer back, link re-established) is void.
        assert fake.expiries == [1]


def test_not_connected_is_503(fake: FakeTransport) -> None:
    client = make_client(fake, token=TOKEN)  # no lifespan: the transport never ran
    p = assert_problem(client.post("/charge", json={"ev_id": "EV_1", "requested_kw": 7, "energy_kwh": 10},
                                   headers=AUTH), 503)
    assert p["type"] == "urn:gridlb:problem:broker-unavailable"


def test_delete_session_publishes_a_release_and_returns_the_completed_answer(
        client: TestClient, fake: FakeTransport) -> None:
    session = SessionView(session_id="s-1", ev_id="EV_0007", request_id="r7", granted_kw=11, requested_kw=11,
                          min_kw=1.4, priority=0, started_at=time.time())
    feed(client, fake, "grid/v1/substation/B/state", sub_state("B", [session]))

    def respond(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        rel = msgspec.json.decode(payload, type=Release)
        done = Assignment(request_id=rel.request_id, ev_id="EV_0007", status="completed", ts=time.time(),
                          session_id=rel.session_id, substation_id="B", reason="released")
        return [("grid/v1/ev/EV_0007/assignment", encode(done))]

    fake.responder = respond
    r = client.delete("/sessions/s-1", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["answer"]["status"] == "completed" and r.json()["substation_id"] == "B"
    topic, payload = fake.published[-1]
    assert topic == "grid/v1/ev/EV_0007/release"
    assert json.loads(payload) == {"request_id": "r7", "session_id": "s-1", "ev_id": "EV_0007"}
    assert_problem(client.delete("/sessions/unknown-1", headers=AUTH), 404)


# ---------------------------------------------------------------------------------------------- operator
def control_answering(ok: bool = True, reason: str | None = None) -> Responder:
    def respond(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        cmd = msgspec.json.decode(payload, type=ControlCommand)
        state = sub_state(cmd.substation_id, draining=cmd.action == "drain",
                          capacity_limit_kw=cmd.capacity_kw) if ok else None
        result = ControlResult(ok=ok, action=cmd.action, substation_id=cmd.substation_id, ts=time.time(),
                               request_id=cmd.request_id, reason=reason, state=state)
        unrelated = ControlResult(ok=True, action="undrain", substation_id="X", ts=time.time(), request_id="other")
        return [("grid/v1/balancer/control/result", encode(unrelated)),
                ("grid/v1/balancer/control/result", encode(result))]
    return respond


def test_operator_actions_need_the_bearer_token(client: TestClient, fake: FakeTransport) -> None:
    fake.responder = control_answering()
    r = client.post("/substations/A/drain")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.post("/substations/A/drain", headers={"Authorization": "Bearer wrong"})
    assert_problem(r, 401)
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert not any(t.endswith("/control") for t, _ in fake.published)

    auth = AUTH
    r = client.post("/substations/A/drain", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["ok"] and r.json()["substation"]["draining"] and r.json()["substation"]["condition"] == "draining"
    topic, payload = fake.published[-1]
    assert topic == "grid/v1/balancer/control"
    cmd = json.loads(payload)
    assert cmd["action"] == "drain" and cmd["substation_id"] == "A" and cmd["request_id"]
    assert client.post("/substations/A/undrain", headers=auth).json()["substation"]["draining"] is False
    r = client.put("/substations/A/capacity", headers=auth, json={"capacity_kw": 300})
    assert r.status_code == 200 and r.json()["substation"]["capacity_limit_kw"] == 300
    assert json.loads(fake.published[-1][1])["capacity_kw"] == 300
    r = client.put("/substations/A/capacity", headers=auth, json={"capacity_kw": None})
    assert r.status_code == 200 and json.loads(fake.published[-1][1])["capacity_kw"] is None
    assert_problem(client.put("/substations/A/capacity", headers=auth, json={"capacity_kw": -3}), 422)

    fake.responder = control_answering(ok=False, reason="unknown_substation")
    p = assert_problem(client.post("/substations/Q/drain", headers=auth), 404)
    assert p["reason"] == "unknown_substation"
    fake.responder = None
    with make_client(fake, token=TOKEN, request_timeout_s=0.2) as quick:
        assert_problem(quick.post("/substations/A/drain", headers=auth), 504)


def test_writes_disabled_without_configured_tokens(fake: FakeTransport) -> None:
    with make_client(fake) as client:
        p = assert_problem(client.post("/substations/A/drain", headers={"Authorization": "Bearer x"}), 503)
        assert p["type"].endswith("operator-disabled") and "set API_TOKEN" in p["detail"]
        p = assert_problem(client.post("/charge", json={"ev_id": "EV_1", "requested_kw": 7, "energy_kwh": 10}), 503)
        assert p["type"].endswith("writes-disabled") and "API_TOKENS_FILE" in p["detail"]
        assert fake.published == []


# ---------------------------------------------------------------------------------------------- metrics, schema
def test_metrics_label_routes_by_template(client: TestClient) -> None:
    client.get("/substations/A")
    client.get("/substations/B")
    client.get("/no/such/thing")
    text = client.get("/metrics").text
    assert 'gridlb_api_requests_total{method="GET",route="/substations/{substation_id}",status="404"} 2.0' in text
    assert 'route="unmatched",status="404"' in text
    assert "/substations/A" not in text
    assert 'gridlb_mqtt_connected{client="api"} 1.0' in text
    assert "gridlb_api_sse_clients 0.0" in text
    assert "gridlb_api_request_duration_seconds_bucket" in text


def test_openapi_errors_are_problem_details_and_bodies_have_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, item in schema["paths"].items():
        for method, op in item.items():
            for code, response in op["responses"].items():
                if int(code) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (path, method, code)
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components
    for name in ("ChargeIn", "CapacityIn", "Assignment", "Substation", "ProblemDetails", "ControlOutcome"):
        assert components[name].get("examples"), name
    schemes = schema["components"]["securitySchemes"]
    assert list(schemes) == ["operator", "ev", "viewer"]
    assert all(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    security = {(m.upper(), path): op.get("security") for path, item in schema["paths"].items()
                for m, op in item.items()}
    assert security["POST", "/charge"] == [{"ev": []}, {"operator": []}]
    assert security["DELETE", "/sessions/{session_id}"] == [{"ev": []}, {"operator": []}]
    assert security["POST", "/substations/{substation_id}/drain"] == [{"operator": []}]
    # this client opens reads: a token is optional ({}) there
    assert security["GET", "/status"] == [{}, {"viewer": []}, {"operator": []}]
    assert security["GET", "/evs/{ev_id}"] == [{}, {"viewer": []}, {"ev": []}, {"operator": []}]
    assert security["GET", "/health"] is None and security["GET", "/metrics"] is None
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert "EventSource" in client.get("/static/app.js").text


# ---------------------------------------------------------------------------------------------- live hub
def tele_at(sid: str, seq: int, load: float, capacity: float = 100.0) -> Telemetry:
    return Telemetry(substation_id=sid, ts=time.time(), seq=seq, capacity_kw=capacity, load_kw=load,
                     base_load_kw=0, ev_load_kw=load, active_sessions=0)


def apply(held: dict[str, Any], kind: str, data: str) -> dict[str, Any]:
    """What the page does with an event (static/grid.js), in Python: a snapshot replaces, a diff must follow."""
    body = json.loads(data)
    if kind == "snapshot":
        return {**body, "rows": {r[0]: r for r in body.pop("substations")}}
    assert body["seq"] == held["seq"] + 1, (body["seq"], held["seq"])
    rows = dict(held["rows"])
    rows.update({r[0]: r for r in body.pop("upsert", [])})
    for sid in body.pop("remove", []):
        del rows[sid]
    return {**held, **body, "rows": rows}


def test_live_hub_sends_a_snapshot_then_diffs_that_rebuild_it_and_resyncs_slow_clients() -> None:
    """A client applying the diffs holds exactly what a new client's snapshot says; a quiet update carries no
    rows; a forgotten substation is removed; a client that fell behind gets a snapshot, not a broken diff."""
    async def scenario() -> None:
        store = StateStore()
        clock = [time.time()]
        hub = LiveHub(store, lambda: True, interval_s=0.05, queue_size=2, max_clients=3, clock=lambda: clock[0])
        q = hub.add_client()
        kind, data = q.get_nowait()  # type: ignore[misc]
        assert kind == "snapshot" and json.loads(data)["totals"]["substations"] == 0
        held = apply({}, kind, data)
        for i in range(3):
            store.on_telemetry(f"S{i}", tele_at(f"S{i}", 1, 10.0 * (i + 1)), clock[0])
        hub.broadcast()
        kind, data = q.get_nowait()  # type: ignore[misc]
        diff = json.loads(data)
        assert kind == "diff" and len(diff["upsert"]) == 3 and diff["totals"]["substations"] == 3
        held = apply(held, kind, data)
        # One substation changes: the diff carries that row only (and the totals, which moved).
        store.on_telemetry("S1", tele_at("S1", 2, 55.0), clock[0])
        hub.broadcast()
        kind, data = q.get_nowait()  # type: ignore[misc]
        diff = json.loads(data)
        assert [r[0] for r in diff["upsert"]] == ["S1"] and "queue" not in diff and "events" not in diff
        held = apply(held, kind, data)
        hub.broadcast()  # nothing changed: no rows, no parts
        kind, data = q.get_nowait()  # type: ignore[misc]
        assert set(json.loads(data)) == {"seq", "ts"} and len(data) < 60
        held = apply(held, kind, data)
        store.forget_substation("S0", clock[0])
        hub.broadcast()
        kind, data = q.get_nowait()  # type: ignore[misc]
        diff = json.loads(data)
        assert diff["remove"] == ["S0"] and diff["decommissioned"][0]["substation_id"] == "S0"
        held = apply(held, kind, data)
        fresh = apply({}, *q_first(hub.add_client()))
        assert held["rows"] == fresh["rows"] and held["totals"] == fresh["totals"]
        assert held["events"] == fresh["events"] and held["seq"] == fresh["seq"]
        # Worst first in the snapshot: S2 (0.3) before S1... both ok, the fullest first.
        assert list(fresh["rows"]) == ["S1", "S2"]
        # A slow client: its queue overflows, it loses the diffs and gets one snapshot that is current.
        for i in range(5):
            store.on_telemetry("S2", tele_at("S2", 3 + i, 20.0 + i), clock[0])
            hub.broadcast()
        assert hub.resyncs >= 1 and hub.dropped >= 2
        events = [q.get_nowait() for _ in range(q.qsize())]
        assert events[0] is not None and events[0][0] == "snapshot"
        again: dict[str, Any] = {}
        for item in events:
            assert item is not None
            again = apply(again, *item)
        assert again["rows"]["S2"][COMPACT_FIELDS.index("load_kw")] == 24.0
        with pytest.raises(Exception, match="live clients"):
            hub.add_client()
            hub.add_client()
        hub.remove_client(q)
        assert len(hub.clients) == 2
        await hub.stop()

    asyncio.run(scenario())


def q_first(q: Any) -> tuple[str, str]:
    item = q.get_nowait()
    assert item is not None
    return item  # type: ignore[no-any-return]


def test_live_hub_runs_an_update_per_change_and_a_probe_noise_variant_of_its_own() -> None:
    async def scenario() -> None:
        store = StateStore()
        hub = LiveHub(store, lambda: True, interval_s=0.05, queue_size=50, max_clients=3)
        plain, noisy = hub.add_client(), hub.add_client(noise=True)
        hub.start()
        store.on_telemetry("A", tele_at("A", 1, 10.0), time.time())
        hub.changed()
        await asyncio.sleep(0.3)
        got = [q_first(plain) for _ in range(plain.qsize())]
        assert got[0][0] == "snapshot" and any("upsert" in json.loads(d) for k, d in got[1:])
        assert noisy.qsize() >= 2 and hub.sent >= 1 and hub.sent_bytes > 0
        hub.remove_client(noisy)
        assert True not in hub._parts  # nobody holds the noise variant any more
        await hub.stop()

    asyncio.run(scenario())


def test_live_hub_stops_even_when_a_change_wakes_it_as_it_is_cancelled() -> None:
    """The API's shutdown waits for the hub: a cancel that lands just as a message wakes the hub must still end it
    (asyncio.wait_for in Python 3.11 returns the inner result and drops that cancel: the API hung at stop)."""

    async def scenario() -> None:
        for spins in range(8):  # the cancel lands 0..7 loop iterations after the wake-up
            hub = LiveHub(StateStore(), lambda: True, interval_s=0.0)
            hub.start()
            await asyncio.sleep(0.01)  # the hub waits for a change
            hub.changed()
            for _ in range(spins):
                await asyncio.sleep(0)
            stopping = asyncio.create_task(hub.stop())
            done, _ = await asyncio.wait({stopping}, timeout=2.0)
            assert stopping in done, f"the hub did not stop (cancel {spins} iterations after the wake-up)"

    asyncio.run(scenario())


def test_only_allowed_host_names_are_served_when_configured(fake: FakeTransport) -> None:
    """DNS rebinding: a page elsewhere resolved to 127.0.0.1 sends its own Host; it gets a problem, not the API."""
    with make_client(fake, allowed_hosts=["127.0.0.1", "localhost"], token=TOKEN, public_reads=True) as client:
        assert client.get("/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
        assert client.get("/health", headers={"Host": "localhost"}).status_code == 200
        p = assert_problem(client.post("/charge", headers={"Host": "evil.example:8000"} | AUTH,
                                       json={"ev_id": "EV_1", "requested_kw": 7, "energy_kwh": 10}), 400)
        assert p["type"].endswith("invalid-host")
        assert fake.published == []



def test_api_models_that_mirror_the_contract_have_its_fields() -> None:
    """The API describes MQTT payloads it passes through (answers, queue entries) with pydantic models for
    OpenAPI; they must not drift from the contract's msgspec models (one definition, checked here)."""
    import msgspec

    from api import schemas
    from grid_protocol import messages

    for api_model, contract in ((schemas.Assignment, messages.Assignment), (schemas.QueueEntry, messages.QueueEntry)):
        assert list(api_model.model_fields) == [f.name for f in msgspec.structs.fields(contract)], api_model
    # POST /charge takes the original HTTP body plus every optional field of the MQTT request.
    assert {f.name for f in msgspec.structs.fields(messages.ChargeRequest)} <= set(schemas.ChargeIn.model_fields)
