"""``python -m ev_clients scenario --scenario FILE --speedup N``: the EVs of a replay scenario, live.

Every EV of the scenario (``grid_sim.scenario.generate_evs``: the same EVs, ids and requests as the fast
simulation for the scenario's seed) gets its own MQTT connection and account (username = EV id), made a
little before it arrives (``--lead``). At its sped-up arrival time it sends its :class:`ChargeRequest`
(``requested_kw``, ``min_kw``, ``energy_kwh``, ``priority`` and ``departure`` as an epoch time: scenario
start + departure / speed-up; request id ``r-<ev id>``, retried with the same id until answered), follows the
answers, and at its departure sends a :class:`Release` if it is still charging or waiting; it leaves early
only when the balancer says ``completed``, ``cancelled`` or ``rejected``. A burst is simply many EVs with
the same arrival time: they ask at the same instant, each on its own connection.

Scenario time 0 is ``--start-at`` (epoch seconds; the live replay passes the same value to the agents).
``--save FILE`` writes the summary and, per EV, its arrival/departure, when it sent its request and its
release (epoch seconds) and every answer it received. Exit code 0 when every EV got an answer and its request
was closed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

from ev_clients.ev import EvBehaviour, SimulatedEv
from ev_clients.settings import EvSettings
from ev_clients.stats import FleetStats, RequestRecord
from grid_protocol.codec import encode
from grid_protocol.messages import ChargeRequest, Release
from grid_protocol.topics import Topics
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger
from grid_sim.scenario import EvSpec, Scenario, ScenarioError, generate_evs, load_scenario
from grid_sim.timeline import Timebase

__all__ = ["ScenarioEv", "ScenarioFleet", "add_parser", "request_for", "run_cli"]

log = get_logger("ev_fleet")

#: Seconds before its arrival an EV connects (a burst of 1,000 connects in about a second here).
DEFAULT_LEAD_S = 2.0
#: EVs connecting at the same time (a burst must not open 1,000 TCP handshakes at once).
CONNECT_PARALLEL = 100


def request_for(ev: EvSpec, timebase: Timebase) -> ChargeRequest:
    """The request of a scenario EV: what the fast simulation sends, with ``departure`` on the wall clock."""
    return ChargeRequest(requested_kw=ev.requested_kw, request_id=f"r-{ev.ev_id}", ev_id=ev.ev_id,
                         energy_kwh=ev.energy_kwh, min_kw=ev.min_kw, priority=ev.priority,
                         departure=round(timebase.wall(ev.departure), 3))


class ScenarioEv(SimulatedEv):
    """An EV that asks once, stays until its departure (or until the balancer closes its request) and leaves."""

    released_at: float | None = None

    async def visit(self, request: ChargeRequest, departure_wall: float) -> RequestRecord:
        assert request.request_id is not None
        record = self.stats.new_record(RequestRecord(
            ev_id=self.ev_id, request_id=request.request_id, requested_kw=request.requested_kw,
            energy_kwh=request.energy_kwh, priority=request.priority))
        self._current = request.request_id
        self._session = None
        if request.expires_at is None:  # (void once the EV stops waiting for a first answer, as SimulatedEv's)
            request = msgspec.structs.replace(request, expires_at=round(time.time() + self.behaviour.answer_window_s,
                                                                        3))
        payload = encode(request)
        try:
            if not await self._first_answer(record, payload):
                record.outcome = "unanswered"
                log.error("ev_request_unanswered", ev_id=self.ev_id, request_id=record.request_id)
                self._leave(record)
                return record
            while not record.finished:
                now = self.clock()
                if self.stop.is_set() or now >= departure_wall:
                    record.outcome = "stopped" if self.stop.is_set() else "departed"
                    self.released_at = now
                    await self._release(record, request)
                    return record
                got = await self._next_or_stop(departure_wall - now)
                if got is not None:
                    self._apply(record, *got)
            record.outcome = record.final_status
            return record
        except asyncio.CancelledError:
            record.outcome = record.outcome or "interrupted"
            raise
        finally:
            self._current = None
            self._session = None

    def _leave(self, record: RequestRecord) -> None:
        """Whatever the balancer may have got, leave nothing open behind us."""
        self.released_at = self.clock()
        record.released = True
        self.transport.publish(self._release_topic, encode(Release(request_id=record.request_id,
                                                                   ev_id=self.ev_id)), 1)


@dataclass(slots=True)
class Visit:
    ev: EvSpec
    record: RequestRecord | None = None
    released_at: float | None = None
    connected: bool = False


class ScenarioFleet:
    """Plays the EVs of ``evs`` against the broker in ``settings.mqtt`` on ``timebase``."""

    def __init__(self, settings: EvSettings, scenario: Scenario, evs: Sequence[EvSpec], timebase: Timebase, *,
                 lead_s: float = DEFAULT_LEAD_S, report_every_s: float | None = None,
                 out: TextIO | None = None) -> None:
        self.settings = settings
        self.scenario = scenario
        self.timebase = timebase
        self.lead_s = lead_s
        self.report_every_s = report_every_s
        self.out = out if out is not None else sys.stderr
        self.topics = Topics(settings.grid.grid_topic_prefix, settings.region)
        self.behaviour = EvBehaviour(retry_after_s=settings.retry_after_s, max_attempts=settings.max_attempts,
                                     timeout_s=settings.timeout_s, speedup=timebase.speedup, release_early_pct=0.0)
        self.stats = FleetStats(mode="scenario", total=len(evs), started_at=time.time())
        self.visits = [Visit(ev) for ev in evs]
        self.stop = asyncio.Event()
        self.interrupted = False
        self._connecting = asyncio.Semaphore(CONNECT_PARALLEL)

    async def _sleep_until(self, wall: float) -> bool:
        """Sleep until epoch ``wall`` unless stopped first; ``True`` when the time came."""
        delay = wall - time.time()
        if delay > 0:
            return not await wait_event(self.stop, delay)
        return not self.stop.is_set()

    async def _visit(self, visit: Visit) -> None:
        spec = visit.ev
        if not await self._sleep_until(self.timebase.wall(spec.arrival) - self.lead_s):
            return
        ev = ScenarioEv(spec.ev_id, self.settings.mqtt, self.topics, self.stats, self.behaviour,
                        client_kind=self.settings.client, stop=self.stop, clock=time.time)
        try:
            async with self._connecting:
                visit.connected = await ev.start()
            if not await self._sleep_until(self.timebase.wall(spec.arrival)):
                return
            visit.record = await ev.visit(request_for(spec, self.timebase), self.timebase.wall(spec.departure))
            visit.released_at = ev.released_at
        finally:
            await ev.close()

    async def _reporter(self) -> None:
        every = self.report_every_s
        if every is None:
            every = 1.0 if getattr(self.out, "isatty", lambda: False)() else 5.0
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            t = self.timebase.scenario(time.time())
            self.out.write(f"[t={t / 3600:5.2f} h] " + self.stats.live_line(time.time()) + "\n")
            self.out.flush()

    def request_stop(self) -> None:
        if not self.stop.is_set():
            self.interrupted = True
            self.stop.set()

    async def run(self) -> FleetStats:
        self.stats.started_at = time.time()
        reporter = asyncio.create_task(self._reporter(), name="reporter")
        tasks = [asyncio.create_task(self._visit(v), name=f"ev-{v.ev.ev_id}") for v in self.visits]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for visit, result in zip(self.visits, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                    log.error("ev_task_failed", ev_id=visit.ev.ev_id, error=repr(result))
        finally:
            self.stats.ended_at = time.time()
            reporter.cancel()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await reporter
        return self.stats

    # --- results ------------------------------------------------------------------------------
    def not_closed(self) -> list[str]:
        """EVs that never asked, were never answered, or whose request was not closed by the end."""
        return [v.ev.ev_id for v in self.visits if v.record is None or not v.record.finished]

    def exit_code(self) -> int:
        return 1 if self.not_closed() else 0

    def report(self) -> dict[str, Any]:
        evs = []
        for v in self.visits:
            r = v.record
            entry: dict[str, Any] = {
                "ev_id": v.ev.ev_id, "arrival_s": v.ev.arrival, "departure_s": v.ev.departure,
                "connected": v.connected, "released_at": v.released_at,
            }
            if r is not None:
                entry.update(sent_at=r.sent_at, attempts=r.attempts, final_status=r.final_status, outcome=r.outcome,
                             answers=[{"status": e.status, "at": (r.sent_at or 0.0) + e.at_s,
                                       "granted_kw": e.granted_kw, "reason": e.reason,
                                       "substation_id": e.substation_id} for e in r.events])
            evs.append(entry)
        return {"scenario": self.scenario.name, "seed": self.scenario.seed, "speedup": self.timebase.speedup,
                "start_epoch": self.timebase.t0, "interrupted": self.interrupted,
                "summary": self.stats.summary(time.time()), "not_closed": self.not_closed(), "evs": evs}


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub: Any, positive_int: Any) -> None:
    """The ``scenario`` subcommand (``sub``: the subparsers of ``python -m ev_clients``; ``positive_int``: its
    argument type for counts)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "scenario", help="the EVs of a replay scenario, at a speed-up (used by python -m replay --mode live)")
    p.add_argument("--scenario", required=True, help="a replay scenario: a shipped name or a file")
    p.add_argument("--start-at", type=float, metavar="EPOCH",
                   help="epoch seconds of the scenario's time 0 (default: in --lead + 1 s)")
    p.add_argument("--lead", type=float, default=DEFAULT_LEAD_S, metavar="S",
                   help="connect each EV this long before it arrives (default %(default)s)")
    p.add_argument("--url", help="broker, mqtt://host:port (default: MQTT_HOST/MQTT_PORT)")
    p.add_argument("--client", choices=("aiomqtt", "paho"), help="MQTT library per EV (EV_CLIENT, aiomqtt)")
    p.add_argument("--speedup", type=float, help="scenario seconds per wall second (EV_SPEEDUP, 1)")
    p.add_argument("--retry-after", type=float, metavar="S",
                   help="re-send an unanswered request after S seconds (EV_RETRY_AFTER_S, 5)")
    p.add_argument("--max-attempts", type=positive_int, metavar="N",
                   help="publishes of a request before it counts as unanswered (EV_MAX_ATTEMPTS, 6)")
    p.add_argument("--save", metavar="FILE.json", help="write the summary and every EV's timeline as JSON")
    p.add_argument("--report-every", type=float, metavar="S",
                   help="live line interval (default 1 s on a TTY, 5 s otherwise; 0 = off)")
    p.add_argument("--log-level", help="log level (LOG_LEVEL; MQTT connection chatter stays at WARNING)")


def _install_signals(fleet: ScenarioFleet, main_task: asyncio.Task[Any]) -> None:
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if fleet.stop.is_set():
            main_task.cancel()
        else:
            fleet.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)


def run_cli(args: argparse.Namespace, settings: EvSettings) -> int:
    """``python -m ev_clients scenario``; logging is configured by the caller."""
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.lead < 0:
        print("error: --lead must be >= 0", file=sys.stderr)
        return 2
    start = args.start_at if args.start_at is not None else time.time() + args.lead + 1.0
    timebase = Timebase(start, settings.speedup)
    fleet = ScenarioFleet(settings, scenario, generate_evs(scenario), timebase, lead_s=args.lead,
                          report_every_s=args.report_every)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        _install_signals(fleet, task)
        with contextlib.suppress(asyncio.CancelledError):
            await fleet.run()

    asyncio.run(main())
    print(f"\n=== scenario {scenario.name}: {len(fleet.visits)} EVs at {settings.speedup:g}x"
          f"{' (interrupted)' if fleet.interrupted else ''} ===")
    print(fleet.stats.table(time.time()))
    if args.save:
        target = Path(args.save)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(fleet.report(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(target)
        print(f"saved {target}")
    missing = fleet.not_closed()
    if missing:
        print(f"FAIL: {len(missing)} EV(s) without a closed request: {' '.join(missing[:20])}", file=sys.stderr)
    return fleet.exit_code()
