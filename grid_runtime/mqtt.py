"""MQTT transports behind one small interface: paho driven by the asyncio loop, and aiomqtt.

Services program against :class:`Transport`: a synchronous message handler, fire-and-forget
``publish`` (delivery is the transport's job: QoS 1, an outbox while disconnected, resend on
reconnect), subscriptions that are restored on every reconnect, and a last will.

Why two: aiomqtt is the idiomatic asyncio client, but costs ~5x paho's CPU per message (111 µs vs
23 µs measured here). The balancer's hot path therefore runs on :class:`PahoTransport`, which
registers paho's socket with the asyncio loop (``add_reader``/``add_writer``) instead of running
paho's own thread: no thread hops, no per-message futures. ``bench/`` measures both.

Both set TCP_NODELAY on their socket: with Nagle + delayed ACK a QoS 1 round trip costs 88 ms
instead of 0.2 ms (FIELD-NOTES).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from grid_runtime.credentials import mqtt_password
from grid_runtime.logs import get_logger
from grid_runtime.settings import MqttSettings

log = get_logger("grid.mqtt")

_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
#: Messages kept while disconnected; beyond this the oldest are dropped, counted and logged.
OUTBOX_LIMIT = 100_000
#: Packets read per readiness callback at most (others on the loop, such as ticks, get their turn in between).
READ_BATCH = 64
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


Handler = Callable[[InMessage], None]


class Transport(Protocol):
    """What a service needs from an MQTT client."""

    stats: TransportStats
    connected: asyncio.Event

    def set_handler(self, handler: Handler) -> None: ...
    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        """Subscribe now and after every reconnect. ``retain_as_published`` (MQTT 5): live messages keep the
        retain flag their publisher set (without it only replayed retained messages carry it)."""
        ...

    def on_connect(self, callback: Callable[[], None]) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, expiry_s: int | None = None) -> None:
        """Publish, or queue until the next connection. With ``expiry_s`` the message is worth nothing later
        (a request someone waits for with a timeout): it is sent now or never (not queued, not re-sent after
        a reconnect by this transport) and carries the MQTT 5 Message Expiry Interval, so the broker drops it
        too if no subscriber takes it in time (say, a balancer that is down)."""
        ...

    async def run(self) -> None: ...
    async def close(self, timeout: float = 2.0) -> None: ...


def _has_data(sock: Any) -> bool:
    """More to read now: bytes in the TLS layer's buffer, or in the socket's (a zero-timeout poll)."""
    pending = getattr(sock, "pending", None)
    if pending is not None and pending() > 0:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed meanwhile
        return False


def _publish_props(corr: bytes | None, expiry_s: int | None) -> Properties | None:
    if corr is None and expiry_s is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if corr is not None:
        props.CorrelationData = corr
    if expiry_s is not None:
        props.MessageExpiryInterval = max(1, expiry_s)
    return props


class _Base:
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
        self._outbox: deque[tuple[str, bytes, int, bool, bytes | None]] = deque()
        self._closing = False

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

    def _queue_offline(self, item: tuple[str, bytes, int, bool, bytes | None]) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()
            self.stats.outbox_dropped += 1
            if self.stats.outbox_dropped % 1000 == 1:
                log.error("outbox_full_dropping", dropped=self.stats.outbox_dropped, limit=OUTBOX_LIMIT)
        self._outbox.append(item)

    def _connected_now(self) -> None:
        self.stats.connects += 1
        self.connected.set()
        for cb in self._connect_callbacks:
            try:
                cb()
            except Exception:
                log.exception("on_connect_callback_failed")


class PahoTransport(_Base):
    """paho-mqtt 2 (MQTT 5, or 3.1.1 for a pure reader) driven by the running asyncio loop."""

    def __init__(self, settings: MqttSettings, *, client_id: str | None = None, will: Will | None = None,
                 clean_start: bool = False, max_inflight: int = 0, mqtt5: bool = True) -> None:
        """``mqtt5=False`` speaks MQTT 3.1.1: no properties to build and parse per message (a subscriber that
        needs none, like the recorder, spends ~30 % less CPU per message); the session then lives as long as
        the broker's ``persistent_client_expiration``."""
        super().__init__(settings, client_id, will, clean_start)
        self.mqtt5 = mqtt5
        if mqtt5:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        else:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv311,
                            clean_session=clean_start)
        if settings.username:
            c.username_pw_set(settings.username, mqtt_password(settings))
        if settings.tls_ca:
            c.tls_set(ca_certs=settings.tls_ca)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        # 0 = no paho-side window: paho rescans its in-flight list on every ack, so a large
        # window costs throughput (18.3k msg/s unlimited vs 5.4k at 65k); the broker bounds us.
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        self._client = c
        self._loop: asyncio.AbstractEventLoop | None = None
        self._disconnected = asyncio.Event()
        self._backlog: deque[tuple[str, bytes, int, bool, bytes | None]] = deque()
        self._sock: Any = None

    # --- socket registration with the asyncio loop -----------------------------------------
    def _on_socket_open(self, client: paho.Client, _ud: Any, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._loop.add_reader(sock, self._on_readable)

    def _on_readable(self) -> None:
        """Read up to READ_BATCH packets while the socket has data. paho's ``loop_read`` reads one packet per call
        when nothing is in flight, and a round through the event loop per packet cost ~30 % of the CPU of a flood
        of small publishes (measured: 140 -> 93 µs per 4 KB message on a loaded machine)."""
        client, sock = self._client, self._sock
        for _ in range(READ_BATCH):
            client.loop_read()
            if self._sock is not sock or not _has_data(sock):
                return

    def _on_socket_close(self, _client: paho.Client, _ud: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._sock = None

    def _on_register_write(self, client: paho.Client, _ud: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, _client: paho.Client, _ud: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.remove_writer(sock)

    # --- paho callbacks --------------------------------------------------------------------
    def _on_connect(self, client: paho.Client, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if rc.is_failure:
            log.error("mqtt_connect_refused", reason=str(rc), client_id=self.client_id)
            return
        log.info("mqtt_connected", client_id=self.client_id, host=self.settings.host, port=self.settings.port)
        if self._subs:
            client.subscribe(list(self._subs.items()) if self.mqtt5
                             else [(f, o.QoS) for f, o in self._subs.items()])  # 3.1.1: no options, QoS only
        # paho re-sends the QoS 1 messages that were in flight when the connection broke only after this
        # callback returns. The outbox holds newer messages: publish them after those, or they overtake
        # them (an EV would hear ``completed`` before ``assigned``). ``connected`` stays clear until then,
        # so whatever is published meanwhile queues behind the outbox.
        assert self._loop is not None
        self._loop.call_soon(self._after_connack)

    def _after_connack(self) -> None:
        if self._closing or not self._client.is_connected():
            return  # lost again already: the outbox waits for the next connection
        while self._outbox:
            topic, payload, qos, retain, corr = self._outbox.popleft()
            self._publish_now(topic, payload, qos, retain, corr)
        self._connected_now()

    def _on_disconnect(self, _client: paho.Client, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self.stats.disconnects += 1
        self.connected.clear()
        self._disconnected.set()
        if not self._closing:
            log.warning("mqtt_disconnected", client_id=self.client_id, reason=str(rc))

    def _on_message(self, _client: paho.Client, _ud: Any, message: paho.MQTTMessage) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.stats.handler_errors += 1
            return
        payload = bytes(message.payload)
        self._dispatch(InMessage(topic, payload, message.qos, bool(message.retain), response_topic, corr))

    # --- public API ------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        if not self.mqtt5 and retain_as_published:
            raise ValueError("retain as published needs MQTT 5 (this transport speaks 3.1.1)")
        options = self._remember(topic_filter, qos, retain_as_published)
        if self.connected.is_set():
            if self.mqtt5:
                self._client.subscribe(topic_filter, options=options)
            else:
                self._client.subscribe(topic_filter, qos)

    def _publish_now(self, topic: str, payload: bytes, qos: int, retain: bool, corr: bytes | None) -> None:
        props = None
        if corr is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
        if self._backlog:  # keep order: nothing overtakes what already waits for a packet id
            self._backlog.append((topic, payload, qos, retain, corr))
            return
        info = self._client.publish(topic, payload, qos, retain, props)
        if info.rc == paho.MQTT_ERR_SUCCESS or info.rc == paho.MQTT_ERR_NO_CONN:
            # NO_CONN with QoS>0: paho keeps the message and sends it after reconnect.
            self.stats.published += 1
        elif info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            # 65,535 QoS 1 messages unacknowledged (packet ids are 16-bit): the broker is stalled. Wait
            # for acknowledgements instead of dropping (see _on_publish).
            self._backlog.append((topic, payload, qos, retain, corr))
            self.stats.backlogged += 1
            if len(self._backlog) == 1:
                log.warning("mqtt_inflight_window_full", client_id=self.client_id)
        else:
            log.error("mqtt_publish_failed", topic=topic, rc=info.rc)

    def _on_publish(self, _client: paho.Client, _ud: Any, _mid: int, _rc: Any, _props: Any) -> None:
        """An acknowledgement freed a packet id: send what waited for one, in order."""
        while self._backlog:
            topic, payload, qos, retain, corr = self._backlog[0]
            props = None
            if corr is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = corr
            info = self._client.publish(topic, payload, qos, retain, props)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                return
            self._backlog.popleft()
            self.stats.published += 1

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, expiry_s: int | None = None) -> None:
        if self._too_large(topic, payload):
            return
        if not self.mqtt5 and (correlation_data is not None or expiry_s is not None):
            raise ValueError("correlation data and message expiry need MQTT 5 (this transport speaks 3.1.1)")
        if expiry_s is not None:
            if not self.connected.is_set():
                self.stats.expired_dropped += 1
                return
            info = self._client.publish(topic, payload, qos, retain, _publish_props(correlation_data, expiry_s))
            if info.rc == paho.MQTT_ERR_SUCCESS:
                self.stats.published += 1
            else:  # (no packet id free, or the link just dropped: the waiting caller times out)
                self.stats.expired_dropped += 1
            return
        if self.connected.is_set():
            self._publish_now(topic, payload, qos, retain, correlation_data)
        else:
            self._queue_offline((topic, payload, qos, retain, correlation_data))

    async def run(self) -> None:
        """Connect and stay connected (exponential back-off) until :meth:`close`."""
        self._loop = asyncio.get_running_loop()
        backoff = 0.2
        misc = asyncio.create_task(self._misc_loop())
        try:
            while not self._closing:
                self._disconnected.clear()
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.settings.session_expiry_s
                try:
                    if self.stats.connects == 0 and self._sock is None and not self.mqtt5:
                        self._client.connect(self.settings.host, self.settings.port, self.settings.keepalive_s)
                    elif self.stats.connects == 0 and self._sock is None:
                        self._client.connect(self.settings.host, self.settings.port, self.settings.keepalive_s,
                                             clean_start=self.clean_start, properties=props)
                    else:
                        self._client.reconnect()
                except OSError as exc:
                    log.warning("mqtt_connect_failed", host=self.settings.host, port=self.settings.port,
                                error=str(exc), retry_in_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                await self._disconnected.wait()
                if self.stats.connects:
                    backoff = 0.2
                if not self._closing:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            misc.cancel()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._sock is not None:
                self._client.loop_misc()

    async def close(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for in-flight QoS 1 publishes, then DISCONNECT (no last will)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while ((self._client._out_messages or self._backlog) and self.connected.is_set()
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.01)
        self._closing = True
        if self._sock is not None:
            self._client.disconnect()
            # Let the DISCONNECT packet leave before the loop stops.
            while self._sock is not None and asyncio.get_running_loop().time() < deadline + 0.5:
                await asyncio.sleep(0.01)
        self._disconnected.set()


class AiomqttTransport(_Base):
    """aiomqtt 2 (MQTT 5): the idiomatic asyncio client for services off the hot path."""

    def __init__(self, settings: MqttSettings, *, client_id: str | None = None, will: Will | None = None,
                 clean_start: bool = False) -> None:
        super().__init__(settings, client_id, will, clean_start)
        self._client: aiomqtt.Client | None = None
        self._pending: set[asyncio.Task[None]] = set()
        #: publishes waiting for their PUBACK, oldest first: they die with the client if the connection breaks
        self._inflight: dict[asyncio.Task[None], tuple[str, bytes, int, bool, bytes | None]] = {}
        self._run_task: asyncio.Task[None] | None = None

    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        options = self._remember(topic_filter, qos, retain_as_published)
        if self._client is not None and self.connected.is_set():
            self._spawn(self._client.subscribe(topic_filter, options=options))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        item = self._inflight.pop(task, None)
        if task.cancelled() or task.exception() is None:
            return
        log.warning("mqtt_publish_failed", error=str(task.exception()))
        if item is not None and not self._closing:
            self._queue_offline(item)  # sent again on the next connection

    def _requeue_inflight(self) -> None:
        """The connection broke: publishes still waiting for their PUBACK were lost with that client (a new
        one is made per connection). Put them back at the head of the outbox, oldest first."""
        lost = [item for task, item in self._inflight.items() if not task.done()]
        tasks = list(self._inflight)
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        self._outbox.extendleft(reversed(lost))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, expiry_s: int | None = None) -> None:
        if self._too_large(topic, payload):
            return
        client = self._client
        if client is None or not self.connected.is_set():
            if expiry_s is not None:
                self.stats.expired_dropped += 1
            else:
                self._queue_offline((topic, payload, qos, retain, correlation_data))
            return
        props = _publish_props(correlation_data, expiry_s)
        self.stats.published += 1
        task = self._spawn(client.publish(topic, payload, qos=qos, retain=retain, properties=props))
        if qos > 0 and expiry_s is None:  # (an expiring message is never re-sent after a reconnect)
            self._inflight[task] = (topic, payload, qos, retain, correlation_data)

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.session_expiry_s
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        tls: ssl.SSLContext | None = None
        if s.tls_ca:
            tls = ssl.create_default_context(cafile=s.tls_ca)
        clean: Literal[True, False, 3] = True if self.clean_start else False  # noqa: SIM210
        return aiomqtt.Client(
            s.host, s.port, username=s.username, password=mqtt_password(s), identifier=self.client_id or None,
            protocol=aiomqtt.ProtocolVersion.V5, will=will, keepalive=s.keepalive_s, clean_start=clean,
            properties=props, socket_options=_NODELAY, tls_context=tls, timeout=10,
        )

    async def run(self) -> None:
        self._run_task = asyncio.current_task()
        backoff = 0.2
        while not self._closing:
            try:
                async with self._make_client() as client:
                    self._client = client
                    # subscribe() may add filters while we wait for a SUBACK: loop until none is left out.
                    done: set[str] = set()
                    while todo := [(f, o) for f, o in self._subs.items() if f not in done]:
                        for f, options in todo:
                            await client.subscribe(f, options=options)
                            done.add(f)
                    log.info("mqtt_connected", client_id=self.client_id, host=self.settings.host,
                             port=self.settings.port)
                    backoff = 0.2
                    self.connected.set()
                    while self._outbox:
                        self.publish(*self._outbox.popleft())
                    self._connected_now()
                    async for message in client.messages:
                        props = message.properties
                        self._dispatch(InMessage(
                            message.topic.value, bytes(message.payload),
                            message.qos, bool(message.retain),
                            getattr(props, "ResponseTopic", None) if props is not None else None,
                            getattr(props, "CorrelationData", None) if props is not None else None,
                        ))
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._client = None
                if self._closing:
                    break
                self._requeue_inflight()
                self.stats.disconnects += 1
                log.warning("mqtt_disconnected", client_id=self.client_id, error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def close(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for pending publishes, then leave the client context: a clean DISCONNECT."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout)
        self._closing = True
        task = self._run_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
        self.connected.clear()


def make_transport(kind: str, settings: MqttSettings, *, client_id: str | None = None, will: Will | None = None,
                   clean_start: bool = False, mqtt5: bool = True) -> Transport:
    """Build the transport named ``kind`` (``paho`` or ``aiomqtt``); ``mqtt5`` as for :class:`PahoTransport`
    (aiomqtt always speaks MQTT 5)."""
    if kind == "paho":
        return PahoTransport(settings, client_id=client_id, will=will, clean_start=clean_start, mqtt5=mqtt5)
    if kind == "aiomqtt":
        return AiomqttTransport(settings, client_id=client_id, will=will, clean_start=clean_start)
    raise ValueError(f"unknown MQTT client {kind!r} (expected paho or aiomqtt)")
