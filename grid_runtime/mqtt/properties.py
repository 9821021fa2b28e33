"""MQTT 5 properties, built and read in one place for both transports (aiomqtt hands paho's classes through)."""

from __future__ import annotations

from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from grid_runtime.mqtt.types import InMessage

__all__ = ["connect_properties", "in_message", "publish_properties"]


def connect_properties(session_expiry_s: int) -> Properties:
    """CONNECT: how long the broker keeps our session (subscriptions, queued QoS 1) after we are gone."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return props


def publish_properties(correlation_data: bytes | None, expiry_s: int | None = None) -> Properties | None:
    """PUBLISH: the correlation data of a reply and the message expiry of a request (none: no properties)."""
    if correlation_data is None and expiry_s is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if expiry_s is not None:
        props.MessageExpiryInterval = max(1, expiry_s)
    return props


def in_message(topic: str, payload: bytes, qos: int, retain: bool, props: Any) -> InMessage:
    """A received message with the properties a service reads (response topic and correlation data, MQTT 5)."""
    if props is None:
        return InMessage(topic, payload, qos, retain)
    return InMessage(topic, payload, qos, retain, getattr(props, "ResponseTopic", None),
                     getattr(props, "CorrelationData", None))
