"""The EV fleet / load tester end to end, as a user runs it.

A private Mosquitto (``broker`` fixture), ``python -m balancer`` and ``python -m substation_agents`` as
subprocesses, and ``python -m ev_clients`` as a subprocess; results are read from its ``--save`` JSON.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from probe import Probe, Received, service_env

from broker.local import LocalBroker
from grid_protocol.topics import Topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-secret"


def _env(broker: LocalBroker, **extra: str) -> dict[str, str]:
    return service_env(broker, **{"LOG_LEVEL": "INFO", **extra})


class Procs:
    """Subprocesses of one test; all are stopped in ``close`` (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append((name, proc))
        return proc

    def balancer(self, broker: LocalBroker) -> subprocess.Popen[bytes]:
        return self.start("balancer", ["-m", "balancer"], _env(
            broker, MQTT_USERNAME="balancer", MQTT_PASSWORD=broker.password_for("balancer")))

    def agents(self, broker: LocalBroker, substations: str, **extra: str) -> subprocess.Popen[bytes]:
        env = _env(broker, SUBSTATIONS=substations, MQTT_ACCOUNT_SECRET=SECRET,
                   SUBSTATION_INTERVAL_S="0.2", SIM_SPEEDUP="1000")
        env.update(extra)
        return self.start("agents", ["-m", "substation_agents"], env)

    def log(self, name: str) -> str:
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def wait_online(broker: LocalBroker, substations: list[str], *, balancer: bool, timeout: float = 15.0) -> None:
    """Wait for the retained ``online`` statuses (and first telemetry) of the services."""
    topics = Topics()
    wanted = {topics.substation_status(s) for s in substations} | {topics.telemetry(s) for s in substations}
    if balancer:
        wanted.add(topics.balancer_status())

    def online(messages: list[Received]) -> set[str]:
        seen: set[str] = set()
        for m in messages:  # in arrival order: a later offline status cancels an online one
            if m.topic.endswith("/telemetry") or b'"online"' in m.payload:
                seen.add(m.topic)
            else:
                seen.discard(m.topic)
        return seen

    with Probe(broker, "observer", *sorted(wanted)) as watch:
        if not watch.wait_until(lambda: wanted <= online(watch.messages), timeout):
            raise AssertionError(f"services not online after {timeout} s: "
                                 f"missing {sorted(wanted - online(watch.messages))}")


def run_ev_clients(broker: LocalBroker, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = _env(broker, MQTT_ACCOUNT_SECRET=SECRET, LOG_LEVEL="WARNING")
    return subprocess.run([sys.executable, "-m", "ev_clients", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _explain(result: subprocess.CompletedProcess[str], procs: Procs) -> str:
    return (f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n"
            f"{result.stderr[-3000:]}\n--- balancer ---\n{procs.log('balancer')}\n--- agents ---\n"
            f"{procs.log('agents')}")


@pytest.mark.parametrize("client", ["aiomqtt", "paho"])
def test_loadtest_every_request_answered(broker: LocalBroker, procs: Procs, tmp_path: Path, client: str) -> None:
    procs.agents(broker, "A:100,B:100,C:100")
    procs.balancer(broker)
    wait_online(broker, ["A", "B", "C"], balancer=True)
    out = tmp_path / "results.json"
    result = run_ev_clients(broker, ["loadtest", "--requests", "60", "--concurrent", "6", "--ramp-up", "1",
                                     "--url", f"mqtt://{broker.host}:{broker.port}", "--save", str(out),
                                     "--seed", "3", "--client", client], timeout=40)
    assert result.returncode == 0, _explain(result, procs)
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["requests_sent"] == 60 and s["requests_answered"] == 60 and s["requests_unanswered"] == 0
    assert s["unanswered_request_ids"] == []
    for key in ("latency_first_answer", "latency_to_assigned"):
        lat = s[key]
        assert lat["count"] > 0
        assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert s["latency_first_answer"]["count"] == 60
    assert s["status_events"].get("assigned", 0) > 0
    assert sum(s["final_status"].values()) == 60
    assert set(s["final_status"]) <= {"completed", "cancelled", "rejected"}
    records = doc["requests"]
    assert len(records) == 60
    assert len({r["request_id"] for r in records}) == 60
    assert {r["ev_id"] for r in records} == {f"EV_{i:04d}" for i in range(1, 7)}
    for r in records:
        assert r["answered"] and r["statuses"] and r["first_answer_ms"] is not None
        if "assigned" in r["statuses"]:
            assert r["substation_id"] in {"A", "B", "C"} and r["granted_kw"] > 0
            assert r["statuses"][-1] == "completed" and r["released"]
    assert doc["config"]["concurrent"] == 6
    assert "p99=" in result.stdout


def test_loadtest_through_the_http_api_holds_sessions_so_requests_queue(
        broker: LocalBroker, procs: Procs, tmp_path: Path) -> None:
    """``--url http://…`` drives POST /charge (the original design's flag), ``--release-after`` holds each session
    so the substations fill and requests wait in the queue, and the summary shows where sessions went."""
    from test_api_e2e import TOKEN, start_api

    procs.agents(broker, "A:40,B:40", SIM_SPEEDUP="1", SUBSTATION_BASE_LOAD_PCT="1")
    procs.balancer(broker)
    wait_online(broker, ["A", "B"], balancer=True)
    api = start_api(broker, tmp_path)
    try:
        out = tmp_path / "results.json"
        args = ["loadtest", "--requests", "24", "--concurrent", "6", "--ramp-up", "0", "--kw-mix", "22:1",
                "--min-kw-pct", "0", "--release-after", "1", "--url", api.url, "--save", str(out), "--seed", "5"]
        refused = run_ev_clients(broker, [*args, "--token", "not-a-token"], timeout=30)
        assert refused.returncode == 1 and "api_token_refused" in refused.stderr + refused.stdout, refused.stderr
        result = run_ev_clients(broker, [*args, "--token", TOKEN], timeout=90)
        assert result.returncode == 0, _explain(result, procs)
        s = json.loads(out.read_text())["summary"]
        assert s["requests_sent"] == 24 and s["requests_answered"] == 24 and s["requests_unanswered"] == 0
        # 38 kW of limit each, 22 kW requests: a session and a partial one per substation, so of the six workers
        # two always wait.
        # (An HTTP EV sees snapshots, not events: polling GET /evs/{id}, it may see a placed request's first
        # answer only after an ``updated`` replaced it. Every request was placed: see sessions_by_substation.)
        events = s["status_events"]
        assert events["queued"] > 0 and events["assigned"] + events.get("updated", 0) >= 24, events
        assert s["final_status"] == {"completed": 24}
        assert set(s["sessions_by_substation"]) == {"A", "B"} and sum(s["sessions_by_substation"].values()) == 24
        assert s["outcomes"] == {"released_after_hold": 24}
        spread = r"sessions per substation\s+[AB]=\d+ \(\d+ %\), [AB]=\d+ \(\d+ %\)"
        assert re.search(spread, result.stdout), result.stdout
        # six workers, each holding every session it gets for 1 s: four rounds at the least (how many sessions
        # run at once depends on partial grants; the queue is proven by ``queued`` above)
        assert s["elapsed_s"] >= 24 / 6 * 1.0, s["elapsed_s"]
        # The API saw every request as an EV's writes (its metrics count them).
        metrics = api.http.get("/metrics").text
        assert 'gridlb_api_balancer_answers_total{operation="charge",outcome="queued"}' in metrics
    finally:
        api.stop()


def test_fleet_queues_then_completes_all(broker: LocalBroker, procs: Procs, tmp_path: Path) -> None:
    """Small substations, a burst of 40 EVs: some wait in the queue and are assigned as others finish."""
    procs.agents(broker, "A:30,B:30", SIM_SPEEDUP="2000", SUBSTATION_BASE_LOAD_PCT="20")
    procs.balancer(broker)
    wait_online(broker, ["A", "B"], balancer=True)
    out = tmp_path / "fleet.json"
    result = run_ev_clients(broker, [
        "fleet", "--evs", "40", "--requests", "40", "--rate", "40", "--arrivals", "fixed",
        "--speedup", "2000", "--energy-kwh", "1-2", "--duration-pct", "0", "--kw-mix", "7.4:2,11:2,22:1",
        "--min-kw-pct", "0", "--release-early-pct", "0", "--timeout", "40", "--retry-after", "2",
        "--url", f"mqtt://{broker.host}:{broker.port}", "--save", str(out), "--seed", "5",
    ], timeout=50)
    assert result.returncode == 0, _explain(result, procs)
    doc = json.loads(out.read_text())
    records = doc["requests"]
    assert len(records) == 40
    # an EV id comes back only after its previous visit ended
    by_ev: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_ev.setdefault(r["ev_id"], []).append(r)
    for visits in by_ev.values():
        visits.sort(key=lambda r: r["sent_at_s"])
        for before, after in itertools.pairwise(visits):
            assert after["sent_at_s"] >= before["sent_at_s"] + before["events"][-1]["at_ms"] / 1000
    assert all(r["final_status"] == "completed" for r in records), _explain(result, procs)
    assert all(r["events"][-1]["reason"] == "energy_delivered" for r in records)
    queued_then_assigned = [r for r in records if r["statuses"][:1] == ["queued"] and "assigned" in r["statuses"]]
    assert queued_then_assigned, "expected some EVs to wait in the queue"
    for r in records:
        assert r["assigned_ms"] is not None and r["substation_id"] in {"A", "B"}
    s = doc["summary"]
    assert s["requests_unanswered"] == 0 and s["active_sessions"] == 0
    assert s["latency_to_assigned"]["count"] == 40


def test_ev_retries_until_balancer_starts(broker: LocalBroker, procs: Procs, tmp_path: Path) -> None:
    """No balancer at first: the EV re-sends the same request_id and is answered once it starts."""
    procs.agents(broker, "A:100,B:100")
    wait_online(broker, ["A", "B"], balancer=False)
    out = tmp_path / "retry.json"
    env = _env(broker, MQTT_ACCOUNT_SECRET=SECRET, LOG_LEVEL="WARNING")
    ev = procs.start("ev_clients", [
        "-m", "ev_clients", "loadtest", "--requests", "2", "--concurrent", "1", "--ramp-up", "0",
        "--retry-after", "1", "--max-attempts", "15", "--url", f"mqtt://{broker.host}:{broker.port}",
        "--save", str(out), "--report-every", "0",
    ], env)
    time.sleep(3.0)
    assert ev.poll() is None, procs.log("ev_clients")
    procs.balancer(broker)
    code = ev.wait(timeout=30)
    assert code == 0, procs.log("ev_clients") + procs.log("balancer")
    doc = json.loads(out.read_text())
    first, second = doc["requests"]
    assert first["attempts"] >= 3, first  # sent at 0, 1, 2, 3 s ... before anyone listened
    assert first["answered"] and first["first_answer_ms"] >= 1500
    assert first["statuses"][0] in ("assigned", "queued") and first["final_status"] == "completed"
    assert first["request_id"] != second["request_id"]
    assert second["attempts"] == 1 and second["final_status"] == "completed"
    assert doc["summary"]["retried_requests"] >= 1 and doc["summary"]["requests_unanswered"] == 0


def test_sigterm_releases_everything_and_saves(broker: LocalBroker, procs: Procs, tmp_path: Path) -> None:
    """Long charges, then SIGTERM: every EV releases (queued: cancelled, charging: completed), the summary
    is saved and the exit code is 0 because every request was answered."""
    procs.agents(broker, "A:60,B:60")
    procs.balancer(broker)
    wait_online(broker, ["A", "B"], balancer=True)
    out = tmp_path / "stopped.json"
    env = _env(broker, MQTT_ACCOUNT_SECRET=SECRET, LOG_LEVEL="WARNING")
    ev = procs.start("ev_clients", [
        "-m", "ev_clients", "--evs", "12", "--rate", "50", "--arrivals", "fixed", "--speedup", "1",
        "--energy-kwh", "30-60", "--duration-pct", "0", "--url", f"mqtt://{broker.host}:{broker.port}",
        "--save", str(out), "--report-every", "0.5",
    ], env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "answered 12/12" not in procs.log("ev_clients"):
        time.sleep(0.1)
    assert "answered 12/12" in procs.log("ev_clients"), procs.log("ev_clients")
    ev.terminate()
    code = ev.wait(timeout=20)
    log = procs.log("ev_clients")
    assert code == 0, log
    assert "SIGTERM: stopping" in log and "fleet summary (interrupted)" in log
    doc = json.loads(out.read_text())
    assert doc["config"]["interrupted"] is True
    records = doc["requests"]
    assert len(records) == 12
    for r in records:
        assert r["released"] and r["outcome"] == "stopped", r
        if "assigned" in r["statuses"]:
            assert r["final_status"] == "completed" and r["events"][-1]["reason"] == "released"
        else:
            assert r["final_status"] == "cancelled"
    assert doc["summary"]["active_sessions"] == 0


@pytest.mark.parametrize("mode", ["loadtest", "fleet"])
def test_the_fleet_never_ends_a_session_someone_else_opened_for_its_ev_id(
        broker: LocalBroker, procs: Procs, tmp_path: Path, mode: str) -> None:
    """Someone else (here the ``api`` account, publishing exactly what ``POST /charge`` publishes) holds a long
    session for EV_0001. A load test whose worker uses EV_0001 gets ``ev_busy`` for each of its requests, a fleet
    gets it once and lets EV_0001 sit out; both must leave that session alone: they may release only requests
    they sent themselves."""
    procs.agents(broker, "A:100,B:100")
    procs.balancer(broker)
    wait_online(broker, ["A", "B"], balancer=True)
    topics = Topics()
    watch = Probe(broker, "observer", "grid/v1/#")
    try:
        with Probe(broker, "api") as api:
            held = {"request_id": "someone-else-1", "ev_id": "EV_0001", "requested_kw": 11,
                    "duration_minutes": 10080}  # a week: still charging long after the load test
            api.publish(topics.request("EV_0001"), held)
            # (queued first when the balancer has not seen the agents' telemetry yet: assigned once it has)
            first = watch.wait_one(lambda m: m.topic == topics.assignment("EV_0001")
                                   and m.json()["request_id"] == "someone-else-1"
                                   and m.json()["status"] == "assigned", timeout=15, what="the session")
            session_id = first.json()["session_id"]

            out = tmp_path / f"{mode}.json"
            common = ["--retry-after", "1", "--url", f"mqtt://{broker.host}:{broker.port}", "--save", str(out),
                      "--seed", "7"]
            if mode == "loadtest":
                args = ["loadtest", "--requests", "6", "--concurrent", "2", "--ramp-up", "0", *common]
            else:  # EV ids are handed out lowest first: EV_0001 arrives first, then sits out (--timeout 60)
                args = ["fleet", "--evs", "2", "--requests", "4", "--rate", "20", "--arrivals", "fixed",
                        "--speedup", "1000", "--energy-kwh", "1-2", "--duration-pct", "0", "--release-early-pct",
                        "0", "--timeout", "60", *common]
            result = run_ev_clients(broker, args, timeout=40)
            assert result.returncode == 0, _explain(result, procs)
            records = json.loads(out.read_text())["requests"]
            mine = [r for r in records if r["ev_id"] == "EV_0001"]
            assert len(mine) == (3 if mode == "loadtest" else 1), mine
            assert all(r["final_status"] == "rejected" and r["events"][-1]["reason"] == "ev_busy" for r in mine)
            others = [r for r in records if r["ev_id"] == "EV_0002"]
            assert len(others) == 3 and all(r["final_status"] == "completed" for r in others), others

            # Nothing the load test sent names or covers the held request; no stop reached its agent.
            releases = [m.json() for m in watch.on(topics.release("EV_0001"))]
            assert all(r.get("request_id") not in (None, "someone-else-1") for r in releases), releases
            stops = [c for m in watch.messages if m.topic.endswith("/command") for c in m.json()["commands"]
                     if c["session_id"] == session_id and c["command"] == "stop"]
            assert stops == [], stops
            # The balancer still holds it: the same request again is answered with its current state.
            since = time.monotonic()
            api.publish(topics.request("EV_0001"), held)
            again = watch.wait_one(lambda m: m.topic == topics.assignment("EV_0001")
                                   and m.json()["request_id"] == "someone-else-1", since=since)
            assert (again.json()["status"], again.json()["session_id"]) == ("assigned", session_id), again.json()
    finally:
        watch.close()
    assert "ev_id_held_elsewhere" in result.stderr + result.stdout, result.stderr[-2000:]
