"""Crash figures (issue 9): what a broker kill -9 and a balancer kill -9 cost a grid under load, measured.

    python -m bench faults [--evs 100] [--down-s 2]

A private Mosquitto (project config, ACL, persistence) with ``python -m balancer`` and ``python -m
substation_agents`` (3 substations) as shipped; ``--evs`` EVs charge through the ``loadtest`` account. Then:

1. broker ``kill -9``, restarted ``--down-s`` later on the same port and data directory: sessions kept, sessions
   ended, EVs told anything, and how long until every agent has re-announced its inventory;
2. balancer ``kill -9``; while it is down half of the EVs release and the other half re-send their request (the
   same request id); restarted ``--down-s`` later: releases honoured, sessions given back, second sessions, and
   how long the restarted balancer held input before acting.

An observer records every message (``observer`` account). The tests in tests/integration/test_faults.py prove the
same promises at a smaller size; this prints the figures quoted in docs/protocol.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.report import save_json
from broker.local import LocalBroker
from grid_runtime.lifecycle import stop_process

P = "grid/v1"
SUBSTATIONS = "north:400,central:300,south:250"
SECRET = "bench-faults"


class Watch:
    """Every message under the prefix, with its arrival time (a paho thread)."""

    def __init__(self, broker: LocalBroker, username: str = "observer") -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        c.username_pw_set(username, broker.password_for(username))
        c.on_message = lambda _c, _u, m: self._add(m)
        c.on_connect = lambda cl, *_a: cl.subscribe(f"{P}/#", 1)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        self.client = c

    def _add(self, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((time.monotonic(), m.topic, bytes(m.payload)))

    def since(self, t0: float, pred: Callable[[str, dict[str, Any]], bool]) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            msgs = [m for m in self.messages if m[0] >= t0]
        out = []
        for at, topic, payload in msgs:
            try:
                body = json.loads(payload) if payload else {}
            except ValueError:
                continue
            if pred(topic, body):
                out.append((at, body))
        return out

    def wait(self, t0: float, pred: Callable[[str, dict[str, Any]], bool], count: int = 1,
             timeout: float = 30.0) -> list[tuple[float, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.since(t0, pred)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise TimeoutError(f"{count} expected, {len(self.since(t0, pred))} seen")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _service(module: str, broker: LocalBroker, logs: Path, **env: str) -> subprocess.Popen[bytes]:
    full = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), LOG_LEVEL="INFO",
                METRICS_PORT="0", **env)
    log = open(logs / f"{module}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", module], env=full, stdout=log, stderr=subprocess.STDOUT)


def _balancer(broker: LocalBroker, logs: Path) -> subprocess.Popen[bytes]:
    return _service("balancer", broker, logs, MQTT_USERNAME="balancer", MQTT_PASSWORD=broker.password_for("balancer"))


def _publish_all(broker: LocalBroker, items: list[tuple[str, dict[str, Any]]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="loadtest", protocol=mqtt.MQTTv5)
    c.username_pw_set("loadtest", broker.password_for("loadtest"))
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    infos = [c.publish(topic, json.dumps(body), qos=1) for topic, body in items]
    for info in infos:
        info.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()


def _is(kind: str, status: str | None = None) -> Callable[[str, dict[str, Any]], bool]:
    return lambda topic, body: topic.endswith(kind) and (status is None or body.get("status") == status
                                                         or body.get("event") == status)


def start_sessions(broker: LocalBroker, watch: Watch, n: int) -> dict[str, tuple[str, str]]:
    t0 = time.monotonic()
    evs = [f"EV_{i:04d}" for i in range(1, n + 1)]
    _publish_all(broker, [(f"{P}/ev/{ev}/request", {"request_id": f"r-{ev}", "requested_kw": 7.4, "min_kw": 7.4,
                                                    "duration_minutes": 600}) for ev in evs])
    assigned = watch.wait(t0, _is("/assignment", "assigned"), count=n)
    sessions = {body["ev_id"]: (body["session_id"], body["substation_id"]) for _, body in assigned}
    watch.wait(t0, _is("/session", "started"), count=n)
    return sessions


def broker_crash(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    evs = [f"EV_{i:04d}" for i in range(1, args.evs + 1)]
    with LocalBroker(tmp / "b1", substation_ids=["north", "central", "south"], ev_ids=evs, secret=SECRET) as broker:
        bal = _balancer(broker, tmp)
        agents = _service("substation_agents", broker, tmp, MQTT_ACCOUNT_SECRET=SECRET, SUBSTATIONS=SUBSTATIONS,
                          SUBSTATION_BASE_LOAD_PCT="10", SUBSTATION_INTERVAL_S="0.5")
        watch = Watch(broker)
        try:
            watch.wait(0, _is("/telemetry"), count=6)
            sessions = start_sessions(broker, watch, args.evs)
            watch.close()
            crashed = time.monotonic()
            broker.restart(crash=True, down_s=args.down_s)
            up = time.monotonic()
            watch = Watch(broker)
            inventories = watch.wait(up, lambda t, b: t.endswith("/status") and b.get("announced_for") is not None
                                     and "/substation/" in t, count=3)
            time.sleep(12.0)  # past a whole lease: a dropped or unrenewed session would show by now
            ended = watch.since(up, _is("/session", "ended"))
            told = [b for _, b in watch.since(up, _is("/assignment")) if b["status"] in ("completed", "revoked")]
            states = {b["substation_id"]: b for _, b in watch.since(up, lambda t, b: t.endswith("/state"))}
            kept = sum(1 for sid, _ in sessions.values()
                       if any(s["session_id"] == sid for st in states.values() for s in st["sessions"]))
            totals = sum(st["sessions_total"] for st in states.values())
            return {"sessions_before": len(sessions), "sessions_kept": kept, "sessions_total_after": totals,
                    "ended_events": len(ended), "evs_told_completed_or_revoked": len(told),
                    "down_s": round(up - crashed, 2),
                    "inventories_closed_s": round(max(at for at, _ in inventories) - up, 2)}
        finally:
            watch.close()
            stop_process(bal, 10)
            stop_process(agents, 10)


def balancer_crash(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    evs = [f"EV_{i:04d}" for i in range(1, args.evs + 1)]
    with LocalBroker(tmp / "b2", substation_ids=["north", "central", "south"], ev_ids=evs, secret=SECRET) as broker:
        bal = _balancer(broker, tmp)
        agents = _service("substation_agents", broker, tmp, MQTT_ACCOUNT_SECRET=SECRET, SUBSTATIONS=SUBSTATIONS,
                          SUBSTATION_BASE_LOAD_PCT="10", SUBSTATION_INTERVAL_S="0.5")
        watch = Watch(broker)
        second = None
        try:
            watch.wait(0, _is("/telemetry"), count=6)
            sessions = start_sessions(broker, watch, args.evs)
            leaving, staying = evs[: len(evs) // 2], evs[len(evs) // 2:]
            killed = time.monotonic()
            bal.send_signal(signal.SIGKILL)
            bal.wait(10)
            watch.wait(killed, lambda t, b: t.endswith("/balancer/status") and b.get("state") == "offline")
            _publish_all(broker, [(f"{P}/ev/{ev}/release", {}) for ev in leaving]
                         + [(f"{P}/ev/{ev}/request", {"request_id": f"r-{ev}", "requested_kw": 7.4, "min_kw": 7.4,
                                                     "duration_minutes": 600}) for ev in staying])
            time.sleep(max(0.0, args.down_s - (time.monotonic() - killed)))
            restarted = time.monotonic()
            second = _balancer(broker, tmp)
            done = watch.wait(restarted, lambda t, b: t.endswith("/assignment") and b["ev_id"] in leaving
                              and b["status"] == "completed", count=len(leaving), timeout=60)
            back = watch.wait(restarted, lambda t, b: t.endswith("/assignment") and b["ev_id"] in staying,
                              count=len(staying), timeout=60)
            time.sleep(1.0)
            honoured = sum(1 for _, b in done if b["session_id"] == sessions[b["ev_id"]][0])
            same = sum(1 for _, b in back if b["status"] == "assigned" and b["session_id"] == sessions[b["ev_id"]][0])
            commands = [c for _, b in watch.since(restarted, _is("/command")) for c in b["commands"]]
            online = watch.wait(restarted, lambda t, b: t.endswith("/balancer/status") and b.get("state") == "online")
            return {"sessions_before": len(sessions), "releases_sent": len(leaving), "releases_honoured": honoured,
                    "stops_sent": sum(1 for c in commands if c["command"] == "stop"),
                    "requests_resent": len(staying), "same_session_back": same,
                    "second_sessions": sum(1 for c in commands if c["command"] == "start"),
                    "rejected": len([b for _, b in watch.since(restarted, _is("/assignment", "rejected"))]),
                    "process_start_to_online_s": round(online[0][0] - restarted, 2),
                    "online_to_last_release_answer_s": round(max(at for at, _ in done) - online[0][0], 3),
                    "lease_pause_s": args.down_s}
        finally:
            watch.close()
            stop_process(bal, 10)
            if second is not None:
                stop_process(second, 10)
            stop_process(agents, 10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--evs", type=int, default=100, help="7.4 kW sessions; 100 fit in the 3 substations")
    p.add_argument("--down-s", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=Path("bench/results/faults.json"))
    p.add_argument("--keep", type=Path, default=None, help="keep the logs and broker files in this directory")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gridlb-faults-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        broker = broker_crash(args, work)
        balancer = balancer_crash(args, work)
    print(f"\nbroker kill -9, down {broker['down_s']} s: {broker['sessions_kept']} of {broker['sessions_before']} "
          f"sessions kept, {broker['ended_events']} ended, {broker['evs_told_completed_or_revoked']} EVs told "
          f"completed/revoked; every agent re-announced {broker['inventories_closed_s']} s after the restart")
    print(f"balancer kill -9, down {args.down_s:g} s: {balancer['releases_honoured']} of {balancer['releases_sent']} "
          f"releases honoured ({balancer['stops_sent']} stops), {balancer['same_session_back']} of "
          f"{balancer['requests_resent']} re-sent requests got their own session back, "
          f"{balancer['second_sessions']} second sessions, {balancer['rejected']} rejected; online "
          f"{balancer['process_start_to_online_s']} s after start, last release answered "
          f"{balancer['online_to_last_release_answer_s']} s after that")
    save_json(args.json, args, broker_crash=broker, balancer_crash=balancer)
    return 0
