"""The API's MQTT adapter: decodes what arrives into the :class:`~api.state.StateStore`, publishes requests,
releases and operator commands, and lets a route wait (bounded) for the balancer's answer.

Thin on purpose: topic parsing and payload models come from :mod:`grid_protocol`, the connection from
:mod:`grid_runtime.mqtt`. A payload that does not decode is counted and logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from api.settings import ApiSettings
from api.state import StateStore
from grid_protocol import PayloadError, Reason, TopicKind, Topics, decode, encode, is_valid_id
from grid_protocol.messages import (
    DEFAULT_REGION,
    MAX_SCHEDULE_PAYLOAD_BYTES,
    MAX_STATE_PAYLOAD_BYTES,
    Assignment,
    BalancerStatus,
    ChargeRequest,
    ControlCommand,
    ControlResult,
    LimitSchedule,
    QueueState,
    Release,
    ScheduleState,
    SessionEvent,
    SubstationState,
    SubstationStatus,
    Telemetry,
)
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import InMessage, Transport, make_transport
from grid_runtime.ratelimit import RateLimitedLog

log = get_logger("api.mqtt")

#: What the API listens to (never requests or agent commands: it does not need them).
SUBSCRIPTIONS = (
    TopicKind.SUBSTATION_STATE, TopicKind.SUBSTATION_STATUS, TopicKind.SUBSTATION_TELEMETRY,
    TopicKind.SUBSTATION_SESSION, TopicKind.BALANCER_STATUS, TopicKind.BALANCER_QUEUE,
    TopicKind.BALANCER_CONTROL_RESULT, TopicKind.EV_ASSIGNMENT, TopicKind.SUBSTATION_SCHEDULE,
)
_MODELS: dict[TopicKind, tuple[type, int]] = {
    TopicKind.SUBSTATION_STATE: (SubstationState, MAX_STATE_PAYLOAD_BYTES),
    TopicKind.SUBSTATION_STATUS: (SubstationStatus, 4096),
    TopicKind.SUBSTATION_TELEMETRY: (Telemetry, 4096),
    TopicKind.SUBSTATION_SESSION: (SessionEvent, 4096),
    TopicKind.BALANCER_STATUS: (BalancerStatus, 4096),
    TopicKind.BALANCER_QUEUE: (QueueState, MAX_STATE_PAYLOAD_BYTES),
    TopicKind.BALANCER_CONTROL_RESULT: (ControlResult, MAX_STATE_PAYLOAD_BYTES),
    TopicKind.EV_ASSIGNMENT: (Assignment, 4096),
    TopicKind.SUBSTATION_SCHEDULE: (ScheduleState, MAX_SCHEDULE_PAYLOAD_BYTES),
}
#: Retained topics where an empty payload means "cleared".
_CLEARABLE = {TopicKind.SUBSTATION_STATE, TopicKind.SUBSTATION_STATUS, TopicKind.BALANCER_STATUS,
              TopicKind.BALANCER_QUEUE, TopicKind.SUBSTATION_SCHEDULE}


class NotConnected(Exception):
    """The API is not connected to the broker: nothing can be sent to the balancer."""

    problem_type = "broker-unavailable"


class BalancerOffline(NotConnected):
    """The balancer's retained status says offline (a graceful stop or its last will): nobody would answer."""

    problem_type = "balancer-unavailable"


@dataclass(slots=True)
class _Waiter:
    predicate: Callable[[Any], bool]
    future: asyncio.Future[Any] = field(repr=False)


def new_request_id() -> str:
    return f"api-{uuid.uuid4().hex[:20]}"


class Bridge:
    def __init__(self, settings: ApiSettings, store: StateStore, transport: Transport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self._refusal_log = RateLimitedLog(log.warning, interval_s=10.0)
        self.clock = clock
        self.topics = Topics(settings.grid.grid_topic_prefix)
        if transport is None:
            mqtt = settings.mqtt
            # Stateless: everything is learnt again from retained messages, so no broker session is kept
            # (nothing would queue up for a stopped API).
            mqtt = mqtt.model_copy(update={"username": mqtt.username or "api", "session_expiry_s": 0})
            transport = make_transport(settings.mqtt_client, mqtt, client_id=mqtt.username, clean_start=True)
        self.transport = transport
        self._waiters: dict[str, list[_Waiter]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        transport.set_handler(self.handle)
        for kind in SUBSCRIPTIONS:  # every region's (issue 12)
            for topic_filter in self.topics.filters_all_regions(kind):
                transport.subscribe(topic_filter, 0 if kind == TopicKind.SUBSTATION_TELEMETRY else 1)

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self.transport.connected.is_set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self.transport.run(), name="api-mqtt")

    async def stop(self) -> None:
        for waiters in self._waiters.values():
            for w in waiters:
                if not w.future.done():
                    w.future.cancel()
        self._waiters.clear()
        await self.transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called after every message that changed the store (the live page's hub)."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------ inbound
    def handle(self, msg: InMessage) -> None:
        parsed = self.topics.parse_any_region(msg.topic)
        if parsed is None:
            return
        region, kind, id_ = parsed
        spec = _MODELS.get(kind)
        if spec is None:
            return
        if id_ is not None and not is_valid_id(id_):
            self._refused(kind, "invalid_topic_id", msg.topic[:200])
            return
        now = self.clock()
        if not msg.payload and kind in _CLEARABLE:
            value: Any = None
        else:
            model, max_bytes = spec
            try:
                value = decode(msg.payload, model, max_bytes=max_bytes)
            except PayloadError as err:
                self._refused(kind, str(err.reason), err.detail)
                return
        self._apply(kind, id_, value, now, region)
        for callback in self._listeners:
            callback()

    def _refused(self, kind: TopicKind, reason: str, detail: str) -> None:
        """Counted every time; logged at most every 10 s per kind and reason (a misbehaving publisher must not
        flood the log), each line saying how many it stands for."""
        self.store.decode_error(str(kind), reason)
        self._refusal_log((kind, reason), "api_payload_refused", kind=str(kind), reason=reason, detail=detail)

    def _apply(self, kind: TopicKind, id_: str | None, value: Any, now: float, region: str = DEFAULT_REGION) -> None:
        store = self.store
        sid = id_ or ""
        if kind == TopicKind.SUBSTATION_STATE:
            if value is not None and value.substation_id != sid:
                self._refused(kind, "id_mismatch", f"state for {value.substation_id!r} on {sid!r}'s topic")
                return
            store.on_substation_state(sid, value, now)
        elif kind == TopicKind.SUBSTATION_STATUS:
            store.on_substation_status(sid, value, now)
        elif kind == TopicKind.SUBSTATION_TELEMETRY:
            if value.substation_id != sid:
                self._refused(kind, "id_mismatch", f"telemetry for {value.substation_id!r} on {sid!r}'s topic")
                return
            store.on_telemetry(sid, value, now)
        elif kind == TopicKind.SUBSTATION_SESSION:
            store.on_session_event(sid, value, now)
        elif kind == TopicKind.BALANCER_STATUS:
            store.on_balancer_status(value, now, region)
        elif kind == TopicKind.BALANCER_QUEUE:
            store.on_queue(value, now, region)
        elif kind == TopicKind.BALANCER_CONTROL_RESULT:
            store.on_control_result(value, now)
            self._resolve(f"control:{value.request_id}", value)
        elif kind == TopicKind.SUBSTATION_SCHEDULE:
            store.on_schedule(sid, value, now)
        elif kind == TopicKind.EV_ASSIGNMENT:
            if value.ev_id != sid:
                self._refused(kind, "id_mismatch", f"assignment for {value.ev_id!r} on {sid!r}'s topic")
                return
            store.on_assignment(value, now)
            self._resolve(f"ev:{sid}", value)

    def _resolve(self, key: str, value: Any) -> None:
        waiters = self._waiters.get(key)
        if not waiters:
            return
        for w in list(waiters):
            if not w.future.done() and w.predicate(value):
                w.future.set_result(value)
                waiters.remove(w)
        if not waiters:
            self._waiters.pop(key, None)

    # ------------------------------------------------------------------ outbound + wait
    async def _publish_and_wait(self, key: str, predicate: Callable[[Any], bool], topic: str, payload: bytes,
                                timeout: float, region: str = DEFAULT_REGION) -> Any | None:
        """Register a waiter, publish, and wait at most ``timeout`` s. ``None`` on timeout."""
        if not self.connected:
            raise NotConnected("not connected to the MQTT broker")
        balancer = self.store.balancers.get(region)
        if balancer is not None and balancer.state == "offline":
            raise BalancerOffline("the balancer is offline (its retained status)" if region == DEFAULT_REGION
                                  else f"the balancer of region {region} is offline (its retained status)")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(predicate, future)
        self._waiters.setdefault(key, []).append(waiter)
        try:
            # Sent now or never, and void after the timeout: the caller gets a 504 and may retry with the same
            # request_id; a late copy must not open a session or apply an operator action nobody waits for. (MQTT 5
            # message expiry; on 3.1.1 the payload's own expires_at, which the balancer checks, on both versions.)
            self.transport.publish(topic, payload, 1, expiry_s=max(1, math.ceil(timeout)))
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    self._waiters.pop(key, None)

    async def charge(self, request: ChargeRequest, timeout: float) -> Assignment | None:
        """Publish ``request`` for its EV and wait for the answer with its request_id: on the EV's assignment topic,
        which works on MQTT 5 and 3.1.1 alike (no response topic). The request carries ``expires_at`` (now +
        ``timeout``): on 3.1.1 there is no message expiry, so the balancer itself refuses a copy that arrives after
        the caller got its 504 (``rejected``, ``expired``) instead of opening a session nobody waits for."""
        ev_id, request_id = request.ev_id, request.request_id
        assert ev_id is not None and request_id is not None
        if request.expires_at is None:
            request = msgspec.structs.replace(request, expires_at=round(self.clock() + timeout, 3))

        def matches(a: Assignment) -> bool:
            return a.request_id == request_id

        result: Assignment | None = await self._publish_and_wait(
            f"ev:{ev_id}", matches, self.topics.request(ev_id), encode(request), timeout)
        return result

    async def release(self, ev_id: str, session_id: str, request_id: str | None, timeout: float) -> Assignment | None:
        """Release a session; the answer is its ``completed`` (or a rejection naming the same request)."""
        release = Release(session_id=session_id, ev_id=ev_id, request_id=request_id)

        def matches(a: Assignment) -> bool:
            if a.session_id == session_id and a.status in ("completed", "cancelled"):
                return True
            return a.status == "rejected" and a.request_id == request_id

        result: Assignment | None = await self._publish_and_wait(
            f"ev:{ev_id}", matches, self.topics.release(ev_id), encode(release), timeout)
        return result

    async def withdraw(self, ev_id: str, timeout: float) -> Assignment | None:
        """Release whatever the EV has open (a queued request or a running session); the answer is its
        ``cancelled``/``completed``, or ``rejected`` (``nothing_to_release``)."""

        def matches(a: Assignment) -> bool:
            return a.status in ("completed", "cancelled") or (
                a.status == "rejected" and a.reason == Reason.NOTHING_TO_RELEASE)

        result: Assignment | None = await self._publish_and_wait(
            f"ev:{ev_id}", matches, self.topics.release(ev_id), encode(Release(ev_id=ev_id)), timeout)
        return result

    async def control(self, command: ControlCommand, timeout: float) -> ControlResult | None:
        if command.request_id is None:
            command = msgspec.structs.replace(command, request_id=new_request_id())
        if command.expires_at is None:  # (void once the caller has its 504: MQTT 3.1.1 has no message expiry)
            command = msgspec.structs.replace(command, expires_at=round(self.clock() + timeout, 3))
        if command.ts is None:
            command = msgspec.structs.replace(command, ts=self.clock())
        # To the balancer of the substation's region (as its retained status or state says).
        region = self.store.region_of(command.substation_id)
        result: ControlResult | None = await self._publish_and_wait(
            f"control:{command.request_id}", lambda _r: True, self.topics.for_region(region).balancer_control(),
            encode(command), timeout, region)
        return result

    async def limits(self, substation_id: str, schedule: LimitSchedule, timeout: float) -> ControlResult | None:
        """Send a source's limit schedule for the substation; the answer is the balancer's ``set_limits`` result."""
        if schedule.request_id is None:
            schedule = msgspec.structs.replace(schedule, request_id=new_request_id())
        if schedule.expires_at is None:  # (as for a control command)
            schedule = msgspec.structs.replace(schedule, expires_at=round(self.clock() + timeout, 3))
        if schedule.ts is None:
            schedule = msgspec.structs.replace(schedule, ts=self.clock())
        region = self.store.region_of(substation_id)
        result: ControlResult | None = await self._publish_and_wait(
            f"control:{schedule.request_id}", lambda _r: True,
            self.topics.for_region(region).substation_limits(substation_id), encode(schedule), timeout, region)
        return result
