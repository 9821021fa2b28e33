"""``gridlb run``: the whole system on this machine, started the way a user would start each part.

A private Mosquitto (project config, fresh accounts, loopback only) plus ``python -m balancer``,
``python -m substation_agents``, the status API and live page (``python -m api``), the telemetry
recorder when a time-series server is configured (``INFLUX_URL``), and, in the foreground,
``python -m ev_clients fleet`` with its live summary. Every service serves Prometheus ``/metrics``.
Service logs go to ``.run/logs/``; credentials for hand testing (MQTT passwords and the API's tokens: the
operator's, one for the hand-test EV only, a viewer's) to ``.run/credentials.env``; the API gets only their
hashes (``.run/api-tokens.json``). Reads are open on this loopback-only run (``API_PUBLIC_READS`` from the
environment, default true). The API gets the broker's ``provisioner`` account, so substations and EVs can be
added and removed while it runs (``python -m api.admin``). Every run starts a fresh broker (new accounts and
passwords, nothing retained from an earlier run). The simulation runs ``--speedup`` times faster than real time
(60 by default), which the banner and the fleet's live line say. Ctrl-C stops the fleet (which prints its summary),
then the services in reverse order, then the broker; ``--duration`` ends the fleet's run on time (not an
interruption) and then stops the rest the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from api.tokens import TokenEntry, TokenFile, hash_token, new_token, write_token_file
from broker.accounts import substation_username
from broker.local import LocalBroker, find_free_port
from grid_protocol.topics import DEFAULT_PREFIX, Topics
from grid_runtime.lifecycle import stop_process
from grid_runtime.metrics import DEFAULT_PORTS

DEFAULT_SUBSTATIONS = "north:400,central:300,south:250"
HAND_TEST_EV = "EV_1234"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1 (0: any), else a free one."""
    return preferred if preferred and _port_free(preferred) else find_free_port()


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gridlb run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=Path(".run"))
    p.add_argument("--port", type=int, default=1884, help="broker port on 127.0.0.1 (taken: a free one is used)")
    p.add_argument("--substations", default=os.environ.get("SUBSTATIONS", DEFAULT_SUBSTATIONS),
                   help="id:capacity_kw list")
    p.add_argument("--evs", type=int, default=200, help="EV accounts and fleet size")
    p.add_argument("--rate", type=float, default=1.0, help="EV arrivals per second")
    p.add_argument("--speedup", type=float, default=60.0,
                   help="simulated seconds per real second: at 60 a 120-minute session ends after 2 real minutes")
    p.add_argument("--no-fleet", action="store_true", help="start everything but the EV fleet (hand testing)")
    p.add_argument("--duration", type=float, default=0,
                   help="real seconds to run, then stop everything (0 = until Ctrl-C)")
    p.add_argument("--api-port", type=int, default=int(os.environ.get("API_PORT", "8000")),
                   help="status API and live page on 127.0.0.1 (taken: a free one is used; default API_PORT or "
                        "8000)")
    p.add_argument("--influx-url", default=os.environ.get("INFLUX_URL"),
                   help="record telemetry to this InfluxDB v2 write endpoint (INFLUX_TOKEN/ORG/BUCKET from the "
                        "environment; default INFLUX_URL, unset = no recorder)")
    return p.parse_args(argv)


class ApiTokens:
    """Fresh tokens for hand testing: the operator's (``API_TOKEN``), one that acts for the hand-test EV only
    and a viewer's. The API gets their hashes in a token file; the tokens go to credentials.env."""

    def __init__(self) -> None:
        self.operator, self.ev, self.viewer = new_token(), new_token(), new_token()

    def write_file(self, path: Path) -> Path:
        write_token_file(path, TokenFile(tokens=[
            TokenEntry(name=f"hand-test-{HAND_TEST_EV}", role="ev", ev_ids=[HAND_TEST_EV], sha256=hash_token(self.ev)),
            TokenEntry(name="hand-test-viewer", role="viewer", sha256=hash_token(self.viewer))]))
        return path


def _write_credentials(path: Path, broker: LocalBroker, api_url: str, tokens: ApiTokens) -> None:
    lines = [
        "# Written by `gridlb run` for hand testing; the broker listens on 127.0.0.1 only.",
        f"export MQTT_HOST={broker.host}",
        f"export MQTT_PORT={broker.port}",
        f"export OBSERVER_PASSWORD={shlex.quote(broker.password_for('observer'))}",
        f"export BALANCER_PASSWORD={shlex.quote(broker.password_for('balancer'))}",
        f"export LOADTEST_PASSWORD={shlex.quote(broker.password_for('loadtest'))}",
        f"export RECORDER_PASSWORD={shlex.quote(broker.password_for('recorder'))}",
        f"export {HAND_TEST_EV}_PASSWORD={shlex.quote(broker.password_for(HAND_TEST_EV))}",
        f"export MQTT_ACCOUNT_SECRET={shlex.quote(broker.secret)}",
        f"export API_URL={api_url}",
        "# HTTP API bearer tokens: the operator's (every route), one that acts for "
        f"{HAND_TEST_EV} only, a viewer's (reads)",
        f"export API_TOKEN={shlex.quote(tokens.operator)}",
        f"export API_EV_TOKEN={shlex.quote(tokens.ev)}",
        f"export API_VIEWER_TOKEN={shlex.quote(tokens.viewer)}",
    ]
    # Created 0600 from the start: it holds passwords and the API tokens (never world-readable, not even
    # for a moment between writing and chmod).
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    work = args.work_dir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    substations = [item.split(":")[0] for item in args.substations.split(",") if item]
    ev_ids = [f"EV_{i:04d}" for i in range(1, args.evs + 1)]
    if HAND_TEST_EV not in ev_ids:
        ev_ids.append(HAND_TEST_EV)
    port = args.port if args.port and _port_free(args.port) else find_free_port()

    # The grants are written for the services' prefix (GRID_TOPIC_PREFIX, which they read from this environment).
    prefix = Topics(os.environ.get("GRID_TOPIC_PREFIX") or DEFAULT_PREFIX).prefix
    # A fresh broker every run: its accounts and passwords are new, so an earlier run's sessions and retained
    # messages (the statuses of substations added by hand back then) would only show things that are gone.
    shutil.rmtree(work / "broker", ignore_errors=True)
    broker = LocalBroker(work / "broker", port=port, prefix=prefix, substation_ids=substations, ev_ids=ev_ids,
                         secret=secrets.token_hex(16))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    # SIGTERM (kill, systemd, a CI timeout) stops everything like Ctrl-C does. Without this handler Python
    # dies at once and leaves the broker and the services (own sessions) running.
    signal.signal(signal.SIGTERM, _raise_terminated)
    rc = 0
    try:
        rc = _run(args, work, logs, broker, substations, ev_ids, procs)
    except _Terminated:
        print("\nSIGTERM: stopping", flush=True)
    except KeyboardInterrupt:  # Ctrl-C while starting up
        pass
    finally:
        _shutdown(procs, broker)
    print(f"stopped. Logs: {logs}")
    return rc


class _Terminated(Exception):
    """SIGTERM arrived."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


def _run(args: argparse.Namespace, work: Path, logs: Path, broker: LocalBroker, substations: list[str],
         ev_ids: list[str], procs: list[tuple[str, subprocess.Popen[bytes]]]) -> int:
    """Start everything (appending to ``procs``) and wait until the end; the caller stops what was started."""
    broker.start()
    api_port = _pick_port(args.api_port)
    api_url = f"http://127.0.0.1:{api_port}"
    tokens = ApiTokens()
    tokens_file = tokens.write_file(work / "api-tokens.json")
    _write_credentials(work / "credentials.env", broker, api_url, tokens)
    public_reads = os.environ.get("API_PUBLIC_READS", "true")
    base_env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), LOG_FORMAT="json",
                    PYTHONUNBUFFERED="1", METRICS_HOST="127.0.0.1")
    for name in ("MQTT_HOSTS", "MQTT_USERNAME", "MQTT_PASSWORD", "METRICS_PORT", "API_HOST", "API_PORT", "API_TOKEN",
                 "API_TOKENS_FILE", "API_PUBLIC_READS", "API_PROVISIONER_USERNAME", "API_PROVISIONER_PASSWORD",
                 "API_MQTT_PUBLIC_URL"):
        base_env.pop(name, None)
    metrics: dict[str, int] = {}

    def metrics_env(service: str, env: dict[str, str]) -> dict[str, str]:
        metrics[service] = _pick_port(DEFAULT_PORTS[service])
        return dict(env, METRICS_PORT=str(metrics[service]))

    def spawn(name: str, module: str, env: dict[str, str], *extra: str, foreground: bool = False) -> None:
        cmd = [sys.executable, "-m", module, *extra]
        if foreground:
            # The terminal shows its live summary; its log records go to the file (LOG_FILE).
            proc = subprocess.Popen(cmd, env=dict(env, LOG_FILE=str(logs / f"{name}.log")))
        else:
            with open(logs / f"{name}.log", "ab") as out:
                # Own session: Ctrl-C reaches only the foreground fleet; we stop the rest in order.
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((name, proc))

    spawn("balancer", "balancer", metrics_env("balancer", dict(
        base_env, MQTT_USERNAME="balancer", MQTT_PASSWORD=broker.password_for("balancer"))))
    spawn("substations", "substation_agents", metrics_env("substation_agents", dict(
        base_env, MQTT_ACCOUNT_SECRET=broker.secret, SUBSTATIONS=args.substations, SIM_SPEEDUP=str(args.speedup))))
    spawn("api", "api", dict(base_env, MQTT_USERNAME="api", MQTT_PASSWORD=broker.password_for("api"),
                             API_PROVISIONER_PASSWORD=broker.password_for("provisioner"),
                             API_HOST="127.0.0.1", API_PORT=str(api_port), API_TOKEN=tokens.operator,
                             API_TOKENS_FILE=str(tokens_file), API_PUBLIC_READS=public_reads,
                             API_ALLOWED_HOSTS='["127.0.0.1", "localhost"]'))
    if args.influx_url:
        spawn("recorder", "monitoring.recorder", metrics_env("recorder", dict(
            base_env, MQTT_USERNAME="recorder", MQTT_PASSWORD=broker.password_for("recorder"),
            INFLUX_URL=args.influx_url)))
    if not args.no_fleet:
        metrics_env("ev_clients", base_env)  # reserve its port now, for the banner
    if not _wait_http(f"{api_url}/health", timeout=15.0):
        print(f"warning: the API did not answer on {api_url} within 15 s; see {logs / 'api.log'}", flush=True)
    _print_banner(work, broker, substations, api_url, metrics, args.influx_url, public_reads, args.speedup)

    fleet: subprocess.Popen[bytes] | None = None
    if not args.no_fleet:
        fleet_env = dict(base_env, MQTT_ACCOUNT_SECRET=broker.secret, EV_COUNT=str(args.evs),
                         EV_ARRIVAL_RATE=str(args.rate), EV_SPEEDUP=str(args.speedup),
                         METRICS_PORT=str(metrics["ev_clients"]))
        # With --duration the fleet ends its own run on time (its summary is a normal one, not "interrupted").
        planned = ("--run-for", f"{args.duration:g}") if args.duration else ()
        spawn("ev_fleet", "ev_clients", fleet_env, "fleet", *planned, foreground=True)
        fleet = procs[-1][1]
    try:
        # (the fleet needs a little longer than --run-for: its EVs release and it prints its summary)
        deadline = time.monotonic() + args.duration + (30 if fleet is not None else 0) if args.duration else None
        while deadline is None or time.monotonic() < deadline:
            dead = [(n, p.returncode) for n, p in procs if p.poll() is not None and p is not fleet]
            if dead:
                print(f"\n{dead[0][0]} exited with code {dead[0][1]}; see {logs / (dead[0][0] + '.log')}")
                return 1
            if fleet is not None and fleet.poll() is not None:
                break
            time.sleep(0.5)
        if args.duration:
            print(f"\n--duration {args.duration:g} s is over: stopping", flush=True)
    except KeyboardInterrupt:
        # The fleet got the same Ctrl-C: let it release its EVs and print its summary (a second
        # signal would cut that short), then stop the rest in order.
        if fleet is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            with contextlib.suppress(subprocess.TimeoutExpired):
                fleet.wait(timeout=20)
    return 0


def _shutdown(procs: list[tuple[str, subprocess.Popen[bytes]]], broker: LocalBroker) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C or SIGTERM must not leave orphans
        signal.signal(sig, signal.SIG_IGN)
    for _name, proc in reversed(procs):
        stop_process(proc, timeout=10)
    broker.stop()


def _wait_http(url: str, timeout: float) -> bool:
    """Poll ``url`` until it answers 200 (bounded); the banner should not promise a page that is not up yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return True
        time.sleep(0.2)
    return False


def _print_banner(work: Path, broker: LocalBroker, substations: list[str], api_url: str,
                  metrics: dict[str, int], influx_url: str | None, public_reads: str = "true",
                  speedup: float = 1.0) -> None:
    creds = work / "credentials.env"
    scrape = "\n".join(f"              http://127.0.0.1:{port}/metrics  ({service})"
                       for service, port in metrics.items())
    first = substations[0] if substations else "north"
    topics = Topics(broker.prefix)
    recorder = (f"recording to {influx_url} (log {work / 'logs' / 'recorder.log'})" if influx_url
                else "off (set INFLUX_URL to record telemetry to InfluxDB / VictoriaMetrics)")
    reads_open = public_reads.strip().lower() in ("1", "true", "yes", "on")
    read = "" if reads_open else ' -H "Authorization: Bearer $API_VIEWER_TOKEN"'
    reads = ("reads open (loopback only; API_PUBLIC_READS=false closes them)" if reads_open
             else "reads need $API_VIEWER_TOKEN (API_PUBLIC_READS=false)")
    if speedup == 1:
        clock = "real time (--speedup 1)"
    else:
        clock = (f"{speedup:g}x real time: one real second is {speedup:g} simulated seconds, so a 120-minute "
                 f"session ends after {120 / speedup:.3g} real minutes (--speedup 1 for real time)")
    print(f"""
Smart Grid Load Balancer is running locally.
  simulation  {clock}
  live page   {api_url}/   (status API: {api_url}/status, OpenAPI docs: {api_url}/docs)
  broker      mqtt://{broker.host}:{broker.port}  (private Mosquitto, log {broker.log_file})
  substations {', '.join(substations)}  (accounts {', '.join(substation_username(s) for s in substations)})
  metrics     {api_url}/metrics  (api)
{scrape}
  recorder    {recorder}
  dashboards  Grafana and Prometheus come with docker compose (README: "Metrics, alerts and Grafana")
  logs        {work / 'logs'}/
  credentials {creds}  (MQTT passwords; API bearer tokens: API_TOKEN operator,
              API_EV_TOKEN acts for {HAND_TEST_EV} only, API_VIEWER_TOKEN reads)
  API access  every write needs a token; {reads}

Watch everything (another terminal):
  source {creds}
  mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -u observer -P "$OBSERVER_PASSWORD" -t '{topics.prefix}/#' -v
Ask the API (every write needs a token):
  source {creds}
  curl -s{read} {api_url}/status
  curl -s -X POST -H "Authorization: Bearer $API_EV_TOKEN" -H 'Content-Type: application/json' {api_url}/charge \\
    -d '{{"ev_id": "{HAND_TEST_EV}", "requested_kw": 22, "duration_minutes": 120}}'   # {HAND_TEST_EV}'s own token
  curl -s -X DELETE -H "Authorization: Bearer $API_EV_TOKEN" {api_url}/evs/{HAND_TEST_EV}/request   # and stop it
  curl -s -X POST -H "Authorization: Bearer $API_TOKEN" {api_url}/substations/{first}/drain     # operator; back:
  curl -s -X POST -H "Authorization: Bearer $API_TOKEN" {api_url}/substations/{first}/undrain
Ask for power by hand:
  mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -u {HAND_TEST_EV} -P "${HAND_TEST_EV}_PASSWORD" -q 1 \\
    -t {topics.request(HAND_TEST_EV)} -m '{{"ev_id": "{HAND_TEST_EV}", "requested_kw": 22, "duration_minutes": 120}}'
Add a substation while it runs (a broker account is created; it prints the password once and the agent's command):
  .venv/bin/python -m api.admin substation add east --capacity 300
  .venv/bin/python -m api.admin substation remove east     # drain, revoke, move its sessions, forget it
Ctrl-C stops everything.
""", flush=True)


if __name__ == "__main__":
    sys.exit(main())
