"""A flood against the real balancer: its memory, and how long another EV waits meanwhile (issue 9, D6).

    python -m bench flood [--flooders 8] [--messages 10000] [--seconds 7] [--payload-bytes 4000]

A private Mosquitto (project config and ACL) and ``python -m balancer`` as shipped. Flooders are EV accounts that
publish junk of ``--payload-bytes`` on their own request topics at QoS 1, paced to ``flooders x messages`` in
``--seconds`` (the defaults are the fault report's 80,000 payloads of 4 KB from 8 EVs in 7 s), from a process of
their own so the measuring client is not starved. Meanwhile one other EV asks for power every 100 ms (request,
answer, release) and the time to each answer is recorded; the balancer's RSS is read from /proc every 50 ms.

Two runs in the same broker: admission off (a budget no flooder can exceed: how the balancer behaved before) and
the shipped defaults. Targets: RSS under the flood <= 1.5 x idle, another EV's request answered within 250 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.bench_balancer import proc_cpu_s, proc_rss_mb
from bench.report import save_json
from broker.local import LocalBroker
from grid_protocol import Topics
from grid_runtime.lifecycle import stop_process
from grid_runtime.percentiles import percentiles

MEASURING_EV = "EV_M"
SUBSTATION = "S1"


def _client(broker_port: int, username: str, password: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
    c.username_pw_set(username, password)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", broker_port)
    return c


def _flood(port: int, accounts: list[tuple[str, str]], messages: int, seconds: float, payload_bytes: int,
           done: Any) -> None:
    """Child process: every account publishes ``messages`` junk payloads, paced over ``seconds``."""
    topics = Topics()
    junk = json.dumps({"requested_kw": "lots", "pad": "x" * max(0, payload_bytes - 40)}).encode()
    clients = [_client(port, user, pw) for user, pw in accounts]
    for c in clients:
        c.loop_start()
    time.sleep(0.5)
    t0 = time.monotonic()
    per_tick = max(1, round(messages / (seconds / 0.01)))
    sent = 0
    infos = []
    while sent < messages:
        for c, (user, _) in zip(clients, accounts, strict=True):
            for _ in range(min(per_tick, messages - sent)):
                infos.append(c.publish(topics.request(user), junk, qos=1))
        sent += min(per_tick, messages - sent)
        delay = t0 + sent / messages * seconds - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    published_s = time.monotonic() - t0
    for info in infos:
        info.wait_for_publish(60)
    done.put({"published_s": round(published_s, 2), "acked_s": round(time.monotonic() - t0, 2),
              "messages": len(infos)})
    for c in clients:
        c.disconnect()
        c.loop_stop()


class MeasuringEv:
    """One EV asking for power again and again, timing request -> answer."""

    def __init__(self, broker: LocalBroker) -> None:
        self.topics = Topics()
        self.client = _client(broker.port, MEASURING_EV, broker.password_for(MEASURING_EV))
        self.client.on_message = self._on_message
        self._answer = threading.Event()
        self._status = ""
        self.client.loop_start()
        self.client.subscribe(self.topics.assignment(MEASURING_EV), 1)
        self.waits: list[float] = []
        self.statuses: dict[str, int] = {}
        self._n = 0

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._status = json.loads(msg.payload).get("status", "")
        self._answer.set()

    def ask(self, timeout: float = 30.0) -> None:
        self._n += 1
        self._answer.clear()
        sent = time.perf_counter()
        self.client.publish(self.topics.request(MEASURING_EV), json.dumps(
            {"request_id": f"m{self._n}", "requested_kw": 7.4, "energy_kwh": 5}), qos=1)
        if not self._answer.wait(timeout):
            self.statuses["unanswered"] = self.statuses.get("unanswered", 0) + 1
            return
        self.waits.append(time.perf_counter() - sent)
        self.statuses[self._status] = self.statuses.get(self._status, 0) + 1
        self._answer.clear()
        self.client.publish(self.topics.release(MEASURING_EV), b"{}", qos=1)
        self._answer.wait(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _telemetry(broker: LocalBroker, stop: threading.Event) -> None:
    c = _client(broker.port, "loadtest", broker.password_for("loadtest"))
    c.loop_start()
    topic = Topics().telemetry(SUBSTATION)
    seq = 0
    while not stop.is_set():
        c.publish(topic, json.dumps({"substation_id": SUBSTATION, "ts": time.time(), "seq": seq, "capacity_kw": 1e5,
                                     "load_kw": 0, "base_load_kw": 0, "ev_load_kw": 0, "active_sessions": 0}), qos=0)
        seq += 1
        stop.wait(0.5)
    c.disconnect()
    c.loop_stop()


def run_once(broker: LocalBroker, args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    full = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), MQTT_USERNAME="balancer",
                MQTT_PASSWORD=broker.password_for("balancer"), LOG_LEVEL="WARNING", METRICS_PORT="0",
                BALANCER_STATS_INTERVAL_S="3600", **env)
    label = "admission off" if env else "shipped defaults"
    cmd = [sys.executable, "-m", "balancer"]
    if args.profile and not env:
        cmd = [sys.executable, "-m", "cProfile", "-o", str(args.profile), "-m", "balancer"]
    with open(logs / f"balancer-{len(env)}.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=full, stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    tel = threading.Thread(target=_telemetry, args=(broker, stop), daemon=True)
    tel.start()
    ev = MeasuringEv(broker)
    try:
        time.sleep(1.5)
        for _ in range(20):  # warm-up: the idle figure is the balancer after it has served a little
            ev.ask()
        ev.waits.clear()
        idle_rss = proc_rss_mb(proc.pid)
        cpu0 = proc_cpu_s(proc.pid)
        accounts = [(f"FLOOD_{i:02d}", broker.password_for(f"FLOOD_{i:02d}")) for i in range(args.flooders)]
        done: Any = multiprocessing.get_context("spawn").Queue()
        flood = multiprocessing.get_context("spawn").Process(
            target=_flood, args=(broker.port, accounts, args.messages, args.seconds, args.payload_bytes, done))
        flood.start()
        peak = idle_rss
        result: dict[str, Any] | None = None
        while result is None:
            t = time.monotonic()
            ev.ask()
            peak = max(peak, proc_rss_mb(proc.pid))
            while time.monotonic() - t < 0.1:
                time.sleep(0.05)
                peak = max(peak, proc_rss_mb(proc.pid))
            if not done.empty():
                result = done.get()
        flood.join(30)
        during = list(ev.waits)
        time.sleep(2.0)
        after_rss = proc_rss_mb(proc.pid)
        cpu = proc_cpu_s(proc.pid) - cpu0
        w = np.array(during) * 1000
        return {
            "run": label, "env": env, "flood": result, "idle_rss_mb": round(idle_rss, 1),
            "peak_rss_mb": round(peak, 1), "after_rss_mb": round(after_rss, 1),
            "rss_ratio": round(peak / idle_rss, 2), "balancer_cpu_s": round(cpu, 2),
            "other_ev_requests": len(during), "other_ev_statuses": dict(ev.statuses),
            **{f"wait_p{p}_ms": None if v is None else round(v, 1)
               for p, v in zip((50, 95), percentiles(w, (50, 95)), strict=True)},
            "wait_max_ms": round(float(w.max()), 1) if len(w) else None,
        }
    finally:
        stop.set()
        ev.close()
        stop_process(proc, 10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench flood", description=__doc__.split("\n\n")[0])
    p.add_argument("--flooders", type=int, default=8)
    p.add_argument("--messages", type=int, default=10_000, help="per flooder")
    p.add_argument("--seconds", type=float, default=7.0, help="the whole flood is paced over this long")
    p.add_argument("--payload-bytes", type=int, default=4000)
    p.add_argument("--only-defaults", action="store_true", help="skip the admission-off run")
    p.add_argument("--json", type=Path, default=Path("bench/results/flood.json"))
    p.add_argument("--profile", type=Path, default=None,
                   help="run the balancer of the defaults run under cProfile, writing PROFILE (slows it down)")
    args = p.parse_args(argv)
    evs = [MEASURING_EV, *(f"FLOOD_{i:02d}" for i in range(args.flooders))]
    runs: list[dict[str, str]] = [] if args.only_defaults else [
        {"BALANCER_EV_RATE_PER_S": "1e9", "BALANCER_EV_BURST": "1e9"}]
    runs.append({})
    results = []
    with tempfile.TemporaryDirectory(prefix="gridlb-flood-") as tmp, \
            LocalBroker(Path(tmp) / "broker", substation_ids=[], ev_ids=evs, secret="bench") as broker:
        for env in runs:
            results.append(run_once(broker, args, env, Path(tmp)))
    total = args.flooders * args.messages
    print(f"\nflood: {total:,} payloads of {args.payload_bytes} B from {args.flooders} EVs over {args.seconds:g} s "
          f"(cpus: {os.cpu_count()})")
    print(f"{'run':<18}{'idle MB':>8}{'peak MB':>8}{'ratio':>7}{'after MB':>9}{'cpu s':>7}   other EV wait ms: "
          f"{'p50':>6}{'p95':>7}{'max':>7}  answers")
    for r in results:
        print(f"{r['run']:<18}{r['idle_rss_mb']:>8.1f}{r['peak_rss_mb']:>8.1f}{r['rss_ratio']:>7.2f}"
              f"{r['after_rss_mb']:>9.1f}{r['balancer_cpu_s']:>7.2f}   {'':>17}{r['wait_p50_ms']:>6}"
              f"{r['wait_p95_ms']:>7}{r['wait_max_ms']:>7}  {r['other_ev_statuses']}")
    last = results[-1]
    print(f"targets: RSS under the flood <= 1.5 x idle: {last['rss_ratio']:.2f} x; another EV answered within "
          f"250 ms: max {last['wait_max_ms']} ms")
    save_json(args.json, args, results=results)
    return 0
