"""One simulated EV: its own MQTT connection and account, one charge request at a time.

The EV subscribes to its assignment topic before it publishes anything, then for each request:

1. publishes the :class:`ChargeRequest` (QoS 1) with a client-chosen ``request_id`` and re-publishes the
   *same* request every ``retry_after_s`` until an answer for that ``request_id`` arrives (at most
   ``max_attempts`` publishes): messages can be lost end to end, the balancer answers a repeated
   request id with its latest answer;
2. follows the request's life: ``queued`` -> waits for ``assigned`` (releases after ``timeout_s``);
   ``assigned``/``updated`` -> charges until ``completed`` (or leaves early with a :class:`Release`);
   ``revoked`` -> keeps waiting (the balancer re-queues it); ``rejected``/``completed``/``cancelled`` end it.
   When nothing is heard for a while the EV re-sends the same request as a state query;
3. every answer is recorded in a :class:`~ev_clients.stats.RequestRecord` with monotonic timestamps
   taken when the message arrives (first-answer latency, time to ``assigned``).

Answers for other request ids (an earlier visit of the same EV id, duplicates) are ignored. An EV releases only
requests it sent itself, always naming the ``request_id``: whatever else holds its EV id (a session opened
through the API, another run) is never ended by it (:class:`OwnRequests`, :meth:`SimulatedEv.release_own`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from ev_clients.stats import FleetStats, RequestRecord
from ev_clients.workload import expected_charge_s
from grid_protocol.codec import PayloadError, decode, encode
from grid_protocol.messages import CHARGING_STATUSES, FINAL_STATUSES, Assignment, ChargeRequest, Release
from grid_protocol.reasons import Reason
from grid_protocol.topics import Topics
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import InMessage, Transport, make_transport
from grid_runtime.settings import MqttSettings

log = get_logger("ev")

WAITING = frozenset({"queued", "revoked"})


def new_request_id() -> str:
    """A fresh client-chosen request id (uuid4 hex)."""
    return uuid.uuid4().hex


@dataclass(slots=True)
class EvBehaviour:
    """How an EV waits, retries and leaves."""

    retry_after_s: float = 5.0
    max_attempts: int = 6
    timeout_s: float = 60.0  # longest wait in the queue; slack past the expected end of a charge
    speedup: float = 1.0  # the agents' SIM_SPEEDUP
    release_early_pct: float = 10.0
    release_at_once: bool = False  # load tester: release as soon as ``assigned`` arrives ...
    release_after_s: float = 0.0  # ... or this many real seconds after it (hold sessions: exercise the queue)
    connect_timeout_s: float = 10.0
    poll_after_s: float | None = None  # silence before a state query; default 4 x retry_after_s
    max_polls: int = 50

    @property
    def answer_window_s(self) -> float:
        """How long the EV waits for a first answer before it gives up (every attempt): a request's
        ``expires_at`` is that far ahead, so a copy that arrives later is refused instead of placed."""
        return self.retry_after_s * self.max_attempts

    @property
    def poll_interval(self) -> float:
        return self.poll_after_s if self.poll_after_s is not None else max(4 * self.retry_after_s, 1.0)


class OwnRequests:
    """Request ids this run sent per EV id whose end it has not heard (unanswered, a release nobody confirmed):
    the only requests the run may release later. Shared by every visit of an EV id, so a later visit can close
    what an earlier one left open, and nothing else. Bounded: the newest ``keep`` per EV id (the balancer keeps
    at most one open request per EV, so older unconfirmed ones are closed already)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._open: dict[str, dict[str, None]] = {}

    def sent(self, ev_id: str, request_id: str) -> None:
        ids = self._open.setdefault(ev_id, {})
        ids[request_id] = None
        while len(ids) > self.keep:
            del ids[next(iter(ids))]

    def ended(self, ev_id: str, request_id: str) -> None:
        ids = self._open.get(ev_id)
        if ids is not None:
            ids.pop(request_id, None)
            if not ids:
                del self._open[ev_id]

    def open(self, ev_id: str) -> list[str]:
        """Oldest first."""
        return list(self._open.get(ev_id, ()))


class SimulatedEv:
    """An EV with its own transport (client id == username == ``ev_id``)."""

    def __init__(self, ev_id: str, mqtt: MqttSettings, topics: Topics, stats: FleetStats,
                 behaviour: EvBehaviour | None = None, *, client_kind: str = "aiomqtt",
                 rng: random.Random | None = None, stop: asyncio.Event | None = None,
                 clock: Callable[[], float] = time.monotonic, transport: Transport | None = None,
                 own: OwnRequests | None = None) -> None:
        self.ev_id = ev_id
        self.own = own if own is not None else OwnRequests()
        self.topics = topics
        self.stats = stats
        self.behaviour = behaviour or EvBehaviour()
        self.rng = rng or random.Random()
        self.stop = stop or asyncio.Event()
        self.clock = clock
        if transport is None:
            settings = mqtt.model_copy(update={"username": ev_id})
            transport = make_transport(client_kind, settings, client_id=ev_id)
        self.transport: Transport = transport
        self.transport.set_handler(self._on_message)
        self._assignment_topic = topics.assignment(ev_id)
        self._request_topic = topics.request(ev_id)
        self._release_topic = topics.release(ev_id)
        self._current: str | None = None
        self._session: str | None = None  # session id of the current request, once assigned
        self._inbox: asyncio.Queue[tuple[float, Assignment]] = asyncio.Queue()
        self._run_task: asyncio.Task[None] | None = None
        self.invalid_messages = 0
        self.ignored_messages = 0
        self.connected_once = False

    # --- connection ----------------------------------------------------------------------------
    async def start(self) -> bool:
        """Subscribe (QoS 1), connect and wait (bounded) for the connection. ``False``: not connected yet
        (the transport keeps trying; publishes wait in its outbox)."""
        self.transport.subscribe(self._assignment_topic, 1)
        self._run_task = asyncio.create_task(self.transport.run(), name=f"mqtt-{self.ev_id}")
        if not await wait_event(self.transport.connected, self.behaviour.connect_timeout_s):
            self.stats.connect_failures += 1
            log.error("ev_not_connected", ev_id=self.ev_id, timeout_s=self.behaviour.connect_timeout_s)
            return False
        self.connected_once = True
        self.stats.connected_evs += 1
        return True

    async def close(self) -> None:
        """Disconnect (bounded): pending QoS 1 publishes get a moment to leave first."""
        try:
            async with asyncio.timeout(3.0):
                await self.transport.close(1.0)
        except (TimeoutError, Exception) as exc:  # closing must never hang or raise
            log.warning("ev_close_failed", ev_id=self.ev_id, error=repr(exc))
        task = self._run_task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(2.0):
                    await asyncio.shield(task)
            except (TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.connected_once:
            self.stats.connected_evs -= 1
            self.connected_once = False

    # --- incoming ------------------------------------------------------------------------------
    def _on_message(self, msg: InMessage) -> None:
        if msg.topic != self._assignment_topic:
            self.ignored_messages += 1
            return
        received = self.clock()
        try:
            answer = decode(msg.payload, Assignment)
        except PayloadError as exc:
            self.invalid_messages += 1
            log.warning("ev_invalid_assignment", ev_id=self.ev_id, error=str(exc))
            return
        if answer.ev_id != self.ev_id:
            self.ignored_messages += 1
            return
        if answer.request_id is None and answer.session_id is not None and answer.session_id == self._session:
            # The end of our session as told by a balancer that restarted and forgot the request id.
            answer.request_id = self._current
        if answer.request_id is None or answer.request_id != self._current:
            self.ignored_messages += 1
            return
        self._inbox.put_nowait((received, answer))

    async def _next(self, timeout: float) -> tuple[float, Assignment] | None:
        if timeout <= 0:
            try:
                return self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            async with asyncio.timeout(timeout):
                return await self._inbox.get()
        except TimeoutError:
            return None

    # --- outgoing ------------------------------------------------------------------------------
    def _publish_request(self, payload: bytes, record: RequestRecord) -> None:
        if record.sent_at is None:
            record.sent_at = self.clock()
        self.transport.publish(self._request_topic, payload, 1)

    def _apply(self, record: RequestRecord, received: float, a: Assignment) -> bool:
        if a.status == "rejected" and a.reason == Reason.NOTHING_TO_RELEASE:
            return False  # about our Release, not the request: handled by the caller
        if a.session_id is not None:
            self._session = a.session_id
        return self.stats.on_answer(record, received, a.status, reason=a.reason, substation_id=a.substation_id,
                                    granted_kw=a.granted_kw, session_id=a.session_id, position=a.position)

    # --- one request ---------------------------------------------------------------------------
    async def charge(self, request: ChargeRequest) -> RequestRecord:
        """Send ``request`` and follow it to its end; returns its record (also added to the stats)."""
        if request.request_id is None:
            request.request_id = new_request_id()
        if request.ev_id is None:
            request.ev_id = self.ev_id
        # Every copy sent while waiting for the first answer carries the moment the EV gives up (the replacement of
        # MQTT 5 message expiry, which 3.1.1 lacks): a copy the broker delivers later is refused, not placed.
        request.expires_at = round(time.time() + self.behaviour.answer_window_s, 3)
        record = self.stats.new_record(RequestRecord(
            ev_id=self.ev_id, request_id=request.request_id, requested_kw=request.requested_kw,
            energy_kwh=request.energy_kwh, duration_minutes=request.duration_minutes, priority=request.priority,
        ))
        self._follow_only(request.request_id)
        self.own.sent(self.ev_id, request.request_id)
        payload = encode(request)
        try:
            if not await self._first_answer(record, payload):
                record.outcome = "unanswered"
                log.error("ev_request_unanswered", ev_id=self.ev_id, request_id=record.request_id,
                          attempts=record.attempts)
                # Whatever the balancer may have got, leave nothing open behind us.
                self.transport.publish(self._release_topic, encode(Release(request_id=record.request_id,
                                                                           ev_id=self.ev_id)), 1)
                return record
            await self._follow(record, request)
            return record
        except asyncio.CancelledError:
            record.outcome = record.outcome or "interrupted"
            raise
        finally:
            if record.outcome is None:
                record.outcome = record.final_status
            if record.finished:
                self.own.ended(self.ev_id, record.request_id)
            self._current = None
            self._session = None

    def _follow_only(self, request_id: str) -> None:
        """From now on only answers for ``request_id`` reach the inbox (older ones are dropped)."""
        self._current = request_id
        self._session = None
        while not self._inbox.empty():
            self._inbox.get_nowait()

    async def _first_answer(self, record: RequestRecord, payload: bytes) -> bool:
        b = self.behaviour
        for _ in range(b.max_attempts):
            self._publish_request(payload, record)
            record.attempts += 1
            deadline = self.clock() + b.retry_after_s
            while (got := await self._next(deadline - self.clock())) is not None:
                self._apply(record, *got)
                if record.answered:
                    return True
        return False

    async def _follow(self, record: RequestRecord, request: ChargeRequest) -> None:
        """From the first answer to the end of the request."""
        b = self.behaviour
        now = self.clock()
        poll_due = now + b.poll_interval
        queue_deadline: float | None = None
        charge_deadline: float | None = None
        release_due: float | None = None
        early_decided = False
        # simulated progress, for the expected end of the charge
        energy_left = request.energy_kwh
        time_left = request.duration_minutes * 60 if request.duration_minutes is not None else None
        segment: tuple[float, float] | None = None  # (start, kW) of the charging stretch in progress
        last_status: str | None = None
        seen = 0  # answers handled so far (a second ``updated`` changes the rate, not the status)

        while True:
            status = record.final_status
            now = self.clock()
            if len(record.events) != seen:
                seen = len(record.events)
                # close the charging stretch (for the estimate of what is left)
                if segment is not None:
                    sim_s = (now - segment[0]) * b.speedup
                    if energy_left is not None:
                        energy_left = max(0.0, energy_left - segment[1] * sim_s / 3600)
                    if time_left is not None:
                        time_left = max(0.0, time_left - sim_s)
                    segment = None
                if status in WAITING:
                    if queue_deadline is None or last_status in CHARGING_STATUSES:
                        queue_deadline = now + b.timeout_s
                    charge_deadline = None
                    poll_due = now + b.poll_interval
                elif status in CHARGING_STATUSES:
                    queue_deadline = None
                    kw = record.events[-1].granted_kw or record.granted_kw or request.requested_kw
                    segment = (now, kw)
                    left = [v for v in (
                        energy_left / kw * 3600 if energy_left is not None and kw > 0 else None, time_left)
                        if v is not None]
                    expected_end = now + (min(left) if left else 0.0) / b.speedup
                    charge_deadline = expected_end + b.timeout_s
                    # silence is normal while charging: ask only once the charge should be over
                    poll_due = max(now + b.poll_interval, expected_end + b.retry_after_s)
                    if b.release_at_once:
                        release_due = now + b.release_after_s
                    elif not early_decided:
                        early_decided = True
                        if self.rng.random() * 100 < b.release_early_pct:
                            span = expected_charge_s(request, kw, b.speedup)
                            release_due = now + self.rng.uniform(0.05, 0.8) * span
                last_status = status
            if status in FINAL_STATUSES:
                return
            if self.stop.is_set():
                record.outcome = "stopped"
                await self._release(record, request)
                return
            if release_due is not None and now >= release_due and status in CHARGING_STATUSES:
                record.outcome = ("released_early" if not b.release_at_once else "released_at_once"
                                  if b.release_after_s == 0 else "released_after_hold")
                await self._release(record, request)
                return
            giveup = queue_deadline if status in WAITING else charge_deadline
            if giveup is not None and now >= giveup:
                record.outcome = "queue_timeout" if status in WAITING else "charge_timeout"
                log.warning("ev_gave_up", ev_id=self.ev_id, request_id=record.request_id, status=status,
                            outcome=record.outcome)
                await self._release(record, request)
                return
            if now >= poll_due:
                if record.polls >= b.max_polls:
                    record.outcome = "poll_limit"
                    await self._release(record, request)
                    return
                record.polls += 1
                self._publish_request(self._restamped(request), record)
                poll_due = now + b.poll_interval
            wake = min(t for t in (poll_due, giveup, release_due if status in CHARGING_STATUSES else None)
                       if t is not None)
            got = await self._next_or_stop(max(0.0, wake - self.clock()))
            if got is not None:
                self._apply(record, *got)
                if status in WAITING:
                    poll_due = self.clock() + b.poll_interval  # the balancer is talking to us

    async def _next_or_stop(self, timeout: float) -> tuple[float, Assignment] | None:
        """Next answer within ``timeout``; returns early (``None``) when the fleet is stopping."""
        if self.stop.is_set() or timeout <= 0:
            return await self._next(0)
        getter = asyncio.ensure_future(self._inbox.get())
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait({getter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        return None

    def _restamped(self, request: ChargeRequest) -> bytes:
        """The request again as a state query, with a fresh ``expires_at``: a balancer that knows it answers with
        its latest answer; one that forgot it (restarted) places it again as long as the EV waits."""
        return encode(msgspec.structs.replace(request, expires_at=round(time.time() + self.behaviour.answer_window_s,
                                                                        3)))

    async def _release(self, record: RequestRecord, request: ChargeRequest) -> None:
        """Release the request (queued: ``cancelled``; charging: ``completed`` released) and wait, bounded,
        for the answer. A ``nothing_to_release`` reply means it was already closed: the EV then asks for the
        final answer with the request itself."""
        b = self.behaviour
        record.released = True
        release = encode(Release(request_id=record.request_id, ev_id=self.ev_id))
        asked = False
        for _ in range(b.max_attempts):
            self.transport.publish(self._release_topic, release, 1)
            deadline = self.clock() + b.retry_after_s
            while (got := await self._next(deadline - self.clock())) is not None:
                received, a = got
                if a.status == "rejected" and a.reason == Reason.NOTHING_TO_RELEASE:
                    if not asked:
                        asked = True
                        record.polls += 1
                        self._publish_request(self._restamped(request), record)
                    continue
                self._apply(record, received, a)
                if record.finished:
                    return
        log.warning("ev_release_unanswered", ev_id=self.ev_id, request_id=record.request_id)
        record.outcome = "release_unanswered"

    async def release_own(self) -> int:
        """After an ``ev_busy`` answer: release the requests this run sent for this EV id and never saw end,
        each by its ``request_id`` (never a bare release, which would end whatever the EV id holds, including
        a session someone else opened for it). Returns how many it closed; 0 means the EV id is held by a
        request this run did not make, which it leaves alone."""
        closed = 0
        try:
            for request_id in self.own.open(self.ev_id):
                self._follow_only(request_id)
                self.transport.publish(self._release_topic, encode(Release(request_id=request_id,
                                                                           ev_id=self.ev_id)), 1)
                deadline = self.clock() + self.behaviour.retry_after_s
                while (got := await self._next(deadline - self.clock())) is not None:
                    answer = got[1]
                    if answer.status in FINAL_STATUSES:  # closed now, or already (nothing_to_release)
                        self.own.ended(self.ev_id, request_id)
                        closed += answer.status != "rejected"
                        break
        finally:
            self._current = None
            self._session = None
        return closed
