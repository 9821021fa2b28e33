"""The live run of issue 10: 1,000 simulated substations reporting at 1 Hz through Mosquitto while EVs ask.

    python -m bench live-grid [--substations 1000] [--agent-processes 2] [--evs 3000] [--rate 50] [--seconds 60]

Everything real, on loopback: a private Mosquitto (project config, one account per substation and per EV),
``python -m balancer`` as shipped, ``python -m substation_agents`` (``--agent-processes`` processes share the
substations: one aiomqtt connection per agent, telemetry every ``--interval`` seconds, grid_sim's base load) and
``python -m ev_clients fleet`` (``--evs`` EV ids, each its own connection and account, arriving at ``--rate`` per
second for ``--seconds``, each charging until the run ends; then the fleet releases what it holds).

Once the balancer holds fresh telemetry from every substation, the fleet starts and, over its ``--seconds``:

  balancer CPU %, RSS       CPU time from /proc over the window (100 % = one core), RSS peak (sampled each second);
  request -> answer         the fleet's first-answer latency p50/p95/p99 (and to ``assigned``);
  telemetry/s handled       telemetry the balancer received (``gridlb_balancer_received_messages_total``) per
                            second, with the telemetry it refused (``gridlb_rejected_payloads_total``: should be 0);
  stale substations         substations whose telemetry went stale in the window (``gridlb_stale_telemetry_total``),
                            and those stale at its end: should be 0;
  overload-seconds          summed over substations (``gridlb_substation_overload_seconds_total``): should be 0.

Bounded in count and time; nothing listens beyond 127.0.0.1. Figures are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.bench_balancer import proc_cpu_s, proc_rss_mb
from bench.live_page import Process, substation_ids
from bench.report import save_json
from broker.local import LocalBroker, find_free_port
from ev_clients.workload import ev_ids

SECRET = "live-grid"
EV_PREFIX = "EV_"


def metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The balancer's /metrics: sample name -> {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def total(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in m.get(name, {}).items() if want <= set(k))


def fresh_count(m: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> int:
    """Substations the balancer holds online with fresh telemetry."""
    stale = m.get("gridlb_substation_stale", {})
    online = m.get("gridlb_substation_online", {})
    return sum(1 for k, v in stale.items() if v == 0 and online.get(k) == 1)


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each part (a part may be several processes)."""
    out = {}
    for part, ids in pids.items():
        try:
            out[part] = sum(proc_cpu_s(pid) for pid in ids)
        except OSError:  # (exited)
            out[part] = float("nan")
    return out


def _snapshot(url: str, proc: Process, pids: dict[str, list[int]]) -> dict[str, Any]:
    m = metrics(url)
    return {"t": time.monotonic(), "cpu_s": proc.cpu_s(), "parts_cpu_s": _cpu(pids), "load": os.getloadavg()[0],
            "telemetry": total(m, "gridlb_balancer_received_messages_total", kind="substation_telemetry"),
            "telemetry_refused": total(m, "gridlb_rejected_payloads_total", kind="substation_telemetry"),
            "received": total(m, "gridlb_balancer_received_messages_total"),
            "stale_transitions": total(m, "gridlb_stale_telemetry_total"),
            "stale_now": total(m, "gridlb_substation_stale"),
            "overload_s": total(m, "gridlb_substation_overload_seconds_total"),
            "sessions": total(m, "gridlb_sessions"), "queue": total(m, "gridlb_queue_length"),
            "decide_buckets": {dict(k)["le"]: v
                               for k, v in m.get("gridlb_decision_latency_seconds_bucket", {}).items()}}


def bucket_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float | None:
    """The upper bound (ms) of the histogram bucket holding the ``q`` quantile of what was observed in between."""
    bounds = sorted(((float(le), after[le] - before.get(le, 0.0)) for le in after), key=lambda b: b[0])
    n = bounds[-1][1] if bounds else 0.0
    if n <= 0:
        return None
    for le, count in bounds:
        if count >= q * n:
            return le * 1000
    return None


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ids = substation_ids(args.substations)
    evs = ev_ids(EV_PREFIX, args.evs)
    t_setup = time.monotonic()
    broker = LocalBroker(work / "broker", substation_ids=ids, ev_ids=evs, secret=SECRET).start()
    started: list[Process] = []
    try:
        port = find_free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        balancer = Process("balancer", broker, work, MQTT_USERNAME="balancer",
                           MQTT_PASSWORD=broker.password_for("balancer"), METRICS_PORT=str(port),
                           LOG_LEVEL="WARNING")
        started.append(balancer)
        chunks = [ids[i::args.agent_processes] for i in range(args.agent_processes)]
        agents = []
        for i, chunk in enumerate(chunks):
            # (a log file per process: Process names it after the module)
            agent_dir = work / f"agents{i}"
            agent_dir.mkdir()
            agents.append(Process("substation_agents", broker, agent_dir, MQTT_ACCOUNT_SECRET=SECRET,
                                  SUBSTATIONS=",".join(f"{sid}:{args.capacity_kw:g}" for sid in chunk),
                                  SUBSTATION_INTERVAL_S=str(args.interval), SIM_START_HOUR=str(args.start_hour),
                                  SUBSTATION_SEED=str(i + 1), LOG_LEVEL="WARNING"))
        started += agents
        deadline = time.monotonic() + args.ready_timeout
        fresh = 0
        while time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                fresh = fresh_count(metrics(url))
            except httpx.HTTPError:
                continue
            if fresh == len(ids):
                break
        if fresh != len(ids):
            raise RuntimeError(f"only {fresh} of {len(ids)} substations fresh at the balancer after "
                               f"{args.ready_timeout:g} s")
        ready_s = time.monotonic() - t_setup
        time.sleep(args.settle)  # (every agent's start-up burst is read)
        fleet_file = work / "fleet.json"
        fleet_out = open(work / "fleet.out", "wb")  # noqa: SIM115
        fleet_proc = subprocess.Popen(
            [sys.executable, "-m", "ev_clients", "fleet", "--evs", str(args.evs), "--rate", str(args.rate),
             "--arrivals", "fixed", "--run-for", str(args.seconds), "--seed", "1", "--report-every", "0",
             "--timeout", str(args.seconds + 30), "--save", str(fleet_file)],
            env=_fleet_env(broker, args), cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.DEVNULL, stdout=fleet_out, stderr=subprocess.STDOUT)
        pids = {"balancer": [balancer.proc.pid], "agents": [a.proc.pid for a in agents],
                "fleet": [fleet_proc.pid], "broker": [broker.pid or 0]}
        before = _snapshot(url, balancer, pids)
        rss_peak = proc_rss_mb(balancer.proc.pid)
        end = before["t"] + args.seconds
        while time.monotonic() < end and fleet_proc.poll() is None:
            time.sleep(1.0)
            rss_peak = max(rss_peak, proc_rss_mb(balancer.proc.pid))
        after = _snapshot(url, balancer, pids)
        try:
            fleet_rc = fleet_proc.wait(args.seconds + 120)
        except subprocess.TimeoutExpired:
            fleet_proc.kill()
            fleet_rc = fleet_proc.wait(10)
        fleet_out.close()
        if not fleet_file.exists():
            raise RuntimeError(f"the fleet saved nothing (exit {fleet_rc}):\n"
                               f"{(work / 'fleet.out').read_text(errors='replace')[-2000:]}")
        summary = json.loads(fleet_file.read_text())["summary"]
        final = _snapshot(url, balancer, {})
        window = after["t"] - before["t"]
        return {
            "substations": len(ids), "agent_processes": args.agent_processes, "evs": args.evs,
            "rate_per_s": args.rate, "seconds": round(window, 1), "ready_s": round(ready_s, 1),
            "balancer_cpu_pct": round((after["cpu_s"] - before["cpu_s"]) / window * 100, 1),
            "balancer_rss_mb_peak": round(rss_peak, 1),
            "telemetry_per_s": round((after["telemetry"] - before["telemetry"]) / window, 1),
            "telemetry_refused": after["telemetry_refused"] - before["telemetry_refused"],
            "messages_per_s": round((after["received"] - before["received"]) / window, 1),
            "stale_in_window": after["stale_transitions"] - before["stale_transitions"],
            "stale_at_end": after["stale_now"],
            "stale_total_after_start": final["stale_transitions"],
            "overload_s": round(final["overload_s"], 3),
            "sessions_at_end": after["sessions"], "queue_at_end": after["queue"],
            "cpu_pct": {part: round((after["parts_cpu_s"][part] - before["parts_cpu_s"][part]) / window * 100, 1)
                        for part in pids},
            "load_average": [round(before["load"], 2), round(after["load"], 2)],
            "fleet_exit": fleet_rc,
            "requests_sent": summary["requests_sent"], "requests_answered": summary["requests_answered"],
            "requests_unanswered": summary["requests_unanswered"],
            "retried_requests": summary["retried_requests"],
            # the balancer's own time to decide and publish, per EV request or release (histogram bucket bounds)
            "decide_ms_bucket": {f"p{q * 100:g}": bucket_quantile(before["decide_buckets"], after["decide_buckets"], q)
                                 for q in (0.5, 0.99)},
            "first_answer_ms": {k: summary["latency_first_answer"][k] for k in ("p50_ms", "p95_ms", "p99_ms",
                                                                                "max_ms")},
            "to_assigned_ms": {k: summary["latency_to_assigned"][k] for k in ("p50_ms", "p95_ms", "p99_ms")},
            "final_status": summary["final_status"], "connect_failures": summary["connect_failures"],
        }
    finally:
        for p in reversed(started):
            p.stop()
        broker.stop()


def _fleet_env(broker: LocalBroker, args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MQTT_", "EV_", "SUBSTATION", "SIM_", "BALANCER_", "GRID_", "LOG_", "METRICS_"))}
    env.update(MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), MQTT_ACCOUNT_SECRET=SECRET, LOG_LEVEL="WARNING",
               LOG_FORMAT="text", METRICS_PORT="0", EV_CLIENT=args.ev_client, EV_RELEASE_EARLY_PCT="0")
    return env


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench live-grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--substations", type=int, default=1000)
    p.add_argument("--agent-processes", type=int, default=2, help="processes the substation agents are split over")
    p.add_argument("--capacity-kw", type=float, default=400.0, help="every substation's capacity")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between an agent's telemetry messages")
    p.add_argument("--start-hour", type=float, default=17.0, help="simulated hour of day (the base-load curve)")
    p.add_argument("--evs", type=int, default=3000, help="EV ids (accounts); one arrival each at most")
    p.add_argument("--rate", type=float, default=50.0, help="EV arrivals per second")
    p.add_argument("--seconds", type=float, default=60.0, help="how long EVs arrive (the measured window)")
    p.add_argument("--ev-client", choices=("aiomqtt", "paho"), default="paho",
                   help="the fleet's MQTT library (paho: the cheaper load generator, so the EVs are not the limit)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds between a fresh grid and the first EV")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--json", type=Path, default=Path("bench/results/live_grid.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gridlb-live-grid-") as tmp:
        row = run(args, Path(tmp))
    _print(row)
    save_json(args.json, args, **row)
    ok = (row["stale_in_window"] == 0 and row["overload_s"] == 0 and row["requests_unanswered"] == 0
          and row["telemetry_refused"] == 0)
    return 0 if ok else 1


def _print(r: dict[str, Any]) -> None:
    fa, ta = r["first_answer_ms"], r["to_assigned_ms"]
    print(f"\n{r['substations']:,} substations ({r['agent_processes']} agent processes), {r['requests_sent']:,} "
          f"EV requests at {r['rate_per_s']:g}/s over {r['seconds']:g} s (grid fresh after {r['ready_s']:g} s)")
    print(f"  balancer CPU {r['balancer_cpu_pct']:.1f} % of a core, RSS peak {r['balancer_rss_mb_peak']:.0f} MB;"
          f" CPU % of the others: {r['cpu_pct']}; load average {r['load_average'][0]} -> {r['load_average'][1]}")
    print(f"  request -> first answer p50/p95/p99 {fa['p50_ms']}/{fa['p95_ms']}/{fa['p99_ms']} ms (max "
          f"{fa['max_ms']}); -> assigned p50/p95/p99 {ta['p50_ms']}/{ta['p95_ms']}/{ta['p99_ms']} ms; requests re-sent "
          f"{r['retried_requests']}")
    print(f"  the balancer's own decide+publish time per request: p50 <= {r['decide_ms_bucket']['p50']} ms, "
          f"p99 <= {r['decide_ms_bucket']['p99']} ms (histogram bucket bounds)")
    print(f"  telemetry handled {r['telemetry_per_s']:,.1f}/s ({r['telemetry_refused']:g} refused); all messages "
          f"{r['messages_per_s']:,.1f}/s")
    print(f"  stale substations in the window {r['stale_in_window']:g} (stale at its end {r['stale_at_end']:g}); "
          f"overload-seconds {r['overload_s']:g}")
    print(f"  answered {r['requests_answered']:,} of {r['requests_sent']:,}; final {r['final_status']}; "
          f"sessions at the end {r['sessions_at_end']:g}, queue {r['queue_at_end']:g}")
