"""MQTT 3.1.1 and broker failover end to end (real Mosquitto, services as subprocesses).

- A charge through the REST API on MQTT 5 and 3.1.1: answered on the EV's assignment topic; a copy that reaches
  a frozen balancer (SIGSTOP) after the caller's 504 is refused ``expired`` when it wakes (SIGCONT), not placed;
  an operator's drain sent meanwhile is refused ``expired`` too, not applied.
  On 3.1.1 there is no message expiry at all; on MQTT 5 the broker had already handed the copy over, so its
  expiry could not stop it either: ``expires_at`` is what does.
- What the retained-input refusal (D4) still does on 3.1.1: the live copy carries retain 0 (served once), the
  replay at the next subscription carries retain 1 (refused and cleared, never replayed again).
- Failover: a transport given a dead address first reaches the next one; a balancer whose broker is killed
  (kill -9) goes on through the next broker in ``MQTT_HOSTS``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from probe import Probe, start_balancer, telemetry
from test_api_e2e import Substations, charge, problem, start_api, wait_for

from broker.local import LocalBroker, find_free_port
from grid_runtime.mqtt import make_transport
from grid_runtime.settings import MqttSettings

pytestmark = pytest.mark.integration
V311 = mqtt.MQTTv311


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_charge_through_rest_and_a_late_copy_is_refused_expired(
        broker: LocalBroker, tmp_path: Path, stopper: list[Callable[[], Any]], protocol: str) -> None:
    subs = Substations(broker, A=(400.0, 100.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STATE_INTERVAL_S="0.2", MQTT_PROTOCOL=protocol)
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path, API_REQUEST_TIMEOUT_S="1.5", MQTT_PROTOCOL=protocol)
    stopper.append(api.stop)
    watch = Probe(broker, "observer", "grid/v1/ev/+/assignment", "grid/v1/substation/A/command",
                  "grid/v1/balancer/control/result",
                  protocol=mqtt.MQTTv5 if protocol == "5" else V311)
    stopper.append(watch.close)
    wait_for(lambda: api.http.get("/ready").json()["ready"], 15, "the API ready")

    r = charge(api.http, "EV_0001", 22, request_id="trip-1")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "assigned" and r.json()["request_id"] == "trip-1"

    balancer.signal(signal.SIGSTOP)  # its connection stays open: the broker hands it the next request
    try:
        t0 = time.monotonic()
        body = problem(charge(api.http, "EV_0002", 11, request_id="late-1"), 504)
        assert body["request_id"] == "late-1" and time.monotonic() - t0 >= 1.4
        problem(api.http.post("/substations/A/drain"), 504)  # an operator action, void as well
    finally:
        balancer.signal(signal.SIGCONT)
    late = watch.wait_one(lambda m: m.topic == "grid/v1/ev/EV_0002/assignment", timeout=10,
                          what="the answer to the late copy").json()
    assert (late["status"], late["reason"], late["request_id"]) == ("rejected", "expired", "late-1")
    time.sleep(0.5)
    starts = [c["ev_id"] for m in watch.on("grid/v1/substation/A/command")
              for c in m.json()["commands"] if c["command"] == "start"]
    assert starts == ["EV_0001"]  # no session for the late copy
    assert api.http.get("/sessions").json()["total"] == 1
    drain = watch.wait_one(lambda m: m.topic.endswith("/control/result") and m.json()["action"] == "drain",
                           timeout=10, what="the late drain's result").json()
    assert (drain["ok"], drain["reason"]) == (False, "expired")
    assert api.http.get("/substations/A").json()["condition"] != "draining"
    log = balancer.log()
    assert "request_rejected" in log and "expired" in log and "Traceback" not in log
    assert f"protocol={protocol}" in log and f"protocol={protocol}" in api.service.log()


def test_on_311_a_retained_request_is_served_live_once_then_refused_and_cleared_at_the_next_subscription(
        broker: LocalBroker, tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    subs = Substations(broker, A=(400.0, 100.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, MQTT_PROTOCOL="3.1.1")
    stopper.append(balancer.stop)
    ev = Probe(broker, "EV_0003", "grid/v1/ev/EV_0003/assignment", "grid/v1/balancer/status", protocol=V311)
    stopper.append(ev.close)
    ev.wait_one(lambda m: m.topic.endswith("balancer/status") and m.json()["state"] == "online", timeout=15)
    time.sleep(0.5)  # telemetry known
    ev.publish("grid/v1/ev/EV_0003/request", {"request_id": "kept", "requested_kw": 11, "duration_minutes": 60},
               retain=True)
    # 3.1.1 has no retain-as-published: the balancer sees the live copy with retain 0 and serves it.
    first = ev.wait_one(lambda m: m.topic.endswith("/assignment"), what="the live answer").json()
    assert (first["status"], first["request_id"]) == ("assigned", "kept")

    assert balancer.stop() == 0
    again = start_balancer(broker, tmp_path, MQTT_PROTOCOL="3.1.1")
    stopper.append(again.stop)
    # Subscribing again, it gets the retained copy with retain 1: refused and cleared (D4), never replayed again.
    refused = ev.wait_one(lambda m: m.topic.endswith("/assignment") and m.json()["status"] == "rejected",
                          timeout=15, what="the replay refused").json()
    assert (refused["reason"], refused["request_id"]) == ("retained", "kept")
    with Probe(broker, "observer", "grid/v1/ev/EV_0003/request") as late:
        time.sleep(0.5)
        assert [m for m in late.messages if m.payload] == []  # the broker holds no retained request any more
    assert "retained_input_refused" in again.log()


@pytest.mark.parametrize("kind", ["paho", "aiomqtt"])
def test_a_transport_skips_a_dead_address_and_fails_over_when_its_broker_is_killed(
        make_broker: Callable[..., LocalBroker], kind: str) -> None:
    first, second = make_broker(), make_broker()
    dead = find_free_port()
    settings = MqttSettings(hosts=f"127.0.0.1:{dead},{first.host}:{first.port},{second.host}:{second.port}",
                            username="loadtest", password=first.password_for("loadtest"), protocol="3.1.1",
                            keepalive_s=5)
    got: list[bytes] = []

    async def scenario() -> None:
        transport = make_transport(kind, settings, client_id="loadtest")
        transport.set_handler(lambda m: got.append(m.payload))
        transport.subscribe("grid/v1/ev/EV_0001/assignment", 1)
        task = asyncio.create_task(transport.run())
        try:
            await asyncio.wait_for(transport.connected.wait(), 10)
            assert transport.address == (first.host, first.port)  # type: ignore[attr-defined]
            assert transport.stats.failovers == 0
            with Probe(first, "balancer") as pub:
                pub.publish("grid/v1/ev/EV_0001/assignment", b"one")
            await _until(lambda: got == [b"one"])
            first.kill()  # kill -9: no DISCONNECT, no goodbye
            await _until(lambda: transport.stats.failovers == 1, timeout=20)
            assert transport.address == (second.host, second.port)  # type: ignore[attr-defined]
            await asyncio.sleep(0.3)  # (subscriptions restored on the new broker)
            with Probe(second, "balancer") as pub:
                pub.publish("grid/v1/ev/EV_0001/assignment", b"two")
            await _until(lambda: got == [b"one", b"two"])
            transport.publish("grid/v1/ev/EV_0001/request", b"{}")  # and it publishes there
            await _until(lambda: transport.stats.published >= 1)
        finally:
            await transport.close()
            task.cancel()

    asyncio.run(scenario())


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_balancer_goes_on_through_the_next_broker_when_its_broker_is_killed(
        make_broker: Callable[..., LocalBroker], tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    first, second = make_broker(), make_broker()
    hosts = f"127.0.0.1:{find_free_port()},{first.host}:{first.port},{second.host}:{second.port}"
    balancer = start_balancer(first, tmp_path, MQTT_HOSTS=hosts, MQTT_PROTOCOL="3.1.1")
    stopper.append(balancer.stop)

    def serve_one(broker: LocalBroker, ev_id: str) -> dict[str, Any]:
        with Probe(broker, ev_id, f"grid/v1/ev/{ev_id}/assignment", "grid/v1/balancer/status",
                   protocol=V311) as ev, Probe(broker, "loadtest", protocol=V311) as fake:
            ev.wait_one(lambda m: m.topic.endswith("balancer/status") and m.json()["state"] == "online",
                        timeout=20, what="the balancer online on this broker")
            fake.publish("grid/v1/substation/A/telemetry", json.dumps(telemetry("A", 1, 400.0, 100.0)), qos=0)
            time.sleep(0.3)
            ev.publish(f"grid/v1/ev/{ev_id}/request", {"request_id": f"r-{ev_id}", "requested_kw": 11,
                                                        "duration_minutes": 60})
            answer: dict[str, Any] = ev.wait_one(lambda m: m.topic.endswith("/assignment"), timeout=10).json()
            return answer

    assert serve_one(first, "EV_0001")["status"] == "assigned"
    first.kill()
    assert serve_one(second, "EV_0002")["status"] == "assigned"
    log = balancer.log()
    assert "mqtt_connect_failed" in log  # the dead address, skipped
    assert "mqtt_failover" in log and f"port={second.port}" in log
    assert "Traceback" not in log
