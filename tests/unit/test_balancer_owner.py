"""A region service in cluster mode (balancer/cluster.py builds it on takeover): every command carries the lease's
epoch, and once the lease is gone (``is_owner`` false: the local deadline passed) it acts on nothing and publishes
nothing, not even an offline status, and stops. Over an in-memory transport; the lease itself is tested against a
real nats-server (tests/integration/test_region_lease.py)."""

from __future__ import annotations

import asyncio
import json

from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from tests.unit.test_balancer_edge import P, request, telemetry
from tests.unit.test_substation_agent_unit import FakeTransport


def owner(epoch: int = 7) -> tuple[BalancerService, FakeTransport, list[bool]]:
    held = [True]
    transport = FakeTransport()
    svc = BalancerService(BalancerSettings(startup_wait_s=0, tick_interval_s=0.01, state_file=""), transport,
                          epoch=epoch, is_owner=lambda: held[0])
    transport.connect()
    return svc, transport, held


def test_commands_carry_the_epoch_and_stop_when_the_lease_is_gone() -> None:
    svc, transport, held = owner()
    telemetry(transport)
    request(transport, "EV_1", "r1")
    svc._flush_commands()
    batches = [json.loads(p.payload) for p in transport.on(f"{P}/substation/A/command")]
    assert [b["epoch"] for b in batches] == [7]
    assert json.loads(transport.on(f"{P}/ev/EV_1/assignment")[0].payload)["status"] == "assigned"

    held[0] = False  # the deadline passed (say, the process was frozen past its lease)
    before = len(transport.sent)
    request(transport, "EV_2", "r2")
    transport.deliver(f"{P}/ev/EV_1/release", b"{}")
    svc._flush_commands()
    svc._renew_leases()
    assert transport.sent[before:] == []
    assert svc.stepped_down and svc.counters["not_owner:input"] == 2


def test_a_service_that_lost_its_lease_stops_without_a_word() -> None:
    svc, transport, held = owner()
    telemetry(transport)
    request(transport, "EV_1", "r1")

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(svc.run(stop))
        await asyncio.sleep(0.05)
        held[0] = False
        await asyncio.wait_for(running, 2.0)  # it stops by itself
        assert not stop.is_set()

    before = len(transport.sent)
    asyncio.run(scenario())
    assert transport.closed
    offline = [p for p in transport.sent[before:] if p.topic == f"{P}/balancer/status" and b"offline" in p.payload]
    assert offline == []
    assert not [p for p in transport.sent[before:] if p.topic.endswith("/command")]
