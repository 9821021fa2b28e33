"""One private nats-server with JetStream on free loopback ports, for the lease tests and the failover bench.

The region leases and the operator settings live in NATS KV (JetStream); the MQTT side may be the project's
Mosquitto or the server's own MQTT listener (``mqtt=True``: JetStream is required for it, and so is a
``server_name``). Never the system NATS on 4222: the ports are chosen free. ``kill()`` is a real ``kill -9``;
``start()`` again reuses the store directory (JetStream state survives, as on a real node restart). The 3-node
cluster for the cluster tests is the i12nats fixture; this is the smallest thing that has a KV store.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from broker.local import free_ports
from broker.nats.cluster import find_nats_server
from grid_runtime.lifecycle import ChildServer

__all__ = ["NatsServer", "find_nats_server"]


class NatsServer(ChildServer):
    """``kill()`` is SIGKILL, ``stop()`` SIGTERM (then SIGKILL after 5 s); both as :class:`ChildServer`'s."""

    stop_timeout_s = 5.0

    def __init__(self, work_dir: Path, *, mqtt: bool = False, name: str = "n1") -> None:
        self.work_dir = Path(work_dir).resolve()  # (the server runs in it: relative paths would resolve twice)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 if mqtt else 1)  # held together: two find_free_port() calls can return one port
        self.port = ports[0]
        self.mqtt_port = ports[1] if mqtt else None
        self.name = name
        self.config = self.work_dir / "nats.conf"
        lines = [f'server_name: "{name}"', f"listen: 127.0.0.1:{self.port}",
                 f'jetstream {{ store_dir: "{self.work_dir / "js"}" }}']
        if self.mqtt_port is not None:
            lines.append(f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}")
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        proc = self._spawn([find_nats_server(), "-c", str(self.config)], self.work_dir / "nats.log", self.work_dir)
        deadline = time.monotonic() + timeout
        ports = [self.port] + ([self.mqtt_port] if self.mqtt_port else [])
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(self.work_dir / 'nats.log').read_text()[-2000:]}")
            try:
                for port in ports:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on {ports} within {timeout} s")
