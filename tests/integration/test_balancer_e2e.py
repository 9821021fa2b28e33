"""The balancer's guarantees, end to end: real Mosquitto (project config and ACL), ``python -m balancer``
as a subprocess, EVs and substations as real MQTT clients.

Fake substations are driven by the ``loadtest`` account (it may publish any substation's telemetry), so
each test controls load exactly; the offline test uses real substation agents and their last will.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from probe import Probe, Service, start_balancer, telemetry

from broker.local import LocalBroker

pytestmark = pytest.mark.integration


@dataclass
class Grid:
    broker: LocalBroker
    balancer: Service
    watch: Probe  # observer: sees everything under grid/v1/#
    fake: Probe  # loadtest: plays substations and many EVs

    def telemetry(self, seq: int, **subs: tuple[float, float]) -> None:
        for sid, (capacity, base) in subs.items():
            self.fake.publish(f"grid/v1/substation/{sid}/telemetry", telemetry(sid, seq, capacity, base), qos=0)

    def first_answers(self, ev_ids: list[str], timeout: float = 20.0) -> dict[str, dict]:
        wanted = set(ev_ids)
        found = self.watch.wait_for(
            lambda m: "/assignment" in m.topic and m.topic.split("/")[3] in wanted, count=len(wanted),
            timeout=timeout, what="answers")
        first: dict[str, dict] = {}
        for m in found:
            first.setdefault(m.topic.split("/")[3], m.json())
        return first


@pytest.fixture
def grid(broker: LocalBroker, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Grid]:
    """The balancer and two probes, all on MQTT 5, or all on 3.1.1 with ``parametrize("grid", ["3.1.1"],
    indirect=True)``."""
    protocol = getattr(request, "param", "5")
    version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    watch = Probe(broker, "observer", "grid/v1/#", protocol=version)
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2", BALANCER_LOST_AFTER_S="30",
                              BALANCER_LEASE_S="3",  # (an offline substation keeps its sessions one lease)
                              MQTT_PROTOCOL=protocol)
    try:
        watch.wait_for(lambda m: m.topic == "grid/v1/balancer/status" and m.json()["state"] == "online",
                       timeout=15, what="balancer online status")
        assert f"protocol={protocol}" in balancer.log() or f'"protocol": "{protocol}"' in balancer.log()
        fake = Probe(broker, "loadtest", protocol=version)
        yield Grid(broker, balancer, watch, fake)
        fake.close()
    finally:
        code = balancer.stop()
        watch.close()
        log = balancer.log()
        assert "Traceback" not in log, log[-3000:]
        assert code == 0, log[-3000:]


@pytest.mark.parametrize("grid", ["5", "3.1.1"], indirect=True)
def test_burst_of_300_never_exceeds_capacity_spreads_evenly_and_queues_the_rest(grid: Grid) -> None:
    capacity = 1000.0
    bases = {"A": 200.0, "B": 100.0, "C": 50.0}
    grid.telemetry(1, **{sid: (capacity, base) for sid, base in bases.items()})
    time.sleep(0.3)
    evs = [f"X{i:03d}" for i in range(300)]
    for i, ev in enumerate(evs):  # all at once: no waiting for answers in between
        grid.fake.client.publish(f"grid/v1/ev/{ev}/request", json.dumps(
            {"request_id": f"r{i}", "requested_kw": 11, "min_kw": 11, "energy_kwh": 20}), qos=1)
    answers = grid.first_answers(evs)

    assigned = {ev: a for ev, a in answers.items() if a["status"] == "assigned"}
    queued = {ev: a for ev, a in answers.items() if a["status"] == "queued"}
    assert len(assigned) + len(queued) == 300, Counter(a["status"] for a in answers.values())
    per_sub = Counter(a["substation_id"] for a in assigned.values())
    limit = capacity * 0.95
    for sid, base in bases.items():
        # Guarantee 1, exactly: grants + base load within capacity less the 5 % margin ...
        assert base + per_sub[sid] * 11 <= limit, (sid, per_sub)
        # ... and nothing left unused that would have fitted one more 11 kW session.
        assert limit - (base + per_sub[sid] * 11) < 11, (sid, per_sub)
    utilisation = [(bases[s] + per_sub[s] * 11) / capacity for s in bases]
    assert max(utilisation) - min(utilisation) <= 0.02, utilisation
    assert sorted(a["position"] for a in queued.values()) == list(range(1, len(queued) + 1))

    # Each session was commanded to its substation, in batches.
    def started() -> int:
        return sum(1 for m in grid.watch.messages if m.topic.endswith("/command")
                   for c in m.json()["commands"] if c["command"] == "start")

    deadline = time.monotonic() + 10
    while started() < len(assigned) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started() == len(assigned)

    # Sessions on A end: the first queued requests (by position) move onto A, in order.
    ended = [ev for ev, a in assigned.items() if a["substation_id"] == "A"][:3]
    for ev in ended:
        grid.fake.publish("grid/v1/substation/A/session", {
            "event": "ended", "session_id": assigned[ev]["session_id"], "ev_id": ev, "ts": time.time(),
            "reason": "energy_delivered"})
    head = sorted(queued, key=lambda ev: queued[ev]["position"])[:3]
    later = grid.watch.wait_for(lambda m: m.topic.endswith("/assignment") and m.topic.split("/")[3] in head
                                and m.json()["status"] == "assigned",
                                count=3, what="queued requests assigned")
    assert {m.json()["substation_id"] for m in later} == {"A"}
    for ev in ended:
        assert grid.watch.wait_for(lambda m, ev=ev: m.topic.endswith(f"/{ev}/assignment")
                                   and m.json()["status"] == "completed")


BAD_REQUESTS = [
    ("malformed", b'{"requested_kw": 22,', "malformed_json"),
    ("not_json", b"\xff\xfe garbage", "malformed_json"),
    ("empty", b"", "malformed_json"),
    ("nan", b'{"requested_kw": NaN, "duration_minutes": 60}', "malformed_json"),
    ("infinity", b'{"requested_kw": Infinity, "duration_minutes": 60}', "malformed_json"),
    ("huge_float", b'{"requested_kw": 1e400, "duration_minutes": 60}', "invalid_field"),
    ("huge_int", b'{"requested_kw": 1' + b"0" * 5000 + b', "duration_minutes": 60}', "payload_too_large"),
    ("wrong_type", b'{"requested_kw": "22", "duration_minutes": 60}', "invalid_field"),
    ("negative", b'{"requested_kw": -5, "duration_minutes": 60}', "invalid_field"),
    ("no_duration_or_energy", b'{"requested_kw": 22}', "invalid_field"),
    ("min_above_requested", b'{"requested_kw": 10, "min_kw": 20, "energy_kwh": 5}', "invalid_field"),
    ("duplicate_key", b'{"requested_kw": 1, "requested_kw": 300, "duration_minutes": 60}', "duplicate_key"),
    ("id_mismatch", b'{"ev_id": "EV_0002", "requested_kw": 22, "duration_minutes": 60}', "id_mismatch"),
    ("bad_request_id", b'{"request_id": "a/b#", "requested_kw": 22, "duration_minutes": 60}', "invalid_field"),
    ("deep", b'{"x": ' + b"[" * 1000 + b"]" * 1000 + b', "requested_kw": 5, "energy_kwh": 1}', "malformed_json"),
    ("oversized", json.dumps({"requested_kw": 5, "energy_kwh": 1, "pad": "x" * 5000}).encode(),
     "payload_too_large"),
    ("array", b"[1, 2, 3]", "invalid_field"),
]


def test_every_bad_request_is_answered_with_a_reason_and_nothing_else_is_lost(grid: Grid) -> None:
    grid.telemetry(1, A=(500.0, 10.0))
    ev = Probe(grid.broker, "EV_0001", "grid/v1/ev/EV_0001/assignment")
    for _name, payload, _reason in BAD_REQUESTS:
        ev.publish("grid/v1/ev/EV_0001/request", payload)
    got = ev.wait_for(lambda m: True, count=len(BAD_REQUESTS), what="rejections")
    reasons = [m.json()["reason"] for m in got]
    statuses = {m.json()["status"] for m in got}
    assert statuses == {"rejected"}
    assert reasons == [reason for _n, _p, reason in BAD_REQUESTS]
    assert all(m.json()["detail"] for m in got)
    # The balancer is alive and serves a good request from the same EV afterwards.
    ev.publish("grid/v1/ev/EV_0001/request", {"ev_id": "EV_0001", "requested_kw": 22, "duration_minutes": 120})
    good = ev.wait_for(lambda m: m.json()["status"] == "assigned", what="assignment")[0].json()
    assert good["substation_id"] == "A" and good["granted_kw"] == 22
    ev.close()
    # Logged and counted: one log line per rejection, and the counts in the stats logged at shutdown.
    assert grid.balancer.stop() == 0
    log = grid.balancer.log()
    expected = Counter(reason for _n, _p, reason in BAD_REQUESTS)
    logged = Counter(re.findall(r"request_rejected ev_id=EV_0001 request_id=\S+ reason=(\w+)", log))
    assert logged == expected, log[-3000:]
    stats = [line for line in log.splitlines() if "balancer_stats" in line][-1]
    for reason, n in expected.items():
        assert f"'rejected:{reason}': {n}" in stats, stats


def test_redelivered_request_gets_the_same_answer_and_one_session_per_ev(grid: Grid) -> None:
    grid.telemetry(1, A=(500.0, 10.0), B=(500.0, 10.0))
    ev = Probe(grid.broker, "EV_0002", "grid/v1/ev/EV_0002/assignment")
    body = {"request_id": "trip-1", "requested_kw": 11, "energy_kwh": 30}
    ev.publish("grid/v1/ev/EV_0002/request", body)
    ev.publish("grid/v1/ev/EV_0002/request", body)  # a redelivery (same request_id)
    first, again = [m.json() for m in ev.wait_for(lambda m: True, count=2)]
    assert first["status"] == "assigned"
    assert again == first  # identical, including session_id and timestamp
    ev.publish("grid/v1/ev/EV_0002/request", {"request_id": "trip-2", "requested_kw": 11, "energy_kwh": 30})
    busy = ev.wait_for(lambda m: m.json()["request_id"] == "trip-2")[0].json()
    assert (busy["status"], busy["reason"]) == ("rejected", "ev_busy")
    # Barrier: the observer gets the balancer's messages in the order they were sent, so once it has the
    # answer to trip-2, it has every command decided for the two earlier deliveries of trip-1.
    grid.watch.wait_for(lambda m: m.topic == "grid/v1/ev/EV_0002/assignment" and m.json()["request_id"] == "trip-2")
    starts = [c for m in grid.watch.messages if m.topic.endswith("/command") for c in m.json()["commands"]
              if c["ev_id"] == "EV_0002" and c["command"] == "start"]
    assert len(starts) == 1
    ev.publish("grid/v1/ev/EV_0002/release", {})
    done = ev.wait_for(lambda m: m.json()["status"] == "completed")[0].json()
    assert done["reason"] == "released" and done["session_id"] == first["session_id"]
    ev.clear()
    ev.publish("grid/v1/ev/EV_0002/request", body)  # the old request again, after it finished
    replay = ev.wait_for(lambda m: True)[0].json()
    assert (replay["status"], replay["session_id"]) == ("completed", first["session_id"])
    ev.close()


def test_mqtt5_response_topic_and_correlation_data(grid: Grid) -> None:
    grid.telemetry(1, A=(500.0, 10.0))
    ev = Probe(grid.broker, "EV_0003", "grid/v1/ev/EV_0003/assignment", "grid/v1/reply/EV_0003/#")
    ev.publish("grid/v1/ev/EV_0003/request", {"requested_kw": 7.4, "energy_kwh": 10},
               response_topic="grid/v1/reply/EV_0003/abc", correlation_data=b"corr-42")
    reply = ev.wait_for(lambda m: m.topic == "grid/v1/reply/EV_0003/abc", what="reply")[0]
    assert reply.correlation_data == b"corr-42"
    assert reply.json()["status"] == "assigned"
    ev.wait_for(lambda m: m.topic.endswith("/assignment"))  # and on the assignment topic as always
    # A response topic outside grid/v1/reply/ is refused (the balancer is not a relay), the answer is not.
    ev.publish("grid/v1/ev/EV_0003/release", {}, response_topic="grid/v1/substation/A/command",
               correlation_data=b"x")
    ev.wait_for(lambda m: m.topic.endswith("/assignment") and m.json()["status"] == "completed")
    # Barrier: the release's stop command goes to that very topic after the answer (and after any reply to
    # it), and a topic's messages arrive in order: once the stop is seen, a leaked reply would be there.
    command_topic = "grid/v1/substation/A/command"
    grid.watch.wait_for(lambda m: m.topic == command_topic
                        and any(c["command"] == "stop" and c["ev_id"] == "EV_0003" for c in m.json()["commands"]),
                        what="stop command of the release")
    leaked = [m for m in grid.watch.on(command_topic) if b"completed" in m.payload]
    assert not leaked, leaked
    ev.close()


def test_stale_substation_gets_nothing_until_telemetry_returns(grid: Grid) -> None:
    grid.telemetry(1, A=(500.0, 10.0))
    time.sleep(2.6)  # BALANCER_STALE_AFTER_S=2
    ev = Probe(grid.broker, "EV_0004", "grid/v1/ev/EV_0004/assignment")
    ev.publish("grid/v1/ev/EV_0004/request", {"requested_kw": 11, "energy_kwh": 5})
    first = ev.wait_for(lambda m: True)[0].json()
    assert (first["status"], first["position"]) == ("queued", 1)
    grid.telemetry(2, A=(500.0, 10.0))
    later = ev.wait_for(lambda m: m.json()["status"] == "assigned")[0].json()
    assert later["substation_id"] == "A"
    ev.close()


def test_offline_substation_sessions_are_revoked_and_moved(grid: Grid, tmp_path: Path) -> None:
    env = {"MQTT_ACCOUNT_SECRET": "test-secret", "SUBSTATION_INTERVAL_S": "0.2", "SUBSTATION_BASE_LOAD_PCT": "10"}
    agent_a = Service("substation_agents", grid.broker, tmp_path, SUBSTATIONS="A:100", **env)
    agent_b: Service | None = None
    try:
        grid.watch.wait_for(lambda m: m.topic == "grid/v1/substation/A/telemetry", what="A telemetry")
        ev = Probe(grid.broker, "EV_0005", "grid/v1/ev/EV_0005/assignment")
        ev.publish("grid/v1/ev/EV_0005/request", {"requested_kw": 22, "duration_minutes": 600})
        first = ev.wait_for(lambda m: m.json()["status"] == "assigned")[0].json()
        assert first["substation_id"] == "A"
        agent_b = Service("substation_agents", grid.broker, tmp_path, SUBSTATIONS="B:100", **env)
        grid.watch.wait_for(lambda m: m.topic == "grid/v1/substation/B/telemetry", what="B telemetry")
        agent_a.signal(signal.SIGKILL)  # the broker publishes A's last will: offline
        will = grid.watch.wait_one(lambda m: m.topic == "grid/v1/substation/A/status" and b"offline" in m.payload,
                                   what="A's last will")
        revoked = ev.wait_one(lambda m: m.json()["status"] == "revoked", what="revocation")
        # Kept through the offline grace (one lease, 3 s here: an agent that reconnects in time keeps charging),
        # then revoked and moved.
        assert revoked.at - will.at >= 2.5
        revoked_answer = revoked.json()
        assert (revoked_answer["reason"], revoked_answer["session_id"]) == ("substation_offline", first["session_id"])
        moved = ev.wait_for(lambda m: m.json()["status"] == "assigned", count=2)[-1].json()
        assert moved["substation_id"] == "B" and moved["request_id"] == first["request_id"]
        assert moved["session_id"] != first["session_id"]
        ev.close()
    finally:
        agent_a.stop()
        if agent_b is not None:
            assert agent_b.stop() == 0


def test_graceful_shutdown_publishes_offline_status(broker: LocalBroker, tmp_path: Path) -> None:
    watch = Probe(broker, "observer", "grid/v1/balancer/status")
    balancer = start_balancer(broker, tmp_path)
    watch.wait_for(lambda m: m.json()["state"] == "online", timeout=15)
    assert balancer.stop() == 0
    watch.wait_for(lambda m: m.json()["state"] == "offline", timeout=5)
    watch.close()
    late = Probe(broker, "observer", "grid/v1/balancer/status")  # retained for newcomers
    assert late.wait_for(lambda m: m.retain)[0].json()["state"] == "offline"
    late.close()


def test_restarted_balancer_adopts_running_sessions_instead_of_double_booking(
        broker: LocalBroker, tmp_path: Path) -> None:
    """State is in memory: after kill -9 and a restart, the agents' ``running`` announcements rebuild it."""
    watch = Probe(broker, "observer", "grid/v1/#")
    agent = Service("substation_agents", broker, tmp_path, SUBSTATIONS="A:200", MQTT_ACCOUNT_SECRET="test-secret",
                    SUBSTATION_INTERVAL_S="0.2", SUBSTATION_BASE_LOAD_PCT="10")
    first = start_balancer(broker, tmp_path)
    second: Service | None = None
    try:
        watch.wait_for(lambda m: m.topic == "grid/v1/balancer/status" and m.json()["state"] == "online", timeout=15)
        watch.wait_for(lambda m: m.topic == "grid/v1/substation/A/telemetry", what="A telemetry")
        ev = Probe(broker, "EV_0006", "grid/v1/ev/EV_0006/assignment")
        body = {"request_id": "trip-1", "requested_kw": 22, "min_kw": 11, "priority": 2, "duration_minutes": 600}
        ev.publish("grid/v1/ev/EV_0006/request", body)
        assigned = ev.wait_for(lambda m: m.json()["status"] == "assigned")[0].json()
        watch.wait_for(lambda m: m.topic.endswith("/A/session") and m.json()["event"] == "started")

        first.signal(signal.SIGKILL)
        first.stop()
        watch.wait_for(lambda m: m.topic == "grid/v1/balancer/status" and m.json()["state"] == "offline",
                       what="balancer last will")
        watch.clear()
        second = start_balancer(broker, tmp_path)
        running = watch.wait_for(lambda m: m.topic.endswith("/A/session") and m.json()["event"] == "running",
                                 timeout=15, what="running announcement")[0].json()
        assert (running["session_id"], running["request_id"], running["granted_kw"]) == (
            assigned["session_id"], "trip-1", 22.0)
        time.sleep(0.3)
        ev.clear()
        ev.publish("grid/v1/ev/EV_0006/request", body)  # the EV's state query after a silence
        again = ev.wait_for(lambda m: True)[0].json()
        assert (again["status"], again["session_id"], again["substation_id"]) == (
            "assigned", assigned["session_id"], "A")
        # No second session was started, and the adopted one was not stopped.
        commands = [c for m in watch.messages if m.topic.endswith("/command") for c in m.json()["commands"]]
        assert commands == []
        # Releasing works on the adopted session as on any other.
        ev.publish("grid/v1/ev/EV_0006/release", {})
        done = ev.wait_for(lambda m: m.json()["status"] == "completed")[0].json()
        assert (done["session_id"], done["reason"]) == (assigned["session_id"], "released")
        ev.close()
    finally:
        if second is not None:
            assert second.stop() == 0, second.log()[-2000:]
        assert agent.stop() == 0
        watch.close()


def test_lease_lapse_pauses_sessions_when_the_balancer_dies_and_renewal_resumes_them(
        broker: LocalBroker, tmp_path: Path) -> None:
    """A dead balancer cannot leave the grid committed: the real agent drops EV load to 0 kW once the lease it
    got lapses, and a restarted balancer (adopting the session) renews it and the power comes back."""
    watch = Probe(broker, "observer", "grid/v1/#")
    agent = Service("substation_agents", broker, tmp_path, SUBSTATIONS="A:200", MQTT_ACCOUNT_SECRET="test-secret",
                    SUBSTATION_INTERVAL_S="0.2", SUBSTATION_BASE_LOAD_PCT="10")
    lease = {"BALANCER_LEASE_S": "2"}
    first = start_balancer(broker, tmp_path, **lease)
    second: Service | None = None

    def ev_load() -> float:
        return float(watch.wait_for(lambda m: m.topic.endswith("/A/telemetry"), count=1)[-1].json()["ev_load_kw"])

    try:
        watch.wait_for(lambda m: m.topic == "grid/v1/balancer/status" and m.json()["state"] == "online", timeout=15)
        ev = Probe(broker, "EV_0007", "grid/v1/ev/EV_0007/assignment")
        ev.publish("grid/v1/ev/EV_0007/request", {"request_id": "t", "requested_kw": 22, "duration_minutes": 600})
        ev.wait_for(lambda m: m.json()["status"] == "assigned")
        batches = watch.wait_for(lambda m: m.topic.endswith("/A/command"), count=2, timeout=5, what="renewals")
        assert all(b.json()["valid_until"] > b.json()["ts"] for b in batches)
        assert batches[1].json()["commands"] == []  # a pure renewal, well before the 2 s lease lapses
        watch.clear()
        assert watch.wait_until(lambda: ev_load() == 22.0, timeout=5)

        first.signal(signal.SIGKILL)
        first.stop()
        killed_at = time.monotonic()
        watch.clear()
        assert watch.wait_until(lambda: ev_load() == 0.0, timeout=6), "EV load still on after the lease lapsed"
        assert time.monotonic() - killed_at <= 2 + 1.5  # the lease, one telemetry interval and some slack
        assert "lease_lapsed_pausing" in agent.log()

        second = start_balancer(broker, tmp_path, **lease)
        watch.clear()
        assert watch.wait_until(lambda: ev_load() == 22.0, timeout=10), "power did not come back after renewal"
        ev.close()
    finally:
        if second is not None:
            assert second.stop() == 0
        assert agent.stop() == 0
        watch.close()
