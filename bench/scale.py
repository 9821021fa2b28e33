"""The allocation core at utility scale (issue 10): CPU per request and rebalancing CPU per second of grid time
as the grid grows, through the pure core and through the real service path (in-memory transport).

    python -m bench scale [--sizes 3x1000,100x10000,1000x100000] [--paths core,service] [--seconds 10]

Each size runs in a fresh process (so its RSS is its own): S substations (capacity classes 400/630/1000 kVA,
scaled so the grid has room for about nine in ten EVs) are told online and report telemetry; N EVs ask
(7.4/11/22 kW, min 1.4 kW, 30-240 min) one after another, N/100 per grid-second (at least 20) so the grid fills in
100 grid-seconds. Base load wanders as in grid_sim's load curve (AR(1) noise, 3 % of the base, 900 s correlation
time). Figures:

  fill µs/req     CPU per request while the grid fills (placement, queueing, ETAs), averaged over all N;
  steady µs/req   CPU per request at full size: a charging EV releases, a new one asks (both counted, per request),
                  the substations still reporting each grid-second (untimed);
  µs/answer       the same CPU per answer the EVs got in that phase: a release there also serves the queue
                  (each placement from it is an ``assigned``), so a grid with a long queue answers more per
                  request than a small one;
  GC µs/req, max  of the steady CPU per request, the part the cyclic GC's collections took (``gc.callbacks``, CPU
                  time, only collections inside the timed calls), and the longest of them in ms;
  rebalance ms/s  CPU per second of grid time with every substation reporting at 1 Hz and the periodic tick at
                  2 Hz, nothing else happening: "churned" in the 10 s right after the steady phase (the grants
                  its releases and requests left to settle), "settled" 30 grid-seconds later; the balancer's
                  own CPU only: each telemetry message is built (and, for the service, encoded) untimed, as the
                  substation's agent would;
  RSS MB          the process's resident memory at full size.
  sat. µs/req     the saturated phase, run last: a charging EV releases, then new EVs ask until the queue is back
                  at the fill's length (at least one asks), every call timed; CPU per call. In the steady phase a
                  release serves queued EVs as room frees, and how many depends on a queue whose length drifts
                  differently at each size (about 4 answers a pair at 1,000 x 100k, 2.5 at 3 x 1k): its µs/req
                  compares different work. Holding the queue at its length compares like with like;
  sat. µs/answer  the same CPU per answer the EVs got in the saturated phase.

With ``--one``, the JSON line also holds the service's substation states built per grid-second in each rebalance
phase (``states_built_*``: the others were kept, nothing of theirs having moved; see BalancerService._states), and
with ``--digest`` a SHA-256 of everything the balancer said (core: its effects, in order; service: every published
topic, payload and retain flag, the instance's random boot id masked): equal digests, equal decisions and messages.
(Hashing costs CPU: compare figures without it.)

Operator limits (issue 10: none of them may make a request's cost grow with the substations), set untimed after the
substations first report: ``--schedules K`` gives the first K substations a limit schedule (source ``dso``, 90 % of
the capacity, in force all run), ``--limited K`` an operator capacity limit (95 %), ``--distinct-limits`` makes each
of those limits differ a little per substation.

CPU time (``time.process_time``), not wall time: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from balancer.core import Balancer, CoreConfig
from balancer.gc_policy import PROCESS_GC
from bench.report import builds, builds_line
from grid_protocol import (
    ASSIGNMENT_STATUSES,
    ChargeRequest,
    ControlCommand,
    LimitEntry,
    LimitSchedule,
    Release,
    Telemetry,
    encode,
)

DEFAULT_SIZES = "3x1000,3x10000,3x100000,100x1000,100x10000,100x100000,1000x1000,1000x10000,1000x100000"
CLASSES_KVA = (400, 630, 1000)
T0 = 1_767_225_600.0
MIN_RATE_PER_S = 20  # requests per grid-second while filling (N/100 for larger grids)
NOISE_PCT, NOISE_TAU_S = 3.0, 900.0  # grid_sim.load_curve's defaults

#: with --digest: the core's decisions in order (its effects); on the service path, what the transport is given
DIGEST: Any = None


def _digest(effects: list[Any]) -> None:
    if DIGEST is not None:
        for effect in effects:
            DIGEST.update(msgspec.json.encode(effect))


@dataclass
class Grid:
    ids: list[str]
    capacity_kw: dict[str, float]
    base_kw: dict[str, float]
    noise: dict[str, float]


def make_grid(substations: int, evs: int, rng: random.Random) -> Grid:
    ids = [f"S{i:04d}" for i in range(substations)]
    # Room for ~90 % of the EVs at ~12 kW each, in three capacity classes.
    per_sub = evs * 12.0 * 0.9 / substations
    mean_class = sum(CLASSES_KVA) / len(CLASSES_KVA)
    capacity = {sid: round(per_sub * CLASSES_KVA[i % 3] / mean_class * 1.25, 1) for i, sid in enumerate(ids)}
    base = {sid: round(capacity[sid] * 0.2, 1) for sid in ids}
    return Grid(ids, capacity, base, dict.fromkeys(ids, 0.0))


class CoreDriver:
    """Feeds the pure core, in a process that treats the GC as the balancer's does (balancer/gc_policy.py: frozen
    after start-up, then what survived at every periodic step)."""

    def __init__(self) -> None:
        self.b = Balancer(CoreConfig())

    def status(self, sid: str, now: float) -> None:
        self.b.on_status(sid, "online", now)

    def wire(self, msg: Telemetry) -> Telemetry:
        """The telemetry as it reaches the core (built untimed: the agent's work, not the balancer's)."""
        return msg

    def deliver(self, wired: Telemetry, now: float) -> None:
        _digest(self.b.on_telemetry(wired, now))

    def request(self, ev: str, msg: ChargeRequest, now: float) -> None:
        _digest(self.b.on_request(ev, msg, now))

    def release(self, ev: str, now: float) -> None:
        _digest(self.b.on_release(ev, Release(), now))

    def tick(self, now: float) -> None:
        _digest(self.b.tick(now))
        PROCESS_GC.step(now)  # (BalancerService.run: after the core's tick)

    def start(self, now: float) -> None:
        PROCESS_GC.start(now)

    @property
    def core(self) -> Balancer:
        return self.b

    def state_counts(self) -> dict[str, int]:
        return {}


class ServiceDriver:
    """Feeds the real BalancerService (topic parsing, decoding, admission, publishing) over an in-memory
    transport: every published message is encoded and handed to the transport, which counts it."""

    def __init__(self) -> None:
        from balancer.service import BalancerService
        from balancer.settings import BalancerSettings
        from grid_protocol import Topics

        self.now = T0
        self.transport = _MemoryTransport()
        settings = BalancerSettings(startup_wait_s=0, ev_rate_per_s=1e9, ev_burst=1e9, telemetry_rate_per_s=1e9,
                                    telemetry_burst=1e9)
        # the process's GC policy, as ``python -m balancer`` hands it to its services (balancer/cli.py)
        self.svc = BalancerService(settings, self.transport, clock=lambda: self.now, gc_policy=PROCESS_GC)
        if DIGEST is not None:
            self.transport.digest = DIGEST
            self.transport.mask = self.svc.instance.encode()
        self.transport.connect()
        self.topics = Topics(settings.grid.grid_topic_prefix)

    def _deliver(self, topic: str, payload: bytes, now: float) -> None:
        from grid_runtime.mqtt import InMessage
        self.now = now
        self.svc.handle(InMessage(topic, payload, 1, False))

    def status(self, sid: str, now: float) -> None:
        self._deliver(self.topics.substation_status(sid),
                      json.dumps({"state": "online", "substation_id": sid}).encode(), now)

    def wire(self, msg: Telemetry) -> Any:
        """The telemetry as the transport hands it over: topic and encoded payload (the agent's work, untimed)."""
        from grid_runtime.mqtt import InMessage
        return InMessage(self.topics.telemetry(msg.substation_id), encode(msg), 1, False)

    def deliver(self, wired: Any, now: float) -> None:
        self.now = now
        self.svc.handle(wired)

    def request(self, ev: str, msg: ChargeRequest, now: float) -> None:
        self._deliver(self.topics.request(ev), encode(msg), now)

    def release(self, ev: str, now: float) -> None:
        self._deliver(self.topics.release(ev), encode(Release()), now)

    def tick(self, now: float) -> None:
        """The service's own periodic step (BalancerService.periodic) on grid time, then the commands and, when due,
        the retained states, as ``BalancerService.run`` does."""
        self.now = now
        due = self.svc.periodic(now)
        self.svc._flush_commands()
        if due:
            self.svc.publish_states(now)

    def start(self, now: float) -> None:
        self.now = now
        self.svc.gc_start()  # as BalancerService.run does before its loop

    @property
    def core(self) -> Balancer:
        return self.svc.core

    def state_counts(self) -> dict[str, int]:
        return dict(getattr(self.svc, "state_counts", {}))  # (a version without the counts: none)


class _MemoryTransport:
    """The Transport protocol in memory: subscriptions and publishes are counted, nothing is sent."""

    def __init__(self) -> None:
        import asyncio

        from grid_runtime.mqtt import TransportStats
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        self.handler: Any = None
        self._callbacks: list[Any] = []
        #: ``--digest``: what is published is hashed (``mask``, the instance's boot id, replaced first)
        self.digest: Any = None
        self.mask = b""

    def set_handler(self, handler: Any) -> None:
        self.handler = handler

    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        pass

    def on_connect(self, callback: Any) -> None:
        self._callbacks.append(callback)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, expiry_s: int | None = None) -> None:
        self.stats.published += 1
        if self.digest is not None:
            self.digest.update(b"%s\0%s\0%d\n" % (topic.encode(), payload.replace(self.mask, b"boot") if self.mask
                                                    else payload, retain))

    def connect(self) -> None:
        self.connected.set()
        for cb in self._callbacks:
            cb()

    async def run(self) -> None:
        pass

    async def close(self, timeout: float = 2.0) -> None:
        pass


_DECAY = math.exp(-1 / NOISE_TAU_S)
_STEP = NOISE_PCT / 100 * math.sqrt(1 - _DECAY**2)


def _telemetry(grid: Grid, sid: str, seq: int, core: Balancer, rng: random.Random, now: float) -> Telemetry:
    sub = core.substations.get(sid)
    granted = sub.granted_w / 1000 if sub else 0.0
    # AR(1) noise, one step per report (1 s): the base load wanders, it does not flicker.
    grid.noise[sid] = grid.noise[sid] * _DECAY + rng.gauss(0.0, _STEP)
    base = grid.base_kw[sid] * (1 + grid.noise[sid])
    return Telemetry(substation_id=sid, ts=now, seq=seq, capacity_kw=grid.capacity_kw[sid], load_kw=base + granted,
                     base_load_kw=base, ev_load_kw=granted, active_sessions=len(sub.sessions) if sub else 0)


def limit_setup(grid: Grid, core: Balancer, now: float, schedules: int, limited: int, distinct: bool) -> None:
    """The operator limits asked for (untimed, straight into the core: set-up, not the figures)."""
    for i, sid in enumerate(grid.ids[:schedules]):
        kw = round(grid.capacity_kw[sid] * 0.9 - (i * 0.001 if distinct else 0), 3)
        core.on_limits(sid, LimitSchedule(source="dso", entries=[
            LimitEntry(start=now - 60, end=now + 2 * 86400, limit_kw=kw)]), now)
    for i, sid in enumerate(grid.ids[:limited]):
        kw = round(grid.capacity_kw[sid] * 0.95 - (i * 0.001 if distinct else 0), 3)
        core.on_control(ControlCommand(action="set_capacity", substation_id=sid, capacity_kw=kw), now)


def run_one(substations: int, evs: int, path: str, seconds: int, steady: int,
            profile: Path | None = None, profile_phase: str = "steady", saturated: int = 2000,
            digest: bool = False, schedules: int = 0, limited: int = 0, distinct: bool = False) -> dict[str, Any]:
    global DIGEST
    DIGEST = hashlib.sha256() if digest else None
    rng = random.Random(1)
    grid = make_grid(substations, evs, rng)
    driver: CoreDriver | ServiceDriver = CoreDriver() if path == "core" else ServiceDriver()
    core = driver.core
    now = T0
    seq = 0
    for sid in grid.ids:
        driver.status(sid, now)
    driver.start(now)  # the GC set-up of a balancer that has started
    kws = (7.4, 11.0, 22.0)

    def report_all(at: float) -> float:
        """Every substation reports; returns the CPU time the balancer spent on it (each message is built and
        encoded, as the agent would, outside the timed part; the timer's own ~1 µs a message is charged)."""
        nonlocal seq
        seq += 1
        cpu = 0.0
        for sid in grid.ids:
            wired = driver.wire(_telemetry(grid, sid, seq, core, rng, at))
            t = time.process_time()
            driver.deliver(wired, at)
            cpu += time.process_time() - t
        t = time.process_time()
        core.placement.refresh(at)  # refile what the reports changed now: telemetry's cost, not the next request's
        return cpu + time.process_time() - t

    def ticks(second: float) -> None:
        """The periodic tick twice a grid-second; what its rebalancing moved is refiled now, as its own cost (as
        after telemetry), not left to the next request's."""
        driver.tick(second)
        driver.tick(second + 0.5)
        core.placement.refresh(second + 0.5)

    report_all(now)
    limit_setup(grid, core, now, schedules, limited, distinct)
    # Fill: N requests at RATE_PER_S per grid-second; every substation reports once per grid-second, the tick
    # runs twice (as in the service) -- only the requests are timed here.
    cpu_requests = 0.0
    next_second = now + 1
    rate = max(MIN_RATE_PER_S, evs / 100)
    for i in range(evs):
        now = T0 + i / rate
        if now >= next_second:
            report_all(next_second)
            ticks(next_second)
            next_second += 1
        msg = ChargeRequest(request_id="r1", requested_kw=kws[i % 3], min_kw=1.4,
                            duration_minutes=30 + (i * 7919) % 211)
        t = time.process_time()
        driver.request(f"EV{i:06d}", msg, now)
        cpu_requests += time.process_time() - t
    sessions = core.session_count()
    queued = len(core.queue)
    # Steady state at full size: a running EV releases, a new one asks.
    # Every release ends a running session: EVs are taken from those charging now, in random order (a list that
    # runs dry, or an EV whose session ended meanwhile, is refilled from the sessions there are, untimed).
    running: list[str] = []

    def next_running() -> str:
        while True:
            if not running:
                running.extend(s.request.ev_id for s in core._sessions.values())
                rng.shuffle(running)
            ev = running.pop()
            state = core._evs.get(ev)
            if state is not None and state.session_id is not None:
                return ev
    cpu_steady = 0.0
    # (CPU time: the machine is shared)
    profiler = cProfile.Profile(time.process_time) if profile and profile_phase == "steady" else None
    answers_before = _answers(core)
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    for j in range(steady):
        now += 1 / rate
        if now >= next_second:  # the substations keep reporting (untimed): the grid stays fresh
            report_all(next_second)
            ticks(next_second)
            next_second += 1
        ev = next_running()
        t = time.process_time()
        pauses.timing = True
        if profiler:
            profiler.enable()
        driver.release(ev, now)
        driver.request(f"N{j:06d}", ChargeRequest(request_id="r1", requested_kw=11.0, min_kw=1.4,
                                                   duration_minutes=120), now)
        if profiler:
            profiler.disable()
        pauses.timing = False
        cpu_steady += time.process_time() - t
    gc.callbacks.remove(pauses)
    if profiler and profile:
        profiler.dump_stats(profile)
        profiler = None
    steady_answers = _answers(core) - answers_before
    cpu_steady_total = cpu_steady
    cpu_steady = cpu_steady / (2 * steady) if steady else 0.0
    # Rebalancing: every substation at 1 Hz, the tick at 2 Hz, for ``seconds`` of grid time, right after the churn
    # and again once the grants it left have settled.
    def grid_seconds(start: float, count: int, phase: str = "") -> float:
        prof = cProfile.Profile(time.process_time) if profile and phase == profile_phase else None
        cpu = 0.0
        if prof:
            prof.enable()
        for k in range(count):
            cpu += report_all(start + k)
            t = time.process_time()
            driver.tick(start + k + 0.25)
            driver.tick(start + k + 0.75)
            cpu += time.process_time() - t
        if prof and profile:
            prof.disable()
            prof.dump_stats(profile)
        return cpu / count

    def built() -> int:
        return driver.state_counts().get("built", 0)

    start = next_second
    before = built()
    cpu_churned = grid_seconds(start, seconds, "churned")
    built_churned = (built() - before) / seconds
    grid_seconds(start + seconds, 30)
    before = built()
    cpu_settled = grid_seconds(start + seconds + 30, seconds, "settled")
    built_settled = (built() - before) / seconds
    rss = _rss_mb()
    cpu_saturated, saturated_calls, saturated_answers = _saturated(
        driver, core, report_all, ticks, next_running, queued, rate, start + seconds + 30 + seconds, saturated,
        profile if profile_phase == "saturated" else None)
    return {"substations": substations, "evs": evs, "path": path, "sessions": sessions, "queued": queued,
            "fill_us_per_request": round(cpu_requests / evs * 1e6, 1),
            "steady_us_per_request": round(cpu_steady * 1e6, 1),
            "steady_answers": steady_answers,
            "steady_us_per_answer": round(cpu_steady_total / max(1, steady_answers) * 1e6, 1),
            "steady_gc_us_per_request": round(pauses.total / max(1, 2 * steady) * 1e6, 1),
            "steady_gc_longest_ms": round(pauses.longest * 1e3, 2),
            "rebalance_churned_ms_per_grid_s": round(cpu_churned * 1e3, 2),
            "rebalance_settled_ms_per_grid_s": round(cpu_settled * 1e3, 2), "rss_mb": round(rss, 1),
            "saturated_calls": saturated_calls, "saturated_answers": saturated_answers,
            "saturated_us_per_request": round(cpu_saturated / max(1, saturated_calls) * 1e6, 1),
            "saturated_us_per_answer": round(cpu_saturated / max(1, saturated_answers) * 1e6, 1),
            "violations": len(core.violations())} | ({"digest": DIGEST.hexdigest()} if digest else {}) | (
                {"states_built_churned_per_grid_s": built_churned, "states_built_settled_per_grid_s": built_settled}
                if path == "service" else {})


def _saturated(driver: CoreDriver | ServiceDriver, core: Balancer, report_all: Any, ticks: Any, next_running: Any,
               queued: int, rate: float, start: float, releases: int,
               profile: Path | None) -> tuple[float, int, int]:
    """The saturated phase: ``releases`` times, a running EV releases, then new EVs ask until the queue is back
    at ``queued`` (at least one asks); every call timed. Returns (CPU, calls, answers)."""
    profiler = cProfile.Profile(time.process_time) if profile else None
    answers_before = _answers(core)
    now, next_second = start, start + 1
    cpu, calls, n = 0.0, 0, 0
    for _ in range(releases):
        now += 1 / rate
        if now >= next_second:  # the substations keep reporting (untimed)
            report_all(next_second)
            ticks(next_second)
            next_second += 1
        ev = next_running()
        t = time.process_time()
        if profiler:
            profiler.enable()
        driver.release(ev, now)
        if profiler:
            profiler.disable()
        cpu += time.process_time() - t
        calls += 1
        while True:
            msg = ChargeRequest(request_id="r1", requested_kw=11.0, min_kw=1.4, duration_minutes=120)
            ev_id = f"Q{n:07d}"
            n += 1
            t = time.process_time()
            if profiler:
                profiler.enable()
            driver.request(ev_id, msg, now)
            if profiler:
                profiler.disable()
            cpu += time.process_time() - t
            calls += 1
            if len(core.queue) >= queued or core.queue.full():
                break
    if profiler and profile:
        profiler.dump_stats(profile)
    return cpu, calls, _answers(core) - answers_before


class GcPauses:
    """CPU time of the cyclic GC's collections while ``timing`` is set (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.timing = False
        self.total = 0.0
        self.longest = 0.0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.process_time() if self.timing else None
        elif self._started is not None:
            took = time.process_time() - self._started
            self.total += took
            self.longest = max(self.longest, took)
            self._started = None


def _answers(core: Balancer) -> int:
    """Answers the core gave EVs so far (assigned, queued, rejected, completed, ...; not other events: the core counts
    each answer under its status, with the reason after a colon)."""
    return sum(n for key, n in core.counters.items() if key.split(":", 1)[0] in ASSIGNMENT_STATUSES)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="SUBSTATIONSxEVS, comma separated")
    parser.add_argument("--paths", default="core,service", help="core, service or core,service")
    parser.add_argument("--seconds", type=int, default=10, help="grid-seconds of 1 Hz telemetry to time")
    parser.add_argument("--steady", type=int, default=2000, help="release+request pairs timed at full size")
    parser.add_argument("--json", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--profile", type=Path, default=None,
                        help="with --one: cProfile one phase into PROFILE (--profile-phase)")
    parser.add_argument("--profile-phase", choices=("steady", "churned", "settled", "saturated"), default="steady",
                        help="steady, saturated: only their requests and releases; churned, settled: the rebalance "
                             "figure's grid-seconds")
    parser.add_argument("--saturated", type=int, default=2000, help="releases timed in the saturated phase")
    parser.add_argument("--digest", action="store_true",
                        help="core path: print a hash of the core's effects in order (equal hashes, equal decisions; "
                             "the hashing's CPU is in the figures)")
    parser.add_argument("--schedules", type=int, default=0, metavar="K",
                        help="the first K substations get a limit schedule (90 %% of capacity)")
    parser.add_argument("--limited", type=int, default=0, metavar="K",
                        help="the first K substations get an operator capacity limit (95 %%)")
    parser.add_argument("--distinct-limits", action="store_true", help="each of those limits a little different")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # SxN:path, in this process
    args = parser.parse_args(argv)
    if not set(args.paths.split(",")) <= {"core", "service"}:
        parser.error("--paths: core, service or core,service")
    if args.one:
        size, path = args.one.split(":")
        s, n = (int(x) for x in size.split("x"))
        print(json.dumps(run_one(s, n, path, args.seconds, args.steady, args.profile, args.profile_phase,
                                   args.saturated, args.digest, args.schedules, args.limited,
                                   args.distinct_limits)))
        return 0
    rows = []
    print(f"{'substations x EVs':>18} {'path':>8} {'sessions':>9} {'queued':>7} {'fill µs/req':>12} "
          f"{'steady µs/req':>14} {'µs/answer':>10} {'GC µs/req, max':>15} {'rebal. churned ms/s':>20} "
          f"{'settled ms/s':>13} {'RSS MB':>7} {'sat. µs/req':>12} {'sat. µs/answer':>15}",
          flush=True)
    for size in args.sizes.split(","):
        for path in args.paths.split(","):
            out = subprocess.run([sys.executable, "-m", "bench", "scale", "--one", f"{size}:{path}",
                                  "--seconds", str(args.seconds), "--steady", str(args.steady),
                                  "--saturated", str(args.saturated), f"--schedules={args.schedules}",
                                  f"--limited={args.limited}"]
                                 + (["--distinct-limits"] if args.distinct_limits else [])
                                 + (["--digest"] if args.digest else []),
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{size:>18} {path:>8} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['substations']:>7,} x {row['evs']:>8,} {path:>8} {row['sessions']:>9,} {row['queued']:>7,} "
                  f"{row['fill_us_per_request']:>12,.1f} {row['steady_us_per_request']:>14,.1f} "
                  f"{row['steady_us_per_answer']:>10,.1f} "
                  f"{row['steady_gc_us_per_request']:>7,.1f} {row['steady_gc_longest_ms']:>5,.1f} ms "
                  f"{row['rebalance_churned_ms_per_grid_s']:>20,.2f} {row['rebalance_settled_ms_per_grid_s']:>13,.2f} "
                  f"{row['rss_mb']:>7,.0f} {row['saturated_us_per_request']:>12,.1f} "
                  f"{row['saturated_us_per_answer']:>15,.1f}"
                  + (f"  digest {row['digest'][:16]}" if args.digest else ""), flush=True)
    print(builds_line(), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "cpu": "time.process_time", **builds()}, indent=1))
    return 0
