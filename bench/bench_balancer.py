"""Balancer throughput and latency through a real Mosquitto, next to a raw echo in the same run.

    python -m bench [--requests 20000] [--window 400] [--rate 1000] [--rate-seconds 5] [--rounds 3]

Phases, each against the same private broker (loopback, project config):
  echo       bench/echo.py answers each request on the EV's assignment topic: the ceiling.
  balancer   ``python -m balancer`` (``--clients``: the paho transport; ``paho,aiomqtt`` adds aiomqtt) answers
             the same requests.
For each: a pipelined run (``--window`` requests in flight) gives answers/s; a paced run at
``--rate`` requests/s gives request->answer latency percentiles. The balancer's CPU time per
request and its resident memory are read from /proc. Figures are printed and saved as JSON.

The phases run in ``--rounds`` interleaved rounds, each responder a fresh process each round, the order reversed
every other round (echo, balancer, balancer, echo, ...): on a shared machine a burst of someone else's load lands
in one phase, and a single echo-then-balancer pair lets it decide the comparison. Reported per responder: the
median over the rounds of answers/s and CPU per request, the paced percentiles over every round's samples pooled,
and each round's own figures; the throughput ratio is the median of the rounds' ratios (each round's balancer
over the same round's echo).

The load client is the measuring instrument: it freezes its start-up objects and suspends its own
cyclic GC during each timed phase (collecting between phases), so its pauses are not counted as the
system's latency. Responders run as shipped, under the same garbage-collector policy
(balancer/gc_policy.py: the echo starts and steps it as the balancer does).

Every request is from a distinct EV id (one open request per EV) to four substations with room
for all of them, so every answer is an ``assigned`` and every request costs the balancer its full
path: decode, place, two publishes (agent command + EV answer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from bench.report import builds_line, save_json
from broker.local import LocalBroker
from grid_protocol import ChargeRequest, Telemetry, TopicKind, Topics, encode
from grid_runtime.mqtt import InMessage, PahoTransport
from grid_runtime.percentiles import percentiles
from grid_runtime.settings import MqttSettings

SUBSTATIONS = ("S1", "S2", "S3", "S4")


class BrokerAddress(Protocol):
    """Where a client connects: a :class:`LocalBroker`, or one node of a :class:`broker.nats.cluster.LocalCluster`."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def password_for(self, username: str) -> str: ...
CAPACITY_KW = 1_000_000.0  # room for every request: the benchmark measures the path, not the queue


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class LoadClient:
    """Publishes pre-encoded requests and times each answer, on one paho-on-asyncio connection."""

    def __init__(self, broker: BrokerAddress, protocol: Literal["5", "3.1.1"] = "5") -> None:
        self.topics = Topics()
        settings = MqttSettings(host=broker.host, port=broker.port, username="loadtest",
                                password=broker.password_for("loadtest"), protocol=protocol)
        self.transport = PahoTransport(settings, client_id="loadtest", clean_start=True)
        self.transport.set_handler(self._on_answer)
        self.transport.subscribe(self.topics.filter(TopicKind.EV_ASSIGNMENT), 1)
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self._waiting = asyncio.Event()
        self._seq = 0
        self._run_id = 0

    def _on_answer(self, msg: InMessage) -> None:
        ev_id = msg.topic.split("/")[-2]
        t0 = self.sent_at.pop(ev_id, None)
        if t0 is None:
            return
        self.latencies.append(time.perf_counter() - t0)
        status = json.loads(msg.payload).get("status", "echo")
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self._waiting.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self.transport.run())
        await asyncio.wait_for(self.transport.connected.wait(), 10)
        self._telemetry_task = asyncio.create_task(self._telemetry())
        await asyncio.sleep(0.3)

    async def _telemetry(self) -> None:
        seq = 0
        while True:
            seq += 1
            for sid in SUBSTATIONS:
                t = Telemetry(substation_id=sid, ts=time.time(), seq=seq, capacity_kw=CAPACITY_KW, load_kw=0.0,
                              base_load_kw=0.0, ev_load_kw=0.0, active_sessions=0)
                self.transport.publish(self.topics.telemetry(sid), encode(t), 0)
            await asyncio.sleep(0.5)

    def _requests(self, n: int) -> list[tuple[str, str, bytes]]:
        self._run_id += 1
        out = []
        for _ in range(n):
            self._seq += 1
            ev_id = f"B{self._run_id}_{self._seq}"
            body = encode(ChargeRequest(request_id=f"r{self._seq}", ev_id=ev_id, requested_kw=22.0,
                                        duration_minutes=60.0))
            out.append((ev_id, self.topics.request(ev_id), body))
        return out

    def _reset(self) -> None:
        self.sent_at.clear()
        self.latencies = []
        self.statuses = {}

    async def pipelined(self, n: int, window: int, timeout: float) -> dict[str, Any]:
        """``n`` requests with at most ``window`` unanswered: the sustainable answer rate."""
        self._reset()
        reqs = self._requests(n)
        publish, sent_at, clock = self.transport.publish, self.sent_at, time.perf_counter
        t0 = clock()
        deadline = t0 + timeout
        i = 0
        while i < n and clock() < deadline:
            room = window - len(sent_at)
            if room <= 0:
                self._waiting.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._waiting.wait(), 1.0)
                continue
            for ev_id, topic, body in reqs[i:i + min(room, 50)]:
                sent_at[ev_id] = clock()
                publish(topic, body, 1)
                i += 1
            await asyncio.sleep(0)
        while sent_at and clock() < deadline:
            await asyncio.sleep(0.005)
        elapsed = clock() - t0
        return self._summary(n, elapsed, mode="pipelined", window=window)

    async def paced(self, rate: float, seconds: float, timeout: float) -> dict[str, Any]:
        """A fixed offered load: latency without self-inflicted queueing."""
        self._reset()
        n = int(rate * seconds)
        reqs = self._requests(n)
        tick = 0.005
        per_tick = rate * tick
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            due = min(n, int((time.perf_counter() - t0) / tick * per_tick) + 1)
            while sent < due:
                ev_id, topic, body = reqs[sent]
                self.sent_at[ev_id] = time.perf_counter()
                self.transport.publish(topic, body, 1)
                sent += 1
            await asyncio.sleep(tick / 2)
        deadline = time.perf_counter() + timeout
        while self.sent_at and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        return self._summary(n, time.perf_counter() - t0, mode="paced", rate=rate)

    def _summary(self, n: int, elapsed: float, **extra: Any) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            **extra,
            "requests": n,
            "answered": len(lat),
            "lost": n - len(lat),
            "elapsed_s": round(elapsed, 3),
            "answers_per_s": round(len(lat) / elapsed, 1) if elapsed else 0.0,
            **{f"p{p}_ms": None if v is None else round(v * 1000, 3)
               for p, v in zip((50, 95, 99), percentiles(lat, (50, 95, 99)), strict=True)},
            "max_ms": round(lat[-1] * 1000, 3) if lat else None,
            "statuses": dict(self.statuses),
        }

    async def stop(self) -> None:
        self._telemetry_task.cancel()
        await self.transport.close()
        self._task.cancel()


def _start_responder(kind: str, broker: BrokerAddress, client: str, logs: Path,
                     profile: Path | None = None, protocol: str = "5") -> subprocess.Popen[bytes]:
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), MQTT_USERNAME="balancer",
               MQTT_PASSWORD=broker.password_for("balancer"), BALANCER_MQTT_CLIENT=client, LOG_LEVEL="WARNING",
               BALANCER_QUEUE_MAX="1000000", BALANCER_STATS_INTERVAL_S="3600", METRICS_PORT="0",
               MQTT_PROTOCOL=protocol)
    env.pop("MQTT_HOSTS", None)
    module = "bench.echo" if kind == "echo" else "balancer"
    log = open(logs / f"{kind}-{client}.log", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", module]
    if profile and kind == "balancer":
        cmd = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", module]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


async def _phase(broker: BrokerAddress, kind: str, client: str, args: argparse.Namespace, logs: Path, *,
                 responder_at: BrokerAddress | None = None, protocol: Literal["5", "3.1.1"] = "5",
                 broker_pids: dict[str, int] | None = None, settle_s: float = 0.7,
                 samples: list[float] | None = None, round_no: int = 1) -> dict[str, Any]:
    """One responder measured: the load client at ``broker``, the responder at ``responder_at`` (default the same).
    ``cpu_share`` is each process's CPU time over the pipelined run's wall time (1.0 = one core busy): the
    responder, the load generator (this process) and ``broker_pids``. The paced run's latencies (seconds) are
    appended to ``samples``."""
    suffix = f".{client}.prof" if getattr(args, "rounds", 1) <= 1 else f".{client}.r{round_no}.prof"
    profile = args.profile.with_suffix(suffix) if args.profile else None
    proc = _start_responder(kind, responder_at or broker, client, logs, profile, protocol)
    load = LoadClient(broker, protocol)
    try:
        await load.start()
        await asyncio.sleep(settle_s)  # responder connected and (balancer) substations fresh
        await load.pipelined(min(1000, args.requests), args.window, 30)  # warm-up
        pids = {kind: proc.pid, "load generator": os.getpid(), **(broker_pids or {})}
        with _client_gc_paused():
            cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
            piped = await load.pipelined(args.requests, args.window, 120)
            cpu1 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
        with _client_gc_paused():
            paced = await load.paced(args.rate, args.rate_seconds, 30)
        if samples is not None:
            samples.extend(load.latencies)
        rss = proc_rss_mb(proc.pid)
        wall = piped["elapsed_s"] or 1.0
        return {"responder": kind, "client": client, "pipelined": piped, "paced": paced,
                "cpu_us_per_request": round((cpu1[kind] - cpu0[kind]) / max(1, piped["answered"]) * 1e6, 1),
                "cpu_share": {name: round((cpu1[name] - cpu0[name]) / wall, 2) for name in pids},
                "rss_mb": round(rss, 1)}
    finally:
        await load.stop()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def _client_gc_paused() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()


def _line(r: dict[str, Any]) -> str:
    p, q = r["pipelined"], r["paced"]
    return (f"{r['responder'] + ' (' + r['client'] + ')':<18}{p['answers_per_s']:>11.0f}{p['lost']:>6}"
            f"{r['cpu_us_per_request']:>12.1f}{r['rss_mb']:>8.1f}   {'':>17}{q['p50_ms']:>7.3f}{q['p95_ms']:>8.3f}"
            f"{q['p99_ms']:>8.3f}{q['lost']:>6}")


def _print(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    header = (f"{'responder':<18}{'answers/s':>11}{'lost':>6}{'cpu µs/req':>12}{'rss MB':>8}"
              f"   paced {args.rate:g}/s: {'p50 ms':>7}{'p95 ms':>8}{'p99 ms':>8}{'lost':>6}")
    rounds = len(results[0].get("rounds", ()))
    if rounds > 1:
        for i in range(rounds):
            print(f"\nround {i + 1} of {rounds}")
            print(header)
            for r in sorted(results, key=lambda r: r["rounds"][i]["order"]):
                print(_line(r["rounds"][i]))
        print(f"\nover the {rounds} rounds: answers/s and CPU per request the median, paced percentiles of every "
              f"round's samples pooled, lost the sum")
    print(header if rounds > 1 else "\n" + header)
    for r in results:
        print(_line(r))
    print(builds_line())
    echo = results[0]
    for r, ratio in echo_ratios(results):
        each = ", ".join(f"{x:.2f}" for x in round_ratios(echo, r))
        gap = r["paced"]["p99_ms"] - echo["paced"]["p99_ms"]
        print(f"balancer ({r['client']}) / echo throughput ratio: {ratio:.2f}"
              f"{f' (median of the rounds: {each})' if rounds > 1 else ''}  (target >= 0.80); paced p99 "
              f"{r['paced']['p99_ms']:.3f} ms, {gap:+.3f} ms against the echo's (target <= +0.3 ms)")


def add_load_arguments(p: argparse.ArgumentParser, *, requests: int, rate: float, clients: str, json: str,
                       rounds: int = 1) -> None:
    """The options every responder-against-echo bench takes (this one, ``bench cluster``)."""
    p.add_argument("--requests", type=int, default=requests)
    p.add_argument("--window", type=int, default=400, help="requests in flight in the pipelined run")
    p.add_argument("--rate", type=float, default=rate, help="offered requests/s in the paced run")
    p.add_argument("--rate-seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=rounds,
                   help="interleaved rounds of every responder (the order reversed every other round)")
    p.add_argument("--clients", default=clients, help="balancer transports to measure")
    p.add_argument("--json", type=Path, default=Path(json))
    p.add_argument("--profile", type=Path, default=None,
                   help="run the balancer under cProfile, writing PROFILE.<client>.prof "
                        "(PROFILE.<client>.r<round>.prof with several rounds; slows it down)")


#: A responder to measure: ("echo", "paho") or ("balancer", client).
Responder = tuple[str, str]
#: Measures one responder in one round: (kind, client, paced samples to extend, round number) -> its result.
PhaseFn = Callable[[str, str, list[float], int], Awaitable[dict[str, Any]]]


def round_order(responders: Sequence[Responder], round_no: int) -> list[Responder]:
    """Round 1, 3, ... in the given order, round 2, 4, ... reversed: a drift of the machine's load over the run
    weighs on every responder alike instead of always on the one measured last."""
    return list(responders) if round_no % 2 else list(reversed(responders))


async def run_rounds(phase: PhaseFn, clients: Sequence[str], rounds: int) -> list[dict[str, Any]]:
    """The echo and each balancer client, ``rounds`` times interleaved; one combined result each (echo first)."""
    responders: list[Responder] = [("echo", "paho"), *(("balancer", c) for c in clients)]
    done: dict[Responder, list[dict[str, Any]]] = {r: [] for r in responders}
    samples: dict[Responder, list[float]] = {r: [] for r in responders}
    for round_no in range(1, max(1, rounds) + 1):
        for order, (kind, client) in enumerate(round_order(responders, round_no)):
            result = await phase(kind, client, samples[(kind, client)], round_no)
            done[(kind, client)].append({**result, "round": round_no, "order": order})
    return [combine(done[r], samples[r]) for r in responders]


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 3)


def combine(rounds: list[dict[str, Any]], samples: Sequence[float]) -> dict[str, Any]:
    """One responder's rounds as one result, in the shape of a single round's (older readers keep working) plus
    ``rounds`` (each round's own). Answers/s, CPU per request, CPU shares and the pipelined run's latencies: the
    median of the rounds; the paced percentiles and max: of ``samples`` (every round's paced latencies, seconds)
    pooled, so a p99 rests on all of them; requests, answers, losses and statuses: the sums; memory: the
    largest."""
    first = rounds[0]

    def counts(mode: str) -> dict[str, Any]:
        parts = [r[mode] for r in rounds]
        statuses: dict[str, int] = {}
        for part in parts:
            for status, n in part["statuses"].items():
                statuses[status] = statuses.get(status, 0) + n
        out = {k: v for k, v in first[mode].items()
               if k not in ("requests", "answered", "lost", "elapsed_s", "answers_per_s", "statuses")
               and not k.endswith("_ms")}
        return {**out, **{k: sum(part[k] for part in parts) for k in ("requests", "answered", "lost")},
                "elapsed_s": round(sum(part["elapsed_s"] for part in parts), 3),
                "answers_per_s": _median([part["answers_per_s"] for part in parts]), "statuses": statuses}

    pipelined = counts("pipelined")
    pipelined.update({k: _median([r["pipelined"][k] for r in rounds if r["pipelined"][k] is not None] or [0.0])
                      for k in first["pipelined"] if k.endswith("_ms")})
    lat = sorted(samples)
    paced = counts("paced")
    paced.update({f"p{p}_ms": None if v is None else round(v * 1000, 3)
                  for p, v in zip((50, 95, 99), percentiles(lat, (50, 95, 99)), strict=True)})
    paced["max_ms"] = round(lat[-1] * 1000, 3) if lat else None
    return {"responder": first["responder"], "client": first["client"], "pipelined": pipelined, "paced": paced,
            "cpu_us_per_request": _median([r["cpu_us_per_request"] for r in rounds]),
            "cpu_share": {name: _median([r["cpu_share"][name] for r in rounds]) for name in first["cpu_share"]},
            "rss_mb": max(r["rss_mb"] for r in rounds), "rounds": rounds}


def round_ratios(echo: dict[str, Any], balancer: dict[str, Any]) -> list[float]:
    """Each round's balancer throughput over the same round's echo."""
    pairs = zip(echo.get("rounds", [echo]), balancer.get("rounds", [balancer]), strict=True)
    return [b["pipelined"]["answers_per_s"] / e["pipelined"]["answers_per_s"]
            if e["pipelined"]["answers_per_s"] else float("nan") for e, b in pairs]


def echo_ratios(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Each balancer's result with its pipelined throughput over the echo's (the first result) in the same run:
    the median of the rounds' ratios (each round's balancer over that round's echo)."""
    return [(r, statistics.median(round_ratios(results[0], r))) for r in results[1:]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    # paho only by default (the balancer's transport, BALANCER_MQTT_CLIENT): three rounds of it take ~1 min, three
    # with aiomqtt (~900 answers/s) ~2.5 min
    add_load_arguments(p, requests=20_000, rate=1000.0, clients="paho", json="bench/results/latest.json", rounds=3)
    args = p.parse_args(argv)

    async def run() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="gridlb-bench-") as tmp:
            logs = Path(tmp)
            with LocalBroker(Path(tmp) / "broker", substation_ids=[], ev_ids=[], secret="bench") as broker:
                async def phase(kind: str, client: str, samples: list[float], round_no: int) -> dict[str, Any]:
                    return await _phase(broker, kind, client, args, logs, samples=samples, round_no=round_no)

                return await run_rounds(phase, args.clients.split(","), args.rounds)

    results = asyncio.run(run())
    _print(results, args)
    save_json(args.json, args, results=results)
    lost = sum(r["pipelined"]["lost"] + r["paced"]["lost"] for r in results)
    return 1 if lost else 0
