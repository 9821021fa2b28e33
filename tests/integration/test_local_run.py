"""The README's run command, as a new user runs it: the whole system comes up, EVs get balanced, it stops."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tsdb import VictoriaMetrics

from api.tokens import hash_token

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_gridlb_run_starts_everything_balances_evs_and_stops_cleanly(tmp_path: Path) -> None:
    work = tmp_path / "run"
    # A topic prefix of the user's own: the run renders the broker's ACL for it, like the services use it.
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRID_TOPIC_PREFIX="site-7/grid/v1")
    proc = subprocess.run(
        [sys.executable, "-m", "gridlb", "run", "--work-dir", str(work), "--port", "0", "--duration", "12",
         "--evs", "30", "--rate", "4", "--speedup", "600"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # Where to look, as the README promises.
    assert "mqtt://127.0.0.1:" in out and "credentials" in out and "mosquitto_sub" in out
    assert "-t 'site-7/grid/v1/#'" in out and "site-7/grid/v1/ev/EV_1234/request" in out
    creds = (work / "credentials.env").read_text()
    assert "MQTT_PORT=" in creds and "EV_1234_PASSWORD=" in creds and "OBSERVER_PASSWORD=" in creds
    for name in ("API_TOKEN", "API_EV_TOKEN", "API_VIEWER_TOKEN"):
        assert f"export {name}=" in creds, name
        assert f"${name}" in out or name == "API_VIEWER_TOKEN", f"the banner shows how to use {name}"
    assert oct((work / "credentials.env").stat().st_mode & 0o777) == "0o600"
    # The API got the scoped tokens' hashes, never the tokens.
    tokens = _credentials(work)
    token_file = (work / "api-tokens.json").read_text()
    assert tokens["API_EV_TOKEN"] not in token_file and hash_token(tokens["API_EV_TOKEN"]) in token_file
    assert oct((work / "api-tokens.json").stat().st_mode & 0o777) == "0o600"
    # The simulation's speed-up is said where a user looks (banner, live line); --duration is a planned end.
    assert "600x real time" in out and "120-minute session ends after 0.2 real minutes" in out
    assert "sim time x600" in out
    assert "=== fleet summary (after --run-for 12 s) ===" in out and "interrupted" not in out, out[-3000:]
    # The fleet's final summary: requests were sent and every one was answered.
    assert "fleet summary" in out, out[-3000:]
    assert re.search(r"sessions per substation\s+\w+=\d+", out)
    # Every service log is JSON lines only (the API's too).
    for name in ("api", "balancer", "substations"):
        lines = [line for line in (work / "logs" / f"{name}.log").read_text().splitlines() if line.strip()]
        assert lines and all(line.startswith("{") and json.loads(line) for line in lines), name
    sent, answered = next(line for line in out.splitlines() if "requests sent / answered" in line).split()[-3::2]
    assert int(sent) > 10 and sent == answered, out[-3000:]
    # Services logged structured JSON and stopped cleanly.
    balancer_log = [json.loads(line) for line in (work / "logs" / "balancer.log").read_text().splitlines()
                    if line.startswith("{")]
    events = [e["event"] for e in balancer_log]
    assert "balancer_starting" in events and "balancer_stopped" in events
    assert not [e for e in balancer_log if e["level"] == "error"], balancer_log[-5:]
    assert "assigned" in json.dumps([e for e in balancer_log if e["event"] == "balancer_stats"][-1])


def test_gridlb_run_help_shows_the_defaults() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "gridlb", "run", "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    for default in ("(default: 1884)", "(default: 200)", "(default: 60.0)", "(default: 0)"):
        assert default in out, out


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _add_and_remove_a_substation_by_hand(work: Path, api_url: str, tokens: dict[str, str], port: int, banner: str,
                                         tmp_path: Path) -> None:
    """As the banner says: add a substation with python -m api.admin, start its agent by hand with the command it
    prints (a second agents process: the default metrics port is the run's, so it takes a free one), see it in
    the API, remove it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "API_", "METRICS_", "SUBSTATION"))}
    env.update(PYTHONPATH=str(ROOT), API_URL=api_url, API_TOKEN=tokens["API_TOKEN"])
    admin = [sys.executable, "-m", "api.admin"]
    assert "python -m api.admin substation add east" in banner
    added = subprocess.run([*admin, "substation", "add", "east", "--capacity", "300"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    command = next(line.split(": ", 1)[1] for line in added.stdout.splitlines() if line.startswith("start its agent"))
    agent_env = dict(env, LOG_FORMAT="json")
    for assignment in shlex.split(command)[:-3]:  # NAME=VALUE ... python -m substation_agents
        name, _, value = assignment.partition("=")
        agent_env[name] = value
    assert agent_env["MQTT_PORT"] == str(port) and agent_env["SUBSTATIONS"] == "east:300"
    log = tmp_path / "east.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "substation_agents"], cwd=ROOT, env=agent_env,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not any(s["substation_id"] == "east" and s["online"] for s in _get_json(f"{api_url}/status")
                      ["substations"]):
            assert time.monotonic() < deadline and agent.poll() is None, log.read_text()[-2000:]
            time.sleep(0.3)
        text = log.read_text()
        assert '"metrics_listening"' in text, text[-2000:]
        if "(substation_agents)" in banner and ":9102/metrics" in banner:
            assert '"metrics_port_taken"' in text  # the run's agents hold the default port
        removed = subprocess.run([*admin, "substation", "remove", "east"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=60, check=False)
        assert removed.returncode == 0 and "substation east removed: account revoked" in removed.stdout, removed
        assert "east" not in {s["substation_id"] for s in _get_json(f"{api_url}/status")["substations"]}
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _credentials(work: Path) -> dict[str, str]:
    """credentials.env as the shell would read it."""
    values = {}
    for line in (work / "credentials.env").read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            values[name] = shlex.split(value)[0] if value else ""
    return values


def _request(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_gridlb_run_serves_api_metrics_records_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """The run also serves the API/live page and /metrics, records into the configured time-series server,
    and ``kill <pid>`` (systemd, CI timeouts) stops every service and the broker, orphaning none."""
    work = tmp_path / "run"
    vm = VictoriaMetrics(tmp_path / "vm").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "API_", "METRICS_", "INFLUX_"))}
    env.update(PYTHONPATH=str(ROOT), INFLUX_URL=vm.url)
    proc = subprocess.Popen([sys.executable, "-m", "gridlb", "run", "--work-dir", str(work), "--port", "0",
                             "--no-fleet", "--api-port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    children: list[int] = []
    try:
        assert proc.stdout is not None
        banner = b""
        deadline = time.monotonic() + 30
        while b"Ctrl-C stops everything" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert b"Ctrl-C stops everything" in banner, banner.decode(errors="replace")
        port = int(re.search(rb"mqtt://127\.0\.0\.1:(\d+)", banner).group(1))  # type: ignore[union-attr]
        children = _children(proc.pid)
        assert len(children) == 5, children  # mosquitto, balancer, substation agents, api, recorder

        text = banner.decode()
        api_url = re.search(r"live page\s+(http://127\.0\.0\.1:\d+)/", text).group(1)  # type: ignore[union-attr]
        metrics_urls = dict((name, url) for url, name in re.findall(r"(http://127\.0\.0\.1:\d+/metrics)\s+\((\w+)\)",
                                                                     text))
        assert set(metrics_urls) == {"api", "balancer", "substation_agents", "recorder"}, text
        deadline = time.monotonic() + 20
        while True:  # the agents' first telemetry reaches the API through the balancer's retained state
            status = _get_json(f"{api_url}/status")
            if len(status["substations"]) == 3 and all(sub.get("capacity_kw") for sub in status["substations"]):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        with urllib.request.urlopen(f"{api_url}/", timeout=5) as resp:
            assert b"<html" in resp.read().lower()
        # Hand testing as the banner shows it: the EV token acts for EV_1234 only, writes need a token.
        tokens = _credentials(work)
        charge = {"ev_id": "EV_1234", "requested_kw": 11, "duration_minutes": 120}
        assert _request("POST", f"{api_url}/charge", None, charge)[0] == 401
        assert _request("POST", f"{api_url}/charge", tokens["API_EV_TOKEN"], charge | {"ev_id": "EV_0001"})[0] == 403
        assert _request("POST", f"{api_url}/substations/north/drain", tokens["API_VIEWER_TOKEN"])[0] == 403
        status, answer = _request("POST", f"{api_url}/charge", tokens["API_EV_TOKEN"], charge)
        assert status == 200 and answer["status"] == "assigned", answer
        status, answer = _request("DELETE", f"{api_url}/evs/EV_1234/request", tokens["API_EV_TOKEN"])
        assert status == 200 and answer["answer"]["status"] == "completed", answer
        assert _request("POST", f"{api_url}/substations/north/drain", tokens["API_TOKEN"])[0] == 200
        assert "API_EV_TOKEN" in text and "API_VIEWER_TOKEN" in text
        _add_and_remove_a_substation_by_hand(work, api_url, tokens, port, text, tmp_path)
        deadline = time.monotonic() + 20
        while True:  # the balancer's view, from the agents' telemetry
            with urllib.request.urlopen(metrics_urls["balancer"], timeout=5) as resp:
                body = resp.read()
            if b'gridlb_substation_capacity_watts{region="default",substation="north"} 400000.0' in body:
                break
            assert time.monotonic() < deadline, body.decode()[-3000:]
            time.sleep(0.3)
        # The recorder writes the agents' telemetry into the configured server.
        series = vm.wait_export('{__name__="substation_telemetry_capacity_kw"}',
                                lambda found: len(found) >= 3, timeout=30)
        # (east, added and removed by hand above, was recorded while it was there)
        assert {s["metric"]["substation_id"] for s in series} - {"east"} == {"north", "central", "south"}

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0, out.decode(errors="replace")
        assert [pid for pid in children if _alive(pid)] == []
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
        balancer_log = (work / "logs" / "balancer.log").read_text()
        assert "balancer_stopped" in balancer_log
        assert "Traceback" not in (work / "logs" / "api.log").read_text()
        assert "Traceback" not in (work / "logs" / "recorder.log").read_text()
        assert "agent_stopped" in (work / "logs" / "substations.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in children:  # without the fix they outlive gridlb: do not leave them running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        vm.stop()


def test_gridlb_run_on_the_local_nats_cluster(tmp_path: Path) -> None:
    """``gridlb run --cluster``: three nats-server nodes instead of Mosquitto, every service on MQTT 3.1.1 with the
    three nodes in MQTT_HOSTS; the fleet's requests are all answered and everything stops (nodes included)."""
    work = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "gridlb", "run", "--cluster", "--work-dir", str(work), "--duration", "12",
         "--evs", "20", "--rate", "3", "--speedup", "600", "--api-port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "3-node NATS cluster, MQTT 3.1.1 on 127.0.0.1:" in out
    creds = (work / "credentials.env").read_text()
    hosts = re.search(r"MQTT_HOSTS=(\S+)", creds)
    assert hosts and len(hosts.group(1).split(",")) == 3 and "MQTT_PROTOCOL=3.1.1" in creds
    sent, answered = next(line for line in out.splitlines() if "requests sent / answered" in line).split()[-3::2]
    assert int(sent) > 10 and sent == answered, out[-3000:]
    balancer_log = [json.loads(line) for line in (work / "logs" / "balancer.log").read_text().splitlines()
                    if line.startswith("{")]
    assert any('"protocol": "3.1.1"' in json.dumps(e) for e in balancer_log)
    # Cluster mode: the balancer owns its region under a lease in the cluster's key-value store (its own account).
    assert "region_lease_acquired" in [e["event"] for e in balancer_log]
    assert not [e for e in balancer_log if e["level"] == "error"], balancer_log[-5:]
    for node in ("grid-1", "grid-2", "grid-3"):
        log = (work / "nats" / node / "nats.log").read_text()
        assert "Server Exiting" in log or "Server is ready" in log, node
    assert not subprocess.run(["pgrep", "-f", str(work / "nats")], capture_output=True).stdout  # all nodes stopped
