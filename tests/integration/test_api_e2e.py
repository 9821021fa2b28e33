"""The status API end to end: real Mosquitto (project config and ACL), ``python -m balancer`` and
``python -m api`` as subprocesses, substations played over MQTT by the ``loadtest`` account.

Covers every endpoint against a live run, the 504 without a balancer, a restarted API learning the grid
from retained messages, who may call what (tokens checked before anything reaches the broker), schemathesis
against the OpenAPI schema, and the live page in headless Chromium (reads open, and reads behind a token).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from probe import Probe, Service, start_balancer, telemetry

from api.tokens import TokenEntry, TokenFile, hash_token, write_token_file
from broker.accounts import SERVICE_ACCOUNTS
from broker.local import LocalBroker, find_free_port

pytestmark = pytest.mark.integration

TOKEN = "operator-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Scoped tokens of the token file every test API gets: an EV (EV_0001 only) and a viewer.
EV_TOKEN = "ev-0001-test-token"
VIEWER_TOKEN = "viewer-test-token"
ROOT = Path(__file__).resolve().parents[2]
#: The screenshot goes next to the test's other artifacts; LIVE_PAGE_SCREENSHOT=docs/img/live-page.png refreshes
#: the one the docs show (a test run must not dirty the working tree).
SCREENSHOT_ENV = "LIVE_PAGE_SCREENSHOT"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


@dataclass
class Api:
    service: Service
    url: str
    http: httpx.Client  # sends the operator's token
    anon: httpx.Client  # sends none

    def stop(self) -> int:
        self.http.close()
        self.anon.close()
        return self.service.stop()


def tokens_file(path: Path) -> Path:
    if not path.exists():
        write_token_file(path, TokenFile(tokens=[
            TokenEntry(name="ev-0001", role="ev", ev_ids=["EV_0001"], sha256=hash_token(EV_TOKEN)),
            TokenEntry(name="wall", role="viewer", sha256=hash_token(VIEWER_TOKEN))]))
    return path


def start_api(broker: LocalBroker, log_dir: Path, **env: str) -> Api:
    port = find_free_port()
    settings = {"MQTT_USERNAME": "api", "MQTT_PASSWORD": broker.password_for("api"), "API_PORT": str(port),
                "API_TOKEN": TOKEN, "API_TOKENS_FILE": str(tokens_file(log_dir / "api-tokens.json")),
                "API_REQUEST_TIMEOUT_S": "3", "API_STALE_AFTER_S": "2", "API_SSE_INTERVAL_S": "0.2"}
    settings.update(env)
    service = Service("api", broker, log_dir, **settings)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=10, headers=AUTH)
    anon = httpx.Client(base_url=url, timeout=10)
    try:
        wait_for(lambda: http.get("/health").status_code == 200, 20, "the API to serve /health")
        wait_for(lambda: "api_listening" in service.log() and f":{port}/" in service.log(), 5, "the URL in the log")
    except AssertionError as exc:
        http.close()
        anon.close()
        service.stop()
        raise AssertionError(f"{exc}\n{service.log()[-3000:]}") from None
    return Api(service, url, http, anon)


class Substations:
    """Plays substation agents: telemetry every 0.3 s for each (capacity, base load, EV load)."""

    def __init__(self, broker: LocalBroker, **subs: tuple[float, float]) -> None:
        self.probe = Probe(broker, "loadtest")
        self.subs = {sid: [cap, base, 0.0] for sid, (cap, base) in subs.items()}
        self.silent: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._seq = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._seq += 1
            for sid, (cap, base, ev) in list(self.subs.items()):
                if sid not in self.silent:
                    self.probe.client.publish(f"grid/v1/substation/{sid}/telemetry",
                                              json.dumps(telemetry(sid, self._seq, cap, base, ev)), qos=0)
            self._stop.wait(0.3)

    def __enter__(self) -> Substations:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.probe.close()


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body


def charge(http: httpx.Client, ev: str, kw: float, **extra: Any) -> httpx.Response:
    return http.post("/charge", json={"ev_id": ev, "requested_kw": kw, "duration_minutes": 120, **extra})


def check_log(service: Service) -> None:
    log = service.log()
    assert "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------------------------------------ endpoints
def test_every_endpoint_during_a_live_run_and_a_restarted_api_answers_from_retained_state(
        broker: LocalBroker, tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    api = start_api(broker, tmp_path, API_REQUEST_TIMEOUT_S="1.5")
    stopper.append(api.stop)
    http = api.http

    # No balancer, no substations yet: alive, not ready, and a charge request times out with a clear 504.
    assert http.get("/health").json()["status"] == "ok"
    # (the HTTP server answers before the MQTT connection is up; on a busy machine that takes a moment)
    wait_for(lambda: http.get("/ready").json()["checks"]["mqtt_connected"], 10, "the API's broker connection")
    body = problem(http.get("/ready"), 503)
    assert body["checks"]["mqtt_connected"] is True and body["checks"]["substation_data"] is False
    t0 = time.monotonic()
    body = problem(charge(http, "EV_0100", 11), 504)
    assert 1.4 < time.monotonic() - t0 < 4 and body["request_id"].startswith("api-")
    assert http.get("/status").json()["balancer"]["state"] == "unknown"

    subs = Substations(broker, A=(400.0, 100.0), B=(300.0, 100.0), C=(200.0, 150.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2", BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)

    def grid_known() -> bool:
        status = http.get("/status").json()
        return (status["balancer"]["state"] == "online" and len(status["substations"]) == 3
                and all(s["source"] == "balancer" and s["condition"] == "ok" for s in status["substations"]))

    wait_for(grid_known, 15, "the balancer's state of A, B and C")
    assert http.get("/ready").json()["ready"] is True
    status = http.get("/status").json()
    assert status["mqtt_connected"] and status["totals"]["capacity_kw"] == 900.0
    assert {s["substation_id"]: s["capacity_kw"] for s in status["substations"]} == {"A": 400, "B": 300, "C": 200}
    assert [s["substation_id"] for s in http.get("/substations").json()] == ["A", "B", "C"]
    a = http.get("/substations/A").json()
    assert (a["limit_kw"], a["base_load_kw"], a["online"], a["stale"]) == (380.0, 100.0, True, False)
    problem(http.get("/substations/Z"), 404)

    # POST /charge: assigned (200), the same request_id again is the same answer, a second request: ev_busy (409).
    r = charge(http, "EV_0001", 22, request_id="trip-1")
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["status"] == "assigned" and first["granted_kw"] == 22 and first["substation_id"] in "ABC"
    again = charge(http, "EV_0001", 22, request_id="trip-1")
    assert again.status_code == 200 and again.json()["session_id"] == first["session_id"]
    busy = problem(charge(http, "EV_0001", 22), 409)
    assert busy["reason"] == "ev_busy" and busy["answer"]["status"] == "rejected"
    for i in range(2, 7):
        r = charge(http, f"EV_{i:04d}", 11)
        assert r.status_code == 200 and r.json()["status"] == "assigned", r.text

    # Sessions, filters, pagination, EVs (from the balancer's retained state).
    wait_for(lambda: http.get("/sessions").json()["total"] == 6, 5, "six sessions in the state")
    page1 = http.get("/sessions", params={"limit": 4}).json()
    assert len(page1["items"]) == 4 and page1["next_offset"] == 4
    page2 = http.get("/sessions", params={"limit": 4, "offset": 4}).json()
    assert len(page2["items"]) == 2 and page2["next_offset"] is None
    ids = {s["session_id"] for s in page1["items"] + page2["items"]}
    assert len(ids) == 6 and first["session_id"] in ids
    per_sub = {sid: http.get("/sessions", params={"substation_id": sid}).json()["total"] for sid in "ABC"}
    assert sum(per_sub.values()) == 6
    assert http.get("/sessions", params={"status": "charging"}).json()["total"] == 6
    assert http.get("/sessions", params={"status": "paused"}).json()["total"] == 0
    ev = http.get("/evs/EV_0001").json()
    assert ev["state"] == "charging" and ev["session"]["session_id"] == first["session_id"]
    assert (ev["last_answer"]["status"], ev["last_answer"]["reason"]) == ("rejected", "ev_busy")  # the latest one
    problem(http.get("/evs/EV_0199"), 404)
    assert http.get("/status").json()["totals"]["sessions"] == 6

    # DELETE /sessions/{id}: the EV's release goes to the balancer; its completed answer comes back.
    target = next(s for s in page1["items"] + page2["items"] if s["ev_id"] == "EV_0002")
    r = http.delete(f"/sessions/{target['session_id']}")
    assert r.status_code == 200, r.text
    assert r.json()["answer"]["status"] == "completed" and r.json()["answer"]["reason"] == "released"
    wait_for(lambda: http.get("/sessions").json()["total"] == 5, 5, "the released session to leave the state")
    problem(http.delete(f"/sessions/{target['session_id']}"), 404)

    # Operator actions: token required; drain keeps new sessions off; capacity limit and its removal.
    r = api.anon.post("/substations/A/drain")
    problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    problem(api.anon.post("/substations/A/drain", headers={"Authorization": "Bearer nope"}), 401)
    auth = AUTH
    for sid in "AB":
        r = http.post(f"/substations/{sid}/drain", headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["ok"] and r.json()["substation"]["draining"] is True
    r = charge(http, "EV_0010", 7)
    assert r.status_code == 200 and r.json()["substation_id"] == "C", r.text
    assert http.get("/substations/A").json()["condition"] == "draining"
    for sid in "AB":
        assert http.post(f"/substations/{sid}/undrain", headers=auth).json()["substation"]["draining"] is False
    r = http.put("/substations/B/capacity", headers=auth, json={"capacity_kw": 250})
    assert r.status_code == 200, r.text
    assert (r.json()["substation"]["capacity_kw"], r.json()["substation"]["capacity_limit_kw"]) == (250, 250)
    r = http.put("/substations/B/capacity", headers=auth, json={"capacity_kw": None})
    assert r.json()["substation"]["capacity_limit_kw"] is None and r.json()["substation"]["capacity_kw"] == 300
    body = problem(http.post("/substations/Q/drain", headers=auth), 404)
    assert body["reason"] == "unknown_substation"
    problem(http.put("/substations/B/capacity", headers=auth, json={"capacity_kw": 0}), 422)

    # Queued (202): fits under A's limit (380 kW) but not beside its base load; rejected: fits nowhere ever.
    r = charge(http, "EV_0020", 350, min_kw=350)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["position"] == 1
    wait_for(lambda: http.get("/queue").json()["length"] == 1, 5, "the queue state")
    q = http.get("/queue").json()
    assert q["entries"][0]["ev_id"] == "EV_0020" and q["entries"][0]["requested_kw"] == 350
    assert http.get("/evs/EV_0020").json()["state"] == "queued"
    assert http.get("/status").json()["totals"]["queue_length"] == 1
    body = problem(charge(http, "EV_0021", 500, min_kw=500), 422)
    assert body["reason"] == "exceeds_capacity"
    problem(http.post("/charge", json={"ev_id": "EV_0022", "requested_kw": 5}), 422)

    # The live feed: a snapshot at once.
    with http.stream("GET", "/events", timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        event = next(line for line in lines if line.startswith("event:"))
        data = next(line for line in lines if line.startswith("data:"))
    assert event == "event: snapshot"
    snapshot = json.loads(data[5:])
    assert {row[snapshot["fields"].index("substation_id")] for row in snapshot["substations"]} == {"A", "B", "C"}

    # Metrics: route templates, answers by outcome, the MQTT connection; SSE client gone after disconnecting.
    def metrics() -> str:
        return http.get("/metrics").text

    text = metrics()
    assert 'gridlb_api_requests_total{method="DELETE",route="/sessions/{session_id}",status="200"} 1.0' in text
    assert 'gridlb_api_balancer_answers_total{operation="charge",outcome="queued"} 1.0' in text
    assert 'gridlb_mqtt_connected{client="api"} 1.0' in text
    wait_for(lambda: "gridlb_api_sse_clients 0.0" in metrics(), 10, "the SSE client to be cleaned up")

    # A new API instance (a restart, or another replica) knows the grid at once from retained messages.
    sessions_before = http.get("/sessions").json()["total"]
    assert api.stop() == 0
    check_log(api.service)
    stopper.remove(api.stop)
    api2 = start_api(broker, tmp_path)
    stopper.append(api2.stop)
    status = wait_for(lambda: (s := api2.http.get("/status").json())["substations"] and s, 2, "retained state")
    assert {s["substation_id"] for s in status["substations"]} == {"A", "B", "C"}
    assert all(s["source"] == "balancer" for s in status["substations"])
    assert api2.http.get("/sessions").json()["total"] == sessions_before
    assert api2.http.get("/queue").json()["entries"][0]["ev_id"] == "EV_0020"
    # Withdraw the queued request; a second withdraw finds nothing.
    r = api2.http.delete("/evs/EV_0020/request")
    assert r.status_code == 200 and r.json()["answer"]["status"] == "cancelled", r.text
    problem(api2.http.delete("/evs/EV_0020/request"), 404)
    wait_for(lambda: api2.http.get("/queue").json()["length"] == 0, 5, "the queue to empty")
    assert status["balancer"]["state"] == "online"
    assert balancer.stop() == 0
    stopper.remove(balancer.stop)
    wait_for(lambda: api2.http.get("/status").json()["balancer"]["state"] == "offline", 5, "balancer offline")

    # The balancer says it is offline: nothing is sent, 503 at once.
    t0 = time.monotonic()
    assert problem(charge(api2.http, "EV_0150", 11), 503)["type"].endswith("balancer-unavailable")
    assert time.monotonic() - t0 < 1

    # (A charge that times out is void: its MQTT message expires with the wait, so a balancer that comes back
    # later never acts on it; tests/integration/test_mqtt_transport.py checks that expiry against the broker.)
    assert api2.stop() == 0
    stopper.remove(api2.stop)
    check_log(api2.service)


def test_two_replicas_with_their_own_accounts_serve_the_same_grid_side_by_side(
        make_broker: Callable[..., LocalBroker], tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    """Replicas log in as ``api`` and ``api.<name>`` (one connection per account): neither replaces the other,
    both learn the grid from retained state, and a charge through either one reaches the same balancer."""
    broker = make_broker(services=(*SERVICE_ACCOUNTS, "api.2"))
    subs = Substations(broker, A=(400.0, 100.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)
    first = start_api(broker, tmp_path)
    stopper.append(first.stop)
    second = start_api(broker, tmp_path, MQTT_USERNAME="api.2", MQTT_PASSWORD=broker.password_for("api.2"))
    stopper.append(second.stop)
    for api in (first, second):
        wait_for(lambda api=api: api.http.get("/ready").status_code == 200, 10, "both replicas ready")  # type: ignore[misc]
    r = charge(second.http, "EV_0001", 11)
    assert r.status_code == 200 and r.json()["status"] == "assigned", r.text
    session_id = r.json()["session_id"]
    wait_for(lambda: any(x["session_id"] == session_id for x in first.http.get("/sessions").json()["items"]),
             5, "the session on the other replica")
    time.sleep(1.0)  # had one replaced the other, the broker would have dropped a connection by now
    for api in (first, second):  # (Prometheus tells the replicas apart by their instance label)
        text = api.http.get("/metrics").text
        assert 'gridlb_mqtt_connected{client="api"} 1.0' in text, text[-2000:]
        assert 'gridlb_mqtt_reconnects_total{client="api"} 0.0' in text
        check_log(api.service)


# ------------------------------------------------------------------------------------------------ schemathesis
@pytest.fixture
def jsonschema_strategies_compat(monkeypatch: pytest.MonkeyPatch) -> None:
    """hypothesis-jsonschema 0.23.1 (the latest) drives ``many`` with ``more()``, which Hypothesis 6.1xx replaced
    by a ``with many(...) as elements: for _ in elements`` protocol; every object schema fails to generate
    without this adapter of the old calls onto the new protocol (same draws, same spans)."""
    import types

    from hypothesis.internal.conjecture import utils as cu
    from hypothesis_jsonschema import _from_schema

    if hasattr(cu.many, "more"):
        return
    new_many = cu.many

    class OldMany:
        def __init__(self, data: Any, min_size: int, max_size: float, average_size: float) -> None:
            self._many = new_many(data, min_size, max_size, average_size)
            self._many.__enter__()
            self._elements = iter(self._many)

        def more(self) -> bool:
            if next(self._elements, StopIteration) is StopIteration:
                self._many.__exit__(None)
                return False
            return True

        def reject(self, why: str | None = None) -> None:
            self._many.reject(why)

    compat = types.SimpleNamespace(**{k: getattr(cu, k) for k in dir(cu) if not k.startswith("__")})
    compat.many = OldMany
    monkeypatch.setattr(_from_schema, "cu", compat)


@pytest.mark.usefixtures("jsonschema_strategies_compat")
def test_openapi_schema_holds_against_the_live_api(broker: LocalBroker, tmp_path: Path,
                                                   stopper: list[Callable[[], Any]]) -> None:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    subs = Substations(broker, A=(400.0, 100.0), B=(300.0, 100.0), C=(200.0, 150.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2", BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)
    # (with the provisioner: the account endpoints answer for real, not 503)
    api = start_api(broker, tmp_path, API_PROVISIONER_PASSWORD=broker.password_for("provisioner"))
    stopper.append(api.stop)
    wait_for(lambda: api.http.get("/ready").status_code == 200, 15, "ready")
    assert charge(api.http, "EV_0001", 11).status_code == 200  # a session, so DELETE has something to find

    # FastAPI writes OpenAPI 3.1; schemathesis 3 tests it with its 3.0 machinery when told to.
    schema = schemathesis.from_uri(f"{api.url}/openapi.json", base_url=api.url, force_schema_version="30")
    checks = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    tested: list[str] = []
    statuses: Counter[str] = Counter()
    for result in schema.get_all_operations():
        op = result.ok()  # type: ignore[union-attr]
        if op.path == "/events":
            continue  # an endless stream (checked in the endpoint test)

        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(max_examples=12, deadline=None, database=None, derandomize=True,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(headers=auth, timeout=10)
            statuses[f"{case.method} {case.path} {response.status_code}"] += 1
            case.validate_response(response, checks=checks)

        run()
        tested.append(f"{op.method.upper()} {op.path}")
    assert len(tested) >= 15, tested
    print(sorted(statuses.items()))
    assert sum(statuses.values()) >= 100, statuses
    check_log(api.service)


# ------------------------------------------------------------------------------------------------ live page
def test_live_page_shows_the_substations_and_follows_the_grid(broker: LocalBroker, tmp_path: Path,
                                                              stopper: list[Callable[[], Any]]) -> None:
    from browser import chromium
    from selenium.webdriver.common.by import By

    subs = Substations(broker, north=(400.0, 180.0), central=(300.0, 120.0), south=(250.0, 90.0),
                       east=(150.0, 40.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2", BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path, API_PUBLIC_READS="true")  # as under ./gridctl run: EventSource, no token
    stopper.append(api.stop)
    wait_for(lambda: len(api.http.get("/substations").json()) == 4, 15, "four substations")

    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get(api.url + "/")

        def bar_text(sid: str) -> str:
            return str(driver.find_element(By.CSS_SELECTOR, f'.sub[data-substation="{sid}"] .nums').text)

        def ev_width(sid: str) -> float:
            return float(driver.execute_script(
                "const s = document.querySelector(arguments[0]);"
                "return s ? s.getBoundingClientRect().width : -1;",
                f'.sub[data-substation="{sid}"] .seg.ev'))

        try:
            wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".sub")) == 4, 15, "four bars on the page")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nbrowser log: {driver.get_log('browser')}\n"
                                 f"page: {driver.page_source[:3000]}") from None
        names = [str(e.get_attribute("data-substation")) for e in driver.find_elements(By.CSS_SELECTOR, ".sub")]
        assert names == ["north", "central", "south", "east"]  # worst first: all ok, the fullest first
        wait_for(lambda: "balancer: online" in driver.find_element(By.ID, "balancer-badge").text, 10, "badge")
        before = {sid: bar_text(sid) for sid in names}
        widths_before = {sid: ev_width(sid) for sid in names}
        assert "0.0 kW in 0 sessions" in before["north"]

        # EVs arrive: the bars show the grants, then the measured EV load once telemetry reflects it.
        granted: dict[str, float] = {}
        for i in range(1, 13):
            r = charge(api.http, f"EV_{i:04d}", 22 if i % 3 else 11)
            assert r.status_code in (200, 202), r.text
            if r.status_code == 200:
                a = r.json()
                granted[a["substation_id"]] = granted.get(a["substation_id"], 0.0) + a["granted_kw"]
        for sid, kw in granted.items():
            subs.subs[sid][2] = kw
        wait_for(lambda: all(bar_text(sid) != before[sid] for sid in granted), 10, "bars to change")
        wait_for(lambda: any(ev_width(sid) > widths_before[sid] + 5 for sid in granted), 10, "EV load in the bars")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#assignments li .st.assigned"), 5, "assignments")

        # Colours: an operator drains one, one goes silent (stale), one is overloaded by its base load.
        assert api.http.post("/substations/central/drain").status_code == 200
        subs.silent.add("east")
        subs.subs["south"][1] = 270.0
        for i in range(13, 16):
            charge(api.http, f"EV_{i:04d}", 300, min_kw=300)  # under a limit, beside no base load: queued

        def condition(sid: str) -> str:
            return str(driver.find_element(By.CSS_SELECTOR, f'.sub[data-substation="{sid}"]').get_attribute("class"))

        wait_for(lambda: "draining" in condition("central"), 10, "central draining")
        wait_for(lambda: "stale" in condition("east"), 10, "east stale")
        wait_for(lambda: "overloaded" in condition("south"), 10, "south overloaded")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#queue tr td.num")) > 0, 10, "queue rows")
        time.sleep(0.5)  # let the bar transitions settle for the screenshot
        screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "live-page.png")
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000  # a real rendering, not an empty page
        logs = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
        assert not logs, logs
    check_log(api.service)


def test_live_page_behind_a_token_asks_for_one_and_then_follows_the_grid(
        broker: LocalBroker, tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    """Reads closed (the default): the page asks for a token, refuses an EV token (it may not read the grid),
    and with a viewer token reads the feed with fetch() (an EventSource cannot send the header)."""
    from browser import chromium
    from selenium.webdriver.common.by import By

    subs = Substations(broker, north=(400.0, 100.0), south=(250.0, 50.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path)
    stopper.append(api.stop)
    wait_for(lambda: len(api.http.get("/substations").json()) == 2, 15, "two substations")
    problem(api.anon.get("/status"), 401)

    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get(api.url + "/")
        form = driver.find_element(By.ID, "login")
        wait_for(lambda: form.is_displayed(), 10, "the token form")
        assert driver.find_elements(By.CSS_SELECTOR, ".sub") == []

        def log_in(token: str) -> None:
            box = driver.find_element(By.ID, "token")
            box.clear()
            box.send_keys(token)
            driver.find_element(By.CSS_SELECTOR, "#login button").click()

        log_in(EV_TOKEN)
        wait_for(lambda: "may not read" in driver.find_element(By.ID, "login-error").text, 10, "the refusal")
        log_in(VIEWER_TOKEN)
        wait_for(lambda: not form.is_displayed(), 10, "the form to go")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".sub")) == 2, 10, "two bars")
        wait_for(lambda: "feed: live" in driver.find_element(By.ID, "feed-badge").text, 10, "the live feed")
        # The feed follows the grid: a charge appears in the latest assignments without a reload.
        r = api.http.post("/charge", json={"ev_id": "EV_0007", "requested_kw": 11, "duration_minutes": 60})
        assert r.status_code == 200, r.text
        wait_for(lambda: "EV_0007" in driver.find_element(By.ID, "assignments").text, 10, "the new assignment")
        streams = wait_for(lambda: api.http.get("/metrics").text.count("gridlb_api_sse_clients 1.0"), 5,
                           "the page's stream counted as a live client")
        assert streams == 1
        logs = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"
                and "401" not in entry.get("message", "") and "403" not in entry.get("message", "")]
        assert not logs, logs  # (the refused requests before logging in are logged by Chromium itself)
    check_log(api.service)


def test_live_page_for_an_operator_trends_actions_event_log_and_probe_noise(
        broker: LocalBroker, tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    """The operator's page in headless Chromium: a trend per substation that grows, operator actions behind an
    operator token (a viewer's is refused), the event log, and probe noise shown only when asked for."""
    from browser import chromium
    from selenium.webdriver.common.by import By

    subs = Substations(broker, north=(400.0, 150.0), south=(250.0, 80.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2", BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path, API_PUBLIC_READS="true", API_TREND_STEP_S="0.5")
    stopper.append(api.stop)
    wait_for(lambda: len(api.http.get("/substations").json()) == 2, 15, "two substations")

    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get(api.url + "/")

        def row(sid: str) -> Any:
            return driver.find_element(By.CSS_SELECTOR, f'.sub[data-substation="{sid}"]')

        def trend_points(sid: str) -> int:
            points = row(sid).find_element(By.CSS_SELECTOR, "polyline.load").get_attribute("points") or ""
            return len(points.split())

        def events_text() -> str:
            return str(driver.find_element(By.ID, "events").text)

        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".sub")) == 2, 15, "two rows")
        # The trend grows with the feed (one sample per 0.5 s here; 10 s by default), limit drawn beside it.
        wait_for(lambda: trend_points("north") >= 4, 15, "a trend for north")
        assert row("north").find_element(By.CSS_SELECTOR, "polyline.lim").get_attribute("points")
        assert api.http.get("/trends").json()["substations"]["north"]["load_kw"][-1] == 150.0
        # No operator yet: no actions shown. A viewer's token is refused as operator; the operator's is taken.
        ops = row("north").find_element(By.CSS_SELECTOR, ".ops")
        assert not ops.is_displayed()
        driver.find_element(By.ID, "operator-button").click()

        def sign_in(token: str) -> None:
            box = driver.find_element(By.ID, "operator-token")
            box.clear()
            box.send_keys(token)
            driver.find_element(By.CSS_SELECTOR, "#operator-login button[type=submit]").click()

        sign_in(VIEWER_TOKEN)
        wait_for(lambda: "may not act as operator" in driver.find_element(By.ID, "operator-error").text, 10,
                 "the viewer refused")
        assert not ops.is_displayed()
        sign_in(TOKEN)
        wait_for(lambda: ops.is_displayed(), 10, "operator actions")
        assert "operator: API_TOKEN (sign out)" in driver.find_element(By.ID, "operator-button").text

        # Drain from the page: the balancer does it, the row and the event log show it.
        row("north").find_element(By.CSS_SELECTOR, "button.drain").click()
        wait_for(lambda: "draining" in str(row("north").get_attribute("class")), 10, "north draining")
        wait_for(lambda: "north drained" in events_text(), 10, "the drain in the event log")
        assert "drain north: done" in driver.find_element(By.ID, "action-result").text
        assert api.http.get("/substations/north").json()["draining"] is True
        # A capacity limit, and its removal.
        cap = row("south").find_element(By.CSS_SELECTOR, ".cap-input")
        cap.send_keys("200")
        row("south").find_element(By.CSS_SELECTOR, 'button[data-action="set-capacity"]').click()
        wait_for(lambda: "operator limit 200.0" in row("south").find_element(By.CSS_SELECTOR, ".nums").text, 10,
                 "south limited")
        wait_for(lambda: "south: operator limit 200 kW" in events_text(), 10, "the limit in the event log")
        row("south").find_element(By.CSS_SELECTOR, 'button[data-action="clear-capacity"]').click()
        wait_for(lambda: "operator limit removed" in events_text(), 10, "the removal in the event log")
        row("north").find_element(By.CSS_SELECTOR, "button.drain").click()  # now labelled undrain
        wait_for(lambda: "north takes new sessions again" in events_text(), 10, "undrain")
        assert api.http.get("/substations/north").json()["draining"] is False

        # Probe noise (nothing_to_release) stays out of the latest answers unless asked for.
        assert charge(api.http, "EV_0002", 11).status_code == 200
        problem(api.http.delete("/evs/EV_0050/request"), 404)  # answered rejected nothing_to_release
        wait_for(lambda: "EV_0002" in driver.find_element(By.ID, "assignments").text, 10, "EV_0002's answer")
        time.sleep(1.0)  # (several snapshots later)
        assert "EV_0050" not in driver.find_element(By.ID, "assignments").text
        driver.find_element(By.ID, "show-noise").click()
        wait_for(lambda: "nothing_to_release" in driver.find_element(By.ID, "assignments").text, 10, "the noise")

        # A substation going silent is in the log as stale (and its trend stops growing).
        subs.silent.add("south")
        wait_for(lambda: "south is stale" in events_text(), 15, "south stale in the event log")
        time.sleep(0.5)
        screenshot = tmp_path / "live-page-operator.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        logs = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
        assert not logs, logs
    check_log(api.service)


# ------------------------------------------------------------------------------------------------ who may call
def test_tokens_are_checked_before_anything_reaches_the_broker(
        broker: LocalBroker, tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    """The real API with the operator's token and a token file: an EV token charges and ends its own EV's
    session; every refused write (no token, a wrong one, another EV, a viewer, an operator action by an EV)
    is a 401/403 problem and publishes nothing, as an observer of the whole prefix sees; a changed token file
    takes effect without a restart."""
    subs = Substations(broker, A=(400.0, 100.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path)
    stopper.append(api.stop)
    wait_for(lambda: api.http.get("/ready").status_code == 200, 15, "ready")
    ev = {"Authorization": f"Bearer {EV_TOKEN}"}
    viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    wrong = {"Authorization": "Bearer not-a-token"}
    body = {"requested_kw": 11, "duration_minutes": 120}

    # Another EV's session, opened by the operator.
    r = api.http.post("/charge", json={"ev_id": "EV_0002", **body})
    assert r.status_code == 200, r.text
    other = r.json()["session_id"]
    wait_for(lambda: api.http.get("/sessions").json()["total"] == 1, 5, "the session in the state")

    with Probe(broker, "observer", "grid/v1/ev/#", "grid/v1/balancer/control") as watch:
        time.sleep(0.3)
        refused = [
            (api.anon.post("/charge", json={"ev_id": "EV_0001", **body}), 401),
            (api.anon.post("/charge", json={"ev_id": "EV_0001", **body}, headers=wrong), 401),
            (api.anon.post("/charge", json={"ev_id": "EV_0002", **body}, headers=ev), 403),
            (api.anon.post("/charge", json={"ev_id": "EV_0001", **body}, headers=viewer), 403),
            (api.anon.delete(f"/sessions/{other}"), 401),
            (api.anon.delete(f"/sessions/{other}", headers=ev), 403),
            (api.anon.delete("/evs/EV_0002/request", headers=ev), 403),
            (api.anon.post("/substations/A/drain", headers=ev), 403),
            (api.anon.put("/substations/A/capacity", json={"capacity_kw": 10}, headers=viewer), 403),
            (api.anon.get("/sessions"), 401),
            (api.anon.get("/sessions", headers=ev), 403),
            (api.anon.get("/evs/EV_0002", headers=ev), 403),
        ]
        for response, status in refused:
            p = problem(response, status)
            assert p["type"] == ("urn:gridlb:problem:unauthorized" if status == 401 else "urn:gridlb:problem:forbidden")
            assert response.headers["www-authenticate"].startswith('Bearer realm="gridlb"')
        time.sleep(0.5)
        assert watch.messages == [], [m.topic for m in watch.messages]  # nothing reached the broker

        # The EV token for its own EV: charge, read its own EV, end its session.
        r = api.anon.post("/charge", json={"ev_id": "EV_0001", **body}, headers=ev)
        assert r.status_code == 200 and r.json()["status"] == "assigned", r.text
        mine = r.json()["session_id"]
        assert api.anon.get("/evs/EV_0001", headers=ev).json()["state"] == "charging"
        r = api.anon.delete(f"/sessions/{mine}", headers=ev)
        assert r.status_code == 200 and r.json()["answer"]["status"] == "completed", r.text
        assert {m.topic for m in watch.messages} >= {"grid/v1/ev/EV_0001/request", "grid/v1/ev/EV_0001/release"}
        assert not [m for m in watch.messages if "/EV_0002/" in m.topic or m.topic.endswith("/control")]
    # The other EV's session is untouched.
    wait_for(lambda: [s["session_id"] for s in api.http.get("/sessions").json()["items"]] == [other], 5,
             "only the other EV's session left")

    # A token added to the file works at once; the removed one stops working (no restart).
    path = tmp_path / "api-tokens.json"
    write_token_file(path, TokenFile(tokens=[
        TokenEntry(name="ev-0002", role="ev", ev_ids=["EV_0002"], sha256=hash_token("new-ev-token"))]))
    wait_for(lambda: api.anon.get("/evs/EV_0002", headers={"Authorization": "Bearer new-ev-token"}).status_code
             == 200, 5, "the new token")
    problem(api.anon.get("/evs/EV_0001", headers=ev), 401)
    metrics = api.http.get("/metrics").text
    assert 'gridlb_api_auth_refused_total{reason="forbidden"}' in metrics
    log = api.service.log()
    assert "api_write" in log and "ev-0001" in log and EV_TOKEN not in log
    check_log(api.service)
