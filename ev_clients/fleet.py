"""Run many simulated EVs: an open fleet (arrivals at a rate) or a closed-loop load test.

* **fleet**: EVs arrive at ``arrival_rate`` per second (Poisson or fixed gaps), each with a realistic
  request, charge until ``completed`` (or leave early) and disconnect; an EV id is used again only after
  its EV left. Runs until stopped or until ``requests`` arrivals are done.
* **loadtest**: ``concurrent`` workers (each its own EV id and connection) start evenly over
  ``ramp_up_s`` and send requests back to back until ``requests`` were sent; each worker sends its share
  (``requests`` split evenly), so the concurrency is really reached however fast the answers are. After
  ``assigned`` a worker
  releases at once and sends the next request; after ``queued`` it waits for ``assigned`` (at most
  ``timeout_s``, then it releases).

Either releases only requests it sent itself (by ``request_id``): after an ``ev_busy`` answer it closes what
it left open for that EV id, if anything, and otherwise leaves the EV id's holder alone (a session opened
through the API, another run) and logs ``ev_id_held_elsewhere``: a fleet lets that id sit out ``timeout_s``
before it arrives again, a load-test worker (one fixed EV id) keeps sending and is answered ``ev_busy``.

A live line reports progress; :meth:`FleetRunner.run` returns the :class:`~ev_clients.stats.FleetStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

import httpx

from ev_clients.ev import EvBehaviour, OwnRequests, SimulatedEv, new_request_id
from ev_clients.http_ev import HttpEv, HttpRefused
from ev_clients.settings import EvSettings
from ev_clients.stats import FleetStats, RequestRecord
from ev_clients.workload import EvIdPool, RequestMix, arrival_gaps, ev_ids, ramp_offsets, split_evenly
from grid_protocol.reasons import Reason
from grid_protocol.topics import Topics
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import Transport, TransportStats

log = get_logger("ev_fleet")

Mode = Literal["fleet", "loadtest"]


@dataclass(slots=True)
class RunConfig:
    mode: Mode = "fleet"
    requests: int | None = None  # fleet: arrivals (None: until stopped); loadtest: requests to send
    concurrent: int = 10  # loadtest workers
    ramp_up_s: float = 5.0
    run_for_s: float | None = None  # stop (gracefully) after this long
    mix: RequestMix = field(default_factory=RequestMix)
    report_every_s: float | None = None  # None: 1 s on a TTY, 5 s otherwise; 0: no live line
    shutdown_grace_s: float | None = None  # after a stop, EVs get this long to release; None: derived


def _behaviour(settings: EvSettings, mode: Mode) -> EvBehaviour:
    return EvBehaviour(
        retry_after_s=settings.retry_after_s,
        max_attempts=settings.max_attempts,
        timeout_s=settings.timeout_s,
        speedup=settings.speedup,
        release_early_pct=settings.release_early_pct,
        release_at_once=mode == "loadtest",
        release_after_s=settings.release_after_s,
    )


class ConnectionTotals(NamedTuple):
    connected: int  # connections up right now
    reconnects: int  # connections after each one's first, summed
    stats: TransportStats  # traffic of every connection so far, summed


class EvConnections:
    """The fleet's MQTT connections, for the metrics: the open ones, and the traffic of those already closed
    (so the fleet's connection counters never go down when an EV leaves). Changed by the event loop, read by
    the metrics thread: both under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Transport] = set()
        self._closed = TransportStats()
        self._closed_reconnects = 0

    def opened(self, transport: Transport) -> None:
        with self._lock:
            self._open.add(transport)

    def closed(self, transport: Transport) -> None:
        with self._lock:
            if transport in self._open:
                self._open.discard(transport)
                _add_stats(self._closed, transport.stats)
                self._closed_reconnects += max(0, transport.stats.connects - 1)

    def totals(self) -> ConnectionTotals:
        with self._lock:
            stats = dataclasses.replace(self._closed)
            connected = 0
            reconnects = self._closed_reconnects
            for transport in self._open:
                _add_stats(stats, transport.stats)
                connected += transport.connected.is_set()
                reconnects += max(0, transport.stats.connects - 1)
        return ConnectionTotals(connected, reconnects, stats)


def _add_stats(total: TransportStats, stats: TransportStats) -> None:
    for f in dataclasses.fields(TransportStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))


class FleetRunner:
    """Runs a fleet or a load test against the broker in ``settings.mqtt``."""

    def __init__(self, settings: EvSettings, config: RunConfig, *, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.config = config
        self.out = out if out is not None else sys.stderr
        self.clock = clock
        self.topics = Topics(settings.grid.grid_topic_prefix, settings.region)
        self.behaviour = _behaviour(settings, config.mode)
        self.rng = random.Random(settings.seed)
        total = config.requests
        # A finite run keeps every record (exact summary and --save); an open-ended fleet runs for days, so it
        # keeps only the most recent ``keep_records`` of them (counts stay exact, memory stays bounded).
        keep = None if config.mode == "loadtest" or total is not None else settings.keep_records
        self.stats = FleetStats(mode=config.mode, total=total, started_at=clock(), keep_records=keep)
        self.stop = asyncio.Event()
        self.interrupted = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._taken = 0  # loadtest: requests started by the workers
        self.connections = EvConnections()
        self.own = OwnRequests()  # requests this run sent and never saw end: the only ones it may release
        self._held_elsewhere: set[str] = set()  # EV ids already reported as held by someone else
        #: ``EV_API_URL``: the load test goes through the HTTP API (one connection pool for every EV)
        self._http: httpx.AsyncClient | None = None
        self.refused: str | None = None  # the API refused the token (the run stopped)

    # --- helpers --------------------------------------------------------------------------------
    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ev_task_failed", task=task.get_name(), error=repr(task.exception()))

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; ``True`` when the full time passed."""
        if seconds <= 0:
            return not self.stop.is_set()
        return not await wait_event(self.stop, seconds)

    def _new_ev(self, ev_id: str, rng: random.Random) -> SimulatedEv | HttpEv:
        if self._http is not None:
            return HttpEv(ev_id, self._http, self.stats, self.behaviour, stop=self.stop, clock=self.clock)
        ev = SimulatedEv(ev_id, self.settings.mqtt, self.topics, self.stats, self.behaviour,
                         client_kind=self.settings.client, rng=rng, stop=self.stop, clock=self.clock,
                         own=self.own)
        self.connections.opened(ev.transport)
        return ev

    async def _after_busy(self, ev: SimulatedEv | HttpEv, record: RequestRecord) -> bool:
        """``ev_busy``: close what this run left open for the EV id (``True``: try again). Anything else holding
        it is not ours to end: say so once per EV id and leave it."""
        if await ev.release_own():
            return True
        if ev.ev_id not in self._held_elsewhere:
            self._held_elsewhere.add(ev.ev_id)
            log.warning("ev_id_held_elsewhere", ev_id=ev.ev_id, request_id=record.request_id,
                        hint="a request this run did not send holds the EV id (answered ev_busy); left alone")
        return False

    async def _close(self, ev: SimulatedEv | HttpEv) -> None:
        try:
            await ev.close()
        finally:
            if ev.transport is not None:
                self.connections.closed(ev.transport)

    @staticmethod
    def _busy(record: RequestRecord) -> bool:
        return bool(record.final_status == "rejected" and record.events
                    and record.events[-1].reason == Reason.EV_BUSY)

    # --- fleet --------------------------------------------------------------------------------
    async def _visit(self, ev_id: str, pool: EvIdPool, freed: asyncio.Event, seed: int) -> None:
        """One EV arrives, charges once and leaves. An EV id someone else holds sits out ``timeout_s`` before it
        may arrive again (the pool hands out the lowest free id: it would otherwise take most arrivals)."""
        rng = random.Random(seed)
        ev = self._new_ev(ev_id, rng)
        held_elsewhere = False
        try:
            await ev.start()
            record = await ev.charge(self.config.mix.make(rng, ev_id, new_request_id()))
            if self._busy(record) and not self.stop.is_set():
                if await self._after_busy(ev, record):
                    # An earlier visit of this id in this run left a request open: closed now, try once more.
                    await ev.charge(self.config.mix.make(rng, ev_id, new_request_id()))
                else:
                    held_elsewhere = True
        finally:
            await self._close(ev)

            def free() -> None:
                pool.release(ev_id)
                freed.set()

            if held_elsewhere and not self.stop.is_set():
                asyncio.get_running_loop().call_later(self.behaviour.timeout_s, free)
            else:
                free()

    async def _run_fleet(self) -> None:
        s = self.settings
        pool = EvIdPool(ev_ids(s.id_prefix, s.count))
        freed = asyncio.Event()
        gaps = arrival_gaps(s.arrival_rate, s.arrival_mode, self.rng)
        limit = self.config.requests
        arrived = 0
        next_at = self.clock()
        while not self.stop.is_set() and (limit is None or arrived < limit):
            next_at += next(gaps)
            if not await self._sleep(next_at - self.clock()):
                break
            ev_id = pool.acquire()
            if ev_id is None:
                self.stats.arrivals_delayed += 1
                while ev_id is None and not self.stop.is_set():
                    freed.clear()
                    stopper = asyncio.ensure_future(self.stop.wait())
                    freer = asyncio.ensure_future(freed.wait())
                    await asyncio.wait({stopper, freer}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    freer.cancel()
                    ev_id = pool.acquire()
                if ev_id is None:
                    break
                next_at = self.clock()  # arrivals resume from the moment an EV could arrive
            arrived += 1
            self._spawn(self._visit(ev_id, pool, freed, self.rng.getrandbits(64)), f"ev-{ev_id}")

    # --- load test ----------------------------------------------------------------------------
    async def _worker(self, ev_id: str, start_after_s: float, share: int, seed: int) -> None:
        if share <= 0 or not await self._sleep(start_after_s):
            return
        rng = random.Random(seed)
        ev = self._new_ev(ev_id, rng)
        try:
            await ev.start()
            for _ in range(share):
                if self.stop.is_set():
                    break
                self._taken += 1
                try:
                    record = await ev.charge(self.config.mix.make(rng, ev_id, new_request_id()))
                except HttpRefused as exc:  # a wrong token: no request of this run can succeed
                    if self.refused is None:
                        self.refused = str(exc)
                        log.error("api_token_refused", detail=str(exc), hint="--token / EV_API_TOKEN / API_TOKEN")
                    self.request_stop()
                    break
                if self._busy(record) and not self.stop.is_set():
                    await self._after_busy(ev, record)
        finally:
            await self._close(ev)

    async def _run_loadtest(self) -> None:
        cfg = self.config
        ids = ev_ids(self.settings.id_prefix, cfg.concurrent)
        shares = split_evenly(cfg.requests or 0, cfg.concurrent)
        for ev_id, offset, share in zip(ids, ramp_offsets(cfg.concurrent, cfg.ramp_up_s), shares, strict=True):
            self._spawn(self._worker(ev_id, offset, share, self.rng.getrandbits(64)), f"worker-{ev_id}")

    # --- live line ----------------------------------------------------------------------------
    async def _reporter(self) -> None:
        tty = bool(getattr(self.out, "isatty", lambda: False)())
        every = self.config.report_every_s
        if every is None:
            every = 1.0 if tty else 5.0
        if every <= 0:
            return
        width = 0
        try:
            for _ in range(10_000_000):  # bounded; the task is cancelled at the end of the run
                await asyncio.sleep(every)
                line = self.stats.live_line(self.clock())
                if self.settings.speedup != 1:  # (a 120-minute session ends after 2 real minutes at 60x)
                    line += f" | sim time x{self.settings.speedup:g}"
                if tty:
                    width = max(width, len(line))
                    self.out.write("\r" + line.ljust(width))
                else:
                    self.out.write(line + "\n")
                self.out.flush()
        finally:
            if tty and width:
                self.out.write("\n")
                self.out.flush()

    # --- run ----------------------------------------------------------------------------------
    def request_stop(self, *, planned: bool = False) -> None:
        """Graceful stop: no new arrivals/requests; EVs release what they hold and disconnect. ``planned``: the
        run's own end (``--run-for``), not an interruption."""
        if not self.stop.is_set():
            self.interrupted = not planned
            self.stop.set()

    def _grace(self) -> float:
        if self.config.shutdown_grace_s is not None:
            return self.config.shutdown_grace_s
        b = self.behaviour
        return min(b.retry_after_s * b.max_attempts, 2 * b.retry_after_s + 5.0) + 5.0

    async def run(self) -> FleetStats:
        if self.settings.api_url is not None:
            token = self.settings.api_token.get_secret_value() if self.settings.api_token else ""
            self._http = httpx.AsyncClient(base_url=self.settings.api_url, timeout=30.0,
                                           headers={"Authorization": f"Bearer {token}"} if token else {},
                                           limits=httpx.Limits(max_connections=max(10, self.config.concurrent)))
        try:
            return await self._run()
        finally:
            if self._http is not None:
                await self._http.aclose()

    async def _run(self) -> FleetStats:
        self.stats.started_at = self.clock()
        reporter = asyncio.create_task(self._reporter(), name="reporter")
        timer: asyncio.Task[None] | None = None
        if self.config.run_for_s:
            timer = asyncio.create_task(self._stop_after(self.config.run_for_s), name="run-for")
        try:
            if self.config.mode == "loadtest":
                await self._run_loadtest()
            else:
                await self._run_fleet()
            await self._drain()
        finally:
            self.stats.ended_at = self.clock()
            for t in (reporter, timer):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t
            if self._tasks:  # cancelled from outside: take the EVs down with us
                for t in list(self._tasks):
                    t.cancel()
                await asyncio.wait(list(self._tasks), timeout=5.0)
        return self.stats

    async def _stop_after(self, seconds: float) -> None:
        if await self._sleep(seconds):
            log.info("run_for_elapsed", seconds=seconds)
            self.request_stop(planned=True)

    async def _drain(self) -> None:
        """Wait for every EV; once stopped, at most the shutdown grace, then cancel the rest."""
        for _ in range(10_000_000):
            if not self._tasks:
                return
            if self.stop.is_set():
                _done, pending = await asyncio.wait(list(self._tasks), timeout=self._grace())
                if pending:
                    log.warning("ev_tasks_cancelled_at_shutdown", count=len(pending))
                    for t in pending:
                        t.cancel()
                    await asyncio.wait(pending, timeout=5.0)
                return
            stopper = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait([*self._tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()

    # --- results ------------------------------------------------------------------------------
    def exit_code(self) -> int:
        """0 when every request sent was answered (and, for a load test, all were sent); 1 otherwise."""
        s = self.stats
        if s.unanswered_count or self.refused is not None:
            return 1
        if self.config.mode == "loadtest" and not self.interrupted and s.sent < (self.config.requests or 0):
            return 1
        return 0

    def report(self) -> dict[str, Any]:
        s = self.settings
        config: dict[str, Any] = {
            "mode": self.config.mode,
            "broker": ",".join(f"{h}:{p}" for h, p in s.mqtt.addresses()) if s.api_url is None else None,
            "api": s.api_url,
            "client": s.client if s.api_url is None else "http",
            "requests": self.config.requests,
            "interrupted": self.interrupted,
            "ev": s.model_dump(mode="json", exclude={"mqtt", "grid", "api_token"}),
            "mix": dataclasses.asdict(self.config.mix),
        }
        if self.config.mode == "loadtest":
            config.update(concurrent=self.config.concurrent, ramp_up_s=self.config.ramp_up_s)
        return self.stats.report(self.clock(), config=config, exit_code=self.exit_code())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write summary + per-request records as JSON (atomically: temp file, then rename); an open-ended
        fleet saves only its most recent records, see :meth:`FleetStats.report`."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.report(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(target)
        return target
