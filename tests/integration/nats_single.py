"""One nats-server node with JetStream and its MQTT listener, for smoke tests of the services on MQTT 3.1.1 over
NATS: :class:`broker.nats_single.NatsServer` with the ``host``/``port`` (MQTT) of :class:`broker.local.LocalBroker`
that :class:`probe.Service` and :class:`probe.Probe` take.

No accounts: without an ``authorization`` block NATS accepts any MQTT username and password, so the services
log in as they would on Mosquitto.
"""

from __future__ import annotations

from pathlib import Path

from broker.nats_single import NatsServer


class NatsNode:
    host = "127.0.0.1"

    def __init__(self, work_dir: Path) -> None:
        self.server = NatsServer(work_dir, mqtt=True, name="smoke")
        assert self.server.mqtt_port is not None
        self.port = self.server.mqtt_port  # what the services are given as MQTT_PORT

    def password_for(self, _username: str) -> str:
        return "unused"  # (no authorization configured)

    def start(self, timeout: float = 15.0) -> NatsNode:
        self.server.start(timeout)
        return self

    def log(self) -> str:
        path = self.server.work_dir / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.server.stop()
