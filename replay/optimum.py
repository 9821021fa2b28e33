"""The offline optimum: the most energy any scheduler could deliver to a set of sessions under a site limit.

A linear program, solved by HiGHS (``scipy.optimize.linprog(method="highs")``), knowing every session in
advance (hence *offline*: an upper bound for any real-time policy)::

    maximise    sum over i, k of x[i, k]                  (kWh delivered to session i in interval k)
    subject to  sum over k of x[i, k] <= energy_i          (nobody gets more than it asked for)
                sum over i of x[i, k] <= limit * dt_k      (the site limit, in every interval)
                0 <= x[i, k] <= max_kw_i * dt_k            (the EV's rate; x only while it is plugged in)

``limit`` may vary in time (a DSO's evening cut, a base load that moves): given as steps ``(from_h, kW)``, the
steps' times join the arrivals and departures as interval bounds.

The intervals are those between consecutive distinct arrival and departure times (and limit steps). Inside one
the set of plugged-in EVs and the limit are constant, so any schedule in continuous time can be averaged over each
interval without breaking a constraint: this LP *is* the continuous-time optimum, not an approximation of
it on a time grid (on the ACN data, whose times lie on a 5-minute grid, it equals the 5-minute LP).
Constraints are sparse (two non-zeros per variable): a month of 954 sessions is ~20,000 variables and
solves in about 0.2 s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Optimum", "OptimumError", "optimal_delivery"]


class OptimumError(RuntimeError):
    """The solver did not reach an optimum (time limit, numerical trouble); the message says what HiGHS said."""


@dataclass(frozen=True, slots=True)
class Optimum:
    """The LP's answer. ``delivered_kwh[i]``: what session ``i`` gets in the optimal schedule."""

    limit_kw: float  # the lowest limit (the only one, unless ``limit_steps``)
    requested_kwh: float
    delivered_kwh_total: float
    delivered_kwh: NDArray[np.float64]
    variables: int
    constraints: int
    intervals: int
    cpu_s: float
    #: a time-varying limit: ``(from_h, kW)`` steps, the first one also before its time
    limit_steps: tuple[tuple[float, float], ...] | None = None

    @property
    def delivered_share(self) -> float:
        """Delivered / requested (0 when nothing was requested)."""
        return self.delivered_kwh_total / self.requested_kwh if self.requested_kwh > 0 else 0.0


def optimal_delivery(arrival_h: Sequence[float], departure_h: Sequence[float], energy_kwh: Sequence[float],
                     max_kw: Sequence[float], limit_kw: float | Sequence[tuple[float, float]], *,
                     time_limit_s: float | None = None) -> Optimum:
    """The most energy deliverable to the sessions (hours, kWh, kW; one entry per session) under
    ``limit_kw`` at every instant: one number, or steps ``(from_h, kW)`` in increasing time (the first applies
    before its time too). ``time_limit_s`` bounds the solver (an :class:`OptimumError` past it).

    Raises ``ValueError`` for inputs no schedule can be built on (unequal lengths, non-finite numbers,
    a departure not after its arrival, negative energy, rate or limit)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    started = time.process_time()
    arrival = np.asarray(arrival_h, dtype=float)
    departure = np.asarray(departure_h, dtype=float)
    energy = np.asarray(energy_kwh, dtype=float)
    rate = np.asarray(max_kw, dtype=float)
    n = len(arrival)
    if not (len(departure) == len(energy) == len(rate) == n):
        raise ValueError("arrival_h, departure_h, energy_kwh and max_kw need one entry per session each")
    steps = [(0.0, float(limit_kw))] if isinstance(limit_kw, int | float) else [(float(a), float(k))
                                                                                for a, k in limit_kw]
    if not steps:
        raise ValueError("limit_kw needs at least one step")
    for at, kw in steps:
        if not (math.isfinite(kw) and math.isfinite(at)) or kw < 0:
            raise ValueError(f"limit_kw must be a finite number >= 0, got {kw!r} (from {at!r} h)")
    step_at = np.array([a for a, _ in steps])
    step_kw = np.array([k for _, k in steps])
    if (np.diff(step_at) <= 0).any():
        raise ValueError("limit steps must be in increasing time")
    lowest = float(step_kw.min())
    varying = None if isinstance(limit_kw, int | float) else tuple(steps)
    for name, values in (("arrival_h", arrival), ("departure_h", departure), ("energy_kwh", energy),
                         ("max_kw", rate)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} has a value that is not a finite number")
    if (departure <= arrival).any():
        raise ValueError(f"session {int(np.argmax(departure <= arrival))}: departure is not after arrival")
    if (energy < 0).any() or (rate < 0).any():
        raise ValueError("energy_kwh and max_kw must be >= 0")
    requested = math.fsum(energy)
    if n == 0 or float(step_kw.max()) == 0 or requested == 0:
        return Optimum(lowest, requested, 0.0, np.zeros(n, dtype=np.float64), 0, 0, 0, time.process_time() - started,
                       varying)

    inside = step_at[(step_at > arrival.min()) & (step_at < departure.max())]
    bounds = np.unique(np.concatenate([arrival, departure, inside]))
    dt = np.diff(bounds)  # hours, all > 0 (distinct bounds)
    first = np.searchsorted(bounds, arrival)
    stop = np.searchsorted(bounds, departure)  # the session is plugged in during intervals first..stop-1
    counts = stop - first
    m = int(counts.sum())
    session = np.repeat(np.arange(n), counts)
    # Interval index of each variable: first[i], first[i] + 1, ... for each session in turn.
    offsets = np.arange(m) - np.repeat(np.cumsum(counts) - counts, counts)
    interval = np.repeat(first, counts) + offsets
    columns = np.arange(m)
    a_ub = coo_matrix((np.ones(2 * m), (np.concatenate([session, n + interval]), np.concatenate([columns, columns]))),
                      shape=(n + len(dt), m)).tocsr()
    # the limit in each interval: the step in force at its start
    in_force = step_kw[np.clip(np.searchsorted(step_at, bounds[:-1], side="right") - 1, 0, None)]
    b_ub = np.concatenate([energy, in_force * dt])
    upper = rate[session] * dt[interval]
    options = {} if time_limit_s is None else {"time_limit": float(time_limit_s)}
    res = linprog(-np.ones(m), A_ub=a_ub, b_ub=b_ub, bounds=np.column_stack([np.zeros(m), upper]),
                  method="highs", options=options)
    if res.status != 0 or res.x is None:
        raise OptimumError(f"HiGHS did not reach an optimum (status {res.status}): {res.message}")
    x = np.clip(res.x, 0.0, None)
    per_session = np.bincount(session, weights=x, minlength=n).astype(np.float64)
    return Optimum(lowest, requested, float(per_session.sum()), per_session, m, n + len(dt), len(dt),
                   time.process_time() - started, varying)
