"""Learn the grid before acting: what a (re)started balancer does with input that arrives before it knows the grid.

A balancer that restarts keeps nothing in memory. The broker hands it, at once, the requests and releases that EVs
sent while it was down (its persistent session), the retained statuses, and then the agents' re-announcements of
the sessions they run. Acting on a release before its session is re-announced answers ``nothing_to_release`` and
leaves the EV charging; acting on a re-sent request queues it as new and gives the EV a second session
(issue 9, D2/D3). So input that acts on the grid (EV requests and releases, operator control) is held, in arrival
order and bounded, until the grid is known:

1. every retained message has arrived: the broker delivers the retained messages of a subscription before any
   later publish to this client, so the echo of the balancer's own ``online`` status closes that snapshot;
2. every substation whose retained status was ``online`` has closed its inventory for this balancer instance
   (an ``online`` status with ``announced_for`` = this instance, after its ``running`` events);

or ``max_wait_s`` has passed (a substation that never answers must not stop the grid). Pure: time is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

M = TypeVar("M")


@dataclass(slots=True)
class StartupGate(Generic[M]):
    """Holds messages until :meth:`ready`; then :meth:`release` yields them in arrival order, once."""

    started_at: float
    max_wait_s: float
    buffer_max: int
    held: deque[M] = field(default_factory=deque)
    is_open: bool = False
    snapshot_complete: bool = False
    #: substations whose retained status said online when the snapshot arrived: the ones to wait for
    expected: set[str] = field(default_factory=set)
    inventoried: set[str] = field(default_factory=set)
    opened_at: float | None = None
    timed_out: bool = False

    def hold(self, message: M) -> bool:
        """Keep ``message`` for later. False when the buffer is full: the caller refuses it (asks for a retry)."""
        if len(self.held) >= self.buffer_max:
            return False
        self.held.append(message)
        return True

    def substation_status(self, substation_id: str, online: bool, inventory: bool) -> None:
        """A substation's status; ``inventory``: it closed its re-announcement to this balancer instance."""
        if inventory:
            self.inventoried.add(substation_id)
        if not self.snapshot_complete and online:
            self.expected.add(substation_id)
        elif not online:
            self.expected.discard(substation_id)  # gone (its will): nothing will come from it

    def own_status_seen(self) -> None:
        """The echo of our own ``online`` status: every retained message was delivered before it."""
        self.snapshot_complete = True

    def missing(self) -> set[str]:
        return self.expected - self.inventoried

    def ready(self, now: float) -> bool:
        if self.is_open:
            return True
        if self.snapshot_complete and not self.missing():
            return True
        if now - self.started_at >= self.max_wait_s:
            self.timed_out = True
            return True
        return False

    def release(self, now: float) -> Iterator[M]:
        """Open the gate (idempotent) and hand over what was held, oldest first."""
        if not self.is_open:
            self.is_open = True
            self.opened_at = now
        while self.held:
            yield self.held.popleft()
