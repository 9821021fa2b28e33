"""Test helpers: one paho MQTT client that records what it receives, and service subprocesses.

:class:`Probe` is the only MQTT client the integration tests use (observers, fake EVs and substations,
ACL checks, TLS). Every wait is bounded; every client talks to the test's own broker on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.local import LocalBroker
from grid_runtime.lifecycle import stop_process

ROOT = Path(__file__).resolve().parents[2]
#: Default bound of every wait (seconds).
TIMEOUT = 5.0
#: How often a waiter re-checks received messages. Messages do not wake waiters: with tens of thousands
#: of messages a wake-up (and predicate run) per message slows a burst down 2-3x (measured).
_POLL_S = 0.005
#: Environment variables the services read: a test's service sees only what the test sets.
SERVICE_ENV_PREFIXES = ("MQTT_", "EV_", "SUBSTATION", "SIM_", "BALANCER_", "GRID_", "LOG_", "METRICS_", "API_",
                        "INFLUX_", "RECORDER_")
#: Substation agents as the fault and failover tests run them: telemetry every 0.2 s, a 5 s keepalive.
AGENT_ENV = {"MQTT_ACCOUNT_SECRET": "test-secret", "SUBSTATION_INTERVAL_S": "0.2", "SUBSTATION_BASE_LOAD_PCT": "10",
             "MQTT_KEEPALIVE_S": "5"}


class Received(NamedTuple):
    """One received message. A plain tuple, not the MQTTMessage: 20k live MQTTMessage objects make the
    cyclic GC slow a burst test down 2-3x."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.payload)


class Probe:
    """A paho MQTT 5 client (callback API v2) for one account, with bounded waits and a record of
    every message it received, PUBACK and SUBACK.

    ``Probe(broker, username, *subscriptions)`` connects, checks the CONNACK and subscribes (waiting for
    the SUBACKs). With ``connect=False`` nothing happens until :meth:`connect` (which returns the CONNACK
    reason, for tests of refused logins) or :meth:`start`.
    """

    def __init__(
        self,
        broker: LocalBroker,
        username: str | None,
        *subscriptions: str,
        password: str | None = None,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
        clean_start: bool = True,
        session_expiry: int | None = None,
        port: int | None = None,
        ca_file: str | None = None,
        connect: bool = True,
        client_id: str | None = None,
    ) -> None:
        self.broker = broker
        self.username = username
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or username or "",
                                  protocol=protocol)
        self.client.max_inflight_messages_set(100)  # the broker's Receive Maximum (max_inflight_messages)
        if username is not None:
            self.client.username_pw_set(username, password if password is not None else broker.password_for(username))
        if ca_file is not None:
            self.client.tls_set(ca_certs=ca_file)
        self.protocol = protocol
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.port = port or broker.port
        self._cond = threading.Condition()
        self.messages: list[Received] = []
        self.acks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.connack: ReasonCode | None = None
        self.session_present: bool | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        if connect:
            self.start()
            if subscriptions:
                codes = self.subscribe(*subscriptions)
                assert not any(rc.is_failure for rc in codes), f"{username} could not subscribe: {codes}"

    # --- callbacks (paho network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _ud: Any, flags: Any, rc: ReasonCode, _props: Any) -> None:
        if rc.is_failure:
            client.disconnect()  # no automatic retry (the loop would sit in its reconnect wait on close)
        with self._cond:
            self.connack = rc
            self.session_present = bool(flags.session_present)
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties is not None else None
        received = Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), corr, time.monotonic())
        with self._cond:
            self.messages.append(received)

    def _on_publish(self, _c: mqtt.Client, _ud: Any, mid: int, rc: ReasonCode, _props: Any) -> None:
        with self._cond:
            self.acks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _ud: Any, mid: int, rcs: list[ReasonCode], _props: Any) -> None:
        with self._cond:
            self.subacks[mid] = rcs
            self._cond.notify_all()

    # --- connection ----------------------------------------------------------------------------
    def connect(self) -> ReasonCode:
        """Connect and return the CONNACK reason (a refusal is returned, not raised)."""
        kwargs: dict[str, Any] = {}
        if self.protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = self.clean_start
            if self.session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry
                kwargs["properties"] = props
        self.client.connect(self.broker.host, self.port, keepalive=60, **kwargs)
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # FIELD-NOTES: 88 ms -> 0.2 ms
        self.client.loop_start()
        assert self.wait_until(lambda: self.connack is not None), f"no CONNACK for {self.username}"
        assert self.connack is not None
        return self.connack

    def start(self) -> Probe:
        rc = self.connect()
        assert not rc.is_failure, f"{self.username} refused: {rc}"
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- operations ----------------------------------------------------------------------------
    def subscribe(self, *topics: str, qos: int = 1) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        result, mid = self.client.subscribe([(t, qos) for t in topics])
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        assert self.wait_until(lambda: mid in self.subacks), "no SUBACK"
        return self.subacks[mid]

    def try_publish(self, topic: str, payload: bytes | str | dict[str, Any] = b"{}", qos: int = 1,
                    retain: bool = False, response_topic: str | None = None,
                    correlation_data: bytes | None = None) -> ReasonCode | None:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code (a refusal is returned).
        QoS 0: wait until the message has left and return ``None``."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos, retain, props)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        if qos == 0:
            info.wait_for_publish(TIMEOUT)
            assert info.is_published(), f"QoS 0 publish to {topic} did not leave"
            return None
        assert self.wait_until(lambda: info.mid in self.acks), f"no PUBACK for {topic}"
        return self.acks[info.mid]

    def publish(self, topic: str, payload: bytes | str | dict[str, Any] = b"{}", qos: int = 1,
                retain: bool = False, response_topic: str | None = None,
                correlation_data: bytes | None = None) -> None:
        """Publish and check that the broker accepted it (QoS 1: a successful PUBACK)."""
        rc = self.try_publish(topic, payload, qos, retain, response_topic, correlation_data)
        assert rc is None or not rc.is_failure, f"publish to {topic} refused: {rc}"

    # --- what was received ---------------------------------------------------------------------
    def wait_until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        """Wait (bounded) until ``predicate()`` holds; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, _POLL_S))
            return True

    def wait_for(self, predicate: Callable[[Received], bool], count: int = 1, timeout: float = 10.0,
                 since: float = 0.0, what: str = "messages") -> list[Received]:
        """All messages received at or after monotonic ``since`` that match, once there are ``count``
        of them; ``AssertionError`` after ``timeout``. Each message is tested once."""
        found: list[Received] = []
        checked = 0

        def enough() -> bool:
            nonlocal checked
            for m in self.messages[checked:]:
                if m.at >= since and predicate(m):
                    found.append(m)
            checked = len(self.messages)
            return len(found) >= count

        if not self.wait_until(enough, timeout):
            raise AssertionError(f"timed out after {timeout} s waiting for {count} {what}; got {len(found)}: "
                                 f"{[m.payload[:200] for m in found[-5:]]}")
        return found

    def wait_one(self, predicate: Callable[[Received], bool], timeout: float = TIMEOUT, since: float = 0.0,
                 what: str = "message") -> Received:
        """The first message (at or after ``since``) that matches."""
        return self.wait_for(predicate, 1, timeout, since, what)[0]

    def wait_for_topic(self, topic: str, timeout: float = TIMEOUT) -> bool:
        return self.wait_until(lambda: any(m.topic == topic for m in self.messages), timeout)

    def on(self, topic: str, since: float = 0.0) -> list[Received]:
        """Messages received on ``topic`` at or after monotonic ``since``."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic and m.at >= since]

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]

    def answers(self, ev_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m.json() for m in self.messages if m.topic.endswith(f"/ev/{ev_id}/assignment")]

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()


def telemetry(sid: str, seq: int, capacity_kw: float, base_kw: float, ev_kw: float = 0.0) -> dict[str, Any]:
    return {"substation_id": sid, "ts": time.time(), "seq": seq, "capacity_kw": capacity_kw,
            "load_kw": base_kw + ev_kw, "base_load_kw": base_kw, "ev_load_kw": ev_kw, "active_sessions": 0}


def service_env(broker: LocalBroker, **env: str) -> dict[str, str]:
    """The environment of a service under test: this machine's, minus every variable the services read,
    plus the test broker's address and ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_ENV_PREFIXES)}
    # METRICS_PORT=0: /metrics on a free port (tests that scrape it set their own).
    full.update(MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), LOG_FORMAT="text", PYTHONUNBUFFERED="1",
                METRICS_PORT="0",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full.update(env)
    return full


class Service:
    """A project service started as a user would: ``python -m <module>`` with environment variables."""

    def __init__(self, module: str, broker: LocalBroker, log_dir: Path, *args: str, **env: str) -> None:
        self.module = module
        self.log_path = log_dir / f"{module}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], env=service_env(broker, **env),
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        """Until ``text`` is in the log; AssertionError with the log's tail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not in the log:\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        code = stop_process(self.proc, timeout)
        self._log.close()
        return code


def wait_telemetry(watch: Probe, *substations: str, timeout: float = 10.0) -> None:
    """Until ``watch`` has telemetry of each substation (the agents are up and reporting)."""
    for sub in substations:
        suffix = f"/substation/{sub}/telemetry"
        watch.wait_for(lambda m: m.topic.endswith(suffix), timeout=timeout, what=f"{sub} telemetry")  # noqa: B023


def start_balancer(broker: LocalBroker, log_dir: Path, **env: str) -> Service:
    settings = {"MQTT_USERNAME": "balancer", "MQTT_PASSWORD": broker.password_for("balancer"),
                "BALANCER_TICK_INTERVAL_S": "0.1",
                # operator settings kept beside the test's logs, never in the checkout (shared by restarts)
                "BALANCER_STATE_FILE": str(log_dir / "operator-settings.json")}
    settings.update(env)
    return Service("balancer", broker, log_dir, **settings)
