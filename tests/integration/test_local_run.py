"""The README's run command, as a new user runs it: the whole system comes up, EVs get balanced, it stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_gridlb_run_starts_everything_balances_evs_and_stops_cleanly(tmp_path: Path) -> None:
    work = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "gridlb", "run", "--work-dir", str(work), "--port", "0", "--duration", "12",
         "--evs", "30", "--rate", "4", "--speedup", "600"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # Where to look, as the README promises.
    assert "mqtt://127.0.0.1:" in out and "credentials" in out and "mosquitto_sub" in out
    creds = (work / "credentials.env").read_text()
    assert "MQTT_PORT=" in creds and "EV_1234_PASSWORD=" in creds and "OBSERVER_PASSWORD=" in creds
    assert oct((work / "credentials.env").stat().st_mode & 0o777) == "0o600"
    # The fleet's final summary: requests were sent and every one was answered.
    assert "fleet summary" in out, out[-3000:]
    sent, answered = next(line for line in out.splitlines() if "requests sent / answered" in line).split()[-3::2]
    assert int(sent) > 10 and sent == answered, out[-3000:]
    # Services logged structured JSON and stopped cleanly.
    balancer_log = [json.loads(line) for line in (work / "logs" / "balancer.log").read_text().splitlines()
                    if line.startswith("{")]
    events = [e["event"] for e in balancer_log]
    assert "balancer_starting" in events and "balancer_stopped" in events
    assert not [e for e in balancer_log if e["level"] == "error"], balancer_log[-5:]
    assert "assigned" in json.dumps([e for e in balancer_log if e["event"] == "balancer_stats"][-1])
