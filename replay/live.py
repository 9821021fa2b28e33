"""Live replay: a scenario through the real broker, balancer, substation agents and EV clients, sped up.

:func:`run_live` starts, in a temporary work directory:

1. a private Mosquitto (:class:`broker.local.LocalBroker`: the project's config and ACL, a free loopback port)
   with an account for every substation and every EV of the scenario;
2. an observer (MQTT account ``observer``) that records every message under the topic prefix with its
   arrival time: telemetry, statuses (and last wills), requests, releases, assignments, commands, session
   events;
3. ``python -m balancer`` with the policy (``BALANCER_ALLOW_BASELINES=true`` for the baselines) and its
   timing settings scaled to the speed-up (:func:`balancer_env`);
4. ``python -m substation_agents`` with ``SUBSTATION_SCENARIO``: one agent per substation of the scenario,
   its base load, its events (offline = the link dies and the broker publishes the agent's last will;
   capacity changes with their notice), telemetry every ``interval_s`` sped up (at least
   :data:`MIN_TELEMETRY_INTERVAL_S`) and ``lag_s`` late;
5. ``python -m ev_clients scenario``: every EV of the scenario on its own MQTT connection, asking at its
   arrival, releasing at its departure.

Scenario time 0 is a wall time a few seconds after the agents start (:data:`STARTUP_S`), the same for the
agents and the EVs. The run ends when every EV is done and the scenario's duration has passed; then the
services are stopped (agents, balancer, broker) and the recording is turned into the same metrics as the
fast simulation (:mod:`replay.recording`, :mod:`replay.metrics`).

The speed-up defaults to what plays the whole run (until the last departure) in about
:data:`DEFAULT_TARGET_WALL_S` seconds; every shipped scenario then takes under a minute of wall time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker
from grid_protocol.topics import DEFAULT_PREFIX
from grid_runtime.lifecycle import stop_process
from grid_sim.scenario import EvSpec, Scenario, generate_evs
from grid_sim.timeline import Timebase, auto_speedup, event_labels, run_span
from replay.metrics import compute_metrics
from replay.recording import Recorded, convert
from replay.sim import RunResult

__all__ = [
    "DEFAULT_TARGET_WALL_S",
    "LiveError",
    "LivePlan",
    "LiveRun",
    "balancer_env",
    "plan_live",
    "run_live",
]

ROOT = Path(__file__).resolve().parents[1]
#: Wall seconds a whole run (until the last EV has left) should take by default.
DEFAULT_TARGET_WALL_S = 40.0
#: Shortest telemetry interval of the agents (wall seconds): the balancer handles every message, and the
#: recorder keeps them all.
MIN_TELEMETRY_INTERVAL_S = 0.01
#: Scenario time 0 comes this long after the agents are started (they connect, the EVs connect ``lead_s``
#: before they arrive).
STARTUP_S = 4.0
#: Each EV connects this long (wall seconds) before it arrives.
EV_LEAD_S = 2.0
#: Bounds of the waits for the services.
SERVICE_UP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
#: After its last departure an EV may still need this long to release (retries are bounded).
FLEET_SLACK_S = 60.0
#: Environment variables the services read: a service sees only what the run sets.
_SERVICE_ENV_PREFIXES = ("MQTT_", "EV_", "SUBSTATION", "SIM_", "BALANCER_", "GRID_", "LOG_", "METRICS_", "API_")


class LiveError(RuntimeError):
    """A live run could not be done (a service did not come up, or died); the message says which and where."""


@dataclass(frozen=True, slots=True)
class LivePlan:
    """Everything decided before a live run starts (pure)."""

    scenario: Scenario
    policy: str
    seed: int
    speedup: float
    evs: list[EvSpec]
    #: scenario seconds until everything has happened (the end or the last departure)
    span_s: float
    telemetry_interval_s: float
    balancer_env: dict[str, str]

    @property
    def expected_wall_s(self) -> float:
        return self.span_s / self.speedup


def balancer_env(policy: str, speedup: float, telemetry_interval_s: float, step_s: float = 1.0) -> dict[str, str]:
    """The balancer's settings for a live run at ``speedup``: its defaults are scenario seconds, so they are
    divided by the speed-up, but never below what the wall clock allows (the agents report every
    ``telemetry_interval_s`` wall seconds, so a substation is stale only after missing several reports, and a
    lease must outlive scheduling hiccups)."""
    def scaled(scenario_s: float) -> float:
        return scenario_s / speedup

    stale = max(scaled(5.0), 10 * telemetry_interval_s, 0.25)
    values = {
        "BALANCER_POLICY": policy,
        "BALANCER_ALLOW_BASELINES": "true",
        "BALANCER_STALE_AFTER_S": stale,
        "BALANCER_LOST_AFTER_S": max(scaled(30.0), 4 * stale),
        "BALANCER_MIN_HOLD_S": scaled(10.0),
        "BALANCER_OVERTAKE_GUARD_S": scaled(30.0),
        "BALANCER_LEASE_S": max(scaled(10.0), 2.0),
        "BALANCER_TICK_INTERVAL_S": max(scaled(step_s), 0.05),
        "BALANCER_REBALANCE_INTERVAL_S": max(scaled(1.0), 0.05),
        "BALANCER_QUEUE_UPDATE_INTERVAL_S": max(scaled(5.0), 0.05),
        "BALANCER_POLL_INTERVAL_S": max(scaled(5.0), 0.05),
        "BALANCER_STATS_INTERVAL_S": 10.0,
    }
    return {k: v if isinstance(v, str) else f"{v:.6g}" for k, v in values.items()}


def plan_live(scenario: Scenario, policy: str, *, speedup: float | None = None, seed: int | None = None,
              target_wall_s: float = DEFAULT_TARGET_WALL_S) -> LivePlan:
    """The EVs (from the seed), the speed-up (``None``: the run in about ``target_wall_s``) and the settings."""
    seed = scenario.seed if seed is None else seed
    if seed != scenario.seed:
        scenario = scenario.model_copy(update={"seed": seed})
    evs = generate_evs(scenario)
    span = run_span(scenario, evs)
    speedup = auto_speedup(span, target_wall_s) if speedup is None else speedup
    if not (speedup > 0 and math.isfinite(speedup)):
        raise ValueError(f"speed-up must be > 0, got {speedup!r}")
    interval = max(MIN_TELEMETRY_INTERVAL_S, scenario.telemetry.interval_s / speedup)
    return LivePlan(scenario, policy, seed, speedup, evs, span, interval,
                    balancer_env(policy, speedup, interval, scenario.step_s))


@dataclass(slots=True)
class LiveRun:
    """A finished live run: the result (as the simulation's, for the same table/JSON/plots) and what it took."""

    result: RunResult
    info: dict[str, Any] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- plumbing
class Observer:
    """A paho client (account ``observer``, read-only) recording every message under the prefix."""

    def __init__(self, broker: LocalBroker, prefix: str = DEFAULT_PREFIX) -> None:
        self.messages: list[Recorded] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv5)
        client.username_pw_set("observer", broker.password_for("observer"))
        client.on_connect = lambda c, _u, _f, rc, _p: self._connected.set() if not rc.is_failure else None
        client.on_subscribe = lambda *_a: self._subscribed.set()
        client.on_message = self._on_message
        self.client = client
        self.prefix = prefix
        self.broker = broker

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        record = Recorded(time.time(), msg.topic, bytes(msg.payload))
        with self._lock:
            self.messages.append(record)

    def start(self, timeout: float = 10.0) -> Observer:
        self.client.connect(self.broker.host, self.broker.port, keepalive=60)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise LiveError("the observer could not connect to the broker")
        self.client.subscribe(f"{self.prefix}/#", qos=1)
        if not self._subscribed.wait(timeout):
            raise LiveError("the observer's subscription was not acknowledged")
        return self

    def snapshot(self) -> list[Recorded]:
        with self._lock:
            return list(self.messages)

    def wait_until(self, predicate: Callable[[list[Recorded]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.05)
        return predicate(self.snapshot())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


class _Service:
    """One project service as a user starts it: ``python -m <module>``, configured by its environment."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *args], env=dict(env), cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # a Ctrl-C reaches the orchestrator only

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout``; the exit code."""
        return stop_process(self.proc, timeout)


def _service_env(broker: LocalBroker, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_ENV_PREFIXES)}
    # METRICS_PORT=0: each service's /metrics on a free port, never a fixed one another run may hold.
    env.update(MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), LOG_FORMAT="json", LOG_LEVEL="INFO", METRICS_PORT="0",
               PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                                if p))
    if os.environ.get("MQTT_PROTOCOL"):  # (its own Mosquitto speaks both: MQTT_PROTOCOL=3.1.1 runs it all on 3.1.1)
        env["MQTT_PROTOCOL"] = os.environ["MQTT_PROTOCOL"]
    env.update(extra)
    return env


def _raise_fd_limit(needed: int) -> None:
    """One socket per EV in the fleet and in Mosquitto (children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _statuses(messages: list[Recorded], topic_prefix: str) -> dict[str, str]:
    """Latest state per status topic (``.../balancer/status``, ``.../substation/<id>/status``)."""
    out: dict[str, str] = {}
    for m in messages:
        if m.topic.startswith(topic_prefix) and m.topic.endswith("/status") and m.payload:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                out[m.topic] = json.loads(m.payload).get("state", "")
    return out


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="replay-live-") as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------------------------------------- the run
def run_live(scenario: Scenario, policy: str, *, speedup: float | None = None, seed: int | None = None,
             target_wall_s: float = DEFAULT_TARGET_WALL_S, work_dir: Path | None = None,
             progress: TextIO | None = None) -> LiveRun:
    """Run ``scenario`` live against ``policy``; raises :class:`LiveError` when a service fails.

    ``work_dir``: where the broker's files, the services' logs and the EV fleet's JSON go (kept); default a
    temporary directory, removed afterwards.
    """
    plan = plan_live(scenario, policy, speedup=speedup, seed=seed, target_wall_s=target_wall_s)
    out = progress if progress is not None else sys.stderr

    def say(text: str) -> None:
        print(f"  live: {text}", file=out, flush=True)

    started = time.monotonic()
    with _work_dir(work_dir) as work:
        return _run(plan, work, say, started, keep=work_dir is not None)


def _save_recording(path: Path, messages: list[Recorded]) -> None:
    """One JSON line per message (``at`` epoch seconds, ``topic``, ``payload`` as text): replayable into
    :func:`replay.recording.convert`."""
    with open(path, "w", encoding="utf-8") as fh:
        for m in messages:
            fh.write(json.dumps({"at": m.at, "topic": m.topic, "payload": m.payload.decode("utf-8", "replace")}))
            fh.write("\n")


def _run(plan: LivePlan, work: Path, say: Callable[[str], None], started: float, *, keep: bool) -> LiveRun:
    sc = plan.scenario
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scenario_file = work / "scenario.json"
    scenario_file.write_text(json.dumps(sc.model_dump(mode="json", by_alias=True), indent=1), encoding="utf-8")
    fleet_file = work / "evs.json"
    ev_ids = [ev.ev_id for ev in plan.evs]
    _raise_fd_limit(2 * len(ev_ids) + 512)
    secret = secrets.token_hex(16)
    broker = LocalBroker(work / "broker", substation_ids=[s.id for s in sc.substations], ev_ids=ev_ids,
                         secret=secret)
    services: list[_Service] = []
    observer: Observer | None = None
    codes: dict[str, int | None] = {}
    try:
        broker.start()
        say(f"broker on {broker.host}:{broker.port}, {len(ev_ids)} EVs, {len(sc.substations)} substations, "
            f"speed-up {plan.speedup:g}x (~{plan.expected_wall_s:.0f} s for {plan.span_s / 3600:.1f} h)")
        observer = Observer(broker).start()
        balancer = _Service("balancer", ["-m", "balancer"], _service_env(
            broker, MQTT_USERNAME="balancer", MQTT_PASSWORD=broker.password_for("balancer"),
            # the run's own operator settings: the scenario's drains must not outlive it (nor a previous run's
            # reach it through the default state file)
            BALANCER_STATE_FILE=str(logs.parent / "operator-settings.json"), **plan.balancer_env),
            logs)
        services.append(balancer)
        balancer_topic = f"{DEFAULT_PREFIX}/balancer/status"
        if not observer.wait_until(lambda ms: _statuses(ms, DEFAULT_PREFIX).get(balancer_topic) == "online",
                                   SERVICE_UP_TIMEOUT_S):
            raise LiveError(f"the balancer did not come online; its log:\n{balancer.tail()}")

        t0 = time.time() + STARTUP_S
        timebase = Timebase(t0, plan.speedup)
        agents = _Service("substation_agents", ["-m", "substation_agents"], _service_env(
            broker, MQTT_ACCOUNT_SECRET=secret, SUBSTATION_SCENARIO=str(scenario_file),
            SUBSTATION_SCENARIO_START=f"{t0:.6f}", SIM_SPEEDUP=f"{plan.speedup:g}",
            SUBSTATION_INTERVAL_S=f"{plan.telemetry_interval_s:.6g}"), logs)
        services.append(agents)
        wanted = {f"{DEFAULT_PREFIX}/substation/{s.id}/status" for s in sc.substations}
        if not observer.wait_until(lambda ms: all(_statuses(ms, DEFAULT_PREFIX).get(t) == "online" for t in wanted),
                                   SERVICE_UP_TIMEOUT_S):
            raise LiveError(f"the substation agents did not come online; their log:\n{agents.tail()}")
        fleet = _Service("ev_clients", [
            "-m", "ev_clients", "scenario", "--scenario", str(scenario_file), "--start-at", f"{t0:.6f}",
            "--speedup", f"{plan.speedup:g}", "--lead", f"{EV_LEAD_S:g}", "--save", str(fleet_file),
            "--retry-after", "2", "--report-every", "0"], _service_env(broker, MQTT_ACCOUNT_SECRET=secret), logs)
        services.append(fleet)
        say(f"scenario time 0 at +{t0 - time.time():.1f} s; agents, balancer ({plan.policy}) and EV fleet running")

        deadline = timebase.wall(plan.span_s) + FLEET_SLACK_S
        end_at_least = timebase.wall(sc.duration_s)
        while fleet.alive() and time.time() < deadline:
            for s in (balancer, agents):
                if not s.alive():
                    raise LiveError(f"{s.name} exited with {s.proc.returncode} during the run; its log:\n{s.tail()}")
            time.sleep(0.1)
        if fleet.alive():
            say("the EV fleet overran its deadline: stopping it (EVs release what they hold)")
            codes["ev_clients"] = fleet.stop(timeout=30.0)
        while time.time() < end_at_least:
            time.sleep(min(0.1, end_at_least - time.time()))
        time.sleep(max(0.3, 5 * plan.telemetry_interval_s))  # the last session events and measurements
        end_wall = time.time()
        codes["ev_clients"] = fleet.proc.wait(STOP_TIMEOUT_S)
        codes["substation_agents"] = agents.stop()
        codes["balancer"] = balancer.stop()
    finally:
        for s in reversed(services):
            if s.alive():
                codes.setdefault(s.name, s.stop())
        if observer is not None:
            observer.close()
        broker.stop()
    wall = time.monotonic() - started
    assert observer is not None
    messages = observer.snapshot()
    if keep:
        _save_recording(work / "recording.jsonl", messages)
    end_s = timebase.scenario(end_wall)
    data = convert(messages, sc, plan.evs, timebase, end_s=end_s)
    metrics = compute_metrics(data.trace, data.evs)
    fleet_doc: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        fleet_doc = json.loads(fleet_file.read_text(encoding="utf-8"))
    anomalies = dict(data.anomalies)
    not_closed = fleet_doc.get("not_closed")
    if not_closed:
        anomalies["fleet:ev_not_closed"] = len(not_closed)
    for name, code in codes.items():
        if code not in (0, None):
            anomalies[f"exit_code:{name}"] = code
    result = RunResult(
        scenario=sc.name, policy=plan.policy, seed=plan.seed, start_hour=sc.start_hour, duration_s=sc.duration_s,
        trace=data.trace, evs=data.evs, metrics=metrics, events=event_labels(sc), counters=data.counters,
        anomalies=dict(sorted(anomalies.items())), notes=data.notes, core_violations=0,
        open_requests_at_end=len(data.lost), sim_seconds=end_s, wall_seconds=wall)
    info: dict[str, Any] = {
        "speedup": plan.speedup, "span_s": plan.span_s, "messages_recorded": len(messages),
        "telemetry_interval_wall_s": plan.telemetry_interval_s,
        "telemetry_lag_wall_s": sc.telemetry.lag_s / plan.speedup, "balancer_env": plan.balancer_env,
        "exit_codes": codes, "lost_evs": data.lost[:50], "fleet": fleet_doc.get("summary"),
        "core_violation_samples": None,  # not observable from outside the balancer
    }
    say(f"done in {wall:.1f} s: {len(messages)} messages recorded, {end_s / 3600:.2f} h of scenario time")
    return LiveRun(result, info, data.lost)
