"""Substations and EVs that come and go while the grid runs, end to end: a real Mosquitto with its dynamic security
plugin, ``python -m balancer``, ``python -m api`` with the provisioner account, real substation agents
(``python -m substation_agents``) and ``python -m api.admin``.

Also the totals that tell the truth (an offline substation leaves them) and a client that sees its own write.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from probe import ROOT, Probe, Service, start_balancer
from test_api_e2e import TOKEN, charge, check_log, problem, start_api, wait_for

from broker.local import LocalBroker

pytestmark = pytest.mark.integration

P = "grid/v1"


def agent(broker: LocalBroker, tmp_path: Path, spec: str, **env: str) -> Service:
    settings = {"SUBSTATIONS": spec, "SUBSTATION_INTERVAL_S": "0.3", "SIM_SPEEDUP": "1",
                "MQTT_ACCOUNT_SECRET": broker.secret}
    settings.update(env)
    return Service("substation_agents", broker, tmp_path, **settings)


def conditions(http: httpx.Client) -> dict[str, str]:
    return {s["substation_id"]: s["condition"] for s in http.get("/substations").json()}


def test_a_substation_added_and_removed_at_runtime(broker: LocalBroker, tmp_path: Path,
                                                   stopper: list[Callable[[], Any]]) -> None:
    agents = [agent(broker, tmp_path, "A:400"), agent(broker, tmp_path, "B:300")]
    for a in agents:
        stopper.append(a.stop)
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2")
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path, API_PROVISIONER_PASSWORD=broker.password_for("provisioner"))
    stopper.append(api.stop)
    http = api.http
    wait_for(lambda: conditions(http) == {"A": "ok", "B": "ok"}, 20, "A and B")

    # Operators only; ids are checked; the account is created once and its password shown once.
    problem(api.anon.post("/substations", json={"substation_id": "east"}), 401)
    problem(api.anon.post("/substations", json={"substation_id": "east"},
                          headers={"Authorization": "Bearer viewer-test-token"}), 403)
    problem(http.post("/substations", json={"substation_id": "ea/st"}), 422)
    r = http.post("/substations", json={"substation_id": "east", "capacity_kw": 300})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["username"] == "substation.east" and len(created["password"]) >= 32
    assert r.headers["cache-control"] == "no-store"
    assert "SUBSTATIONS=east:300" in created["command"] and created["password"] in created["command"]
    assert created["mqtt_url"] == f"mqtt://{broker.host}:{broker.port}"
    assert problem(http.post("/substations", json={"substation_id": "east"}), 409)["type"].endswith("account-exists")

    # Its agent, started as the answer says, joins without a broker restart.
    east = agent(broker, tmp_path, "east:300", MQTT_PASSWORD=created["password"], MQTT_ACCOUNT_SECRET="")
    stopper.append(east.stop)
    wait_for(lambda: conditions(http).get("east") == "ok", 20, "east online")

    # A session there: A and B drained, so the charge lands on east. GET /sessions shows it at once (read your
    # own write: the balancer's retained state comes up to a second later).
    for sid in "AB":
        assert http.post(f"/substations/{sid}/drain").status_code == 200
    r = charge(http, "EV_0001", 22)
    assert r.status_code == 200 and r.json()["substation_id"] == "east", r.text
    session_id = r.json()["session_id"]
    mine = http.get("/sessions", params={"ev_id": "EV_0001"}).json()
    assert [s["session_id"] for s in mine["items"]] == [session_id] and mine["items"][0]["requested_kw"] == 22

    with Probe(broker, "observer", f"{P}/ev/EV_0001/assignment") as watch:
        r = http.delete("/substations/east")
        assert r.status_code == 200, r.text
        removed = r.json()
        assert (removed["account_removed"], removed["balancer"], removed["sessions_moved"]) == (True, "forgotten", 1)
        # The EV hears why, and its request waits in the queue (A and B are drained) ...
        answers = [m.json() for m in watch.wait_for(lambda m: m.json()["status"] == "queued", what="re-queued")]
        revoked = [a for a in watch.answers("EV_0001") if a["status"] == "revoked"]
        assert revoked and revoked[0]["reason"] == "decommissioned" and answers[0]["reason"] == "decommissioned"
        # ... until an operator opens A again: it is placed there.
        assert http.post("/substations/A/undrain").status_code == 200
        watch.wait_for(lambda m: m.json()["status"] == "assigned" and m.json()["substation_id"] == "A",
                       what="placed on A")
    status = http.get("/status").json()
    assert [s["substation_id"] for s in status["substations"]] == ["A", "B"]
    assert [d["substation_id"] for d in status["decommissioned"]] == ["east"]
    assert status["totals"]["capacity_kw"] == 700 and status["totals"]["decommissioned"] == 1
    problem(http.get("/substations/east"), 404)
    kinds = [e["kind"] for e in http.get("/event-log").json()["events"]]
    assert {"account_added", "decommissioned", "account_removed", "drain", "undrain", "revoked"} <= set(kinds)
    # Its agent was disconnected and is refused from now on; nothing of it is retained for later readers.
    wait_for(lambda: "not authori" in east.log().lower() or "refused" in east.log().lower(), 10,
             "the agent's refused reconnect")
    with Probe(broker, "observer", f"{P}/substation/east/#") as late:
        time.sleep(1.0)
        assert late.messages == [], late.topics()
    # A restarted balancer does not learn it again; a second DELETE finds nothing.
    assert balancer.stop() == 0
    stopper.remove(balancer.stop)
    balancer2 = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2")
    stopper.append(balancer2.stop)
    wait_for(lambda: http.get("/status").json()["balancer"]["state"] == "online", 15, "the new balancer")
    time.sleep(1.5)
    assert set(conditions(http)) == {"A", "B"}
    assert problem(http.delete("/substations/east"), 404)["type"].endswith("not-found")

    # Totals tell the truth: B stops (its retained status says offline) and leaves them, counted apart.
    assert http.post("/substations/B/undrain").status_code == 200
    b = agents[1]
    b.signal(signal.SIGTERM)
    b.proc.wait(10)
    wait_for(lambda: conditions(http).get("B") == "offline", 10, "B offline")
    totals = http.get("/status").json()["totals"]
    assert (totals["capacity_kw"], totals["offline_capacity_kw"], totals["offline"]) == (400, 300, 1)
    assert totals["utilisation"] == round(totals["load_kw"] / 400, 4)
    check_log(api.service)


def test_ev_accounts_at_runtime_and_the_admin_cli(broker: LocalBroker, tmp_path: Path,
                                                  stopper: list[Callable[[], Any]]) -> None:
    a = agent(broker, tmp_path, "A:400")
    stopper.append(a.stop)
    balancer = start_balancer(broker, tmp_path)
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path, API_PROVISIONER_PASSWORD=broker.password_for("provisioner"))
    stopper.append(api.stop)
    http = api.http
    wait_for(lambda: conditions(http) == {"A": "ok"}, 20, "A")

    r = http.post("/evs", json={"ev_id": "EV_9000"})
    assert r.status_code == 201, r.text
    password = r.json()["password"]
    problem(http.post("/evs", json={"ev_id": "balancer"}), 422)
    problem(http.post("/evs", json={"ev_id": "EV_9000"}), 409)
    with Probe(broker, "EV_9000", f"{P}/ev/EV_9000/assignment", password=password) as ev:
        ev.publish(f"{P}/ev/EV_9000/request", {"requested_kw": 11, "duration_minutes": 60, "request_id": "x1"})
        ev.wait_one(lambda m: m.json()["status"] == "assigned", what="assigned")
        r = http.delete("/evs/EV_9000")
        assert r.status_code == 200, r.text
        assert r.json()["account_removed"] is True and r.json()["released"]["status"] == "completed"
    refused = Probe(broker, "EV_9000", password=password, connect=False)
    refused.client.reconnect_delay_set(60, 60)
    try:
        assert refused.connect().is_failure
    finally:
        refused.close()
    problem(http.delete("/evs/EV_9000"), 404)

    # The CLI: the same endpoints, for an operator at a shell.
    env = {"API_URL": api.url, "API_TOKEN": TOKEN, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.admin", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    added = admin("substation", "add", "west", "--capacity", "250")
    assert added.returncode == 0, added.stderr
    assert "substation.west created" in added.stdout and "password (shown once): " in added.stdout
    assert "SUBSTATIONS=west:250" in added.stdout
    assert admin("substation", "add", "west").returncode == 1
    removed = admin("substation", "remove", "west", "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["account_removed"] is True
    assert "refused (401)" in admin("--token", "nope", "ev", "add", "EV_1").stderr
    check_log(api.service)


def test_provisioning_endpoints_answer_503_without_a_provisioner(broker: LocalBroker, tmp_path: Path,
                                                                 stopper: list[Callable[[], Any]]) -> None:
    api = start_api(broker, tmp_path)
    stopper.append(api.stop)
    body = problem(api.http.post("/substations", json={"substation_id": "east"}), 503)
    assert "API_PROVISIONER_PASSWORD" in body["detail"]

