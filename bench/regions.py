"""Regional partitions (issue 12): two regions on two balancer processes against one region on one, through a real
Mosquitto, with the CPU share of each balancer, the broker and the load generator beside the figures.

    python -m bench regions [--requests 6000] [--window 400] [--rate 1000] [--rate-seconds 3] [--rounds 3]
                            [--cluster]

Setups, each on a fresh private broker (loopback, project config), the same load generator (bench_balancer's
``LoadClient``: one paho connection, pre-encoded requests, distinct EV ids, room for every request, so every answer
is an ``assigned`` that cost the balancer its full path):

  1 region  / 1 process    ``BALANCER_REGIONS=default``: today's deployment.
  2 regions / 2 processes  ``default`` and ``east`` each owned by its own process; requests alternate regions.
  2 regions / 1 process    one process owning both (one event loop, one GIL).

For each: a pipelined run (``--window`` requests in flight per region) gives answers/s, with the CPU
seconds of every process over that run (from /proc) as a share of one core, and the balancers' CPU per request; a
paced run at ``--rate`` requests/s in all gives latency percentiles. This machine's cores are shared by all of
them (and by whatever else runs): the shares show which process is the bottleneck in each setup. The setups run
``--rounds`` times, interleaved, and the medians are printed (one run on a shared machine proves little).

``--cluster``: the same setups through a local 3-node NATS cluster (``broker.nats.cluster.LocalCluster``, MQTT
3.1.1, the project's accounts): the load generator on node 1, the balancer processes on nodes 2 and 3, so every
request and answer crosses the cluster; the CPU of each nats-server is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from bench.bench_balancer import CAPACITY_KW, BrokerAddress, LoadClient, _client_gc_paused, proc_cpu_s
from bench.report import save_json
from broker.accounts import SERVICE_ACCOUNTS, balancer_username
from broker.local import LocalBroker
from broker.nats.cluster import LocalCluster
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

    def __init__(self, broker: BrokerAddress, regions: tuple[str, ...],
                 protocol: Literal["5", "3.1.1"] = "5") -> None:
        super().__init__(broker, protocol)
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


def _start_balancer(broker: BrokerAddress, regions: str, logs: Path, protocol: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), MQTT_USERNAME="balancer",
               MQTT_PASSWORD=PASSWORD, BALANCER_REGIONS=regions, LOG_LEVEL="WARNING", BALANCER_QUEUE_MAX="1000000",
               BALANCER_STATS_INTERVAL_S="3600", METRICS_PORT="0", BALANCER_STARTUP_WAIT_S="0.5",
               MQTT_PROTOCOL=protocol)
    log = open(logs / f"balancer-{regions.replace(',', '+')}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "balancer"], env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def _brokers(processes: list[str], regions: tuple[str, ...], tmp: Path,
             cluster: bool) -> Iterator[tuple[BrokerAddress, list[BrokerAddress], dict[str, int]]]:
    """(where the load generator connects, where each balancer process connects, broker pids)."""
    services = (*SERVICE_ACCOUNTS, *(balancer_username(r) for r in regions if r != "default"))
    passwords = {balancer_username(r): PASSWORD for r in regions}
    work = tmp / f"broker-{len(processes)}-{len(regions)}"
    if not cluster:
        with LocalBroker(work, substation_ids=[], ev_ids=[], secret="bench", services=services,
                         service_passwords=passwords) as broker:
            assert broker.pid is not None
            yield broker, [broker] * len(processes), {"broker": broker.pid}
        return
    with LocalCluster(work, secret="bench", services=services, service_passwords=passwords) as nats:
        nodes = nats.nodes
        pids = {f"nats-{n.index + 1}": n.pid for n in nodes if n.pid is not None}
        yield nodes[0], [nodes[(1 + i) % len(nodes)] for i in range(len(processes))], pids


async def _setup(name: str, processes: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    regions = tuple(r for p in processes for r in p.split(","))
    protocol: Literal["5", "3.1.1"] = "3.1.1" if args.cluster else "5"
    with _brokers(processes, regions, tmp, args.cluster) as (load_at, balancers_at, broker_pids):
        procs = [_start_balancer(at, p, tmp, protocol) for p, at in zip(processes, balancers_at, strict=True)]
        load = RegionalLoad(load_at, regions, protocol)
        try:
            await load.start()
            await asyncio.sleep(3.0 if args.cluster else 1.5)  # balancers connected, gates open, substations fresh
            # In flight: --window per region, so each balancer sees the same pipelining (batches per read pass, and
            # so commands per request) whatever the number of regions; --window-total: split over the regions.
            window = args.window if args.window_total else args.window * len(regions)
            await load.pipelined(min(1000, args.requests), window, 30)  # warm-up
            pids = {**broker_pids, "load generator": os.getpid(),
                    **{f"balancer {p}": proc.pid for p, proc in zip(processes, procs, strict=True)}}
            # The balancers' fixed cost (ticks, retained state, telemetry, lease renewals: per second, not per
            # request), over an idle interval, so the marginal CPU per request can be told from it.
            idle0, idle_t0 = {k: proc_cpu_s(pid) for k, pid in pids.items()}, time.monotonic()
            await asyncio.sleep(args.idle_seconds)
            idle_s = time.monotonic() - idle_t0
            idle_share = {k: (proc_cpu_s(pid) - idle0[k]) / idle_s for k, pid in pids.items()}
            load_avg = os.getloadavg()[0]
            with _client_gc_paused():
                cpu0 = {k: proc_cpu_s(pid) for k, pid in pids.items()}
                busy0 = machine_busy_s()
                piped = await load.pipelined(args.requests, window, 120)
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
            balancer_idle = sum(v * elapsed for k, v in idle_share.items() if k.startswith("balancer"))
            return {"setup": name, "processes": processes, "pipelined": piped, "paced": paced,
                    "cpu_s": cpu, "cpu_share_of_one_core": {k: round(v / elapsed, 3) for k, v in cpu.items()},
                    "balancer_cpu_us_per_request": round(balancer_cpu / max(1, piped["answered"]) * 1e6, 1),
                    "balancer_idle_share_of_one_core": round(balancer_idle / elapsed, 3),
                    "balancer_marginal_cpu_us_per_request": round(
                        max(0.0, balancer_cpu - balancer_idle) / max(1, piped["answered"]) * 1e6, 1),
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


SETUPS: tuple[tuple[str, list[str]], ...] = (
    ("1 region / 1 process", ["default"]),
    ("2 regions / 2 processes", ["default", "east"]),
    ("2 regions / 1 process", ["default,east"]),
)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _print(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print("\nthrough a local 3-node NATS cluster (MQTT 3.1.1; load on node 1, balancers on nodes 2 and 3)"
          if args.cluster else "\nthrough one Mosquitto (MQTT 5)", end="")
    per = "in all" if args.window_total else "per region"
    print(f"; {args.requests} requests, {args.window} in flight {per}, {args.rounds} round(s), setups interleaved")
    print(f"{'round':<6}{'setup':<26}{'answers/s':>10}{'lost':>6}{'bal µs/req':>11}{'(idle)':>8}{'marginal':>9}"
          f"   paced {args.rate:g}/s:{'p50 ms':>8}{'p99 ms':>8}{'load1':>7}")
    for r in results:
        p, q = r["pipelined"], r["paced"]
        print(f"{r['round']:<6}{r['setup']:<26}{p['answers_per_s']:>10.0f}{p['lost']:>6}"
              f"{r['balancer_cpu_us_per_request']:>11.1f}{r['balancer_idle_share_of_one_core']:>8.3f}"
              f"{r['balancer_marginal_cpu_us_per_request']:>9.1f}   {'':>12}{q['p50_ms']:>8.3f}{q['p99_ms']:>8.3f}"
              f"{r['load_average_1m_before']:>7.2f}")
    print("(bal µs/req: the balancers' CPU over the pipelined run per answer; idle: their CPU share of one core "
          "when no request comes; marginal: µs/req less that idle cost)")
    print(f"\nCPU over the pipelined run, as a share of one core ({os.cpu_count()} cores = {os.cpu_count():.2f}) "
          "[µs per answered request]:")
    for r in results:
        per = r["cpu_us_per_request"]
        shares = "  ".join(f"{k} {v:.2f}" + (f" [{per[k]:.0f}]" if k in per else "")
                           for k, v in r["cpu_share_of_one_core"].items())
        print(f"  {r['round']:<4}{r['setup']:<24}{shares}")
    by_setup = {name: [r for r in results if r["setup"] == name] for name, _ in SETUPS}
    base_rate = _median([r["pipelined"]["answers_per_s"] for r in by_setup[SETUPS[0][0]]])
    base_cpu = _median([r["balancer_cpu_us_per_request"] for r in by_setup[SETUPS[0][0]]])
    base_marginal = _median([r["balancer_marginal_cpu_us_per_request"] for r in by_setup[SETUPS[0][0]]])
    print("\nmedians over the rounds:")
    for name, rows in by_setup.items():
        rate = _median([r["pipelined"]["answers_per_s"] for r in rows])
        cpu = _median([r["balancer_cpu_us_per_request"] for r in rows])
        marginal = _median([r["balancer_marginal_cpu_us_per_request"] for r in rows])
        print(f"  {name:<26}{rate:>8.0f} answers/s (x{rate / base_rate:.2f}),  balancer {cpu:.0f} µs/request "
              f"(x{cpu / base_cpu:.2f}), marginal {marginal:.0f} µs/request (x{marginal / base_marginal:.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench regions", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=6_000)
    p.add_argument("--window", type=int, default=400, help="requests in flight per region in the pipelined run")
    p.add_argument("--window-total", action="store_true", help="--window is in all, split over the regions")
    p.add_argument("--rate", type=float, default=1000.0, help="offered requests/s in the paced run (all regions)")
    p.add_argument("--rate-seconds", type=float, default=3.0)
    p.add_argument("--idle-seconds", type=float, default=2.0, help="idle interval for the balancers' fixed cost")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three setups (medians are printed)")
    p.add_argument("--cluster", action="store_true", help="through a local 3-node NATS cluster (MQTT 3.1.1)")
    p.add_argument("--json", type=Path, default=None, help="default bench/results/regions[-cluster].json")
    args = p.parse_args(argv)
    if args.json is None:
        args.json = Path(f"bench/results/regions{'-cluster' if args.cluster else ''}.json")

    async def run() -> list[dict[str, Any]]:
        out = []
        for round_ in range(1, args.rounds + 1):  # interleaved: a change in the machine's load hits every setup
            for name, processes in SETUPS:
                with tempfile.TemporaryDirectory(prefix="gridlb-bench-regions-") as tmp:
                    out.append({"round": round_, **await _setup(name, processes, args, Path(tmp))})
        return out

    results = asyncio.run(run())
    _print(results, args)
    save_json(args.json, args, results=results)
    lost = sum(r["pipelined"]["lost"] + r["paced"]["lost"] for r in results)
    return 1 if lost else 0
