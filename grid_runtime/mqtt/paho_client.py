"""paho's ``Client`` with a leaner receive path for the two packets of the hot path (PUBLISH and PUBACK).

Measured in the balancer's profile (``python -m bench --profile``): paho builds a ``Properties`` object (~10 µs: it
rebuilds its tables of names and types in ``__init__``) and a ``ReasonCode`` for every packet it reads, on MQTT 5 and,
for acknowledgements, on 3.1.1 too, and reads each packet with three or four ``recv`` calls (the command byte, the
length one byte at a time, the body). Here:

- a PUBACK of two bytes (packet id only: success without properties, the form Mosquitto sends) or three (a reason
  code, no properties: e.g. 0x10 when nobody subscribes) skips the decoder and hands ``on_publish`` shared, read-only
  values; any other PUBACK or PUBCOMP goes through paho's decoder;
- a PUBLISH at QoS 0 or 1 whose MQTT 5 property length is zero skips the ``Properties`` object (the message's
  ``properties`` is None, as on 3.1.1); one with properties, QoS 2, or 3.1.1 goes through paho's own handler;
- the socket is read in chunks into a buffer that ``_sock_recv`` serves from (one ``recv`` per chunk, not per
  field), dropped when the socket changes;
- a message is handed to ``on_message`` directly while no per-topic callback was added (``message_callback_add``):
  paho matches every message's topic against those callbacks with a recursive closure, a reference cycle per
  message that only the cyclic GC frees (~180 objects per collection in the balancer's read loop);
- consecutive queued QoS 1 PUBLISHes and PUBACKs (packets paho does nothing more with once written) leave in one
  ``send`` instead of one each: fewer system calls here, fewer reads and TCP segments at the broker. Packets paho
  acts on after writing them (QoS 0 PUBLISH, DISCONNECT, ...) stay packets of their own, in order.

Everything else (sessions, resends after a reconnect, the in-flight bookkeeping close() waits on) is paho's.
The overridden methods are paho 2.x internals: tests/unit/test_paho_client.py holds them to paho's own results.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["RECV_CHUNK", "SEND_CHUNK", "LeanClient"]

#: Bytes asked of the socket per ``recv``: a read pass of the bench's small packets fits in one or two.
RECV_CHUNK = 65536
#: At most this many bytes of packets are joined into one ``send``.
SEND_CHUNK = 65536

_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)  # (0 = Success)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)
_REASONS: dict[int, ReasonCode | None] = {}
_MID = struct.Struct("!H")


def _puback_reason(code: int) -> ReasonCode | None:
    """A shared, read-only ReasonCode per PUBACK reason code (e.g. 0x10 No matching subscribers: a command to a
    substation whose agent is not connected); None if ``code`` is not one."""
    if code not in _REASONS:
        reason: ReasonCode | None = ReasonCode(PacketTypes.PUBACK)
        try:
            reason.unpack(bytes([code]))  # type: ignore[union-attr]
        except Exception:  # (paho raises what its tables raise for an unknown code)
            reason = None
        _REASONS[code] = reason
    return _REASONS[code]
_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS


class LeanClient(paho.Client):
    """A ``paho.mqtt.client.Client`` whose hot receive path allocates less (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: Any = None
        self._filtered = False

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._filtered = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        if self._filtered:
            return super()._handle_on_message(message)
        with self._callback_mutex:
            on_message = self.on_message
        if on_message is None:
            return None
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise
        return None

    def buffered(self) -> bool:
        """Bytes read from the current socket and not yet handled: read them before waiting for the socket."""
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos < len(buf) and self._rsock is self._sock:
            end = pos + bufsize
            self._rpos = end
            return buf[pos:end]
        data = super()._sock_recv(max(bufsize, RECV_CHUNK))
        if len(data) <= bufsize:  # (b"": the connection closed)
            self._rbuf, self._rpos = b"", 0
            return data
        self._rbuf, self._rpos, self._rsock = data, bufsize, self._sock
        return data[:bufsize]

    def _packet_write(self) -> MQTTErrorCode:
        out = self._out_packet
        if len(out) > 1:
            self._out_packet = _joined(out)
        return super()._packet_write()

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        size = len(packet)
        if cmd != "PUBACK" or size > 3 or size < 2:
            return super()._handle_pubackcomp(cmd)
        reason = _PUBACK_SUCCESS if size == 2 else _puback_reason(packet[2])
        if reason is None:
            return super()._handle_pubackcomp(cmd)  # (not a PUBACK reason code: paho's decoder says so)
        mid = _MID.unpack_from(packet)[0]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return _SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        header: int = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol != MQTTProtocolVersion.MQTTv5 or qos == 2:
            return super()._handle_publish()
        packet = self._in_packet["packet"]
        if len(packet) < 2:
            return super()._handle_publish()  # (malformed: paho says so)
        pos = 2 + _MID.unpack_from(packet)[0]
        topic = bytes(packet[2:pos])
        mid = 0
        if qos:
            if len(packet) < pos + 2:
                return super()._handle_publish()
            mid = _MID.unpack_from(packet, pos)[0]
            pos += 2
        if len(packet) <= pos or packet[pos] != 0:
            return super()._handle_publish()  # properties to read (or malformed): paho's decoder
        message = paho.MQTTMessage(mid, topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = bytes(packet[pos + 1:])
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return _SUCCESS


def _plain(packet: Any) -> bool:
    """Nothing left to do once written (a QoS 1 PUBLISH waits for its PUBACK, a PUBACK for nothing), not begun."""
    kind = packet["command"] & 0xF0
    return packet["pos"] == 0 and (kind == paho.PUBACK or (kind == paho.PUBLISH and packet["qos"] > 0))


def _joined(out: Any) -> Any:
    """``out`` with each run of plain packets (up to SEND_CHUNK bytes) joined into one, order kept."""
    joined: deque[Any] = deque()
    run: list[Any] = []
    size = 0
    for packet in out:
        plain = _plain(packet)
        if plain and size + packet["to_process"] <= SEND_CHUNK:
            run.append(packet)
            size += packet["to_process"]
            continue
        if run:
            joined.append(_one(run, size))
            run, size = [], 0
        if plain:
            run, size = [packet], packet["to_process"]
        else:
            joined.append(packet)
    if run:
        joined.append(_one(run, size))
    return joined


def _one(run: list[Any], size: int) -> Any:
    if len(run) == 1:
        return run[0]
    data = b"".join(p["packet"] for p in run)
    return {"command": paho.PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": size, "packet": data, "info": None}
