"""The lease on a substation's sessions, both ends of it (pure: time passed in, plain data out).

Every command batch the balancer sends carries ``valid_until = now + lease_s``; a substation with sessions that
has heard nothing for ``lease_s / 3`` gets an empty batch that only renews the lease. An agent whose lease has run
out (the balancer died, or the link did) pauses its sessions at 0 kW until the next batch: a dead balancer never
leaves the grid committed to power nobody watches.

* :class:`LeaseIssuer` is the balancer's end: commands in, :class:`SessionCommands` batches out, and which
  substations are due for a renewal. The MQTT adapter (``balancer.service``) and the fast replay use it.
* :class:`LeaseHolder` is the agent's end: what a batch does to the lease, and when the lease has lapsed. The
  MQTT agent (``substation_agents.agent``) and the fast replay use it.

Times are the balancer's clock (epoch seconds on the wire), whatever clock the agent simulates.

Fencing (cluster mode, issue 12): the balancer that owns a region holds a lease on it in NATS KV, and the revision
that acquired it is its ``epoch``; the issuer stamps every batch with it. The holder keeps the highest epoch it has
seen and refuses a batch of a lower one (or one without an epoch once it has seen one) with no effect at all: no
command applied, the lease not renewed. A balancer that was stopped past its region lease and wakes up (SIGCONT)
cannot command an agent that has already heard from its successor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from grid_protocol.messages import MAX_COMMANDS_PER_MESSAGE, SessionCommand, SessionCommands

__all__ = ["RENEW_FRACTION", "LeaseHolder", "LeaseIssuer"]

#: A lease is renewed when this fraction of it has passed without a batch: two renewals may be lost before it lapses.
RENEW_FRACTION = 1.0 / 3.0


class LeaseIssuer:
    """The balancer's end: turns commands into batches that carry the lease, and says when a renewal is due."""

    __slots__ = ("_sent", "epoch", "lease_s")

    def __init__(self, lease_s: float, epoch: int | None = None) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s!r}")
        self.lease_s = lease_s
        #: the region lease's epoch stamped on every batch (None: single-node mode, no fencing)
        self.epoch = epoch
        self._sent: dict[str, float] = {}  # substation -> when its lease was last renewed

    def batches(self, substation_id: str, commands: Sequence[SessionCommand], now: float) -> list[SessionCommands]:
        """``commands`` for one substation as batches of at most ``MAX_COMMANDS_PER_MESSAGE``, in order, each
        valid until ``now + lease_s``; sending them renews the lease."""
        valid_until = now + self.lease_s
        out = [SessionCommands(ts=now, commands=list(commands[i:i + MAX_COMMANDS_PER_MESSAGE]),
                               valid_until=valid_until, epoch=self.epoch)
               for i in range(0, len(commands), MAX_COMMANDS_PER_MESSAGE)]
        if out:
            self._sent[substation_id] = now
        return out

    def renewals(self, with_sessions: Iterable[str], now: float) -> list[tuple[str, SessionCommands]]:
        """An empty batch for each of ``with_sessions`` (substations that have sessions) whose lease was not
        renewed for ``lease_s * RENEW_FRACTION``; the renewal counts as sent."""
        every = self.lease_s * RENEW_FRACTION
        due = [sid for sid in with_sessions if now - self._sent.get(sid, float("-inf")) >= every]
        for sid in due:
            self._sent[sid] = now
        return [(sid, SessionCommands(ts=now, commands=[], valid_until=now + self.lease_s, epoch=self.epoch))
                for sid in due]

    def forget(self, substation_id: str) -> None:
        """A decommissioned substation: nothing of it is kept."""
        self._sent.pop(substation_id, None)


@dataclass(slots=True)
class LeaseHolder:
    """The agent's end: the lease its sessions run under, and whether they are paused for want of one.

    ``until`` is None before the first batch with a lease (a bare command from hand testing carries none) and after
    the agent went offline (it starts clean when it comes back).
    """

    until: float | None = None
    #: The lease lapsed: every session draws 0 kW (and charges nothing) until a batch renews it.
    paused: bool = False
    #: The highest balancer epoch seen (kept across reconnects: fencing must outlive a broken link).
    epoch: int | None = None
    #: Batches refused for an older (or missing) epoch.
    fenced: int = 0

    def admits(self, batch: SessionCommands) -> bool:
        """Whether ``batch`` may act: its epoch is not older than the highest seen (which it then raises). False
        for a batch of an older epoch, or without an epoch once one was seen: the caller applies nothing of it
        and does not renew the lease (counted in :attr:`fenced`)."""
        if batch.epoch is None:
            ok = self.epoch is None
        else:
            ok = self.epoch is None or batch.epoch >= self.epoch
            if ok:
                self.epoch = batch.epoch
        if not ok:
            self.fenced += 1
        return ok

    def on_batch(self, batch: SessionCommands) -> bool:
        """A batch arrived (and :meth:`admits` it): its ``valid_until`` (when it has one) is the new lease, and
        paused sessions resume. True when it resumed them."""
        if batch.valid_until is None:
            return False
        self.until = batch.valid_until
        resumed, self.paused = self.paused, False
        return resumed

    def must_pause(self, now: float, *, has_sessions: bool) -> bool:
        """The lease ran out (it is valid up to and including ``until``) while sessions draw power: the caller
        accounts their energy up to now, then calls :meth:`pause`."""
        return has_sessions and not self.paused and self.until is not None and now > self.until

    def pause(self) -> None:
        self.paused = True

    def drop(self) -> None:
        """The agent went offline: it starts clean when it comes back (no lease until the next batch). The epoch
        is kept."""
        self.until = None
