"""``python -m substation_agents`` as a real process against a private Mosquitto.

Checks the agent's side of the contract end to end: retained online status, telemetry, session
events for a start command, survival of malformed commands, retained offline on SIGTERM and the
broker-published last will on SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker
from grid_protocol.codec import decode, encode
from grid_protocol.messages import SessionCommand, SessionCommands, SessionEvent, SubstationStatus, Telemetry
from grid_protocol.topics import TopicKind, Topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
T = Topics()
TIMEOUT = 5.0
CAPACITY = {"A": 100.0, "B": 50.0}


@dataclass(frozen=True)
class Received:
    at: float
    topic: str
    payload: bytes
    retain: bool


class Observer:
    """A paho client recording everything it receives, with bounded waits."""

    def __init__(self, broker: LocalBroker, username: str, topic_filter: str | None = "grid/v1/#") -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, broker.password_for(username))
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(TIMEOUT), "observer could not connect"
        if topic_filter is not None:
            self.client.subscribe(topic_filter, 1)
            assert subscribed.wait(TIMEOUT), "subscription not acknowledged"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(time.monotonic(), msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def on(self, topic: str, since: float = 0.0) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic and m.at >= since]

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = TIMEOUT,
                 since: float = 0.0, what: str = "message") -> Received:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if m.at >= since and predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout} s")
                self._cond.wait(left)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentProcess:
    def __init__(self, broker: LocalBroker, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MQTT_", "SUBSTATION", "SIM_", "GRID_", "LOG_"))}
        env.update(
            PYTHONPATH=str(ROOT), MQTT_HOST="127.0.0.1", MQTT_PORT=str(broker.port),
            MQTT_ACCOUNT_SECRET=broker.secret, MQTT_KEEPALIVE_S="5", SUBSTATIONS="A:100,B:50",
            SUBSTATION_INTERVAL_S="0.2", SIM_SPEEDUP="600", LOG_LEVEL="DEBUG", LOG_FORMAT="text",
        )
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "substation_agents"], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self._log.close()


@pytest.fixture
def observer(broker: LocalBroker) -> Iterator[Observer]:
    obs = Observer(broker, "observer")
    yield obs
    obs.close()


@pytest.fixture
def agents(broker: LocalBroker, observer: Observer, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(broker, tmp_path / "agents.log")
    try:
        for sid in CAPACITY:
            observer.wait_for(on_topic(T.telemetry(sid)), what=f"telemetry of {sid}")
    except AssertionError:
        proc.stop()
        raise AssertionError(f"agents did not come up; log:\n{proc.log()}") from None
    yield proc
    proc.stop()


@pytest.fixture
def balancer(broker: LocalBroker) -> Iterator[Observer]:
    bal = Observer(broker, "balancer", topic_filter=None)
    yield bal
    bal.close()


def on_topic(topic: str, contains: bytes = b"") -> Callable[[Received], bool]:
    return lambda m: m.topic == topic and contains in m.payload


def telemetry(observer: Observer, sid: str, since: float = 0.0) -> list[Telemetry]:
    return [decode(m.payload, Telemetry) for m in observer.on(T.telemetry(sid), since)]


def session_events(observer: Observer, since: float = 0.0) -> list[SessionEvent]:
    return [decode(m.payload, SessionEvent) for m in observer.on(T.session_events("A"), since)]


def commands(*batch: SessionCommand) -> bytes:
    """A command-topic payload as the balancer sends it: a batch, applied in order."""
    return encode(SessionCommands(ts=time.time(), commands=list(batch)))


def start_command(session_id: str, energy_kwh: float) -> bytes:
    return commands(SessionCommand(command="start", session_id=session_id, ev_id="EV_0001", ts=time.time(),
                                   granted_kw=22.0, energy_kwh=energy_kwh))


def retained_status(broker: LocalBroker, sid: str) -> SubstationStatus:
    """What a newcomer sees on the status topic: it must be a retained message."""
    late = Observer(broker, "api", topic_filter=T.substation_status(sid))
    try:
        msg = late.wait_for(lambda m: True, what=f"retained status of {sid}")
        assert msg.retain
        return decode(msg.payload, SubstationStatus)
    finally:
        late.close()


def test_retained_online_status_and_telemetry(broker: LocalBroker, observer: Observer,
                                              agents: AgentProcess) -> None:
    for sid, capacity in CAPACITY.items():
        status = retained_status(broker, sid)
        assert (status.state, status.substation_id, status.capacity_kw) == ("online", sid, capacity)
    time.sleep(1.0)
    now = time.time()
    for sid, capacity in CAPACITY.items():
        msgs = telemetry(observer, sid)
        assert len(msgs) >= 5  # 0.2 s interval over > 1 s
        seqs = [m.seq for m in msgs]
        assert seqs == sorted(set(seqs))
        for m in msgs:
            assert m.substation_id == sid
            assert m.capacity_kw == capacity
            assert abs(m.ts - now) < 10
            assert 0 < m.base_load_kw < capacity
            assert m.ev_load_kw == 0 and m.active_sessions == 0
            assert m.load_kw == pytest.approx(m.base_load_kw + m.ev_load_kw, abs=1e-6)
    # Nothing is published to another substation's topics or anywhere unexpected.
    kinds = {T.parse(m.topic) for m in observer.messages}
    assert kinds <= {(k, sid) for k in (TopicKind.SUBSTATION_TELEMETRY, TopicKind.SUBSTATION_STATUS)
                     for sid in CAPACITY}


def test_start_command_gives_started_then_energy_delivered(observer: Observer, balancer: Observer,
                                                            agents: AgentProcess) -> None:
    t0 = time.monotonic()
    balancer.publish(T.command("A"), start_command("sess-1", energy_kwh=3.0))  # ~0.8 s real at 600x
    observer.wait_for(on_topic(T.session_events("A"), b'"ended"'), since=t0, what="ended event")
    started, ended = session_events(observer, t0)
    assert (started.event, started.session_id, started.ev_id, started.substation_id) == (
        "started", "sess-1", "EV_0001", "A")
    assert (ended.event, ended.session_id, ended.reason, ended.energy_delivered_kwh) == (
        "ended", "sess-1", "energy_delivered", 3.0)
    charging = [m for m in telemetry(observer, "A", t0) if m.active_sessions == 1]
    assert charging, "no telemetry showed the session"
    assert all(m.ev_load_kw == 22.0 for m in charging)
    assert all(m.load_kw == pytest.approx(m.base_load_kw + 22.0, abs=1e-6) for m in charging)
    # B is untouched.
    assert all(m.ev_load_kw == 0 for m in telemetry(observer, "B", t0))


def test_stop_command_ends_session_with_its_reason(observer: Observer, balancer: Observer,
                                                   agents: AgentProcess) -> None:
    t0 = time.monotonic()
    balancer.publish(T.command("A"), start_command("sess-2", energy_kwh=500.0))
    observer.wait_for(on_topic(T.session_events("A")), since=t0, what="started event")
    balancer.publish(T.command("A"), commands(SessionCommand(
        command="stop", session_id="sess-2", ev_id="EV_0001", ts=time.time(), reason="released")))
    ended = observer.wait_for(on_topic(T.session_events("A"), b'"ended"'), since=t0, what="ended event")
    event = decode(ended.payload, SessionEvent)
    assert event.reason == "released"
    assert event.energy_delivered_kwh is not None and 0 < event.energy_delivered_kwh < 500


def test_malformed_commands_do_not_kill_the_agent(observer: Observer, balancer: Observer,
                                                  agents: AgentProcess) -> None:
    for payload in (b"garbage", b"{}", json.dumps({"command": "start"}).encode(), b"\xff" * 10,
                    b'{"command":"start","session_id":"x","ev_id":"EV_0001","ts":1,"granted_kw":-5}',
                    b'{"ts":1,"commands":[]}', b'{"ts":1,"commands":[{"command":"stop"}]}'):
        balancer.publish(T.command("A"), payload)
    t0 = time.monotonic()
    time.sleep(0.6)
    assert agents.proc.poll() is None, agents.log()
    assert len(telemetry(observer, "A", t0)) >= 2
    assert session_events(observer) == []
    # Still obeys valid commands.
    balancer.publish(T.command("A"), start_command("sess-3", energy_kwh=0.5))
    observer.wait_for(on_topic(T.session_events("A"), b'"ended"'), since=t0,
                      what="ended event after bad commands")
    assert "command_refused" in agents.log()


def test_sigterm_publishes_retained_offline_and_exits_zero(broker: LocalBroker, observer: Observer,
                                                           agents: AgentProcess) -> None:
    t0 = time.monotonic()
    agents.proc.send_signal(signal.SIGTERM)
    assert agents.proc.wait(TIMEOUT) == 0, agents.log()
    assert time.monotonic() - t0 < 3.0
    for sid, capacity in CAPACITY.items():
        status = retained_status(broker, sid)
        assert (status.state, status.substation_id, status.capacity_kw) == ("offline", sid, capacity)
        assert status.ts is not None  # our own status, not the broker's last will


def test_sigkill_makes_the_broker_publish_the_last_will(broker: LocalBroker, observer: Observer,
                                                        agents: AgentProcess) -> None:
    t0 = time.monotonic()
    agents.proc.kill()
    agents.proc.wait(TIMEOUT)
    # The socket is closed by the kernel, so the broker notices at once; the 5 s keepalive bounds it otherwise.
    for sid in CAPACITY:
        msg = observer.wait_for(on_topic(T.substation_status(sid), b"offline"), timeout=10.0, since=t0,
                                what=f"last will of {sid}")
        assert decode(msg.payload, SubstationStatus) == SubstationStatus(state="offline", substation_id=sid)
        status = retained_status(broker, sid)
        assert (status.state, status.ts) == ("offline", None)


def test_frozen_agent_is_declared_offline_after_keepalive_and_drops_sessions_on_reconnect(
        broker: LocalBroker, observer: Observer, balancer: Observer, agents: AgentProcess) -> None:
    """A hung agent (socket open, no pings) is detected by keepalive; when it wakes up it reconnects,
    ends the sessions the balancer has revoked meanwhile and announces itself online again."""
    balancer.publish(T.command("A"), start_command("sess-4", energy_kwh=500.0))
    observer.wait_for(on_topic(T.session_events("A")), what="started event")
    t0 = time.monotonic()
    agents.proc.send_signal(signal.SIGSTOP)
    try:
        will = observer.wait_for(on_topic(T.substation_status("A"), b"offline"),
                                 timeout=15.0, since=t0, what="last will after keepalive")
        # MQTT_KEEPALIVE_S=5: the broker waits 1.5 keepalives (measured ~10.7 s with Mosquitto 2.0.11).
        assert will.at - t0 >= 7.0
    finally:
        agents.proc.send_signal(signal.SIGCONT)
    ended = observer.wait_for(on_topic(T.session_events("A"), b'"ended"'),
                              since=t0, what="ended event after reconnect")
    event = decode(ended.payload, SessionEvent)
    assert (event.session_id, event.reason) == ("sess-4", "substation_offline")
    observer.wait_for(on_topic(T.substation_status("A"), b'"online"'),
                      since=will.at, what="online status after reconnect")
    assert retained_status(broker, "A").state == "online"
