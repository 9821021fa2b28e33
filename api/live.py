"""The live page's feed: a snapshot, then only what changed, fanned out to Server-Sent Events clients.

A client first gets a ``snapshot`` event: the overview with each substation as one compact array
(:data:`api.state.COMPACT_FIELDS`, worst first) and ``seq``. Then, at most once per ``API_SSE_INTERVAL_S`` (when
something changed, and every ``REFRESH_S`` regardless, so staleness is judged again), a ``diff`` event with
``seq`` one higher: the substations whose row changed (``upsert``), those gone (``remove``: forgotten), and each of
the other parts (totals, balancer, queue, latest answers, event log, decommissioned) only when it changed. Rows
hold no ages (a stale row carries when it was last heard of), so a quiet grid costs a few bytes per update.

The diff is made once per update for every client. A client that cannot keep up (its bounded queue is full) loses
its queued events and gets a fresh snapshot instead, so it never applies a diff to a state it does not have
(``resyncs``). A client that asked for probe noise (``/events?noise=true``) gets the variant whose latest answers
include it; each variant's parts are made once per update, only when some client wants it. Each cycle also notes
substations whose condition changed (the event log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from api.state import COMPACT_FIELDS, CONDITION_RANK, StateStore, compact_row
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger

log = get_logger("api.live")

#: An update is sent at least this often even when nothing changed (staleness is judged again).
REFRESH_S = 2.0
#: Queue entries, latest assignments and events on the page.
PAGE_ROWS = 20
#: What a diff may carry besides the substations, each only when it changed.
PARTS = ("mqtt_connected", "balancer", "totals", "decommissioned", "queue", "latest_assignments", "events",
         "schedules")
#: Intervals of each substation's limit schedule (its composite) the page shows.
SCHEDULE_SLOTS = 4
_CONDITION = COMPACT_FIELDS.index("condition")
_UTILISATION = COMPACT_FIELDS.index("utilisation")

#: One event for a client: (SSE event name, JSON data); ``None`` ends the stream.
Item = tuple[str, str] | None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def worst_first_row(row: tuple[Any, ...]) -> tuple[int, float, str]:
    """:func:`api.state.worst_first` for a compact row."""
    utilisation = row[_UTILISATION]
    return (CONDITION_RANK[row[_CONDITION]], -(utilisation if utilisation is not None else -1.0), row[0])


class TooManyClients(Exception):
    pass


class LiveHub:
    def __init__(self, store: StateStore, connected: Callable[[], bool], *, interval_s: float = 0.5,
                 queue_size: int = 8, max_clients: int = 100, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.connected = connected
        self.interval_s = interval_s
        self.queue_size = queue_size
        self.max_clients = max_clients
        self.broadcast_errors = 0
        self.clock = clock
        #: each client's queue, and whether it wants probe noise in the latest answers
        self.clients: dict[asyncio.Queue[Item], bool] = {}
        self.sent = 0  # updates made (each one fanned out to every client)
        self.dropped = 0  # events a slow client lost (replaced by a snapshot)
        self.resyncs = 0  # snapshots sent to clients that fell behind
        self.sent_bytes = 0  # event data queued for clients, summed over clients
        #: the state the clients hold, as of update ``seq``: every substation's row, and per variant the JSON of
        #: each part
        self.seq = 0
        self.ts = 0.0
        self._rows: dict[str, tuple[Any, ...]] = {}
        self._parts: dict[bool, dict[str, str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ what the clients hold
    def _part_values(self, noise: bool, now: float, views: list[dict[str, Any]]) -> dict[str, Any]:
        store = self.store
        balancer = store.balancer_view(now)
        balancer.pop("age_s")  # (the page ages it from ts: an age would make every update carry it)
        return {
            "mqtt_connected": self.connected(), "balancer": balancer, "totals": store.totals(views),
            "decommissioned": list(reversed(store.decommissioned.values())),
            "queue": store.queue_view(now, PAGE_ROWS),
            "latest_assignments": store.recent_assignments(PAGE_ROWS, noise=noise),
            "events": store.events.latest(PAGE_ROWS),
            "schedules": store.schedule_views(SCHEDULE_SLOTS),
        }

    def _advance(self, now: float, views: list[dict[str, Any]]) -> dict[str, Any]:
        """Take the rows of ``now`` as what the clients hold; return the shared part of the diff."""
        rows = {v["substation_id"]: compact_row(v) for v in views}
        before = self._rows
        upsert = [list(row) for sid, row in rows.items() if before.get(sid) != row]
        remove = [sid for sid in before if sid not in rows]
        self._rows = rows
        self.seq += 1
        self.ts = now
        diff: dict[str, Any] = {"seq": self.seq, "ts": now}
        if upsert:
            diff["upsert"] = upsert
        if remove:
            diff["remove"] = remove
        return diff

    def _variant_diff(self, noise: bool, now: float, views: list[dict[str, Any]]) -> dict[str, Any]:
        """The parts of this variant that changed since its last update (all of them for a new variant)."""
        held = self._parts.setdefault(noise, {})
        changed: dict[str, Any] = {}
        for name, value in self._part_values(noise, now, views).items():
            text = _dumps(value)
            if held.get(name) != text:
                held[name] = text
                changed[name] = value
        return changed

    def snapshot_json(self, noise: bool = False) -> str:
        """What the clients of this variant hold, whole (their parts must have been made: see add_client)."""
        rows = sorted(self._rows.values(), key=worst_first_row)
        parts = ",".join(f'"{name}":{text}' for name, text in self._parts[noise].items())
        head = _dumps({"seq": self.seq, "ts": self.ts, "fields": COMPACT_FIELDS, "substations": rows})
        return head[:-1] + "," + parts + "}"

    def snapshot(self, noise: bool = False) -> dict[str, Any]:
        """The snapshot a new client would get now (parsed; for tests and the benchmark)."""
        self._ensure(noise)
        value: dict[str, Any] = json.loads(self.snapshot_json(noise))
        return value

    def _ensure(self, noise: bool) -> None:
        """Make sure the clients' state exists for ``noise``: a first client starts it afresh (nobody misses an
        update), a client of a new variant gets that variant's parts made now."""
        now = self.clock()
        if not self.clients or self.seq == 0:
            views = self.store.substation_views(now)
            self._parts.clear()
            self._advance(now, views)
            self._variant_diff(noise, now, views)
        elif noise not in self._parts:
            self._variant_diff(noise, now, self.store.substation_views(now))

    # ------------------------------------------------------------------ clients
    def changed(self) -> None:
        """The store changed (called for every MQTT message: only sets a flag)."""
        self._wake.set()

    def add_client(self, noise: bool = False) -> asyncio.Queue[Item]:
        if len(self.clients) >= self.max_clients:
            raise TooManyClients(f"{len(self.clients)} live clients already")
        self._ensure(noise)
        queue: asyncio.Queue[Item] = asyncio.Queue(self.queue_size)
        self._put(queue, ("snapshot", self.snapshot_json(noise)))
        self.clients[queue] = noise
        return queue

    def remove_client(self, queue: asyncio.Queue[Item]) -> None:
        noise = self.clients.pop(queue, None)
        if noise is not None and noise not in self.clients.values():
            self._parts.pop(noise, None)  # nobody holds this variant any more

    def _put(self, queue: asyncio.Queue[Item], item: Item) -> None:
        queue.put_nowait(item)
        if item is not None:
            self.sent_bytes += len(item[1])

    def _offer(self, queue: asyncio.Queue[Item], item: tuple[str, str], noise: bool) -> None:
        """Queue an update; a client that fell behind loses what it had queued and gets a snapshot instead."""
        if queue.full():
            while not queue.empty():
                queue.get_nowait()
                self.dropped += 1
            self.resyncs += 1
            item = ("snapshot", self.snapshot_json(noise))
        self._put(queue, item)

    def broadcast(self, now: float | None = None, views: list[dict[str, Any]] | None = None) -> None:
        """One update: the diff since the last one to every client (nothing is made without clients)."""
        if not self.clients:
            return
        if now is None or views is None:
            now = self.clock()
            views = self.store.substation_views(now)
        shared = self._advance(now, views)
        payloads: dict[bool, str] = {}
        for noise in set(self.clients.values()):
            payloads[noise] = _dumps({**shared, **self._variant_diff(noise, now, views)})
        for queue, noise in list(self.clients.items()):
            self._offer(queue, ("diff", payloads[noise]), noise)
        self.sent += 1

    async def run(self) -> None:
        last_version = -1
        last_connected: bool | None = None
        last_sent = 0.0
        while True:
            # (wait_event, not wait_for: in Python 3.11 wait_for drops a cancel that lands with the wake-up, and
            # stop() then waited for this loop for ever: the API hung at exit)
            await wait_event(self._wake, REFRESH_S)
            self._wake.clear()
            now = time.monotonic()
            wall = self.clock()
            views = self.store.substation_views(wall)  # (once per cycle: the event log and the update)
            try:
                self.store.note_conditions(wall, views)
            except Exception:  # the event log must never stop the feed
                log.exception("live_conditions_failed")
            connected = self.connected()
            if (self.store.version != last_version or connected != last_connected
                    or now - last_sent >= REFRESH_S):
                last_version, last_connected, last_sent = self.store.version, connected, now
                try:
                    self.broadcast(wall, views)
                except Exception:  # a page frozen on "live" would be worse than a logged error and a retry
                    self.broadcast_errors += 1
                    log.exception("live_broadcast_failed")
            await asyncio.sleep(self.interval_s)  # at most one update per interval

    def full(self) -> bool:
        return len(self.clients) >= self.max_clients

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="api-live-hub")

    async def stop(self) -> None:
        for queue in list(self.clients):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)  # tells the stream to end
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
