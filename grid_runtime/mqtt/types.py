"""What services and transports exchange: messages in and out, the last will, counters, the transport interface."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MAX_MESSAGE_BYTES", "OUTBOX_LIMIT", "Handler", "InMessage", "OutMessage", "Transport", "TransportStats",
           "Will"]

#: Messages kept while disconnected; beyond this the oldest are dropped, counted and logged.
OUTBOX_LIMIT = 100_000
#: The broker's ``message_size_limit``. Mosquitto answers a larger MQTT 5 publish with PUBACK 0x95,
#: which paho 2.2 takes for a malformed packet: it reconnects and resends forever. So refuse it here.
MAX_MESSAGE_BYTES = 65536


@dataclass(slots=True)
class InMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(slots=True, frozen=True)
class OutMessage:
    """A publish a transport keeps for later: in its outbox while disconnected, waiting for a packet id, or in
    flight until its PUBACK. (A message with an expiry is never kept: it is sent now or never.)"""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation_data: bytes | None = None


@dataclass(slots=True, frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(slots=True)
class TransportStats:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    published: int = 0
    handler_errors: int = 0
    outbox_dropped: int = 0
    oversized_refused: int = 0
    backlogged: int = 0  # publishes that waited for a free packet id (broker stalled)
    expired_dropped: int = 0  # publishes with an expiry not sent: disconnected (they are never queued)
    failovers: int = 0  # connections made to another broker address than the previous one (MQTT_HOSTS)


Handler = Callable[[InMessage], None]


class Transport(Protocol):
    """What a service needs from an MQTT client."""

    stats: TransportStats
    connected: asyncio.Event

    def set_handler(self, handler: Handler) -> None: ...
    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        """Subscribe now and after every reconnect. ``retain_as_published`` (MQTT 5): live messages keep the
        retain flag their publisher set (without it only replayed retained messages carry it). MQTT 3.1.1 has
        no such option: it is ignored there, and a live message always arrives with retain 0."""
        ...

    def on_connect(self, callback: Callable[[], None]) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, expiry_s: int | None = None) -> None:
        """Publish, or queue until the next connection. With ``expiry_s`` the message is worth nothing later
        (a request someone waits for with a timeout): it is sent now or never (not queued, not re-sent after
        a reconnect by this transport) and carries the MQTT 5 Message Expiry Interval, so the broker drops it
        too if no subscriber takes it in time (say, a balancer that is down). On MQTT 3.1.1 there is no message
        expiry: the message is still sent now or never, and the payload must say when it is void (``expires_at``);
        correlation data needs MQTT 5 (ValueError)."""
        ...

    async def run(self) -> None: ...
    async def close(self, timeout: float = 2.0) -> None: ...
