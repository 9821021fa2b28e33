"""A local N-node NATS cluster (JetStream + MQTT) on free loopback ports: tests, benchmarks, ``gridctl run --cluster``.

:class:`LocalCluster` writes one config per node and the shared accounts file (``broker/nats/config.py``, the
accounts and their permissions derived from ``broker/roles.py``), starts ``nats-server -c`` for each node and
waits until the cluster serves MQTT on every node: each node's ``/jsz`` knows a JetStream meta leader and an
MQTT 3.1.1 CONNECT as the ``healthcheck`` account gets CONNACK 0 on every node (the
first MQTT connection of the account creates its replicated session streams, which needs a formed cluster:
about 6 s from a cold start on this machine).

Each node keeps its ports and data dir across :meth:`ClusterNode.kill` / :meth:`ClusterNode.start`, so a node
killed with ``SIGKILL`` comes back with its JetStream state (a real crash, then a real recovery).

Nodes look like :class:`broker.local.LocalBroker` to MQTT clients (``host``, ``port`` = the MQTT port,
``password_for``), and so does the cluster itself (its first node's address).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from broker.accounts import (
    SERVICE_ACCOUNTS,
    Account,
    AccountBook,
    build_accounts,
    service_account_passwords,
    validate_prefix,
    write_private,
)
from broker.local import TLS_CA_FILE, free_ports
from broker.nats.config import ClusterLayout, NodeAddress, render_accounts, render_node
from grid_protocol.topics import DEFAULT_PREFIX
from grid_runtime.lifecycle import ChildServer, file_tail, find_executable

__all__ = ["ClusterNode", "ClusterStartError", "LocalCluster", "find_nats_server", "mqtt_connect_rc"]

_FALLBACK_BINARIES = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")


class ClusterStartError(RuntimeError):
    """The cluster (or one node) did not become ready in time; the message has the log tails."""


def find_nats_server() -> str:
    """Path of ``nats-server`` (``$NATS_SERVER_BIN``, ``PATH``, then /usr/sbin: Debian installs it there)."""
    return find_executable("nats-server", "NATS_SERVER_BIN", _FALLBACK_BINARIES,
                           "install it (Debian: apt-get install nats-server)")


def _utf8(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def mqtt_connect_rc(host: str, port: int, username: str, password: str, client_id: str,
                    timeout: float = 5.0, ca_file: str | os.PathLike[str] | None = None) -> int:
    """CONNECT over MQTT 3.1.1 (clean session) and return the CONNACK return code (0 = accepted); OSError when
    the node does not answer. A bare socket (TLS with ``ca_file``): no client library thread for a probe."""
    body = _utf8("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30)
    body += _utf8(client_id) + _utf8(username) + _utf8(password)
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        if ca_file is not None:
            sock = stack.enter_context(ssl.create_default_context(cafile=str(ca_file)).wrap_socket(
                sock, server_hostname=host))
        sock.settimeout(timeout)
        sock.sendall(bytes([0x10, len(body)]) + body if len(body) < 128 else
                     bytes([0x10, (len(body) & 0x7F) | 0x80, len(body) >> 7]) + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError("closed before CONNACK")
            connack += chunk
        if connack[0] != 0x20:
            raise ConnectionError(f"not a CONNACK: {connack.hex()}")
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return connack[3]


class ClusterNode(ChildServer):
    """One ``nats-server`` of a :class:`LocalCluster` (its ports and data dir stay across restarts)."""

    def __init__(self, cluster: LocalCluster, index: int, address: NodeAddress) -> None:
        self.cluster = cluster
        self.index = index
        self.address = address
        self.name = address.name
        self.dir = cluster.work_dir / address.name
        self.conf_file = self.dir / "nats.conf"
        self.store_dir = self.dir / "jetstream"
        self.log_file = self.dir / "nats.log"
        self._probes = 0

    # --- what MQTT clients need (LocalBroker-like) ---------------------------------------------
    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        """The MQTT port."""
        return self.address.mqtt_port

    @property
    def client_port(self) -> int:
        return self.address.client_port

    @property
    def http_port(self) -> int | None:
        return self.address.http_port

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    def password_for(self, username: str) -> str:
        return self.cluster.password_for(username)

    # --- process (pid, running, stop, kill, signal: ChildServer) ---------------------------------
    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        layout = self.cluster.layout
        # Every node includes the cluster's one accounts file (relative includes resolve from the config's dir).
        layout.accounts_file = os.path.relpath(self.cluster.accounts_file, self.dir)
        self.conf_file.write_text(render_node(layout, self.index, self.store_dir), encoding="utf-8")

    def launch(self) -> None:
        """Start the process (no wait; :meth:`start` waits)."""
        if self.running:
            return
        self.write_config()
        self._spawn([self.cluster.nats_bin, "-c", str(self.conf_file)], self.log_file, self.dir)

    def start(self, timeout: float | None = None) -> ClusterNode:
        """Start (same ports, same data dir) and wait until this node serves MQTT."""
        self.launch()
        self.wait_ready(timeout if timeout is not None else self.cluster.start_timeout)
        return self

    def healthy(self) -> bool:
        """JetStream has a meta leader (``/jsz``) and an MQTT CONNECT with a new client id is accepted.

        Not ``/healthz``: after a restart it reports stale MQTT consumers of clients that died with the node as
        "not current" for minutes while the node serves MQTT normally (measured, 2.9.10)."""
        if not self.running:
            return False
        if self.http_port:
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/jsz", timeout=1.0) as r:
                    meta = json.loads(r.read()).get("meta_cluster") or {}
            except (OSError, ValueError):
                return False
            if not meta.get("leader"):
                return False
        self._probes += 1
        try:
            user = self.cluster.probe_user
            rc = mqtt_connect_rc(self.host, self.port, user, self.password_for(user),
                                 f"ready-{self.name}-{os.getpid()}-{self._probes}", timeout=3.0,
                                 ca_file=self.cluster.ca_file)
        except OSError:
            return False
        return rc == 0

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.running:
                raise ClusterStartError(f"{self.name} exited ({self.exit_code}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterStartError(f"{self.name} not ready after {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        return file_tail(self.log_file, lines) or "(no log)"

    def restart(self, *, crash: bool = False, down_s: float = 0.0, timeout: float | None = None) -> ClusterNode:
        (self.kill if crash else self.stop)()
        time.sleep(down_s)
        return self.start(timeout)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"ClusterNode({self.name}, mqtt {self.host}:{self.port}, nats {self.client_port}, {state})"


class LocalCluster(AccountBook):
    """An N-node nats-server cluster (default 3) with the project's accounts, on free loopback ports.

    Usage::

        with LocalCluster(tmp_path, substation_ids=["A"], ev_ids=["EV_0001"], secret="s") as cluster:
            cluster.mqtt_hosts            # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3" (MQTT_HOSTS)
            cluster.nodes[1].kill()       # SIGKILL one node ...
            cluster.nodes[1].start()      # ... and bring it back on the same ports and data dir

    Accounts as :class:`broker.local.LocalBroker`'s: ``services`` with passwords from ``service_passwords`` or
    derived from ``secret``, ``substation.<id>`` per substation, one per EV (or exactly ``accounts``, when given).
    :meth:`add_accounts` /
    :meth:`remove_accounts` rewrite the accounts file and reload every running node (SIGHUP).
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        *,
        nodes: int = 3,
        name: str = "grid",
        prefix: str = DEFAULT_PREFIX,
        substation_ids: Iterable[str] = (),
        ev_ids: Iterable[str] = (),
        secret: str = "local-secret",
        service_passwords: Mapping[str, str] | None = None,
        services: Iterable[str] = SERVICE_ACCOUNTS,
        host: str = "127.0.0.1",
        tls_dir: str | os.PathLike[str] | None = None,
        monitoring: bool = True,
        start_timeout: float = 30.0,
        nats_bin: str | None = None,
        accounts: Iterable[Account] | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.work_dir = Path(work_dir).resolve()
        self.prefix = validate_prefix(prefix)
        self.secret = secret
        self.accounts: list[Account] = (list(accounts) if accounts is not None else build_accounts(
            secret, substation_ids, ev_ids, service_account_passwords(secret, services, service_passwords)))
        self._passwords = {a.username: a.password for a in self.accounts}
        #: the account the readiness probe logs in as (may log in, nothing else)
        self.probe_user = "healthcheck" if "healthcheck" in self._passwords else self.accounts[0].username
        self.start_timeout = start_timeout
        self.nats_bin = nats_bin or find_nats_server()
        self.accounts_file = self.work_dir / "accounts.conf"
        self._host, self._monitoring, self._tls_dir = host, monitoring, tls_dir
        self._name = name
        self.layout = self._new_layout(nodes)
        self.nodes = [ClusterNode(self, i, a) for i, a in enumerate(self.layout.nodes)]
        self._started_once = False

    def _new_layout(self, nodes: int) -> ClusterLayout:
        free = free_ports(nodes * 4, self._host)
        ports = [(free[4 * i], free[4 * i + 1], free[4 * i + 2], free[4 * i + 3] if self._monitoring else None)
                 for i in range(nodes)]
        tls_dir = Path(self._tls_dir).resolve() if self._tls_dir is not None else None
        return ClusterLayout.local(ports, name=self._name, host=self._host, tls_dir=tls_dir)

    # --- addresses -------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.nodes[0].host

    @property
    def port(self) -> int:
        """The first node's MQTT port (a cluster passed where one broker is expected)."""
        return self.nodes[0].port

    @property
    def mqtt_hosts(self) -> str:
        """``MQTT_HOSTS``: every node's MQTT address, comma-separated."""
        return ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    @property
    def nats_urls(self) -> str:
        """Every node's NATS client URL, comma-separated (nats-py takes the list)."""
        return ",".join(n.nats_url for n in self.nodes)

    @property
    def ca_file(self) -> Path | None:
        return Path(self.layout.tls_dir) / TLS_CA_FILE if self.layout.tls_dir is not None else None

    # --- accounts (password_for, substation_credentials: AccountBook) ----------------------------
    def write_accounts(self) -> None:
        write_private(self.accounts_file, render_accounts(self.prefix, self.accounts))

    def reload(self) -> None:
        """Rewrite the accounts file and make every running node re-read its config (SIGHUP = reload)."""
        self.write_accounts()
        for node in self.nodes:
            node.signal(signal.SIGHUP)

    def add_accounts(self, accounts: Iterable[Account]) -> None:
        new = list(accounts)
        names = {a.username for a in new}
        self.accounts = [a for a in self.accounts if a.username not in names] + new
        self._passwords.update({a.username: a.password for a in new})
        self.reload()

    def remove_accounts(self, usernames: Iterable[str]) -> None:
        gone = set(usernames)
        self.accounts = [a for a in self.accounts if a.username not in gone]
        for name in gone:
            self._passwords.pop(name, None)
        self.reload()

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return any(n.running for n in self.nodes)

    def start(self) -> LocalCluster:
        """Write the files, start every node, wait until every node serves MQTT (JetStream ready).

        A port chosen free can be taken by another process before the node binds it: the first start then
        tries again on new ports (twice at most)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.write_accounts()
        for attempt in range(3):
            for node in self.nodes:
                node.launch()
            try:
                self._wait_all(self.nodes, self.start_timeout)
                return self
            except ClusterStartError as exc:
                tails = "\n".join(f"--- {n.name} ---\n{n.log_tail(15)}" for n in self.nodes)
                self.stop()
                if attempt < 2 and "address already in use" in tails and not self._started_once:
                    for node in self.nodes:  # nothing to keep from a cluster that never formed
                        shutil.rmtree(node.dir, ignore_errors=True)
                    self.layout = self._new_layout(len(self.nodes))
                    self.nodes = [ClusterNode(self, i, a) for i, a in enumerate(self.layout.nodes)]
                    continue
                raise ClusterStartError(f"{exc}\n{tails}") from None
            finally:
                self._started_once = any(n.running for n in self.nodes)
        return self  # pragma: no cover - the loop returns or raises

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every running node serves MQTT."""
        self._wait_all([n for n in self.nodes if n.running],
                       timeout if timeout is not None else self.start_timeout)

    @staticmethod
    def _wait_all(nodes: list[ClusterNode], timeout: float) -> None:
        """Until each of ``nodes`` serves MQTT; :class:`ClusterStartError` at once when one exits (a node that
        cannot bind its ports), or after ``timeout``."""
        deadline = time.monotonic() + timeout
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                if not node.running:
                    raise ClusterStartError(f"{node.name} exited ({node.exit_code}):\n{node.log_tail()}")
                if node.healthy():
                    waiting.remove(node)
            if waiting and time.monotonic() > deadline:
                raise ClusterStartError(f"{', '.join(n.name for n in waiting)} not ready after {timeout:g} s:\n"
                                        f"{waiting[0].log_tail()}")
            if waiting:
                time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        for node in reversed(self.nodes):
            node.stop(timeout)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalCluster({len(self.nodes)} nodes, mqtt {self.mqtt_hosts}, work_dir={str(self.work_dir)!r})"
