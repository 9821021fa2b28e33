"""A replayed scenario against its offline optimum: the LP of :mod:`replay.optimum` over the run's EVs, under the
limit its trace saw (time-varying: a DSO's cut, a base load that moves).

The EVs' power in each ``window_s`` is bounded by the mean, over the window, of what the substations left for EVs
(limit less base load, summed over the online substations: as if the EVs could share one pool, which only
loosens the bound). Per-second limits imply these window means, so the result is an upper bound for any
scheduler; with a flat base load and limits that change on window bounds it is exact. ``margin_pct`` gives the
optimum within the balancer's safety margin (what it may plan with), 0 the optimum at the limit itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from replay.optimum import Optimum, optimal_delivery
from replay.sim import RunResult

__all__ = ["format_optimum", "trace_optimum"]


def trace_optimum(result: RunResult, *, margin_pct: float = 0.0, window_s: float = 60.0) -> Optimum:
    trace = result.trace
    n = trace.samples
    room = np.zeros(n)
    for sub in trace.substations:
        cap = np.asarray(sub.capacity_kw[:n], dtype=float) * (1 - margin_pct / 100)
        base = np.asarray(sub.base_kw[:n], dtype=float) if len(sub.base_kw) >= n else np.zeros(n)
        room += np.where(np.asarray(sub.online[:n], dtype=bool), np.clip(cap - base, 0.0, None), 0.0)
    per = max(1, round(window_s / trace.step_s))
    steps = [(k * trace.step_s / 3600, float(room[k:k + per].mean())) for k in range(0, n, per)]
    evs = result.evs
    return optimal_delivery([e.requested_at / 3600 for e in evs],
                            [max(e.departure, e.requested_at + 1e-6) / 3600 for e in evs],
                            [e.energy_kwh for e in evs], [e.requested_kw for e in evs], steps or [(0.0, 0.0)])


def format_optimum(results: Sequence[RunResult], margin_pct: float) -> str:
    """Delivered energy of each run against the optimum at the limit and within the safety margin."""
    lines = ["policy          delivered kWh  optimum kWh (at limit / within margin)  delivered % of optimum  "
             "overload s"]
    for r in results:
        at_limit = trace_optimum(r)
        within = trace_optimum(r, margin_pct=margin_pct)
        delivered = sum(e.delivered_kwh for e in r.evs)
        lines.append(f"{r.policy:<15} {delivered:>13.1f}  {at_limit.delivered_kwh_total:>12.1f} / "
                     f"{within.delivered_kwh_total:<23.1f}  "
                     f"{100 * delivered / max(1e-9, at_limit.delivered_kwh_total):>6.2f} / "
                     f"{100 * delivered / max(1e-9, within.delivered_kwh_total):<13.2f}  {r.metrics.overload_s:g}")
    return "\n".join(lines)
