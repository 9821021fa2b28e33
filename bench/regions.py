"""Regional partitions (issue 12): two regions on two balancer processes against one region on one, through a real
Mosquitto, with the CPU share of each balancer, the broker and the load generator beside the figures.

    python -m bench regions [--requests 10000] [--window 400] [--rate 1000] [--rate-seconds 4]

Setups, each on a fresh private broker (loopback, project config), the same load generator (bench_balancer's
``LoadClient``: one paho connection, pre-encoded requests, distinct EV ids, room for every request, so every answer
is an ``assigned`` that cost the balancer its full path):

  1 region  / 1 process    ``BALANCER_REGIONS=default``: today's deployment.
  2 regions / 2 processes  ``default`` and ``east`` each owned by its own process; requests alternate regions.
  2 regions / 1 process    one process owning both (one event loop, one GIL).

For each: a pipelined run (``--window`` requests in flight, split over the regions) gives answers/s, with the CPU
seconds of every process over that run (from /proc) as a share of one core, and the balancers' CPU per request; a
paced run at ``--rate`` requests/s in all gives latency percentiles. This machine's cores are shared by all of
them (and by whatever else runs): the shares show which process is the bottleneck in each setup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_balancer import CAPACITY_KW, LoadClient, _client_gc_paused, proc_cpu_s
from broker.accounts import SERVICE_ACCOUNTS, balancer_username
from broker.local import LocalBroker
from grid_protocol import ChargeRequest, Telemetry, TopicKind, Topics, encode

REGIONS = ("default", "east")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every process: ours and whatever else runs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
SUBSTATIONS = ("S1", "S2", "S3", "S4")  # per region (ids are grid-wide: the region is part of the name)
PASSWORD = "bench-balancer"  # a process owning several regions logs in to each with its one password


class RegionalLoad(LoadClient):
    """The balancer benchmark's load client over several regions: requests alternate regions, answers are read
    from every region, each region's substations get telemetry under its topics."""

    def __init__(self, broker: LocalBroker, regions: tuple[str, ...]) -> None:
        super().__init__(broker)
        self.regions = [Topics(region=r) for r in regions]
        for topic_filter in self.topics.filters_all_regions(TopicKind.EV_ASSIGNMENT):
            self.transport.subscribe(topic_filter, 1)
        self.per_region: dict[str, int] = {}

    def _on_answer(self, msg: Any) -> None:
        parsed = self.topics.parse_any_region(msg.topic)
        if parsed is not None and parsed[2] in self.sent_at:
            self.per_region[parsed[0]] = self.per_region.get(parsed[0], 0) + 1
        super()._on_answer(msg)

    async def _telemetry(self) -> None:
        seq = 0
        while True:
            seq += 1
            for topics in self.regions:
                for base in SUBSTATIONS:
                    sid = f"{topics.region}-{base}"
                    t = Telemetry(substation_id=sid, ts=time.time(), seq=seq, capacity_kw=CAPACITY_KW, load_kw=0.0,
                                  base_load_kw=0.0, ev_load_kw=0.0, active_sessions=0)
                    self.transport.publish(topics.telemetry(sid), encode(t), 0)
            await asyncio.sleep(0.5)

    def _requests(self, n: int) -> list[tuple[str, str, bytes]]:
        self._run_id += 1
        out = []
        for i in range(n):
            self._seq += 1
            ev_id = f"B{self._run_id}_{self._seq}"
            body = encode(ChargeRequest(request_id=f"r{self._seq}", ev_id=ev_id, requested_kw=22.0,
                                        duration_minutes=60.0))
            out.append((ev_id, self.regions[i % len(self.regions)].request(ev_id), body))
        return out

    def _reset(self) -> None:
        super()._reset()
        self.per_region = {}


def _start_balancer(broker: LocalBroker, regions: str, logs: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), MQTT_USERNAME="balancer",
               MQTT_PASSWORD=PASSWORD, BALANCER_REGIONS=regions, LOG_LEVEL="WARNING", BALANCER_QUEUE_MAX="1000000",
               BALANCER_STATS_INTERVAL_S="3600", METRICS_PORT="0", BALANCER_STARTUP_WAIT_S="0.5")
    log = open(logs / f"balancer-{regions.replace(',', '+')}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "balancer"], env=env, stdout=log, stderr=subprocess.STDOUT)


async def _setup(name: str, processes: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    regions = tuple(r for p in processes for r in p.split(","))
    services = (*SERVICE_ACCOUNTS, *(balancer_username(r) for r in regions if r != "default"))
    passwords = {balancer_username(r): PASSWORD for r in regions}
    with LocalBroker(tmp / f"broker-{len(processes)}-{len(regions)}", substation_ids=[], ev_ids=[], secret="bench",
                     services=services, service_passwords=passwords) as broker:
        assert broker.pid is not None
        procs = [_start_balancer(broker, p, tmp) for p in processes]
        load = RegionalLoad(broker, regions)
        try:
            await load.start()
            await asyncio.sleep(1.5)  # balancers connected, startup gates open, substations fresh
            await load.pipelined(min(1000, args.requests), args.window, 30)  # warm-up
            pids = {"broker": broker.pid, "load generator": os.getpid(),
                    **{f"balancer {p}": proc.pid for p, proc in zip(processes, procs, strict=True)}}
            load_avg = os.getloadavg()[0]
            with _client_gc_paused():
                cpu0 = {k: proc_cpu_s(pid) for k, pid in pids.items()}
                busy0 = machine_busy_s()
                piped = await load.pipelined(args.requests, args.window, 120)
                cpu1 = {k: proc_cpu_s(pid) for k, pid in pids.items()}
                busy1 = machine_busy_s()
            piped["per_region"] = dict(load.per_region)
            with _client_gc_paused():
                paced = await load.paced(args.rate, args.rate_seconds, 30)
            elapsed = piped["elapsed_s"]
            cpu = {k: round(cpu1[k] - cpu0[k], 3) for k in pids}
            # Everything else on the machine over the same run (other users' work shares the same cores).
            cpu["rest of machine"] = round(max(0.0, busy1 - busy0 - sum(cpu.values())), 3)
            balancer_cpu = sum(v for k, v in cpu.items() if k.startswith("balancer"))
            return {"setup": name, "processes": processes, "pipelined": piped, "paced": paced,
                    "cpu_s": cpu, "cpu_share_of_one_core": {k: round(v / elapsed, 3) for k, v in cpu.items()},
                    "balancer_cpu_us_per_request": round(balancer_cpu / max(1, piped["answered"]) * 1e6, 1),
                    "cpu_us_per_request": {k: round(v / max(1, piped["answered"]) * 1e6, 1) for k, v in cpu.items()
                                           if k != "rest of machine"},
                    "load_average_1m_before": round(load_avg, 2)}
        finally:
            await load.stop()
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _print(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{'setup':<26}{'answers/s':>10}{'lost':>6}{'bal µs/req':>11}   paced {args.rate:g}/s:"
          f"{'p50 ms':>8}{'p99 ms':>8}{'load1':>7}")
    for r in results:
        p, q = r["pipelined"], r["paced"]
        print(f"{r['setup']:<26}{p['answers_per_s']:>10.0f}{p['lost']:>6}{r['balancer_cpu_us_per_request']:>11.1f}"
              f"   {'':>13}{q['p50_ms']:>8.3f}{q['p99_ms']:>8.3f}{r['load_average_1m_before']:>7.2f}")
    print(f"\nCPU over the pipelined run, as a share of one core ({os.cpu_count()} cores = {os.cpu_count():.2f}) "
          "[µs per answered request]:")
    for r in results:
        per = r["cpu_us_per_request"]
        shares = "  ".join(f"{k} {v:.2f}" + (f" [{per[k]:.0f}]" if k in per else "")
                           for k, v in r["cpu_share_of_one_core"].items())
        print(f"  {r['setup']:<24}{shares}")
    base = results[0]
    for r in results[1:]:
        ratio = r["pipelined"]["answers_per_s"] / base["pipelined"]["answers_per_s"]
        per_req = r["balancer_cpu_us_per_request"] / base["balancer_cpu_us_per_request"]
        print(f"{r['setup']}: throughput x{ratio:.2f} of one region, balancer CPU per request x{per_req:.2f};"
              f" answers per region {r['pipelined']['per_region']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench regions", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--window", type=int, default=400, help="requests in flight in the pipelined run (all regions)")
    p.add_argument("--rate", type=float, default=1000.0, help="offered requests/s in the paced run (all regions)")
    p.add_argument("--rate-seconds", type=float, default=4.0)
    p.add_argument("--json", type=Path, default=Path("bench/results/regions.json"))
    args = p.parse_args(argv)

    async def run() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="gridlb-bench-regions-") as tmp:
            return [await _setup("1 region / 1 process", ["default"], args, Path(tmp)),
                    await _setup("2 regions / 2 processes", ["default", "east"], args, Path(tmp)),
                    await _setup("2 regions / 1 process", ["default,east"], args, Path(tmp))]

    results = asyncio.run(run())
    _print(results, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                       "loadavg_at_end": os.getloadavg()},
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results}
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"saved {args.json}")
    lost = sum(r["pipelined"]["lost"] + r["paced"]["lost"] for r in results)
    return 1 if lost else 0
