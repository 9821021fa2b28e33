"""LeanClient (grid_runtime/mqtt/paho_client.py) against paho's own Client: the same bytes in, the same messages,
acknowledgements and bytes out. No broker: both read from and write to an in-memory socket."""

from __future__ import annotations

import errno
import gc
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from grid_runtime.mqtt.paho_client import RECV_CHUNK, SEND_CHUNK, LeanClient, _joined
from grid_runtime.mqtt.paho_transport import PahoTransport
from grid_runtime.settings import MqttSettings


class FakeSocket:
    """Hands out what was fed, at most ``bufsize`` bytes per recv (EAGAIN when empty); records what is sent,
    one entry per send call."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.sent: list[bytes] = []
        self.recv_calls = 0

    def recv(self, bufsize: int) -> bytes:
        self.recv_calls += 1
        if not self.data:
            raise BlockingIOError(errno.EAGAIN, "no data")
        out = bytes(self.data[:bufsize])
        del self.data[:bufsize]
        return out

    def send(self, buf: bytes) -> int:
        self.sent.append(bytes(buf))
        return len(buf)

    def close(self) -> None:
        pass


def _client(cls: type[paho.Client], protocol: int = paho.MQTTv5, sock: FakeSocket | None = None) -> Any:
    c = cls(CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol)
    c._sock = sock or FakeSocket()
    c._state = paho._ConnectionState.MQTT_CS_CONNECTED
    return c


def _publish_bytes(topic: str, payload: bytes, qos: int, retain: bool = False, props: Properties | None = None,
                   protocol: int = paho.MQTTv5) -> bytes:
    """The bytes of a PUBLISH as paho writes it (the same format the broker sends us)."""
    c = _client(paho.Client, protocol)
    c.publish(topic, payload, qos, retain, props)
    c.loop_write()
    return b"".join(c._sock.sent)


def _redelivered(packet: bytes) -> bytes:
    """The PUBLISH again with its DUP flag set (a broker's redelivery of a QoS 1 message)."""
    return bytes([packet[0] | 0x08]) + packet[1:]


def _received(cls: type[paho.Client], data: bytes, protocol: int = paho.MQTTv5,
              manual_ack: bool = False) -> tuple[list[tuple[Any, ...]], bytes]:
    """Every message read from ``data`` (topic, payload, qos, retain, dup, mid, correlation data) and the bytes sent
    back (acknowledgements)."""
    sock = FakeSocket(data)
    c = _client(cls, protocol, sock)
    c.manual_ack_set(manual_ack)
    got: list[tuple[Any, ...]] = []

    def on_message(_c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        corr = getattr(m.properties, "CorrelationData", None) if m.properties is not None else None
        got.append((m.topic, bytes(m.payload), m.qos, m.retain, m.dup, m.mid, corr))

    c.on_message = on_message
    for _ in range(100):
        c.loop_read()
        if not sock.data and not (isinstance(c, LeanClient) and c.buffered()):
            break
    c.loop_write()
    return got, b"".join(sock.sent)


def _corr(value: bytes) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    p.CorrelationData = value
    return p


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
def test_publishes_are_read_as_paho_reads_them(protocol: int) -> None:
    packets = [
        _publish_bytes("grid/v1/ev/E1/request", b'{"a":1}', 1, protocol=protocol),
        _publish_bytes("grid/v1/ev/E2/request", b"", 0, protocol=protocol),
        _publish_bytes("grid/v1/sub/S1/status", b"x" * 300, 1, retain=True, protocol=protocol),
        _publish_bytes("t/q2", b"two", 2, protocol=protocol),
        _redelivered(_publish_bytes("grid/v1/ev/E3/request", b"again", 1, protocol=protocol)),
    ]
    if protocol == paho.MQTTv5:
        packets.append(_publish_bytes("reply/E1/x", b"r", 1, props=_corr(b"c-1"), protocol=protocol))
    data = b"".join(packets)
    lean, lean_sent = _received(LeanClient, data, protocol)
    ref, ref_sent = _received(paho.Client, data, protocol)
    assert lean == ref
    assert len(lean) == len(packets) - 1  # the QoS 2 one waits for its PUBREL in both
    assert lean_sent == ref_sent  # the same PUBACKs (and PUBREC), in the same order
    assert [m[4] for m in lean if m[0] == "grid/v1/ev/E3/request"] == [True]  # the redelivery says so
    if protocol == paho.MQTTv5:
        assert lean[-1][-1] == b"c-1"  # a message with properties still has them


def test_a_publish_split_across_reads_is_put_together() -> None:
    data = b"".join(_publish_bytes(f"t/{i}", bytes([i]) * 50, 1) for i in range(5))

    class Trickle(FakeSocket):
        def recv(self, bufsize: int) -> bytes:
            return super().recv(min(bufsize, 7))

    sock = Trickle(data)
    c = _client(LeanClient, sock=sock)
    got: list[str] = []
    c.on_message = lambda _c, _u, m: got.append(m.topic)
    for _ in range(200):
        c.loop_read()
    assert got == [f"t/{i}" for i in range(5)]


def test_many_small_packets_take_one_recv() -> None:
    data = b"".join(_publish_bytes(f"t/{i}", b"p", 1) for i in range(40))
    assert len(data) < RECV_CHUNK
    sock = FakeSocket(data)
    c = _client(LeanClient, sock=sock)
    got: list[str] = []
    c.on_message = lambda _c, _u, m: got.append(m.topic)
    while len(got) < 40:
        c.loop_read()
    assert sock.recv_calls == 1 and not c.buffered()


def test_bytes_read_from_an_old_socket_are_dropped() -> None:
    data = b"".join(_publish_bytes(f"t/{i}", b"p", 1) for i in range(3))
    c = _client(LeanClient, sock=FakeSocket(data))
    got: list[str] = []
    c.on_message = lambda _c, _u, m: got.append(m.topic)
    c.loop_read()
    assert got == ["t/0"] and c.buffered()
    c._sock = FakeSocket(_publish_bytes("new", b"p", 1))  # a reconnect: a new connection starts afresh
    assert not c.buffered()
    c.loop_read()
    assert got == ["t/0", "new"]


def _publishing_client(cls: type[paho.Client], protocol: int = paho.MQTTv5) -> tuple[Any, list[tuple[int, Any]]]:
    c = _client(cls, protocol)
    acked: list[tuple[int, Any]] = []
    c.on_publish = lambda _c, _u, mid, rc, _p: acked.append((mid, rc.value))
    return c, acked


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
def test_a_two_byte_puback_completes_the_publish_as_in_paho(protocol: int) -> None:
    results = []
    for cls in (LeanClient, paho.Client):
        c, acked = _publishing_client(cls, protocol)
        mids = [c.publish("t", b"x", 1).mid for _ in range(3)]
        c.loop_write()
        c._sock.data += b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in (mids[1], mids[0], 999))
        for _ in range(5):
            c.loop_read()
        results.append((acked, sorted(c._out_messages), c._inflight_messages))
    assert results[0] == results[1]
    assert [m for m, _ in results[0][0]] == [2, 1] and results[0][1] == [3]


@pytest.mark.parametrize("tail", [b"\x87", b"\x10", b"\x00", b"\x05", b"\x10\x00", b"\x87\x04\x1f\x00\x01x"])
def test_a_puback_with_a_reason_code_or_properties_completes_as_in_paho(tail: bytes) -> None:
    """3 bytes (reason code only: shared values), more (properties: paho's decoder); 0x05 is no PUBACK reason."""
    results = []
    for cls in (LeanClient, paho.Client):
        c, acked = _publishing_client(cls)
        mid = c.publish("t", b"x", 1).mid
        c.loop_write()
        c._sock.data += bytes([0x40, 2 + len(tail)]) + mid.to_bytes(2, "big") + tail
        rc = c.loop_read()
        results.append((acked, sorted(c._out_messages), rc))
    assert results[0] == results[1]
    if tail[0] != 0x05:
        assert results[0][0] == [(1, tail[0])]


def test_queued_acks_and_qos1_publishes_leave_in_one_send_qos0_and_order_kept() -> None:
    for cls in (LeanClient, paho.Client):
        c = _client(cls)
        c.on_socket_register_write = lambda *_: None  # (an event loop would write later: queue them all first)
        c.publish("a", b"1", 1)
        c._send_puback(7)
        c.publish("b", b"2", 1)
        c.publish("zero", b"0", 0)
        c.publish("c", b"3", 1)
        c.loop_write()
        if cls is LeanClient:
            lean = c._sock.sent
        else:
            ref = c._sock.sent
    assert b"".join(lean) == b"".join(ref)  # the same bytes in the same order
    assert len(ref) == 5 and len(lean) == 3  # [a, ack, b] [zero] [c]


def test_joined_runs_stop_at_the_size_limit() -> None:
    def pkt(n: int) -> dict[str, Any]:
        return {"command": paho.PUBLISH | 0x02, "mid": 1, "qos": 1, "pos": 0, "to_process": n, "packet": b"p" * n,
                "info": None}

    out = _joined([pkt(SEND_CHUNK // 2), pkt(SEND_CHUNK // 2), pkt(10), pkt(SEND_CHUNK * 2)])
    assert [p["to_process"] for p in out] == [SEND_CHUNK, 10, SEND_CHUNK * 2]


def test_reading_messages_leaves_no_garbage_for_the_cyclic_gc() -> None:
    data = b"".join(_publish_bytes(f"t/{i}", b"p", 1) for i in range(50))
    counts = {}
    for cls in (LeanClient, paho.Client):
        gc.collect()
        gc.disable()
        try:
            _received(cls, data)
            counts[cls] = gc.collect()
        finally:
            gc.enable()
    assert counts[LeanClient] < 20 <= 50 * 6 <= counts[paho.Client]  # paho: a cycle of 6 objects per message


def test_per_topic_callbacks_still_take_their_messages() -> None:
    sock = FakeSocket(_publish_bytes("a/x", b"1", 1) + _publish_bytes("b/y", b"2", 1))
    c = _client(LeanClient, sock=sock)
    general: list[str] = []
    special: list[str] = []
    c.on_message = lambda _c, _u, m: general.append(m.topic)
    c.message_callback_add("a/+", lambda _c, _u, m: special.append(m.topic))
    for _ in range(3):
        c.loop_read()
    assert special == ["a/x"] and general == ["b/y"]


def test_with_manual_acks_nothing_is_acknowledged_until_the_application_says_so() -> None:
    """``manual_ack_set(True)``: a QoS 1 message is handed over and not acknowledged, as in paho."""
    data = b"".join(_publish_bytes(f"t/{i}", b"p", 1) for i in range(3))
    lean, lean_sent = _received(LeanClient, data, manual_ack=True)
    ref, ref_sent = _received(paho.Client, data, manual_ack=True)
    assert lean == ref and len(lean) == 3
    assert lean_sent == ref_sent == b""


def test_a_read_pass_scheduled_after_the_connection_closed_does_nothing() -> None:
    """``PahoTransport._on_readable`` comes back by ``call_soon`` when it left packets buffered; by then the
    connection may have closed (no socket): it returns, where ``select`` on no socket raised ``TypeError`` into the
    event loop."""
    transport = PahoTransport(MqttSettings(host="127.0.0.1", port=1), clean_start=True)
    assert transport._sock is None
    transport._on_readable()  # (raised before)
    assert not transport._client.want_write()
