"""Balancing-quality metrics of one replay run (pure: plain records in, numbers out).

Inputs are what a run observed, not what the balancer believed: the substations' *actual* load
(base + EV draw) and capacity sampled every ``step_s`` (sample ``i`` holds for ``[i·step, (i+1)·step)``),
and per EV its arrival, departure, the answers it received and the energy it really got.

Definitions (every one tested with hand-computed cases in ``tests/unit/test_replay_metrics.py``):

* **overload-seconds**: Σ over online substations of the time their load exceeds their capacity;
  **peak overload**: the largest ``load - capacity`` (kW, 0 if never over).
* **utilisation spread**: at each sample, max - min of ``load / capacity`` over the online substations
  (0 with one online); its time-weighted mean (and max) over samples with at least one online.
* **Jain's fairness index** over accepted (not rejected) EVs: ``J = (Σx)² / (n·Σx²)`` with
  ``x_i = min(1, delivered_kwh_i / (requested_kw_i · T_i))``, the EV's average delivered power as a
  share of what it asked for, over ``T_i`` = from its request until it left or got its energy,
  whichever came first. 1 = everyone got the same share; 1/n = one EV got everything. EVs that
  waited and left empty-handed count with x = 0 (leaving them out would hide the worst unfairness).
* **energy not delivered**: Σ ``max(0, energy_kwh - delivered)`` over all EVs (a rejected EV's whole
  request counts), and its share of the total energy asked for.
* **queue wait**: request → first ``assigned`` answer, for every EV that got power (0 when assigned
  at once); also over the EVs that were queued first only. Percentiles are nearest-rank.
* **power changes** (flapping): per EV that got power, how often its granted power changed after the
  first assignment: each ``updated`` to another value, each ``revoked`` (to 0) and each re-assignment.
* **rejected**: EVs whose request was answered ``rejected``, by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from grid_protocol.messages import CHARGING_STATUSES
from grid_runtime.percentiles import percentile

__all__ = [
    "Answer",
    "EvRecord",
    "Metrics",
    "SubstationTrace",
    "Trace",
    "compute_metrics",
    "fair_shares",
    "jain_index",
    "overload",
    "power_changes",
    "queue_waits",
    "utilisation_spread",
]

_EPS = 1e-9


class Answer(NamedTuple):
    """One ``Assignment`` an EV received, at ``t`` (seconds from the start)."""

    t: float
    status: str
    granted_kw: float | None = None
    reason: str | None = None


@dataclass(slots=True)
class EvRecord:
    """What happened to one EV. ``finished_at``: when its energy target was reached (None if never)."""

    ev_id: str
    requested_at: float
    departure: float
    requested_kw: float
    energy_kwh: float
    priority: int = 0
    answers: list[Answer] = field(default_factory=list)
    delivered_kwh: float = 0.0
    finished_at: float | None = None

    @property
    def rejected_reason(self) -> str | None:
        """The reason when the request itself was refused (its first answer is ``rejected``)."""
        if self.answers and self.answers[0].status == "rejected":
            return self.answers[0].reason or "unknown"
        return None

    @property
    def first_assigned_at(self) -> float | None:
        return next((a.t for a in self.answers if a.status == "assigned"), None)

    @property
    def queued_first(self) -> bool:
        return bool(self.answers) and self.answers[0].status == "queued"


@dataclass(frozen=True, slots=True)
class SubstationTrace:
    """Samples of one substation. ``base_kw`` (non-EV load) is for plots and checks; metrics use ``load_kw``."""

    substation_id: str
    load_kw: Sequence[float]
    capacity_kw: Sequence[float]
    online: Sequence[bool]
    base_kw: Sequence[float] = ()


@dataclass(frozen=True, slots=True)
class Trace:
    step_s: float
    substations: Sequence[SubstationTrace]

    @property
    def samples(self) -> int:
        return min((len(s.load_kw) for s in self.substations), default=0)


@dataclass(frozen=True, slots=True)
class Metrics:
    evs: int
    served: int
    never_served: int
    rejected: int
    rejected_by_reason: dict[str, int]
    overload_s: float
    peak_overload_kw: float
    peak_utilisation: float
    spread_mean: float
    spread_max: float
    jain: float | None
    energy_demand_kwh: float
    energy_not_delivered_kwh: float
    energy_not_delivered_share: float | None
    wait_p50_s: float | None
    wait_p95_s: float | None
    wait_queued_p50_s: float | None
    wait_queued_p95_s: float | None
    changes_mean: float | None
    changes_max: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def overload(trace: Trace) -> tuple[float, float, float]:
    """(overload-seconds, peak overload kW, peak utilisation) over online samples."""
    seconds = 0.0
    peak = 0.0
    peak_util = 0.0
    for sub in trace.substations:
        for load, cap, online in zip(sub.load_kw, sub.capacity_kw, sub.online, strict=True):
            if not online:
                continue
            over = load - cap
            if over > _EPS:
                seconds += trace.step_s
                peak = max(peak, over)
            peak_util = max(peak_util, load / cap)
    return seconds, peak, peak_util


def utilisation_spread(trace: Trace) -> tuple[float, float]:
    """(time-weighted mean, max) of max - min utilisation across online substations."""
    total = 0.0
    counted = 0
    worst = 0.0
    subs = trace.substations
    for i in range(trace.samples):
        utils = [s.load_kw[i] / s.capacity_kw[i] for s in subs if s.online[i]]
        if not utils:
            continue
        spread = max(utils) - min(utils)
        total += spread
        counted += 1
        worst = max(worst, spread)
    return (total / counted if counted else 0.0), worst


def jain_index(xs: Sequence[float]) -> float | None:
    """``(Σx)² / (n·Σx²)``; None for no values or all zero (undefined)."""
    square_sum = sum(x * x for x in xs)
    if not xs or square_sum <= 0:
        return None
    return sum(xs) ** 2 / (len(xs) * square_sum)


def fair_shares(evs: Iterable[EvRecord]) -> list[float]:
    """``x_i`` of Jain's index (see the module docstring) for every accepted EV with a positive window."""
    xs = []
    for ev in evs:
        if ev.rejected_reason is not None:
            continue
        end = ev.departure if ev.finished_at is None else min(ev.departure, ev.finished_at)
        hours = (end - ev.requested_at) / 3600.0
        if hours <= 0:
            continue
        xs.append(min(1.0, ev.delivered_kwh / (ev.requested_kw * hours)))
    return xs


def queue_waits(evs: Iterable[EvRecord]) -> tuple[list[float], list[float]]:
    """(waits of every EV that got power, waits of those that were queued first)."""
    every: list[float] = []
    queued: list[float] = []
    for ev in evs:
        first = ev.first_assigned_at
        if first is None:
            continue
        wait = max(0.0, first - ev.requested_at)
        every.append(wait)
        if ev.queued_first:
            queued.append(wait)
    return every, queued


def power_changes(ev: EvRecord) -> int | None:
    """How often the EV's granted power changed after its first assignment (None: never assigned)."""
    level: float | None = None
    changes = 0
    for answer in ev.answers:
        if answer.status in ("completed", "cancelled"):
            break
        if answer.status == "revoked":
            new = 0.0
        elif answer.status in CHARGING_STATUSES and answer.granted_kw is not None:
            new = answer.granted_kw
        else:
            continue
        if level is not None and abs(new - level) > _EPS:
            changes += 1
        level = new
    return None if level is None else changes


def compute_metrics(trace: Trace, evs: Sequence[EvRecord]) -> Metrics:
    seconds, peak, peak_util = overload(trace)
    spread_mean, spread_max = utilisation_spread(trace)
    reasons = Counter(r for r in (ev.rejected_reason for ev in evs) if r is not None)
    served = sum(1 for ev in evs if ev.first_assigned_at is not None)
    rejected = sum(reasons.values())
    demand = sum(ev.energy_kwh for ev in evs)
    missing = sum(ev.energy_kwh if ev.rejected_reason is not None else max(0.0, ev.energy_kwh - ev.delivered_kwh)
                  for ev in evs)
    every, queued = queue_waits(evs)
    changes = [c for c in (power_changes(ev) for ev in evs) if c is not None]
    return Metrics(
        evs=len(evs), served=served, never_served=len(evs) - served - rejected, rejected=rejected,
        rejected_by_reason=dict(sorted(reasons.items())),
        overload_s=seconds, peak_overload_kw=peak, peak_utilisation=peak_util,
        spread_mean=spread_mean, spread_max=spread_max,
        jain=jain_index(fair_shares(evs)),
        energy_demand_kwh=demand, energy_not_delivered_kwh=missing,
        energy_not_delivered_share=missing / demand if demand > 0 else None,
        wait_p50_s=percentile(every, 50), wait_p95_s=percentile(every, 95),
        wait_queued_p50_s=percentile(queued, 50), wait_queued_p95_s=percentile(queued, 95),
        changes_mean=sum(changes) / len(changes) if changes else None,
        changes_max=max(changes, default=0),
    )
