"""Failover time (issue 12): ``kill -9`` of the active balancer, again and again, with a standby in cluster mode.

    python -m bench failover [--kills 10] [--lease-s 3] [--evs 20] [--broker mosquitto|cluster]

Two ``python -m balancer`` processes in cluster mode share the region ``default`` (lease in NATS KV), with
``python -m substation_agents`` (2 substations) and ``--evs`` running sessions. MQTT: the project's Mosquitto and
one nats-server for the KV (``mosquitto``), or the project's 3-node NATS cluster for both, on MQTT 3.1.1 with R3
buckets (``cluster``). Each round kills the active balancer with ``SIGKILL`` and, at once, sends a new EV's request;
then measures, from the kill:

* **online**: the standby's retained ``online`` status (it holds the lease and the MQTT session);
* **answered**: the new EV's first answer (``queued`` or ``assigned``: the standby acts on input);
* **assigned**: the new EV's assignment (a fresh owner treats a substation's load as unknown until its telemetry);

and counts sessions ended (none may be: every running session is adopted) and telemetry above capacity
(overload-seconds). The killed process is started again as the next standby. The figures are quoted in
docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.faults import Watch, _is
from bench.report import save_json
from broker.local import LocalBroker
from broker.nats_single import NatsServer
from grid_runtime.lifecycle import stop_process

P = "grid/v1"
SECRET = "bench-failover"
CAPACITY = {"A": 300.0, "B": 300.0}


class Grid:
    """Where the services connect: MQTT address(es) and protocol, NATS URLs, passwords."""

    def __init__(self, kind: str, work: Path, evs: list[str], stack: ExitStack) -> None:
        self.kind = kind
        if kind == "mosquitto":
            broker = stack.enter_context(LocalBroker(work / "mosquitto", substation_ids=list(CAPACITY), ev_ids=evs,
                                                     secret=SECRET))
            nats = NatsServer(work / "nats").start()
            stack.callback(nats.stop)
            self.mqtt = broker
            self.env = {"MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port)}
            self.nats_urls = nats.url
            self.protocol = mqtt.MQTTv5
            self.replicas = "1"
        else:
            from broker.nats.cluster import LocalCluster

            cluster = LocalCluster(work / "cluster", substation_ids=list(CAPACITY), ev_ids=evs, secret=SECRET)
            cluster.start()
            stack.callback(cluster.stop)
            self.mqtt = cluster.nodes[1]  # the observer and the load on node 2
            self.env = {"MQTT_HOSTS": cluster.mqtt_hosts, "MQTT_PROTOCOL": "3.1.1"}
            self.nats_urls = cluster.nats_urls
            self.protocol = mqtt.MQTTv311
            self.replicas = "3"
        self.password_for = self.mqtt.password_for

    def service(self, module: str, logs: Path, **env: str) -> subprocess.Popen[bytes]:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "BALANCER_", "SUBSTATION"))}
        full.update(self.env, LOG_LEVEL="INFO", METRICS_PORT="0", LOG_FORMAT="text", **env)
        log = open(logs / f"{module}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - the child writes it
        return subprocess.Popen([sys.executable, "-m", module], env=full, stdout=log, stderr=subprocess.STDOUT)

    def balancer(self, logs: Path, lease_s: float) -> subprocess.Popen[bytes]:
        return self.service("balancer", logs, MQTT_USERNAME="balancer", MQTT_PASSWORD=self.password_for("balancer"),
                            BALANCER_NATS_URLS=self.nats_urls, BALANCER_NATS_REPLICAS=self.replicas,
                            BALANCER_LEASE_S=str(lease_s), BALANCER_TICK_INTERVAL_S="0.1",
                            BALANCER_STARTUP_WAIT_S=str(lease_s), BALANCER_STALE_AFTER_S="30",
                            BALANCER_STATE_FILE="")

    def publish(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="loadtest", protocol=self.protocol)
        c.username_pw_set("loadtest", self.password_for("loadtest"))
        c.connect(self.mqtt.host, self.mqtt.port)
        c.loop_start()
        for info in [c.publish(topic, json.dumps(body), qos=1) for topic, body in items]:
            info.wait_for_publish(30)
        c.disconnect()
        c.loop_stop()


def _request(ev: str, rid: str) -> dict[str, Any]:
    return {"request_id": rid, "requested_kw": 7.4, "min_kw": 7.4, "duration_minutes": 600}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    evs = [f"EV_{i:04d}" for i in range(1, args.evs + 1)]
    newcomers = [f"EV_{i:04d}" for i in range(args.evs + 1, args.evs + 1 + args.kills)]
    with ExitStack() as stack:
        grid = Grid(args.broker, work, evs + newcomers, stack)
        # (bench.faults.Watch speaks MQTT 5; NATS only 3.1.1)
        watch = _watch311(grid) if grid.protocol == mqtt.MQTTv311 else Watch(grid.mqtt)  # type: ignore[arg-type]
        stack.callback(watch.close)
        agents = grid.service("substation_agents", work, MQTT_ACCOUNT_SECRET=SECRET, SUBSTATION_INTERVAL_S="0.2",
                              SUBSTATIONS=",".join(f"{k}:{v:g}" for k, v in CAPACITY.items()),
                              SUBSTATION_BASE_LOAD_PCT="10")
        stack.callback(stop_process, agents, 10)
        active = grid.balancer(work, args.lease_s)
        # (not its retained online status: a NATS subscriber that comes early may miss retained messages)
        watch.wait(0, _is("/telemetry"), count=4, timeout=60)
        time.sleep(args.lease_s)  # the first one holds the lease
        standby = grid.balancer(work, args.lease_s)
        procs = [active, standby]
        stack.callback(lambda: [stop_process(p, 10) for p in procs])
        watch.wait(0, _is("/telemetry"), count=4, timeout=60)
        t0 = time.monotonic()
        grid.publish([(f"{P}/ev/{ev}/request", _request(ev, f"r-{ev}")) for ev in evs])
        watch.wait(t0, _is("/session", "started"), count=len(evs), timeout=60)
        rounds: list[dict[str, float]] = []
        for n, ev in enumerate(newcomers):
            time.sleep(args.lease_s)  # the standby is up and polling
            online_before = watch.since(0, lambda t, b: t.endswith("/balancer/status") and b.get("state") == "online")
            old = online_before[-1][1]["instance"] if online_before else None
            killed = time.monotonic()
            active.send_signal(signal.SIGKILL)
            grid.publish([(f"{P}/ev/{ev}/request", _request(ev, f"new-{n}"))])
            online = watch.wait(killed, lambda t, b, old=old: t.endswith("/balancer/status")
                                and b.get("state") == "online" and b.get("instance") != old,
                                timeout=args.lease_s + 30)
            answered = watch.wait(killed, lambda t, b, ev=ev: t == f"{P}/ev/{ev}/assignment",
                                  timeout=args.lease_s + 30)
            assigned = watch.wait(killed, lambda t, b, ev=ev: t == f"{P}/ev/{ev}/assignment"
                                  and b.get("status") == "assigned", timeout=args.lease_s + 30)
            rounds.append({"online_s": online[0][0] - killed, "answered_s": answered[0][0] - killed,
                           "assigned_s": assigned[0][0] - killed})
            print(f"kill {n + 1}: online {rounds[-1]['online_s']:.2f} s, answered {rounds[-1]['answered_s']:.2f} s, "
                  f"assigned {rounds[-1]['assigned_s']:.2f} s", flush=True)
            active.wait(10)
            procs.remove(active)
            active, standby = standby, grid.balancer(work, args.lease_s)
            procs.append(standby)
        time.sleep(1.0)
        ended = watch.since(0, _is("/session", "ended"))
        over = [b for _, b in watch.since(0, _is("/telemetry")) if b["load_kw"] > CAPACITY[b["substation_id"]]]
        second = [b for _, b in watch.since(0, _is("/assignment", "assigned")) if b["ev_id"] in evs
                  and b["request_id"] != f"r-{b['ev_id']}"]

    def stats(key: str) -> dict[str, float]:
        values = [r[key] for r in rounds]
        return {"p50": round(statistics.median(values), 2), "max": round(max(values), 2),
                "min": round(min(values), 2)}

    return {"broker": args.broker, "kills": len(rounds), "lease_s": args.lease_s, "sessions": len(evs),
            "online": stats("online_s"), "answered": stats("answered_s"), "assigned": stats("assigned_s"),
            "sessions_ended": len(ended), "overload_telemetry": len(over), "second_sessions": len(second),
            "rounds": rounds}


def _watch311(grid: Grid) -> Watch:
    """The bench's Watch on MQTT 3.1.1 (NATS)."""
    from paho.mqtt.enums import CallbackAPIVersion

    w = Watch.__new__(Watch)
    w.messages = []
    import threading

    w._lock = threading.Lock()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv311)
    c.username_pw_set("observer", grid.password_for("observer"))
    c.on_message = lambda _c, _u, m: w._add(m)
    c.on_connect = lambda cl, *_a: cl.subscribe(f"{P}/#", 1)
    c.connect(grid.mqtt.host, grid.mqtt.port)
    c.loop_start()
    w.client = c
    return w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench failover", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--lease-s", type=float, default=3.0)
    p.add_argument("--evs", type=int, default=20, help="7.4 kW sessions running through every failover")
    p.add_argument("--broker", choices=("mosquitto", "cluster"), default="mosquitto")
    p.add_argument("--json", type=Path, default=Path("bench/results/failover.json"))
    p.add_argument("--keep", type=Path, default=None, help="keep the logs and broker files in this directory")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gridlb-failover-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    print(f"\n{result['kills']} kills of the active balancer ({result['broker']}, lease {args.lease_s:g} s, "
          f"{result['sessions']} sessions): standby online p50 {result['online']['p50']} s / max "
          f"{result['online']['max']} s; new EV answered p50 {result['answered']['p50']} s / max "
          f"{result['answered']['max']} s; assigned p50 {result['assigned']['p50']} s / max "
          f"{result['assigned']['max']} s; {result['sessions_ended']} sessions ended, "
          f"{result['overload_telemetry']} telemetry above capacity, {result['second_sessions']} second sessions")
    save_json(args.json, args, **result)
    return 0
