"""The balancer's retained state, operator control and /metrics, end to end: real Mosquitto with the project's
ACL, ``python -m balancer`` as a subprocess, the ``api`` account sending control messages."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from probe import Probe, Service, start_balancer, telemetry
from prometheus_client.parser import text_string_to_metric_families

from broker.local import LocalBroker

pytestmark = pytest.mark.integration
P = "grid/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: every balancer metric names its region (issue 12)
R = ("region", "default")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def running(broker: LocalBroker, tmp_path: Path) -> Iterator[tuple[Service, Probe, Probe, int]]:
    port = free_port()
    watch = Probe(broker, "observer", f"{P}/#")
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="30", BALANCER_STATE_INTERVAL_S="0.2",
                              METRICS_PORT=str(port))
    api = Probe(broker, "api")
    try:
        watch.wait_for(lambda m: m.topic == f"{P}/balancer/status" and m.json()["state"] == "online",
                       timeout=15, what="balancer online")
        yield balancer, watch, api, port
    finally:
        api.close()
        code = balancer.stop()
        watch.close()
        assert "Traceback" not in balancer.log(), balancer.log()[-3000:]
        assert code == 0, balancer.log()[-3000:]


def latest_state(watch: Probe, sid: str, predicate=lambda s: True, timeout: float = 10.0) -> dict:  # type: ignore[no-untyped-def]
    found = watch.wait_for(lambda m: m.topic == f"{P}/substation/{sid}/state" and predicate(m.json()),
                           timeout=timeout, what=f"state of {sid}")
    return found[-1].json()


def test_state_is_retained_control_acts_and_metrics_show_it(running, broker: LocalBroker) -> None:  # type: ignore[no-untyped-def]
    _balancer, watch, api, port = running
    with Probe(broker, "loadtest") as fake:  # plays the substations: exact numbers
        fake.publish(f"{P}/substation/A/telemetry", telemetry("A", 0, 100.0, 10.0), qos=0)
        fake.publish(f"{P}/substation/B/telemetry", telemetry("B", 0, 200.0, 20.0), qos=0)
    ev = Probe(broker, "EV_0001", f"{P}/ev/EV_0001/assignment")
    ev.publish(f"{P}/ev/EV_0001/request", {"request_id": "r1", "requested_kw": 11, "duration_minutes": 30})
    first = ev.wait_for(lambda m: True, what="answer")[0].json()
    assert first["status"] == "assigned"
    sid = first["substation_id"]

    state = latest_state(watch, sid, lambda s: s["sessions_total"] == 1)
    assert state["sessions"][0]["ev_id"] == "EV_0001" and state["granted_kw"] == 11.0
    assert state["online"] and not state["draining"]

    # Retained: a reader that connects now learns the state at once. (One connection per account: the
    # api probe reconnects afterwards.)
    api.close()
    late = Probe(broker, "api", f"{P}/substation/+/state", f"{P}/balancer/queue")
    assert late.wait_for(lambda m: m.topic == f"{P}/substation/{sid}/state" and m.retain, what="retained state")
    assert late.wait_for(lambda m: m.topic == f"{P}/balancer/queue" and m.retain, what="retained queue")
    late.close()
    api = Probe(broker, "api")

    # Drain the other substation, lower this one's capacity: each answered on the result topic.
    other = "B" if sid == "A" else "A"
    api.publish(f"{P}/balancer/control", {"action": "drain", "substation_id": other, "request_id": "op-1"})
    api.publish(f"{P}/balancer/control", {"action": "set_capacity", "substation_id": sid, "capacity_kw": 50,
                                           "request_id": "op-2"})
    api.publish(f"{P}/balancer/control", {"action": "drain", "substation_id": "nowhere", "request_id": "op-3"})
    results = {m.json()["request_id"]: m.json() for m in watch.wait_for(
        lambda m: m.topic == f"{P}/balancer/control/result", count=3, what="control results")}
    assert results["op-1"]["ok"] and results["op-1"]["state"]["draining"] is True
    assert results["op-2"]["ok"] and results["op-2"]["state"]["capacity_kw"] == 50.0
    assert results["op-2"]["state"]["capacity_limit_kw"] == 50.0
    assert not results["op-3"]["ok"] and results["op-3"]["reason"] == "unknown_substation"

    # A non-api account cannot send control messages (broker ACL: refused, never delivered).
    with Probe(broker, "loadtest") as intruder:
        assert intruder.try_publish(f"{P}/balancer/control", {"action": "undrain", "substation_id": other}) == 0x87

    # A new request may not go to the drained substation.
    ev2 = Probe(broker, "EV_0002", f"{P}/ev/EV_0002/assignment")
    ev2.publish(f"{P}/ev/EV_0002/request", {"request_id": "r2", "requested_kw": 11, "duration_minutes": 30})
    second = ev2.wait_for(lambda m: True, what="answer")[0].json()
    assert second["status"] == "assigned" and second["substation_id"] == sid

    # A bad control payload is answered (with its request_id), counted, and not fatal.
    api.publish(f"{P}/balancer/control", b'{"action": "explode", "substation_id": "A", "request_id": "op-4"}')
    refused = watch.wait_one(lambda m: m.topic == f"{P}/balancer/control/result" and b"op-4" in m.payload,
                             what="the refusal").json()
    assert (refused["ok"], refused["reason"], refused["action"]) == (False, "invalid_field", None)
    assert "action" in refused["detail"]

    deadline = time.monotonic() + 10
    while True:
        metrics = scrape(port)
        if metrics.get(("gridlb_rejected_payloads_total", (("kind", "balancer_control"),
                                                            ("reason", "invalid_field"), R))) == 1.0:
            break
        assert time.monotonic() < deadline, "bad control payload not counted"
        time.sleep(0.2)
    assert metrics[("gridlb_substation_capacity_watts", (R, ("substation", sid)))] == 50_000
    assert metrics[("gridlb_substation_reported_capacity_watts", (R, ("substation", sid)))] == (
        100_000 if sid == "A" else 200_000)
    assert metrics[("gridlb_substation_draining", (R, ("substation", other)))] == 1
    assert metrics[("gridlb_substation_active_sessions", (R, ("substation", sid)))] == 2
    assert metrics[("gridlb_decisions_total", (("outcome", "assigned"), ("reason", ""), R))] == 2
    assert metrics[("gridlb_decision_latency_seconds_count", (R,))] >= 2
    assert metrics[("gridlb_mqtt_connected", (("client", "balancer"),))] == 1
    assert metrics[("gridlb_balancer_events_total", (("detail", "drain"), ("event", "control"), R))] == 1
    assert not [k for k in metrics if k[0] == "gridlb_decisions_total" and dict(k[1])["outcome"] == "control"]
    ev.close()
    ev2.close()
    api.close()
