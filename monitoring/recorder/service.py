"""The recorder's MQTT adapter: contract topics in, points into the bounded buffer, the writer task out.

It owns topic parsing and strict decoding (``grid_protocol``): a bad payload is counted by reason and
logged (rate-limited), never raised, and never stops the recorder. The MQTT handler only decodes and
appends to the buffer, so however slow the database, the MQTT side keeps reading at full speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from grid_protocol.codec import PayloadError, decode
from grid_protocol.ids import is_valid_id
from grid_protocol.messages import MAX_STATE_PAYLOAD_BYTES
from grid_protocol.reasons import Reason
from grid_protocol.topics import TopicKind, Topics
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import InMessage, Transport
from grid_runtime.ratelimit import RateLimitedLog
from monitoring.recorder.buffer import PointBuffer
from monitoring.recorder.metrics import RecorderStats
from monitoring.recorder.points import TRANSLATIONS, IdMismatch, Seen, to_lines
from monitoring.recorder.settings import RecorderSettings
from monitoring.recorder.writer import Observer, Sink, Writer, WriterConfig

log = get_logger("recorder")

#: The retained state topics may be as large as the broker allows; everything else uses the codec's 4 KiB.
_MAX_BYTES = {TopicKind.SUBSTATION_STATE: MAX_STATE_PAYLOAD_BYTES, TopicKind.BALANCER_QUEUE: MAX_STATE_PAYLOAD_BYTES}


class RecorderService:
    def __init__(self, settings: RecorderSettings, transport: Transport, sink: Sink,
                 stats: RecorderStats | None = None, latency: Observer | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.transport = transport
        self.clock = clock
        self.stats = stats if stats is not None else RecorderStats()
        self.topics = Topics(settings.grid.grid_topic_prefix)
        self.buffer = PointBuffer(settings.buffer_max_points, self.stats, log_interval_s=settings.log_interval_s,
                                  batch_size=settings.batch_size, on_batch_ready=self._batch_ready)
        self.writer = Writer(self.buffer, sink, WriterConfig(
            batch_size=settings.batch_size, flush_interval_s=settings.flush_interval_s,
            backoff_min_s=settings.backoff_min_s, backoff_max_s=settings.backoff_max_s,
            shutdown_timeout_s=settings.shutdown_timeout_s), self.stats, latency)
        self._bad_log = RateLimitedLog(log.warning, settings.log_interval_s)
        self._seen: Seen = {}  # last point per series, to keep points of one series and instant apart
        transport.set_handler(self.handle)
        for topic_filter in self.subscriptions():
            transport.subscribe(topic_filter, 1)

    def subscriptions(self) -> list[str]:
        """Every region's topics (issue 12): the default region's and ``<prefix>/region/+/...``."""
        return [f for kind in TRANSLATIONS for f in self.topics.filters_all_regions(kind)]

    def _batch_ready(self) -> None:
        self.writer.batch_ready.set()

    def handle(self, msg: InMessage) -> None:
        parsed = self.topics.parse_any_region(msg.topic)
        if parsed is None or parsed[1] not in TRANSLATIONS:
            return  # not ours (a subscription never delivers these; kept for safety)
        region, kind, id_ = parsed
        self.stats.messages[kind] += 1
        if id_ is not None and not is_valid_id(id_):
            self._bad(kind, "invalid_topic_id", f"topic {msg.topic[:200]!r}")
            return
        model, _translate = TRANSLATIONS[kind]
        try:
            message = decode(msg.payload, model, max_bytes=_MAX_BYTES.get(kind, 4096))
            points = to_lines(kind, id_, message, self.clock(), self._seen, region)
        except PayloadError as err:
            self._bad(kind, str(err.reason), err.detail)
            return
        except IdMismatch as err:
            self._bad(kind, str(Reason.ID_MISMATCH), str(err))
            return
        self.buffer.add(points)

    def _bad(self, kind: TopicKind, reason: str, detail: str) -> None:
        self.stats.bad_payloads[(str(kind), reason)] += 1
        self._bad_log((kind, reason), "payload_refused", kind=str(kind), reason=reason, detail=detail[:300],
                      total=self.stats.bad_payloads[(str(kind), reason)])

    async def run(self, stop: asyncio.Event) -> None:
        """Record until ``stop``; then stop reading, flush (bounded) and log a summary."""
        log.info("recorder_started", influx_url=self.settings.influx.url, bucket=self.settings.influx.bucket,
                 subscriptions=self.subscriptions(), buffer_max_points=self.settings.buffer_max_points)
        writer_stop = asyncio.Event()
        mqtt_task = asyncio.create_task(self.transport.run())
        writer_task = asyncio.create_task(self.writer.run(writer_stop))
        try:
            await stop.wait()
        finally:
            await self.transport.close()
            mqtt_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mqtt_task
            writer_stop.set()
            await writer_task
            s = self.stats
            log.info("recorder_stopped", messages=sum(s.messages.values()), bad_payloads=sum(s.bad_payloads.values()),
                     points_queued=s.points_queued, points_written=s.points_written,
                     points_retried=s.points_retried, points_dropped=dict(s.points_dropped),
                     write_errors=s.write_errors)
