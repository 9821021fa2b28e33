"""What both transports do alike: subscriptions kept for every reconnect, the outbox, the handler, the connect
callbacks, and the broker addresses to fail over between (``MQTT_HOSTS``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from paho.mqtt.subscribeoptions import SubscribeOptions

from grid_runtime.backoff import Backoff
from grid_runtime.logs import get_logger
from grid_runtime.mqtt.types import (
    MAX_MESSAGE_BYTES,
    OUTBOX_LIMIT,
    Handler,
    InMessage,
    OutMessage,
    TransportStats,
    Will,
)
from grid_runtime.settings import MqttSettings

__all__ = ["RECONNECT_FIRST_S", "RECONNECT_MAX_S", "TransportBase", "log"]

log = get_logger("grid.mqtt")

#: Reconnect back-off (``grid_runtime.backoff``): the first wait after a lost or refused connection, doubling up to
#: the cap; a connection that worked starts the streak anew. With several broker addresses the back-off applies
#: between full rounds over them: a dead node costs one refused connect, not a wait.
RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 10.0


class TransportBase:
    def __init__(self, settings: MqttSettings, client_id: str | None, will: Will | None,
                 clean_start: bool) -> None:
        self.settings = settings
        self.client_id = client_id or settings.username or ""
        self.will = will
        self.clean_start = clean_start
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        self._handler: Handler = lambda _m: None
        self._subs: dict[str, SubscribeOptions] = {}
        self._connect_callbacks: list[Callable[[], None]] = []
        self._outbox: deque[OutMessage] = deque()
        self._closing = False
        self._addresses = settings.addresses()
        self._addr = 0  # the address tried now (or connected to)
        self._round_start = 0  # where the current streak of failures began: back-off once we are back there
        self._last_connected: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The broker (host, port) connected to, or tried next."""
        return self._addresses[self._addr]

    async def _failed(self, backoff: Backoff) -> None:
        """A lost or refused connection: move on to the next address (round robin); wait out the back-off only
        when a full round over the addresses has failed."""
        self._addr = (self._addr + 1) % len(self._addresses)
        if self._addr == self._round_start and not self._closing:
            delay = next(backoff)
            host, port = self.address
            log.info("mqtt_retry", client_id=self.client_id, host=host, port=port, in_s=round(delay, 3))
            await asyncio.sleep(delay)

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def _remember(self, topic_filter: str, qos: int, retain_as_published: bool) -> SubscribeOptions:
        options = SubscribeOptions(qos=qos, retainAsPublished=retain_as_published)
        self._subs[topic_filter] = options
        return options

    def on_connect(self, callback: Callable[[], None]) -> None:
        self._connect_callbacks.append(callback)

    def _dispatch(self, msg: InMessage) -> None:
        self.stats.received += 1
        try:
            self._handler(msg)
        except Exception:  # the handler must never take the connection down with it
            self.stats.handler_errors += 1
            log.exception("handler_failed", topic=msg.topic)

    def _too_large(self, topic: str, payload: bytes) -> bool:
        if len(payload) <= MAX_MESSAGE_BYTES:
            return False
        self.stats.oversized_refused += 1
        log.error("mqtt_publish_refused_oversized", topic=topic, size=len(payload), limit=MAX_MESSAGE_BYTES)
        return True

    def _queue_offline(self, msg: OutMessage) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()
            self.stats.outbox_dropped += 1
            if self.stats.outbox_dropped % 1000 == 1:
                log.error("outbox_full_dropping", dropped=self.stats.outbox_dropped, limit=OUTBOX_LIMIT)
        self._outbox.append(msg)

    def _connected_now(self) -> None:
        address = self.address
        if self._last_connected is not None and address != self._last_connected:
            self.stats.failovers += 1
            log.warning("mqtt_failover", client_id=self.client_id, host=address[0], port=address[1],
                        previous=f"{self._last_connected[0]}:{self._last_connected[1]}",
                        failovers=self.stats.failovers)
        self._last_connected = address
        self._round_start = self._addr
        self.stats.connects += 1
        self.connected.set()
        for cb in self._connect_callbacks:
            try:
                cb()
            except Exception:
                log.exception("on_connect_callback_failed")
