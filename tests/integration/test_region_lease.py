"""balancer/region_lease.py against a real nats-server (JetStream KV; no mock of NATS): create-if-absent, renewal
by compare-and-swap, expiry by the bucket's max age, epochs that only grow, the local deadline, release."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.cluster import connect_nats, open_buckets
from balancer.region_lease import RegionLease
from broker.nats_single import NatsServer

pytestmark = pytest.mark.integration

LEASE_S = 1.5


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


class Clock:
    """A monotonic clock the test can push forward (a process frozen by SIGSTOP sees its deadline pass)."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew


def test_one_holder_renewals_keep_it_expiry_hands_it_over_with_a_larger_epoch(nats: NatsServer) -> None:
    async def scenario() -> None:
        nc = await connect_nats(nats.url)
        try:
            leases, _ = await open_buckets(nc, LEASE_S, 1)
            a = RegionLease(leases, "north", LEASE_S, "a")
            b = RegionLease(leases, "north", LEASE_S, "b")
            other = RegionLease(leases, "south", LEASE_S, "b")
            assert await a.acquire() and a.held()
            assert not await b.acquire() and not b.held()
            assert await other.acquire()  # regions are independent
            first = a.epoch
            assert first is not None
            # Renewed every lease/3 for two whole leases: nobody else gets it, the epoch stays.
            for _ in range(6):
                await asyncio.sleep(LEASE_S / 3)
                assert await a.renew()
                assert not await b.acquire()
            assert a.epoch == first and a.revision > first
            # Not renewed: the key expires (bucket max age) and the standby takes it, with a larger epoch.
            started = time.monotonic()
            while not await b.acquire():
                await asyncio.sleep(0.05)
                assert time.monotonic() - started < LEASE_S + 3, "the key never expired"
            assert time.monotonic() - started >= LEASE_S - 0.6  # not before the lease ran out
            assert b.epoch is not None and b.epoch > a.revision
            assert not a.held()  # its local deadline passed too
            # The old holder's renewal is refused: lost at once, for good.
            assert not await a.renew()
            assert a.epoch is None and not a.held()
            # A clean release hands it over at once.
            taken = b.epoch
            await b.release()
            assert not b.held()
            assert await a.acquire()
            assert a.epoch is not None and a.epoch > taken
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_the_local_deadline_ends_the_lease_before_the_server_does(nats: NatsServer) -> None:
    """A holder frozen past its lease (clock pushed on) knows on waking that it holds nothing, before any call;
    and a renewal that reaches the server after the deadline is not trusted: it steps down."""

    async def scenario() -> None:
        nc = await connect_nats(nats.url)
        try:
            leases, _ = await open_buckets(nc, LEASE_S, 1)
            clock = Clock()
            a = RegionLease(leases, "default", LEASE_S, "a", monotonic=clock)
            assert await a.acquire() and a.held()
            clock.skew = LEASE_S + 0.01
            assert not a.held()
            assert not await a.renew()  # the key is still there and still ours, but too late
            assert a.epoch is None
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_a_server_that_does_not_answer_is_not_a_loss_until_the_deadline(nats: NatsServer) -> None:
    async def scenario() -> None:
        nc = await connect_nats(nats.url)
        try:
            leases, _ = await open_buckets(nc, 6.0, 1)
            a = RegionLease(leases, "default", 6.0, "a")
            assert await a.acquire()
            nats.kill()
            assert await a.renew()  # failed, but the lease holds until its deadline
            assert a.held() and a.epoch is not None
        finally:
            await nc.close()

    asyncio.run(scenario())
