"""One nats-server node with JetStream and its MQTT listener on free loopback ports, for smoke tests of the
services on MQTT 3.1.1 over NATS (the 3-node cluster fixture is a separate helper of the cluster work).

No accounts: without an ``authorization`` block NATS accepts any MQTT username and password, so the services
log in as they would on Mosquitto. Duck-types the ``host``/``port`` of :class:`broker.local.LocalBroker` so
:class:`probe.Service` and :class:`probe.Probe` accept it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from broker.local import find_free_port
from grid_runtime.lifecycle import stop_process


def find_nats_server() -> str:
    """The nats-server binary: on PATH, or Debian's /usr/sbin (not on a non-root PATH)."""
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if found is None:
        raise FileNotFoundError("nats-server not found (Debian package nats-server)")
    return found


class NatsNode:
    host = "127.0.0.1"

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = find_free_port()  # MQTT (what the services are given as MQTT_PORT)
        self.client_port = find_free_port()  # NATS protocol
        self._proc: subprocess.Popen[bytes] | None = None

    def password_for(self, _username: str) -> str:
        return "unused"  # (no authorization configured)

    def start(self, timeout: float = 15.0) -> NatsNode:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "nats.conf"
        # JetStream is required for MQTT (sessions, QoS 1 and retained messages live in streams).
        config.write_text(f"server_name: smoke\nmqtt {{ listen: {self.host}:{self.port} }}\n")
        log = open(self.work_dir / "nats.log", "wb")  # noqa: SIM115 - closed with the process
        self._proc = subprocess.Popen(
            [find_nats_server(), "-c", str(config), "-js", "-sd", str(self.work_dir / "js"), "-a", self.host,
             "-p", str(self.client_port), "-m", "0"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not start: {self.log()[-2000:]}") from None
                time.sleep(0.05)

    def log(self) -> str:
        path = self.work_dir / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 5.0)
            self._proc = None
