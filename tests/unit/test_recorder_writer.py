"""The writer: batching, back-off schedule, retry/drop accounting, off-loop writes, bounded shutdown."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest
from influxdb_client.rest import ApiException
from urllib3.exceptions import NewConnectionError

from monitoring.recorder.buffer import PointBuffer
from monitoring.recorder.metrics import RecorderStats
from monitoring.recorder.points import Point, make_line
from monitoring.recorder.writer import Writer, WriterConfig, is_retryable


def pts(n: int, start: int = 0) -> list[str]:
    return [make_line("substation_telemetry", 1.0, {"substation_id": "A"}, {"seq": s})
            for s in range(start, start + n)]


def seq(line: str) -> int:
    return int(Point.parse(line).field("seq") or 0)


class FakeSink:
    """Fails ``fail`` times (with ``error``), then records batches; optionally slow."""

    def __init__(self, fail: int = 0, error: Exception | None = None, delay_s: float = 0.0) -> None:
        self.fail = fail
        self.error = error or ConnectionRefusedError("down")
        self.delay_s = delay_s
        self.batches: list[list[str]] = []
        self.threads: set[int] = set()
        self.calls = 0

    def __call__(self, batch: list[str]) -> None:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            self.fail -= 1
            raise self.error
        self.batches.append(batch)


def make(sink: FakeSink, max_points: int = 1000, **cfg: float) -> tuple[Writer, PointBuffer, RecorderStats]:
    stats = RecorderStats()
    config = WriterConfig(**{"batch_size": 10, "flush_interval_s": 0.02, "backoff_min_s": 0.01,
                             "backoff_max_s": 0.04, "shutdown_timeout_s": 0.5, **cfg})  # type: ignore[arg-type]
    holder: list[Writer] = []
    buf = PointBuffer(max_points, stats, batch_size=config.batch_size,
                      on_batch_ready=lambda: holder[0].batch_ready.set())
    writer = Writer(buf, sink, config, stats)
    holder.append(writer)
    return writer, buf, stats


@pytest.mark.parametrize(("exc", "retry"), [
    (ApiException(status=503), True), (ApiException(status=500), True), (ApiException(status=429), True),
    (ApiException(status=408), True), (ApiException(status=400), False), (ApiException(status=401), True),
    (ApiException(status=404), True), (ApiException(status=413), False), (NewConnectionError(None, "refused"), True),  # type: ignore[arg-type]
    (ConnectionRefusedError(), True), (TimeoutError(), True),
])
def test_what_is_retried(exc: Exception, retry: bool) -> None:
    assert is_retryable(exc) is retry


async def _run_until(writer: Writer, cond: object, timeout: float = 5.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.wait_for(task, timeout)


def test_batches_by_size_and_flushes_partial_batches_on_the_interval() -> None:
    sink = FakeSink()
    writer, buf, stats = make(sink)

    async def scenario() -> None:
        buf.add(pts(25))
        await _run_until(writer, lambda: stats.points_written == 25)

    asyncio.run(scenario())
    assert [len(b) for b in sink.batches] == [10, 10, 5]
    assert [seq(p) for b in sink.batches for p in b] == list(range(25))  # in order
    assert threading.get_ident() not in sink.threads  # written from a worker thread, not the event loop
    assert (stats.write_errors, stats.points_retried, stats.dropped_total()) == (0, 0, 0)


def test_failed_writes_are_retried_with_backoff_and_counted() -> None:
    sink = FakeSink(fail=3)
    writer, buf, stats = make(sink)

    async def scenario() -> None:
        buf.add(pts(10))
        await _run_until(writer, lambda: stats.points_written == 10)

    started = time.monotonic()
    asyncio.run(scenario())
    assert sink.calls == 4 and len(sink.batches) == 1
    assert stats.write_errors == 3 and stats.points_retried == 30 and stats.dropped_total() == 0
    assert time.monotonic() - started >= 0.01 + 0.02 + 0.04  # the three back-off delays


def test_a_batch_the_database_refuses_is_dropped_and_counted_not_retried() -> None:
    sink = FakeSink(fail=1, error=ApiException(status=400, reason="bad line"))
    writer, buf, stats = make(sink)

    async def scenario() -> None:
        buf.add(pts(15))
        await _run_until(writer, lambda: stats.points_written == 5)

    asyncio.run(scenario())
    assert stats.points_dropped["rejected"] == 10 and stats.write_errors == 1 and stats.points_retried == 0
    assert stats.points_queued == stats.points_written + stats.dropped_total()


def test_a_slow_database_does_not_block_the_event_loop() -> None:
    sink = FakeSink(delay_s=0.3)
    writer, buf, stats = make(sink)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        t = asyncio.create_task(ticker())
        buf.add(pts(10))
        await _run_until(writer, lambda: stats.points_written == 10)
        t.cancel()

    asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 15 and max(gaps) < 0.15, max(gaps)


def test_outage_with_a_full_buffer_keeps_the_newest_and_accounts_for_every_point() -> None:
    sink = FakeSink(fail=10**9)
    writer, buf, stats = make(sink, max_points=30)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        for i in range(20):
            buf.add(pts(10, start=i * 10))
            await asyncio.sleep(0.005)
        assert stats.write_errors >= 2
        sink.fail = 0  # the database is back
        deadline = time.monotonic() + 5
        while (len(buf) or stats.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(scenario())
    written = [seq(p) for b in sink.batches for p in b]
    assert stats.points_queued == 200
    assert stats.points_written == len(written) == 200 - stats.points_dropped["buffer_full"]
    assert stats.points_dropped["buffer_full"] == 200 - 30 - 10  # buffer + the batch held for retry
    assert written[:10] == list(range(10))  # the batch in flight when the outage began
    assert written[10:] == list(range(170, 200))  # then the newest 30: the oldest were dropped


def test_shutdown_flushes_what_it_can_within_the_timeout_and_counts_the_rest() -> None:
    sink = FakeSink(fail=10**9)
    writer, buf, stats = make(sink, shutdown_timeout_s=0.3)

    async def scenario() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        buf.add(pts(45))
        await asyncio.sleep(0.05)
        stop.set()
        started = time.monotonic()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - started

    took = asyncio.run(scenario())
    assert took < 0.3 + 0.2
    assert stats.points_written == 0 and stats.points_dropped["shutdown"] == 45 and len(buf) == 0


def test_shutdown_writes_everything_when_the_database_is_up() -> None:
    sink = FakeSink()
    writer, buf, stats = make(sink, flush_interval_s=60)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        buf.add(pts(7))  # below the batch size and the flush interval is long: only shutdown writes it
        await asyncio.sleep(0.05)
        assert stats.points_written == 0
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert stats.points_written == 7 and stats.dropped_total() == 0


def test_shutdown_does_not_wait_for_a_hung_write_beyond_the_timeout() -> None:
    sink = FakeSink(delay_s=1.0)
    writer, buf, stats = make(sink, shutdown_timeout_s=0.2, flush_interval_s=60)

    async def scenario() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        buf.add(pts(5))
        stop.set()
        started = time.monotonic()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - started

    took = asyncio.run(scenario())  # asyncio.run then waits for the worker thread (the client's timeout)
    assert took < 0.5
    assert stats.points_dropped["shutdown"] == 5
