"""Operator settings survive a crash (issue 12): single-node mode, real Mosquitto, ``python -m balancer`` killed
with ``SIGKILL`` and started again on the same state file. A drain and a capacity limit set before the crash are
in force after it, before any request is placed (restored before the startup gate opens)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from probe import Probe, start_balancer, telemetry

from broker.local import LocalBroker

pytestmark = pytest.mark.integration
P = "grid/v1"


def online(m) -> bool:  # type: ignore[no-untyped-def]
    return m.topic == f"{P}/balancer/status" and m.json()["state"] == "online"


def feed(broker: LocalBroker) -> None:
    """Two substations with exact numbers (the loadtest account plays them)."""
    with Probe(broker, "loadtest") as fake:
        fake.publish(f"{P}/substation/A/telemetry", telemetry("A", 0, 100.0, 0.0), qos=0)
        fake.publish(f"{P}/substation/B/telemetry", telemetry("B", 0, 200.0, 0.0), qos=0)


def test_drain_and_capacity_limit_survive_kill_9(broker: LocalBroker, tmp_path: Path) -> None:
    watch = Probe(broker, "observer", f"{P}/#")
    state_file = tmp_path / "operator-settings.json"
    balancer = start_balancer(broker, tmp_path, BALANCER_STARTUP_WAIT_S="1")
    try:
        watch.wait_for(online, timeout=15, what="balancer online")
        feed(broker)
        with Probe(broker, "api") as api:
            api.publish(f"{P}/balancer/control", {"action": "drain", "substation_id": "B", "request_id": "op-1"})
            api.publish(f"{P}/balancer/control", {"action": "set_capacity", "substation_id": "A",
                                                   "capacity_kw": 30, "request_id": "op-2"})
            results = watch.wait_for(lambda m: m.topic == f"{P}/balancer/control/result", count=2,
                                     what="control results")
        assert all(m.json()["ok"] for m in results)
        # Stored before it was answered.
        stored = json.loads(state_file.read_text())
        assert stored["default"] == {"A": {"draining": False, "capacity_limit_w": 30_000},
                                     "B": {"draining": True, "capacity_limit_w": None}}
        balancer.signal(signal.SIGKILL)
        assert balancer.stop() == -signal.SIGKILL
        watch.clear()

        balancer = start_balancer(broker, tmp_path, BALANCER_STARTUP_WAIT_S="1")
        watch.wait_for(online, timeout=15, what="restarted balancer online")
        feed(broker)
        # Every request goes to A (B is drained), and A plans with the operator's 30 kW: two of 11 kW fit
        # (limit minus the 10 % margin: 27 kW), the third waits.
        evs = [f"EV_{i:04d}" for i in (1, 2, 3)]
        with Probe(broker, "loadtest") as fake:
            for i, ev in enumerate(evs):
                fake.publish(f"{P}/ev/{ev}/request", {"request_id": f"r{i}", "requested_kw": 11, "min_kw": 11,
                                                       "duration_minutes": 60})
        answers = {m.topic.split("/")[3]: m.json() for m in watch.wait_for(
            lambda m: m.topic.endswith("/assignment"), count=3, timeout=15, what="answers")}
        assert sorted(a["status"] for a in answers.values()) == ["assigned", "assigned", "queued"], answers
        assert {a["substation_id"] for a in answers.values() if a["status"] == "assigned"} == {"A"}
        states = {sid: watch.wait_for(lambda m, sid=sid: m.topic == f"{P}/substation/{sid}/state",
                                      what=f"state of {sid}")[-1].json() for sid in ("A", "B")}
        assert states["B"]["draining"] is True
        assert (states["A"]["capacity_kw"], states["A"]["capacity_limit_kw"]) == (30.0, 30.0)
        assert "operator_settings_restored" in balancer.log()
    finally:
        code = balancer.stop()
        watch.close()
    assert "Traceback" not in balancer.log(), balancer.log()[-3000:]
    assert code == 0, balancer.log()[-3000:]
