"""MQTT transports behind one small interface: paho driven by the asyncio loop, and aiomqtt.

Services program against :class:`Transport` (``types``): a synchronous message handler, fire-and-forget
``publish`` (delivery is the transport's job: QoS 1, an outbox while disconnected, resend on reconnect),
subscriptions that are restored on every reconnect, and a last will. Laid out as aiomqtt lays out its own:
``types`` (messages, will, counters, the interface), ``properties`` (MQTT 5 properties, built and read in one
place), ``base`` (what both transports share), ``paho_transport`` and ``aiomqtt_transport``; ``paho_client``
is paho's ``Client`` with a leaner receive and write path for the hot packets (PUBLISH, PUBACK).

Why two: aiomqtt is the idiomatic asyncio client, but costs ~5x paho's CPU per message (111 µs vs 23 µs measured
here), so the balancer's hot path runs on :class:`PahoTransport`. Both set TCP_NODELAY on their socket: with
Nagle + delayed ACK a QoS 1 round trip costs 88 ms instead of 0.2 ms (FIELD-NOTES). ``bench/`` measures both.
"""

from __future__ import annotations

from grid_runtime.mqtt.aiomqtt_transport import AiomqttTransport
from grid_runtime.mqtt.paho_transport import PahoTransport
from grid_runtime.mqtt.types import Handler, InMessage, OutMessage, Transport, TransportStats, Will
from grid_runtime.settings import MqttSettings

__all__ = ["AiomqttTransport", "Handler", "InMessage", "OutMessage", "PahoTransport", "Transport", "TransportStats",
           "Will", "make_transport"]


def make_transport(kind: str, settings: MqttSettings, *, client_id: str | None = None, will: Will | None = None,
                   clean_start: bool = False, mqtt5: bool | None = None) -> Transport:
    """Build the transport named ``kind`` (``paho`` or ``aiomqtt``), speaking ``MQTT_PROTOCOL`` and failing over
    between ``MQTT_HOSTS``; ``mqtt5=False`` forces 3.1.1 (a pure reader, see :class:`PahoTransport`)."""
    if kind == "paho":
        return PahoTransport(settings, client_id=client_id, will=will, clean_start=clean_start, mqtt5=mqtt5)
    if kind == "aiomqtt":
        if mqtt5 is False and settings.mqtt5:
            settings = settings.model_copy(update={"protocol": "3.1.1"})
        return AiomqttTransport(settings, client_id=client_id, will=will, clean_start=clean_start)
    raise ValueError(f"unknown MQTT client {kind!r} (expected paho or aiomqtt)")
