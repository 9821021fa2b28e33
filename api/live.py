"""The live page's feed: one snapshot of the overview per update, fanned out to Server-Sent Events clients.

Every event is a complete snapshot, so a slow client can lose old ones without losing anything: each
client has a small bounded queue and the oldest snapshot is dropped when it is full. Snapshots are made
at most once per ``API_SSE_INTERVAL_S`` (when something changed, and every few seconds regardless, so
ages and staleness keep moving), never per message: a busy grid costs the page nothing extra. A client that
asked for probe noise (``/events?noise=true``) gets the variant whose latest answers include it; each variant is
made once per update, only when some client wants it. Each cycle also notes substations whose condition changed
(the event log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import msgspec

from api.state import StateStore
from grid_runtime.logs import get_logger

log = get_logger("api.live")

#: A snapshot is sent at least this often even when nothing changed (ages, staleness).
REFRESH_S = 2.0
#: Queue entries and latest assignments on the page.
PAGE_ROWS = 20
#: intervals of each limit schedule's composite the page shows
SCHEDULE_SLOTS = 4


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
        self.clients: dict[asyncio.Queue[str | None], bool] = {}
        self.sent = 0
        self.dropped = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def snapshot(self, noise: bool = False) -> dict[str, Any]:
        snap = self.store.overview(self.clock(), connected=self.connected(), queue_limit=PAGE_ROWS,
                                   assignments_limit=PAGE_ROWS, noise=noise, events_limit=PAGE_ROWS)
        # Limit schedules: what binds now and the next few intervals of the composite, per substation.
        snap["schedules"] = {sid: {"limit_kw": s.limit_kw, "source": s.source,
                                   "composite": [msgspec.to_builtins(c) for c in s.composite[:SCHEDULE_SLOTS]]}
                             for sid, s in self.store.schedules.items()}
        return snap

    def snapshot_json(self, noise: bool = False) -> str:
        return json.dumps(self.snapshot(noise), separators=(",", ":"))

    def changed(self) -> None:
        """The store changed (called for every MQTT message: only sets a flag)."""
        self._wake.set()

    def add_client(self, noise: bool = False) -> asyncio.Queue[str | None]:
        if len(self.clients) >= self.max_clients:
            raise TooManyClients(f"{len(self.clients)} live clients already")
        queue: asyncio.Queue[str | None] = asyncio.Queue(self.queue_size)
        queue.put_nowait(self.snapshot_json(noise))
        self.clients[queue] = noise
        return queue

    def remove_client(self, queue: asyncio.Queue[str | None]) -> None:
        self.clients.pop(queue, None)

    def _offer(self, queue: asyncio.Queue[str | None], item: str | None) -> None:
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
                self.dropped += 1
        queue.put_nowait(item)

    def broadcast(self) -> None:
        if not self.clients:
            return
        payloads: dict[bool, str] = {}
        for queue, noise in list(self.clients.items()):
            if noise not in payloads:
                payloads[noise] = self.snapshot_json(noise)
            self._offer(queue, payloads[noise])
        self.sent += 1

    async def run(self) -> None:
        last_version = -1
        last_connected: bool | None = None
        last_sent = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), REFRESH_S)
            self._wake.clear()
            now = time.monotonic()
            try:
                self.store.note_conditions(self.clock())
            except Exception:  # the event log must never stop the feed
                log.exception("live_conditions_failed")
            connected = self.connected()
            if (self.store.version != last_version or connected != last_connected
                    or now - last_sent >= REFRESH_S):
                last_version, last_connected, last_sent = self.store.version, connected, now
                try:
                    self.broadcast()
                except Exception:  # a page frozen on "live" would be worse than a logged error and a retry
                    self.broadcast_errors += 1
                    log.exception("live_broadcast_failed")
            await asyncio.sleep(self.interval_s)  # at most one snapshot per interval

    def full(self) -> bool:
        return len(self.clients) >= self.max_clients

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="api-live-hub")

    async def stop(self) -> None:
        for queue in list(self.clients):
            self._offer(queue, None)  # tells the stream to end
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
