"""Smoke test on NATS (one nats-server node, MQTT 3.1.1 only): the balancer, a substation agent process and the
EV load tester, unchanged, with ``MQTT_PROTOCOL=3.1.1``. Every request is answered, sessions run on the agents'
substations and complete. (The 3-node cluster and its fault tests are the cluster work's.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from nats_single import NatsNode
from probe import ROOT, Probe, Service, service_env

pytestmark = pytest.mark.integration
V311 = {"MQTT_PROTOCOL": "3.1.1", "MQTT_ACCOUNT_SECRET": "test-secret"}


def test_balancer_agents_and_evs_run_on_a_nats_node_over_mqtt_311(
        tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    node = NatsNode(tmp_path / "nats").start()
    stopper.append(node.stop)
    watch = Probe(node, "observer", "grid/v1/balancer/status", "grid/v1/substation/+/telemetry",
                  protocol=mqtt.MQTTv311, clean_start=True)
    stopper.append(watch.close)
    balancer = Service("balancer", node, tmp_path, MQTT_USERNAME="balancer", MQTT_PASSWORD="x",
                       BALANCER_TICK_INTERVAL_S="0.1", **V311)
    stopper.append(balancer.stop)
    agents = Service("substation_agents", node, tmp_path, SUBSTATIONS="A:100,B:100",
                     SUBSTATION_INTERVAL_S="0.2", SIM_SPEEDUP="1000", **V311)
    stopper.append(agents.stop)
    watch.wait_for(lambda m: m.topic.endswith("balancer/status") and m.json()["state"] == "online", timeout=30,
                   what="the balancer online (retained, through JetStream)")
    for sid in ("A", "B"):
        watch.wait_one(lambda m, sid=sid: m.topic == f"grid/v1/substation/{sid}/telemetry", timeout=20,
                       what=f"{sid}'s telemetry")

    out = tmp_path / "evs.json"
    env = service_env(node, LOG_LEVEL="WARNING", **V311)
    result = subprocess.run(
        [sys.executable, "-m", "ev_clients", "loadtest", "--requests", "24", "--concurrent", "4", "--ramp-up", "0.5",
         "--save", str(out), "--seed", "7"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
        check=False)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:], balancer.log()[-3000:])
    summary = json.loads(out.read_text())["summary"]
    assert summary["requests_sent"] == 24 and summary["requests_answered"] == 24, summary
    assert summary["requests_unanswered"] == 0
    assert summary["status_events"].get("assigned", 0) > 0
    assert set(summary["final_status"]) <= {"completed", "cancelled"}, summary["final_status"]
    for name, service in (("balancer", balancer), ("agents", agents)):
        log = service.log()
        assert "protocol=3.1.1" in log, f"{name} did not connect on 3.1.1"
        assert "Traceback" not in log, log[-3000:]
    assert "mqtt_publish_failed" not in balancer.log()
