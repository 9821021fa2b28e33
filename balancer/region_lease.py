"""One region's lease in NATS JetStream key-value: who owns the region, and its epoch (issue 12, fenced failover).

Exactly one balancer acts for a region. The owner holds key ``region.<R>`` in bucket ``grid_leases`` (history 1,
``max_age`` = the lease time, so a key nobody renews disappears):

* acquire with ``create`` (only if the key is absent); the revision it returns is the **epoch**, stamped on every
  command batch (``SessionCommands.epoch``); a later acquisition always has a larger revision;
* renew with ``update(last=revision)`` (compare-and-swap) every ``lease_s / 3``; renewals keep the epoch;
* a renewal refused (somebody else's revision is there) means the lease is lost at once; a renewal that fails
  for want of a server is retried, but the lease counts as held only until the **local monotonic deadline**
  (``lease_s`` after the start of the last successful write, so never later than the server expires the key).

Whoever holds the lease checks :meth:`RegionLease.held` before acting on input or publishing a command: a process
that was stopped (SIGSTOP) past its deadline knows it on waking, before it reads anything. Standbys call
:meth:`acquire` every poll interval: a key that expired (no delete marker is written) or was released (deleted by
an owner that stopped cleanly) is taken by the first of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from grid_runtime.logs import get_logger

__all__ = ["LEASE_BUCKET", "RegionLease", "lease_key"]

log = get_logger("balancer.lease")

#: The NATS KV bucket of the region leases (``max_age`` = the lease time).
LEASE_BUCKET = "grid_leases"


def lease_key(region: str) -> str:
    return f"region.{region}"


class RegionLease:
    """The lease on one region, seen from one process (``holder``: who it is, stored as the key's value)."""

    def __init__(self, kv: Any, region: str, lease_s: float, holder: str, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv
        self.region = region
        self.key = lease_key(region)
        self.lease_s = lease_s
        self.holder = holder.encode()
        self._monotonic = monotonic
        #: the revision of the create that acquired the lease (None: not held)
        self.epoch: int | None = None
        #: the revision last written (create or renewal): the next renewal's compare-and-swap
        self.revision = 0
        #: monotonic time after which the lease is not held any more without a successful renewal
        self.deadline = float("-inf")

    def held(self) -> bool:
        """Held, as far as this process can know without asking: acquired, not lost, deadline not passed."""
        return self.epoch is not None and self._monotonic() < self.deadline

    def remaining(self) -> float:
        """Seconds until the local deadline (negative: passed)."""
        return self.deadline - self._monotonic()

    def _timeout(self) -> float:
        return max(0.2, self.lease_s / 3)

    async def acquire(self) -> bool:
        """Try to take the region (only if nobody holds it). True when this process holds it now."""
        import nats.errors
        import nats.js.errors

        started = self._monotonic()
        try:
            async with asyncio.timeout(self._timeout()):
                revision = await self.kv.create(self.key, self.holder)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # somebody holds it
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.warning("region_lease_acquire_failed", region=self.region, error=repr(exc))
            return False
        self.epoch = self.revision = int(revision)
        self.deadline = started + self.lease_s
        log.info("region_lease_acquired", region=self.region, epoch=self.epoch, lease_s=self.lease_s)
        return True

    async def renew(self) -> bool:
        """Renew by compare-and-swap. False when the lease is lost for good (refused: another revision is
        there). A server that does not answer is not a loss by itself: the deadline decides (:meth:`held`)."""
        import nats.errors
        import nats.js.errors

        if self.epoch is None:
            return False
        started = self._monotonic()
        try:
            async with asyncio.timeout(self._timeout()):
                revision = await self.kv.update(self.key, self.holder, last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            if await self._own_write_landed():
                return True
            log.error("region_lease_lost", region=self.region, epoch=self.epoch, reason="taken")
            self.lose()
            return False
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.warning("region_lease_renewal_failed", region=self.region, epoch=self.epoch, error=repr(exc),
                        held_for_s=round(self.deadline - self._monotonic(), 3))
            return self.held()
        if self.held():
            self.revision = int(revision)
            self.deadline = started + self.lease_s
            return True
        # Renewed only after the deadline had passed: the region may have been taken meanwhile, and this process
        # already stopped acting. Stepping down is the safe answer (a standby, or this process, takes it again).
        log.error("region_lease_lost", region=self.region, epoch=self.epoch, reason="deadline_passed")
        self.lose()
        return False

    async def _own_write_landed(self) -> bool:
        """A renewal that timed out here may still have been written: if the key holds our value at a later
        revision than we know, that revision is ours (nobody else writes our holder id)."""
        import nats.errors
        import nats.js.errors

        try:
            async with asyncio.timeout(self._timeout()):
                entry = await self.kv.get(self.key)
        except (TimeoutError, nats.errors.Error, nats.js.errors.KeyNotFoundError, OSError):
            return False
        if entry.value == self.holder and (entry.revision or 0) > self.revision and self.held():
            self.revision = int(entry.revision or 0)
            return True
        return False

    def lose(self) -> None:
        self.epoch = None
        self.deadline = float("-inf")

    async def release(self) -> None:
        """A clean stop: delete the key (only if it is still ours) so a standby takes over at once."""
        import nats.errors
        import nats.js.errors

        if self.epoch is None:
            return
        try:
            async with asyncio.timeout(self._timeout()):
                await self.kv.delete(self.key, last=self.revision)
            log.info("region_lease_released", region=self.region, epoch=self.epoch)
        except (TimeoutError, nats.errors.Error, nats.js.errors.KeyWrongLastSequenceError, OSError) as exc:
            log.warning("region_lease_release_failed", region=self.region, error=repr(exc))
        self.lose()
