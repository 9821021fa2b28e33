"""The writer task: takes batches from the buffer and writes them, off the event loop, with retries.

Why this shape: the InfluxDB client's synchronous write API is simple and has no hidden queue, so every
point's fate is ours to count. It runs in a worker thread (``asyncio.to_thread``) so the MQTT side keeps
reading while a write waits on the network. A failed batch is retried with capped exponential back-off
(``grid_runtime.backoff``) and held meanwhile (new points keep arriving in the bounded buffer); a batch the
database refuses as invalid (HTTP 4xx other than 401/403/404/408/429) is dropped and counted, since sending it
again cannot help; 401/403/404 are configuration (token, org, bucket) and are retried until an operator fixes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from grid_runtime.backoff import Backoff
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger
from monitoring.recorder.buffer import PointBuffer
from monitoring.recorder.metrics import RecorderStats

log = get_logger("recorder.writer")

#: A sink writes one batch of line-protocol lines synchronously (in a worker thread) and raises on failure.
Sink = Callable[[list[str]], None]


class Observer(Protocol):
    def observe(self, amount: float) -> Any: ...


@dataclass(frozen=True, slots=True)
class WriterConfig:
    batch_size: int = 5_000
    flush_interval_s: float = 1.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    shutdown_timeout_s: float = 5.0


def is_retryable(exc: BaseException) -> bool:
    """Network errors, timeouts, 5xx, 401/403/404 (configuration), 408 and 429 are worth retrying; other
    HTTP 4xx answers (the data itself was refused) are not."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 500:
        # 401/403/404 are configuration (token, org, bucket), not the data: retry (loudly logged) until an
        # operator fixes it rather than dropping valid points; the bounded buffer still caps memory.
        return status in (401, 403, 404, 408, 429)
    return True


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"


class Writer:
    def __init__(self, buffer: PointBuffer, sink: Sink, config: WriterConfig, stats: RecorderStats,
                 latency: Observer | None = None) -> None:
        self.buffer = buffer
        self.sink = sink
        self.config = config
        self.stats = stats
        self.latency = latency
        self.batch_ready = asyncio.Event()
        self.failing_since: float | None = None
        self._deadline: float | None = None  # loop time by which shutdown must be done, once it started

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set, then flush for at most ``shutdown_timeout_s``."""
        while not stop.is_set():
            if len(self.buffer) < self.config.batch_size:
                await self._wait_for_batch(stop)
            if stop.is_set():
                break
            if len(self.buffer):
                batch = self.buffer.take(self.config.batch_size)
                if not await self._write_batch(batch, stop):
                    self.stats.points_dropped["shutdown"] += len(batch)
        await self.drain()

    async def _wait_for_batch(self, stop: asyncio.Event) -> None:
        self.batch_ready.clear()
        waiters = [asyncio.ensure_future(self.batch_ready.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.config.flush_interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _start_shutdown_clock(self) -> float:
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self.config.shutdown_timeout_s
        return self._deadline

    async def drain(self) -> None:
        """Shutdown: write what is buffered until done or ``shutdown_timeout_s``; count and log what is left."""
        deadline = self._start_shutdown_clock()
        loop = asyncio.get_running_loop()
        start_len = len(self.buffer)
        while len(self.buffer) and loop.time() < deadline:
            batch = self.buffer.take(self.config.batch_size)
            if not await self._write_batch(batch, None):
                self.stats.points_dropped["shutdown"] += len(batch)
                break
        left = len(self.buffer)
        if left:
            self.buffer.take(left)
            self.stats.points_dropped["shutdown"] += left
        self.buffer.flush_drop_log()
        lost = self.stats.points_dropped["shutdown"]
        if lost:
            log.error("shutdown_points_not_written", points=lost, buffered_at_shutdown=start_len,
                      timeout_s=self.config.shutdown_timeout_s)
        else:
            log.info("shutdown_flushed", points=start_len)

    async def _write_batch(self, batch: list[str], stop: asyncio.Event | None) -> bool:
        """Write ``batch``, retrying retryable failures: until written, refused, or (shutdown) the deadline.

        Returns True when the batch is settled (written or counted as rejected), False when the deadline
        passed first (the caller counts it as dropped at shutdown). ``stop`` cuts a back-off sleep short so
        shutdown starts at once; the batch is then retried under the shutdown deadline. Outside shutdown a
        write is bounded by the client's own timeout (``INFLUX_TIMEOUT_S``).
        """
        loop = asyncio.get_running_loop()
        delays = Backoff(self.config.backoff_min_s, self.config.backoff_max_s)  # a fresh streak per batch
        self.stats.in_flight = len(batch)
        try:
            while True:
                started = time.perf_counter()
                deadline = self._deadline
                try:
                    if deadline is None:
                        await asyncio.to_thread(self.sink, batch)
                    else:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            return False
                        task = asyncio.ensure_future(asyncio.to_thread(self.sink, batch))
                        done, _ = await asyncio.wait({task}, timeout=remaining)
                        if not done:  # the thread finishes on its own (client timeout); its result is lost
                            task.add_done_callback(_consume)
                            return False
                        task.result()
                except Exception as exc:  # the sink's errors are many (urllib3, HTTP, OS): classify, never die
                    self.stats.write_errors += 1
                    if not is_retryable(exc):
                        self.stats.points_dropped["rejected"] += len(batch)
                        log.error("write_rejected_dropping_batch", points=len(batch), error=str(exc)[:500])
                        return True
                    delay = next(delays)
                    deadline = self._deadline
                    if deadline is not None:
                        delay = min(delay, max(0.0, deadline - loop.time()))
                    self.stats.points_retried += len(batch)
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                    log.warning("write_failed_retrying", points=len(batch), error=str(exc)[:300],
                                retry_in_s=round(delay, 3), buffered=len(self.buffer))
                    if stop is not None and not stop.is_set():
                        if await wait_event(stop, delay):
                            self._start_shutdown_clock()
                    else:
                        await asyncio.sleep(delay)
                    continue
                elapsed = time.perf_counter() - started
                self.stats.points_written += len(batch)
                if self.latency is not None:
                    self.latency.observe(elapsed)
                if self.failing_since is not None:
                    log.info("write_recovered", outage_s=round(time.monotonic() - self.failing_since, 3),
                             buffered=len(self.buffer))
                    self.failing_since = None
                return True
        finally:
            self.stats.in_flight = 0
