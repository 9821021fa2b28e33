"""Balancer throughput and latency through a local 3-node NATS cluster, next to a raw echo through the same cluster.

    python -m bench cluster [--requests 5000] [--window 400] [--rate 200] [--rate-seconds 5] [--clients paho]

One cluster (``broker.nats.cluster.LocalCluster``: JetStream, MQTT 3.1.1, the project's accounts) for the whole
run. The load client (the EVs and the substations' telemetry) connects to node 1 and the responder to node 2, so
every request and every answer crosses the cluster (a QoS 1 message is stored in JetStream, replicated on the
three nodes, and delivered from there). Phases as in ``python -m bench`` (bench/bench_balancer.py, reused):
``bench/echo.py`` answers each request on the EV's assignment topic (the ceiling), then ``python -m balancer``
(``MQTT_PROTOCOL=3.1.1``), in ``--rounds`` interleaved rounds (default 1) as there. Each phase: a pipelined run
(``--window`` in flight) gives answers/s, a paced run at ``--rate`` gives latency percentiles. Beside the
figures: the CPU share (CPU seconds per wall second, 1.0 = one core) of the responder, each nats-server and the
load generator during the pipelined run: on a 2-core machine they compete, and the shares show where the time
goes.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_balancer import _phase, add_load_arguments, echo_ratios, run_rounds
from bench.report import save_json
from broker.nats.cluster import LocalCluster


def _print(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n3-node NATS cluster, MQTT 3.1.1, QoS 1; load generator on node 1, responder on node 2; "
          f"{args.requests} requests, {args.window} in flight")
    print(f"{'responder':<18}{'answers/s':>11}{'lost':>6}{'cpu µs/req':>12}"
          f"   paced {args.rate:g}/s: {'p50 ms':>7}{'p95 ms':>8}{'p99 ms':>8}{'lost':>6}")
    for r in results:
        p, q = r["pipelined"], r["paced"]
        print(f"{r['responder'] + ' (' + r['client'] + ')':<18}{p['answers_per_s']:>11.0f}{p['lost']:>6}"
              f"{r['cpu_us_per_request']:>12.1f}   {'':>17}{q['p50_ms']:>7.2f}{q['p95_ms']:>8.2f}"
              f"{q['p99_ms']:>8.2f}{q['lost']:>6}")
    print("CPU share during the pipelined run (CPU s per wall s; 2 cores = 2.0):")
    for r in results:
        shares = ", ".join(f"{name} {share:.2f}" for name, share in r["cpu_share"].items())
        print(f"  {r['responder'] + ' (' + r['client'] + ')':<18}{shares}; total {sum(r['cpu_share'].values()):.2f}")
    for r, ratio in echo_ratios(results):
        verdict = "met" if ratio >= 0.8 else "missed"
        print(f"balancer ({r['client']}) / echo throughput through the cluster: {ratio:.2f} (target >= 0.80: "
              f"{verdict})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__.split("\n\n")[0])
    add_load_arguments(p, requests=5_000, rate=200.0, clients="paho", json="bench/results/cluster.json")
    p.add_argument("--nodes", type=int, default=3)
    args = p.parse_args(argv)

    async def run() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="gridlb-bench-cluster-") as tmp:
            logs = Path(tmp)
            with LocalCluster(Path(tmp) / "nats", nodes=args.nodes, secret="bench",
                              services=("balancer", "loadtest", "healthcheck")) as cluster:
                load_at, responder_at = cluster.nodes[0], cluster.nodes[1 % len(cluster.nodes)]
                pids = {f"nats-{n.index + 1}": n.pid for n in cluster.nodes if n.pid is not None}
                common: dict[str, Any] = {"responder_at": responder_at, "protocol": "3.1.1", "broker_pids": pids,
                                          "settle_s": 2.0}

                async def phase(kind: str, client: str, samples: list[float], round_no: int) -> dict[str, Any]:
                    return await _phase(load_at, kind, client, args, logs, **common, samples=samples,
                                        round_no=round_no)

                return await run_rounds(phase, args.clients.split(","), args.rounds)

    results = asyncio.run(run())
    _print(results, args)
    save_json(args.json, args, results=results)
    lost = sum(r["pipelined"]["lost"] + r["paced"]["lost"] for r in results)
    return 1 if lost else 0
