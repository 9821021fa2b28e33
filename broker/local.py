"""A private Mosquitto for local runs, tests and benchmarks.

:class:`LocalBroker` writes the dynamic security plugin's state file (every account, role and grant;
``broker/dynsec.py``) and ``mosquitto.conf`` (rendered from ``broker/mosquitto.conf.in``) into a work directory,
starts ``mosquitto -c`` on a loopback port and waits until it accepts connections. It never touches a system
broker: the port is chosen free (``port=0``) or given explicitly.

CLI::

    python -m broker.local run --work-dir .run/broker [--port 1884] [--substations A,B,C] [--ev-count 200]
    python -m broker.local render --port 1883 --bind 0.0.0.0 --data-dir /mosquitto/data ... > mosquitto.conf
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template
from types import FrameType, TracebackType

from broker import dynsec
from broker.accounts import (
    SERVICE_ACCOUNTS,
    Account,
    AccountBook,
    build_accounts,
    service_account_passwords,
    validate_prefix,
)
from grid_protocol.topics import DEFAULT_PREFIX
from grid_runtime.lifecycle import ChildServer, file_tail, find_executable

__all__ = [
    "BrokerStartError",
    "LocalBroker",
    "find_dynsec_plugin",
    "find_free_port",
    "find_mosquitto",
    "free_ports",
    "render_config",
]

#: File names ``broker/tls/make-certs.sh`` writes and the TLS listener reads.
TLS_CA_FILE = "ca.crt"
TLS_CERT_FILE = "server.crt"
TLS_KEY_FILE = "server.key"

_FALLBACK_BINARIES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
#: Where the dynamic security plugin is installed: Debian/Ubuntu (multiarch dirs), the eclipse-mosquitto image.
_DYNSEC_PLUGINS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                   "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                   "/usr/lib/mosquitto_dynamic_security.so", "/usr/local/lib/mosquitto_dynamic_security.so")
#: Its path inside the eclipse-mosquitto image (docker compose).
IMAGE_DYNSEC_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"



class BrokerStartError(RuntimeError):
    """Mosquitto did not start (or did not accept connections in time); the message has its log tail."""


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary (``$MOSQUITTO_BIN``, ``PATH``, then the usual sbin dirs)."""
    return find_executable("mosquitto", "MOSQUITTO_BIN", _FALLBACK_BINARIES,
                           "install Mosquitto 2.0 (Debian: apt-get install mosquitto)")


def find_dynsec_plugin() -> str:
    """Path of ``mosquitto_dynamic_security.so`` (``$MOSQUITTO_DYNSEC_PLUGIN``, then where packages put it)."""
    for candidate in (os.environ.get("MOSQUITTO_DYNSEC_PLUGIN"), *_DYNSEC_PLUGINS):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        "mosquitto_dynamic_security.so not found (looked at $MOSQUITTO_DYNSEC_PLUGIN and "
        f"{', '.join(_DYNSEC_PLUGINS)}); it comes with Mosquitto 2.0 (Debian: apt-get install mosquitto)"
    )


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bind to port 0 and ask the kernel)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now: every socket is held until all are chosen (one
    :func:`find_free_port` after another can return the same port twice; it did, and a cluster node then failed
    with "address already in use")."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _conf_value(name: str, value: str) -> str:
    # Mosquitto splits config lines on whitespace; a newline would inject config lines.
    if not value or any(ch.isspace() for ch in value):
        raise ValueError(f"{name} {value!r} must be non-empty and contain no whitespace")
    return value


def _tls_block(tls_dir: str | os.PathLike[str], tls_port: int, bind_address: str) -> str:
    tls = Path(tls_dir)
    return (
        "\n# TLS listener (certificates from broker/tls/make-certs.sh). Clients verify the server with the CA;\n"
        "# they authenticate with username/password like on the plain listener (no client certificates).\n"
        f"listener {int(tls_port)} {bind_address}\n"
        f"cafile {_conf_value('cafile', str(tls / TLS_CA_FILE))}\n"
        f"certfile {_conf_value('certfile', str(tls / TLS_CERT_FILE))}\n"
        f"keyfile {_conf_value('keyfile', str(tls / TLS_KEY_FILE))}\n"
        "require_certificate false\n"
        "tls_version tlsv1.2\n"
    )


def render_config(
    *,
    port: int,
    data_dir: str | os.PathLike[str],
    dynsec_file: str | os.PathLike[str],
    log_file: str | os.PathLike[str] | None,
    bind_address: str = "127.0.0.1",
    tls_dir: str | os.PathLike[str] | None = None,
    tls_port: int | None = None,
    run_user: str | None = None,
    dynsec_plugin: str | None = None,
) -> str:
    """Render ``broker/mosquitto.conf.in``.

    ``dynsec_file`` is the dynamic security plugin's state file (:func:`broker.dynsec.render_config`);
    ``dynsec_plugin`` the plugin's path (default: :func:`find_dynsec_plugin`). ``log_file=None`` logs to stdout
    (docker compose). ``tls_dir`` + ``tls_port`` add a TLS listener using ``ca.crt``/``server.crt``/``server.key``
    from ``tls_dir``. ``run_user`` defaults to the current user (Mosquitto started as root drops privileges to it;
    see the template).
    """
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} out of range")
    if (tls_dir is None) != (tls_port is None):
        raise ValueError("tls_dir and tls_port go together")
    bind_address = _conf_value("bind_address", bind_address)
    tls_block = ""
    if tls_dir is not None and tls_port is not None:
        if not 1 <= int(tls_port) <= 65535 or int(tls_port) == int(port):
            raise ValueError(f"invalid tls_port {tls_port}")
        tls_block = _tls_block(tls_dir, tls_port, bind_address)
    data = str(data_dir)
    if not data.endswith("/"):
        data += "/"  # Mosquitto concatenates persistence_location and "mosquitto.db"
    template = Template(resources.files("broker").joinpath("mosquitto.conf.in").read_text(encoding="utf-8"))
    return template.substitute(
        run_user=_conf_value("run_user", run_user or getpass.getuser()),
        port=int(port),
        bind_address=bind_address,
        tls_block=tls_block,
        data_dir=_conf_value("data_dir", data),
        dynsec_plugin=_conf_value("dynsec_plugin", dynsec_plugin or find_dynsec_plugin()),
        dynsec_file=_conf_value("dynsec_file", str(dynsec_file)),
        log_dest="stdout" if log_file is None else f"file {_conf_value('log_file', str(log_file))}",
    )


def _wait_until_running(
    log_file: Path, offset: int, proc: subprocess.Popen[bytes], ports: Sequence[tuple[str, int]], deadline: float
) -> bool:
    """True once *this* process logged that it is running and its ports accept TCP.

    The log line matters: a TCP probe alone would also succeed against another process that already
    holds the port (ours then exits with "Address already in use").
    """
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with open(log_file, "rb") as fh:
                fh.seek(offset)
                running = b" running" in fh.read()
        except OSError:
            running = False
        if running:
            break
        time.sleep(0.005)
    else:
        return False
    for host, port in ports:
        while True:
            if proc.poll() is not None or time.monotonic() >= deadline:
                return False
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
                break
            time.sleep(0.005)
    return proc.poll() is None


class LocalBroker(ChildServer, AccountBook):
    """A Mosquitto subprocess with the project's config, accounts and ACL, on a loopback port.

    Usage::

        with LocalBroker(tmp_path, substation_ids=["A"], ev_ids=["EV_0001"]) as broker:
            client.username_pw_set("EV_0001", broker.password_for("EV_0001"))
            client.connect(broker.host, broker.port)

    Accounts: ``services`` (default all of :data:`SERVICE_ACCOUNTS`, including ``loadtest`` and
    ``provisioner``) with the passwords in ``service_passwords`` or else derived from ``secret``;
    ``substation.<id>`` for each substation id and one account per EV id, derived from ``secret``
    (:func:`grid_runtime.credentials.derive_password`). They are written to the dynamic security plugin's state file at
    the first start; what changes at runtime (accounts added or removed over its control topic) is the broker's
    to keep, across :meth:`restart` too.

    ``port=0`` picks a free port at the first start; :meth:`restart` keeps port and data dir, so
    persistent sessions and retained messages survive it. ``tls_dir`` (certificates from
    ``broker/tls/make-certs.sh``) adds a TLS listener on ``tls_port`` (0 = free port).
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        *,
        port: int = 0,
        prefix: str = DEFAULT_PREFIX,
        substation_ids: Iterable[str] = (),
        ev_ids: Iterable[str] = (),
        secret: str = "local-secret",
        service_passwords: Mapping[str, str] | None = None,
        services: Iterable[str] = SERVICE_ACCOUNTS,
        bind_address: str = "127.0.0.1",
        tls_dir: str | os.PathLike[str] | None = None,
        tls_port: int = 0,
        start_timeout: float = 5.0,
        mosquitto_bin: str | None = None,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.prefix = validate_prefix(prefix)
        self.substation_ids = list(substation_ids)
        self.ev_ids = list(ev_ids)
        self.secret = secret
        self.bind_address = bind_address
        self.host = "127.0.0.1" if bind_address in ("127.0.0.1", "0.0.0.0") else bind_address
        self.port = int(port)
        self._port_fixed = self.port != 0
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        self.tls_port: int | None = int(tls_port) if tls_dir is not None else None
        self.start_timeout = start_timeout
        self.mosquitto_bin = mosquitto_bin or find_mosquitto()
        self.dynsec_plugin = find_dynsec_plugin()

        self.data_dir = self.work_dir / "data"
        self.conf_file = self.work_dir / "mosquitto.conf"
        self.dynsec_file = self.work_dir / "dynsec.json"
        self.log_file = self.work_dir / "mosquitto.log"
        self.stderr_file = self.work_dir / "mosquitto.stderr"

        # Validates every username now, not at start().
        self.accounts: list[Account] = build_accounts(
            secret, self.substation_ids, self.ev_ids, service_account_passwords(secret, services, service_passwords)
        )
        self._passwords = {a.username: a.password for a in self.accounts}
        self._files_written = False

    @property
    def ca_file(self) -> Path | None:
        return self.tls_dir / TLS_CA_FILE if self.tls_dir is not None else None

    # --- process (pid, running, stop, kill, signal: ChildServer) ---------------------------------
    #: SIGTERM makes Mosquitto save its persistence database; it takes well under a second.
    stop_timeout_s = 5.0

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the broker log (and of its stderr, where config errors go)."""
        parts = [file_tail(self.log_file, lines), file_tail(self.stderr_file, lines)]
        return "\n".join(p for p in parts if p)

    def _write_files(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        dynsec.write_config(self.dynsec_file, dynsec.render_config(self.prefix, self.accounts))
        self._files_written = True

    def _write_config(self) -> None:
        self.conf_file.write_text(
            render_config(
                port=self.port,
                data_dir=self.data_dir,
                dynsec_file=self.dynsec_file,
                log_file=self.log_file,
                bind_address=self.bind_address,
                tls_dir=self.tls_dir,
                tls_port=self.tls_port,
                dynsec_plugin=self.dynsec_plugin,
            ),
            encoding="utf-8",
        )

    def start(self) -> LocalBroker:
        """Write the files (first time), start Mosquitto and wait until it accepts TCP connections."""
        if self.running:
            return self
        if not self._files_written:
            self._write_files()
        attempts = 1 if self._port_fixed else 3  # a free port can be taken between probe and bind
        for attempt in range(attempts):
            if not self._port_fixed and (self.port == 0 or attempt > 0):
                self.port = find_free_port()
            if self.tls_dir is not None and (self.tls_port in (0, None) or attempt > 0):
                self.tls_port = find_free_port()
            self._write_config()
            try:
                self._launch()
                return self
            except BrokerStartError:
                if attempt == attempts - 1 or "in use" not in self.log_tail():
                    raise
        return self  # pragma: no cover - loop always returns or raises

    def _launch(self) -> None:
        try:
            log_offset = self.log_file.stat().st_size
        except FileNotFoundError:
            log_offset = 0
        proc = self._spawn([self.mosquitto_bin, "-c", str(self.conf_file)], self.stderr_file, self.work_dir)
        ports = [(self.host, self.port)]
        if self.tls_port is not None:
            ports.append((self.host, self.tls_port))
        deadline = time.monotonic() + self.start_timeout
        if not _wait_until_running(self.log_file, log_offset, proc, ports, deadline):
            code = proc.poll()
            self.kill()
            state = f"exited with code {code}" if code is not None else f"not ready after {self.start_timeout} s"
            raise BrokerStartError(
                f"mosquitto ({self.mosquitto_bin} -c {self.conf_file}) {state} on {self.host}:{self.port}.\n"
                f"--- log tail ---\n{self.log_tail() or '(empty)'}"
            )

    def restart(self, *, crash: bool = False, down_s: float = 0.0) -> LocalBroker:
        """Stop (or with ``crash=True`` kill), stay down ``down_s`` seconds and start again on the same port with
        the same data dir."""
        if crash:
            self.kill()
        else:
            self.stop()
        time.sleep(down_s)
        self._port_fixed = True  # clients reconnect to the same address
        return self.start()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"LocalBroker({self.host}:{self.port}, {state}, work_dir={str(self.work_dir)!r})"


# --- CLI ------------------------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.local", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a private broker in the foreground until Ctrl-C")
    run.add_argument("--work-dir", type=Path, default=Path(".run/broker"))
    run.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    run.add_argument("--bind", default="127.0.0.1")
    run.add_argument("--prefix", default=DEFAULT_PREFIX)
    run.add_argument("--substations", default="A,B,C")
    run.add_argument("--ev-count", type=int, default=200)
    run.add_argument("--ev-prefix", default="EV_")
    run.add_argument("--secret", default=os.environ.get("MQTT_ACCOUNT_SECRET", "local-secret"))
    run.add_argument("--tls-dir", type=Path, default=None)
    run.add_argument("--tls-port", type=int, default=0)

    render = sub.add_parser("render", help="print mosquitto.conf (defaults: docker compose paths)")
    render.add_argument("--port", type=int, default=1883)
    render.add_argument("--bind", default="0.0.0.0")
    render.add_argument("--data-dir", default="/mosquitto/data/")
    render.add_argument("--dynsec-file", default="/mosquitto/auth/dynsec.json")
    render.add_argument("--dynsec-plugin", default=IMAGE_DYNSEC_PLUGIN)
    render.add_argument("--log-file", default=None, help="default: log to stdout")
    render.add_argument("--user", default="mosquitto")
    render.add_argument("--tls-dir", default=None)
    render.add_argument("--tls-port", type=int, default=None)

    args = parser.parse_args(argv)
    if args.command == "render":
        sys.stdout.write(
            render_config(
                port=args.port,
                data_dir=args.data_dir,
                dynsec_file=args.dynsec_file,
                dynsec_plugin=args.dynsec_plugin,
                log_file=args.log_file,
                bind_address=args.bind,
                tls_dir=args.tls_dir,
                tls_port=args.tls_port,
                run_user=args.user,
            )
        )
        return 0

    ev_ids = [f"{args.ev_prefix}{i:04d}" for i in range(1, args.ev_count + 1)]
    broker = LocalBroker(
        args.work_dir,
        port=args.port,
        bind_address=args.bind,
        prefix=args.prefix,
        substation_ids=_split(args.substations),
        ev_ids=ev_ids,
        secret=args.secret,
        tls_dir=args.tls_dir,
        tls_port=args.tls_port,
    )
    def _terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # leave the with block: stop Mosquitto (SIGTERM would skip cleanup)

    signal.signal(signal.SIGTERM, _terminate)
    with broker:
        tls = f", TLS on {broker.tls_port}" if broker.tls_port else ""
        print(f"mosquitto listening on {broker.host}:{broker.port}{tls} (pid {broker.pid}); log {broker.log_file}")
        print(f"accounts: {len(broker.accounts)}; passwords derived from the secret (derive_password)")
        with contextlib.suppress(KeyboardInterrupt):
            while broker.running:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
