"""The simulated EV's request life cycle against a scripted in-memory balancer (no broker)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from ev_clients.ev import EvBehaviour, SimulatedEv
from ev_clients.stats import FleetStats, RequestRecord
from grid_protocol.codec import decode, encode
from grid_protocol.messages import Assignment, ChargeRequest, Release
from grid_protocol.topics import Topics
from grid_runtime.mqtt import Handler, InMessage, TransportStats
from grid_runtime.settings import MqttSettings

TOPICS = Topics()
EV = "EV_0001"

# A script gets (kind, payload, fake) for each publish: kind "request" or "release".
Script = Callable[[str, Any, "FakeTransport"], None]


class FakeTransport:
    """Implements the Transport protocol in memory; answers come from ``script``."""

    def __init__(self, script: Script) -> None:
        self.stats = TransportStats()
        self.connected = asyncio.Event()
        self.handler: Handler = lambda _m: None
        self.subscribed: list[str] = []
        self.published: list[tuple[str, Any]] = []
        self.script = script
        self.closed = False
        self._stopped = asyncio.Event()

    def set_handler(self, handler: Handler) -> None:
        self.handler = handler

    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        assert qos == 1
        self.subscribed.append(topic_filter)

    def on_connect(self, callback: Callable[[], None]) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> None:
        assert qos == 1 and TOPICS.assignment(EV) in self.subscribed  # subscribed before publishing
        if topic == TOPICS.request(EV):
            item: tuple[str, Any] = ("request", decode(payload, ChargeRequest))
        elif topic == TOPICS.release(EV):
            item = ("release", decode(payload, Release))
        else:
            raise AssertionError(f"unexpected topic {topic}")
        self.published.append(item)
        self.script(item[0], item[1], self)

    def send(self, delay: float = 0.0, *, ev_id: str = EV, **fields: Any) -> None:
        """Deliver an Assignment to the EV after ``delay`` seconds."""
        msg = Assignment(ev_id=ev_id, ts=time.time(), **fields)
        payload = encode(msg)
        asyncio.get_running_loop().call_later(
            delay, self.handler, InMessage(TOPICS.assignment(EV), payload, 1, False))

    async def run(self) -> None:
        self.connected.set()
        await self._stopped.wait()

    async def close(self, timeout: float = 2.0) -> None:
        self.closed = True
        self._stopped.set()

    def requests(self) -> list[ChargeRequest]:
        return [p for k, p in self.published if k == "request"]

    def releases(self) -> list[Release]:
        return [p for k, p in self.published if k == "release"]


def _behaviour(**kw: Any) -> EvBehaviour:
    base: dict[str, Any] = dict(retry_after_s=0.05, max_attempts=5, timeout_s=1.0, speedup=1.0,
                                release_early_pct=0.0, connect_timeout_s=1.0)
    base.update(kw)
    return EvBehaviour(**base)


def _request(rid: str = "r1", **kw: Any) -> ChargeRequest:
    fields: dict[str, Any] = dict(requested_kw=11.0, energy_kwh=0.001, request_id=rid)
    fields.update(kw)
    return ChargeRequest(**fields)


async def _charge(script: Script, request: ChargeRequest | None = None, *, stop: asyncio.Event | None = None,
                  **behaviour: Any) -> tuple[RequestRecord, FakeTransport, FleetStats]:
    fake = FakeTransport(script)
    stats = FleetStats(mode="fleet", started_at=time.monotonic())
    ev = SimulatedEv(EV, MqttSettings(), TOPICS, stats, _behaviour(**behaviour), transport=fake,
                     rng=random.Random(1), stop=stop)
    assert await ev.start()
    try:
        record = await asyncio.wait_for(ev.charge(request or _request()), 10)
    finally:
        await ev.close()
    assert fake.closed
    return record, fake, stats


def test_retries_same_request_id_until_answered() -> None:
    def script(kind: str, msg: Any, fake: FakeTransport) -> None:
        if kind == "request" and len(fake.requests()) == 3:
            fake.send(request_id=msg.request_id, status="assigned", substation_id="A", granted_kw=11.0,
                      session_id="s1")
            fake.send(0.01, request_id=msg.request_id, status="completed", substation_id="A", granted_kw=11.0,
                      session_id="s1", reason="energy_delivered")

    record, fake, stats = asyncio.run(_charge(script))
    assert record.attempts == 3
    assert {r.request_id for r in fake.requests()} == {"r1"}
    assert record.statuses == ["assigned", "completed"]
    assert record.first_answer_s is not None and record.first_answer_s >= 0.09  # two retry periods
    assert record.assigned_s == record.first_answer_s
    assert stats.active_sessions == 0 and record.outcome == "completed"


def test_ignores_answers_for_other_requests_and_evs() -> None:
    def script(kind: str, msg: Any, fake: FakeTransport) -> None:
        if kind == "request":
            fake.send(request_id="old-request", status="completed", reason="released")
            fake.send(request_id=msg.request_id, ev_id="EV_0002", status="rejected", reason="ev_busy")
            fake.send(request_id=None, status="completed", session_id="someone-else")
            fake.send(0.01, request_id=msg.request_id, status="rejected", reason="invalid_field")

    record, _, _ = asyncio.run(_charge(script))
    assert record.statuses == ["rejected"] and record.attempts == 1


def test_queued_revoked_requeued_then_completed() -> None:
    def script(kind: str, msg: Any, fake: FakeTransport) -> None:
        if kind != "request" or len(fake.requests()) > 1:
            return
        rid = msg.request_id
        fake.send(request_id=rid, status="queued", reason="no_headroom", position=3)
        fake.send(0.02, request_id=rid, status="assigned", substation_id="A", granted_kw=7.4, session_id="s1")
        fake.send(0.03, request_id=rid, status="updated", substation_id="A", granted_kw=5.0, session_id="s1")
        fake.send(0.04, request_id=rid, status="revoked", substation_id="A", granted_kw=5.0, session_id="s1",
                  reason="substation_offline")
        fake.send(0.04, request_id=rid, status="queued", reason="substation_offline", position=1)
        fake.send(0.06, request_id=rid, status="assigned", substation_id="B", granted_kw=11.0, session_id="s2")
        # a balancer that restarted tells the end of the session without the request id
        fake.send(0.08, request_id=None, status="completed", substation_id="B", session_id="s2",
                  reason="energy_delivered")

    record, fake, stats = asyncio.run(_charge(script))
    assert record.statuses == ["queued", "assigned", "updated", "revoked", "queued", "assigned", "completed"]
    assert record.substation_id == "A" and record.granted_kw == 7.4  # the first grant
    assert record.assigned_s is not None and record.assigned_s >= 0.015
    assert stats.active_sessions == 0 and stats.queued_now == 0
    assert fake.releases() == []


def test_loadtest_releases_at_once_after_assigned() -> None:
    def script(kind: str, msg: Any, fake: FakeTransport) -> None:
        if kind == "request":
            fake.send(request_id=msg.request_id, status="assigned", substation_id="C", granted_kw=22.0,
                      session_id="s9")
        else:
            assert msg.request_id == "r1" and msg.ev_id == EV
            fake.send(request_id=msg.request_id, status="completed", substation_id="C", granted_kw=22.0,
                      session_id="s9", reason="released")

    record, fake, _ = asyncio.run(_charge(script, release_at_once=True))
    assert record.statuses == ["assigned", "completed"] and record.released
    assert record.outcome == "released_at_once" and len(fake.releases()) == 1


def test_queue_timeout_releases_and_is_cancelled() -> None:
    def script(kind: str, msg: Any, fake: FakeTransport) -> None:
        if kind == "request":
            fake.send(request_id=msg.request_id, status="queued", reason="no_headroom", position=1)
        else:
            fake.send(request_id=msg.request_id, status="cancelled", reason="released")

    record, fake, stats = asyncio.run(_charge(script, timeout_s=0.2, poll_after_s=0.08))
    assert record.statuses == ["queued", "cancelled"] and record.outcome == "queue_timeout"
    assert record.polls >= 1  # the EV asked again while waiting silently
    assert len(fake.releases()) == 1 and stats.queued_now == 0


def test_never_answered_is_reported_and_released() -> None:
    record, fake, stats = asyncio.run(_charge(lambda *_: None, max_attempts=3, retry_after_s=0.02))
    assert record.attempts == 3 and not record.answered and record.outcome == "unanswered"
    assert stats.unanswered() == [record]
    assert len(fake.releases()) == 1 and fake.releases()[0].request_id == "r1"


def test_nothing_to_release_asks_for_the_final_answer() -> None:
    """The EV gives up on a charge whose ``completed`` was lost: the release finds nothing open, so the EV
    re-sends the request and the balancer answers with the final state."""
    def script(kind: str, msg: Any, fake: FakeTransport) -> None:
        rid = "r1"
        if kind == "request" and len(fake.requests()) == 1:
            fake.send(request_id=rid, status="assigned", substation_id="A", granted_kw=11.0, session_id="s1")
        elif kind == "release":
            fake.send(request_id=rid, status="rejected", reason="nothing_to_release")
        elif kind == "request":
            fake.send(request_id=rid, status="completed", substation_id="A", granted_kw=11.0, session_id="s1",
                      reason="energy_delivered")

    record, _, _ = asyncio.run(_charge(script, timeout_s=0.1))
    assert record.statuses == ["assigned", "completed"]
    assert record.outcome == "charge_timeout" and record.final_status == "completed"


def test_stop_releases_a_charging_ev() -> None:
    async def scenario() -> tuple[RequestRecord, FakeTransport, FleetStats]:
        stop = asyncio.Event()

        def script(kind: str, msg: Any, fake: FakeTransport) -> None:
            if kind == "request":
                fake.send(request_id=msg.request_id, status="assigned", substation_id="A", granted_kw=11.0,
                          session_id="s1")
                asyncio.get_running_loop().call_later(0.05, stop.set)
            else:
                fake.send(request_id=msg.request_id, status="completed", substation_id="A", granted_kw=11.0,
                          session_id="s1", reason="released")

        return await _charge(script, _request(energy_kwh=50.0), stop=stop, timeout_s=60)

    record, fake, stats = asyncio.run(scenario())
    assert record.statuses == ["assigned", "completed"] and record.outcome == "stopped"
    assert len(fake.releases()) == 1 and stats.active_sessions == 0


@pytest.mark.parametrize("pct", [0.0, 100.0])
def test_release_early_probability(pct: float) -> None:
    def script(kind: str, msg: Any, fake: FakeTransport) -> None:
        if kind == "request" and len(fake.requests()) == 1:
            fake.send(request_id=msg.request_id, status="assigned", substation_id="A", granted_kw=11.0,
                      session_id="s1")
            fake.send(0.5, request_id=msg.request_id, status="completed", substation_id="A", granted_kw=11.0,
                      session_id="s1", reason="energy_delivered")
        elif kind == "release":
            fake.send(request_id=msg.request_id, status="completed", substation_id="A", granted_kw=11.0,
                      session_id="s1", reason="released")

    # 0.0011 kWh at 11 kW = 0.36 s of charging at speedup 1: an early release comes before 0.3 s
    record, fake, _ = asyncio.run(_charge(script, _request(energy_kwh=0.0011), release_early_pct=pct,
                                          timeout_s=5))
    if pct:
        assert record.outcome == "released_early" and record.events[-1].reason == "released"
    else:
        assert record.outcome == "completed" and record.events[-1].reason == "energy_delivered"
        assert fake.releases() == []


class OneOpenRequest:
    """A scripted balancer that keeps one open request per EV, like the real one: another request is
    ``ev_busy``; a release must match the open request (a bare one matches anything); ``lose_releases``
    drops releases on the way (the EV's release goes unconfirmed, the request stays open)."""

    def __init__(self, held: str | None = None) -> None:
        self.open = held
        self.lose_releases = False

    def __call__(self, kind: str, msg: Any, fake: FakeTransport) -> None:
        if kind == "request":
            if self.open is None or self.open == msg.request_id:
                self.open = msg.request_id
                fake.send(request_id=msg.request_id, status="assigned", substation_id="A", granted_kw=11.0,
                          session_id=f"s-{msg.request_id}")
            else:
                fake.send(request_id=msg.request_id, status="rejected", reason="ev_busy")
        elif self.lose_releases:
            return
        elif msg.request_id in (None, self.open) and self.open is not None:
            closed, self.open = self.open, None
            fake.send(request_id=closed, status="completed", substation_id="A", granted_kw=11.0,
                      session_id=f"s-{closed}", reason="released")
        else:
            fake.send(request_id=msg.request_id, status="rejected", reason="nothing_to_release")


def test_release_own_never_touches_a_request_someone_else_holds() -> None:
    async def scenario() -> tuple[RequestRecord, int, FakeTransport, OneOpenRequest]:
        balancer = OneOpenRequest(held="someone-else")
        fake = FakeTransport(balancer)
        ev = SimulatedEv(EV, MqttSettings(), TOPICS, FleetStats(mode="loadtest", started_at=time.monotonic()),
                         _behaviour(release_at_once=True), transport=fake, rng=random.Random(1))
        await ev.start()
        record = await ev.charge(_request("r1"))
        closed = await ev.release_own()
        await ev.close()
        return record, closed, fake, balancer

    record, closed, fake, balancer = asyncio.run(scenario())
    assert record.final_status == "rejected" and record.events[-1].reason == "ev_busy"
    assert closed == 0 and fake.releases() == [] and balancer.open == "someone-else"


def test_release_own_closes_what_this_run_left_open_by_its_request_id() -> None:
    """r1's release goes unanswered (the balancer still holds r1); r2 then gets ``ev_busy``: the EV releases
    r1 by its id and the next request is assigned. No release ever goes out without a request_id."""
    async def scenario() -> tuple[list[RequestRecord], list[int], FakeTransport, OneOpenRequest]:
        balancer = OneOpenRequest()
        fake = FakeTransport(balancer)
        ev = SimulatedEv(EV, MqttSettings(), TOPICS, FleetStats(mode="loadtest", started_at=time.monotonic()),
                         _behaviour(release_at_once=True, max_attempts=2), transport=fake, rng=random.Random(1))
        await ev.start()
        balancer.lose_releases = True
        records = [await ev.charge(_request("r1"))]
        balancer.lose_releases = False
        assert ev.own.open(EV) == ["r1"]
        records.append(await ev.charge(_request("r2")))
        closed = [await ev.release_own()]
        records.append(await ev.charge(_request("r3")))
        closed.append(await ev.release_own())
        await ev.close()
        return records, closed, fake, balancer

    records, closed, fake, balancer = asyncio.run(scenario())
    assert records[0].outcome == "release_unanswered"
    assert records[1].events[-1].reason == "ev_busy"
    assert closed == [1, 0]
    assert records[2].statuses == ["assigned", "completed"]
    assert all(r.request_id is not None for r in fake.releases()), fake.releases()
    assert [r.request_id for r in fake.releases()] == ["r1", "r1", "r1", "r3"]  # 2 lost, r1 by release_own, r3
    assert balancer.open is None
