"""Test helpers: a paho MQTT 5 client that records what it receives, and service subprocesses.

Every wait is bounded; every client talks to the test's own broker on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.local import LocalBroker

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


class Probe:
    """A connected MQTT 5 client for one account; records every message on its subscriptions."""

    def __init__(self, broker: LocalBroker, username: str, *subscriptions: str) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, broker.password_for(username))
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(broker.host, broker.port, keepalive=30, clean_start=True)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        assert connected.wait(5), f"{username} could not connect"
        for topic in subscriptions:
            result, _mid = self.client.subscribe(topic, 1)
            assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)  # SUBACKs

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), corr))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos, retain, props)
        info.wait_for_publish(5)

    def wait_for(self, predicate: Callable[[Received], bool], count: int = 1, timeout: float = 10.0,
                 what: str = "messages") -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {count} {what}; got {len(found)}: "
                                         f"{[m.payload[:200] for m in found[-5:]]}")
                self._cond.wait(left)

    def answers(self, ev_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m.json() for m in self.messages if m.topic.endswith(f"/ev/{ev_id}/assignment")]

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def telemetry(sid: str, seq: int, capacity_kw: float, base_kw: float, ev_kw: float = 0.0) -> dict[str, Any]:
    return {"substation_id": sid, "ts": time.time(), "seq": seq, "capacity_kw": capacity_kw,
            "load_kw": base_kw + ev_kw, "base_load_kw": base_kw, "ev_load_kw": ev_kw, "active_sessions": 0}


class Service:
    """A project service started as a user would: ``python -m <module>`` with environment variables."""

    def __init__(self, module: str, broker: LocalBroker, log_dir: Path, *args: str, **env: str) -> None:
        self.module = module
        self.log_path = log_dir / f"{module}-{os.getpid()}-{time.monotonic_ns()}.log"
        full_env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), LOG_FORMAT="text",
                        PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        full_env.update(env)
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], env=full_env, cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_balancer(broker: LocalBroker, log_dir: Path, **env: str) -> Service:
    settings = {"MQTT_USERNAME": "balancer", "MQTT_PASSWORD": broker.password_for("balancer"),
                "BALANCER_TICK_INTERVAL_S": "0.1"}
    settings.update(env)
    return Service("balancer", broker, log_dir, **settings)
