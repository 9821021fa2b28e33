"""The balancer's model of the grid: substations, sessions and waiting requests.

Power is held in integer watts so that sums and the capacity check are exact: float kW from the
wire are converted once (loads rounded up, capacities rounded down, i.e. always the safe way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgspec


def kw_to_w_up(kw: float) -> int:
    """A load in kW as watts, rounded up (never under-count a load)."""
    return math.ceil(kw * 1000 - 1e-9)


def kw_to_w_down(kw: float) -> int:
    """A capacity or grant in kW as watts, rounded down (never over-state headroom)."""
    return math.floor(kw * 1000 + 1e-9)


#: Sessions ``Substation.sessions_changed`` names before it says "any" (a rebuilt list then looks at each).
SESSIONS_CHANGED_MAX = 16


def w_to_kw(w: int) -> float:
    return w / 1000


class PendingRequest(msgspec.Struct, gc=False):
    """A request the balancer has accepted: waiting in the queue, or backing a session.

    ``gc=False`` (also on :class:`Session`): the balancer holds one of each per EV and they never form
    reference cycles, so the cyclic GC need not scan them. Tracked, 40k EVs made a full collection
    take ~57 ms, the p99 latency tail measured in bench/.
    """

    ev_id: str
    request_id: str
    requested_w: int
    min_w: int
    priority: int
    arrival: int  # monotonically increasing arrival number: queue order within a priority
    received_at: float
    duration_minutes: float | None
    energy_kwh: float | None
    departure: float | None = None  # epoch seconds, for the deadline policy

    @property
    def queue_key(self) -> tuple[int, int]:
        return (-self.priority, self.arrival)


class Session(msgspec.Struct, gc=False):
    session_id: str
    substation_id: str
    request: PendingRequest
    granted_w: int
    started_at: float
    confirmed: bool = False  # the agent reported it started
    #: when the agent says it started it (its clock, the ``started`` event's ts): an inventory the agent took
    #: before that cannot list it, however late the inventory arrives (a clustered broker keeps no order between
    #: a retained status and later events)
    confirmed_ts: float | None = None
    last_change_at: float = 0.0  # when granted_w last changed (hold time against flapping)
    changes: int = 0  # grant changes after the start
    delivered_wh: float = 0.0  # estimated from grants over time, up to accounted_at
    accounted_at: float = 0.0

    def account(self, now: float) -> None:
        """Bring the delivered-energy estimate up to ``now`` at the current grant."""
        if now > self.accounted_at:
            self.delivered_wh += self.granted_w * (now - self.accounted_at) / 3600
            self.accounted_at = now

    def remaining_wh(self) -> float | None:
        energy = self.request.energy_kwh
        return None if energy is None else max(0.0, energy * 1000 - self.delivered_wh)

    def expected_end(self) -> float | None:
        """When the session should end at its current grant (energy or duration, whichever is first)."""
        minutes = self.request.duration_minutes
        end = None if minutes is None else self.started_at + minutes * 60
        if self.granted_w > 0 and (remaining := self.remaining_wh()) is not None:
            by_energy = self.accounted_at + remaining / self.granted_w * 3600
            if end is None or by_energy < end:
                end = by_energy
        return end



@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """What an operator set on one substation (balancer/control) that must outlive the balancer process: kept in
    the operator settings store (balancer/operator_store.py) and restored before the grid is acted on."""

    draining: bool = False
    capacity_limit_w: int | None = None

    @property
    def is_default(self) -> bool:
        return not self.draining and self.capacity_limit_w is None

@dataclass(slots=True)
class Substation:
    """What the balancer knows about one substation.

    ``granted_w`` is the sum of its sessions' grants, kept incrementally. The balancer's own
    commitment is ``base_load_w + granted_w``: grants count in full from the moment they are made,
    whether or not telemetry shows them yet, so a burst cannot herd onto stale numbers.
    """

    id: str
    capacity_w: int = 0  # what the balancer plans with: reported, lowered by the operator's limit
    reported_capacity_w: int = 0  # as the agent last reported it
    capacity_limit_w: int | None = None  # operator's limit (balancer/control set_capacity)
    #: the limit schedule's lowest limit from now to the lead time ahead, and its source (balancer/core/limits.py)
    schedule_limit_w: int | None = None
    schedule_source: str | None = None
    draining: bool = False  # operator: no new sessions here; running ones finish
    base_load_w: int = 0
    load_w: int = 0  # measured total, as last reported
    ev_load_w: int = 0
    reported_sessions: int = 0
    granted_w: int = 0
    requested_w: int = 0  # sum of its sessions' requests (kept incrementally, like granted_w)
    floors_w: int = 0  # sum of its sessions' minimums
    status: str | None = None  # "online" / "offline" from the retained status, None if never seen
    region: str = "default"  # as the agent's latest status says
    last_telemetry_at: float | None = None  # balancer clock
    last_seq: int = -1
    lost: bool = False  # silent past lost_after_s: its sessions were revoked
    known_since: float = 0.0  # balancer clock: when it was first heard of
    rebalanced_at: float = float("-inf")
    #: granted_w when the last telemetry arrived: its measured load contains at most these grants, so
    #: load_w - granted_at_telemetry_w is load we do not control (grants made since are not in it yet).
    granted_at_telemetry_w: int = 0
    overload_s: float = 0.0  # time measured load was above the reported capacity (between telemetry samples)
    stale: bool = False  # telemetry went stale and has not come back (for counting transitions)
    stale_transitions: int = 0
    #: balancer clock: when its status turned offline; its sessions are kept (and counted) for the offline grace,
    #: so a reconnect within the lease (a broker restart, a network blip) ends nothing
    offline_since: float | None = None
    #: sessions the agent re-announced (``running``) since its last inventory closed (a status with announced_for)
    announced: set[str] = field(default_factory=set)
    #: bumped when a session comes, goes or changes grant: the policy's shares may have moved
    shares_version: int = 0
    #: base-load noise: the range (highest - lowest) of the uncontrolled load within one window (the hold time),
    #: held and decaying over time (None: no whole window measured yet); sizes the band kept free below the limit
    noise_w: float | None = None
    noise_at: float = 0.0
    noise_window: tuple[float, int, int] | None = None  # the current window: (start, lowest W, highest W)
    #: the retained state's session list as of ``shares_version`` (balancer.core.views): a session's view moves
    #: only when a session comes, goes or changes grant, where the state itself moves with every telemetry; and
    #: each listed session's view and what it was built from, by session id
    session_views: tuple[int, list[object], dict[str, object], dict[str, object]] | None = field(
        default=None, repr=False, compare=False)
    #: the sessions whose view may have moved since ``session_views`` last listed them (SessionBook: started, ended,
    #: grant changed), at most ``SESSIONS_CHANGED_MAX`` ids; None: any of them (more, or not known)
    sessions_changed: set[str] | None = field(default=None, repr=False, compare=False)

    def session_changed(self, session_id: str) -> None:
        """``session_id`` started, ended or changed grant: its view in the retained state must be built again."""
        changed = self.sessions_changed
        if changed is not None:
            if len(changed) < SESSIONS_CHANGED_MAX:
                changed.add(session_id)
            else:
                self.sessions_changed = None

    def apply_capacity(self) -> None:
        """Plan with the reported capacity, or the operator's limit or the scheduled one when lower."""
        scheduled = self.schedule_limit_w
        self.capacity_w = self.rated_w() if scheduled is None else min(self.rated_w(), scheduled)

    def rated_w(self) -> int:
        """The capacity without the limit schedule: reported, or the operator's limit when lower."""
        limit = self.capacity_limit_w
        return self.reported_capacity_w if limit is None else min(self.reported_capacity_w, limit)

    def limit_source(self) -> str:
        """What sets ``capacity_w``: ``capacity`` (reported), ``operator`` or the binding schedule's source."""
        if self.schedule_limit_w is not None and self.schedule_source is not None \
                and self.schedule_limit_w < self.rated_w():
            return self.schedule_source
        limit = self.capacity_limit_w
        return "operator" if limit is not None and limit < self.reported_capacity_w else "capacity"

    def reserved_w(self) -> int:
        """Grants made since the last telemetry: committed, but not visible in the measured load yet."""
        return max(0, self.granted_w - self.granted_at_telemetry_w)

    def uncontrolled_w(self) -> int:
        """Non-EV load, or more when the measurement shows load we did not grant (never less)."""
        return max(self.base_load_w, self.load_w - self.granted_at_telemetry_w)
    sessions: dict[str, Session] = field(default_factory=dict)

    def observe_noise(self, now: float, window_s: float, decay_s: float) -> None:
        """Take a telemetry sample's uncontrolled load into the noise estimate: how far it ranged within a window
        of ``window_s`` (whatever the telemetry interval), as a peak-hold that decays with ``decay_s``, so one
        jump widens the band for minutes, not for ever."""
        x = self.uncontrolled_w()
        window = self.noise_window
        if window is None or now < window[0]:
            self.noise_window = (now, x, x)
            return
        start, lo, hi = window[0], min(window[1], x), max(window[2], x)
        if now - start < window_s:
            self.noise_window = (start, lo, hi)
            return
        held = 0.0 if self.noise_w is None else self.noise_w * math.exp(-max(0.0, now - self.noise_at) / decay_s)
        self.noise_w = max(float(hi - lo), held)
        self.noise_at = now
        self.noise_window = (now, x, x)  # the next window starts at this sample

    def limit_w(self, margin_pct: float) -> int:
        return math.floor(self.capacity_w * (1 - margin_pct / 100))

    @staticmethod
    def limit_for(capacity_w: int, margin_pct: float) -> int:
        """``limit_w`` of a substation of this capacity."""
        return math.floor(capacity_w * (1 - margin_pct / 100))

    def committed_w(self) -> int:
        return self.base_load_w + self.granted_w

    def used_w(self) -> int:
        """What the substation carries as far as we can tell: its uncontrolled load (base load, or more when
        the measurement shows load we did not grant, say sessions from before a balancer restart) plus
        every grant, whether telemetry shows it yet or not."""
        return self.uncontrolled_w() + self.granted_w

    def is_fresh(self, now: float, stale_after_s: float) -> bool:
        return self.last_telemetry_at is not None and now - self.last_telemetry_at <= stale_after_s

    def is_available(self, now: float, stale_after_s: float) -> bool:
        """May receive new sessions: not offline, not lost, not draining, telemetry fresh."""
        return (self.status != "offline" and not self.lost and not self.draining
                and self.is_fresh(now, stale_after_s))

    def headroom_w(self, now: float, margin_pct: float, stale_after_s: float) -> int:
        if not self.is_available(now, stale_after_s):
            return 0
        return max(0, self.limit_w(margin_pct) - self.used_w())

    def noise_band_w(self) -> int:
        """The measured base-load noise (``noise_w``, rounded up), 0 until a whole window has been measured: the
        power that noise alone may take back. The rebalancer keeps at least a hysteresis step free until then
        (``Rebalancer.band_w``); placement leaves free what was measured."""
        return 0 if self.noise_w is None else math.ceil(self.noise_w)

    def placeable_w(self, now: float, margin_pct: float, stale_after_s: float) -> int:
        """Headroom beyond the measured noise band: what a new session may be granted here. A grant into the band
        is shed by the next upward wobble of the base load (issue 10: at 1,000 substations with a long queue,
        ~500 placements a second went into the band and were shed again a second later)."""
        return max(0, self.headroom_w(now, margin_pct, stale_after_s) - self.noise_band_w())
