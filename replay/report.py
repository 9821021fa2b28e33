"""Presenting replay results: a text table, a JSON document and utilisation plots (PNG, matplotlib Agg).

Plots show each substation's actual load as a share of its physical capacity over the time of day
(one line per substation, the capacity at 100 %, the balancer's limit dashed, scenario events as
vertical lines). Curves are drawn from per-bucket maxima so that a one-second overload stays visible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replay.metrics import Metrics
from replay.sim import RunResult

__all__ = ["COLUMN_NOTES", "format_table", "plot_overview", "plot_run", "results_json", "write_json"]

#: The balancer's default safety margin, drawn as the limit line.
LIMIT_PCT = 95.0
_MAX_POINTS = 1200


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _pair(a: float | None, b: float | None) -> str:
    return f"{_num(a)}/{_num(b)}"


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("scenario", "<"), ("policy", "<"), ("EVs", ">"), ("served", ">"), ("unserved", ">"), ("rejected", ">"),
    ("overload s", ">"), ("peak over kW", ">"), ("spread %", ">"), ("Jain", ">"), ("undelivered kWh", ">"),
    ("wait p50/p95 s", ">"), ("queued p50/p95 s", ">"), ("changes mean/max", ">"),
)


def _row(result: RunResult) -> list[str]:
    m: Metrics = result.metrics
    share = "" if m.energy_not_delivered_share is None else f" ({m.energy_not_delivered_share * 100:.0f} %)"
    return [
        result.scenario, result.policy, str(m.evs), str(m.served), str(m.never_served), str(m.rejected),
        _num(m.overload_s), _num(m.peak_overload_kw, 1), _num(m.spread_mean * 100, 1), _num(m.jain, 3),
        f"{m.energy_not_delivered_kwh:.0f}{share}", _pair(m.wait_p50_s, m.wait_p95_s),
        _pair(m.wait_queued_p50_s, m.wait_queued_p95_s), f"{_num(m.changes_mean, 1)}/{m.changes_max}",
    ]


#: What each column means (printed under the table; definitions in replay/metrics.py).
COLUMN_NOTES: tuple[tuple[str, str], ...] = (
    ("EVs / served / unserved / rejected", "EVs that asked; got power at some point; waited and left with none; "
                                           "refused outright (queue full, exceeds capacity)"),
    ("overload s / peak over kW", "seconds any online substation's measured load was above its capacity, and "
                                  "the worst excess (0 is the guarantee)"),
    ("spread %", "time-weighted mean of (max - min) utilisation across online substations: how even the load is"),
    ("Jain", "fairness of what EVs got, 1 = all the same share of what they asked for, 1/n = one got everything; "
             "EVs that waited and left empty count as 0"),
    ("undelivered kWh", "energy asked for and not delivered (its share of all energy asked for)"),
    ("wait p50/p95 s", "request to first assignment, over EVs that got power; queued: only those that waited"),
    ("changes mean/max", "how often an EV's granted power changed after its first assignment (flapping)"),
)
#: Why a row can look bad while the policy is right (printed when those scenarios are in the table).
SCENARIO_NOTES: dict[str, str] = {
    "burst_1000": "burst_1000: 1,000 EVs ask at once where the grid has room for a few dozen at a time; most wait "
                  "and many leave before their turn (their stay is 20-60 min), so a low Jain and most energy "
                  "undelivered measure the grid's room, not the policy: the capacity-respecting policies have "
                  "0 overload-seconds while the baselines that ignore capacity deliver more by overloading.",
}


def format_notes(results: Sequence[RunResult]) -> str:
    """The column explanations, and a note for each scenario in ``results`` that needs one."""
    width = max(len(name) for name, _ in COLUMN_NOTES)
    lines = ["columns:"] + [f"  {name.ljust(width)}  {text}" for name, text in COLUMN_NOTES]
    notes = [SCENARIO_NOTES[s] for s in dict.fromkeys(r.scenario for r in results) if s in SCENARIO_NOTES]
    if notes:
        lines += ["notes:"] + [f"  {note}" for note in notes]
    return "\n".join(lines)


def format_table(results: Sequence[RunResult]) -> str:
    """One row per scenario x policy; the columns are the metrics of :mod:`replay.metrics`."""
    rows = [[name for name, _ in _COLUMNS], *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def line(row: list[str]) -> str:
        cells = (cell.ljust(w) if align == "<" else cell.rjust(w)
                 for cell, w, (_, align) in zip(row, widths, _COLUMNS, strict=True))
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def results_json(results: Sequence[RunResult], plots: dict[tuple[str, str], str] | None = None, *,
                 mode: str = "sim", extra: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON document: ``mode`` (``sim`` or ``live``) and one entry per run; ``extra`` adds keys to the
    entry of a (scenario, policy) (a live run's speed-up, process exit codes, ...)."""
    runs = []
    for r in results:
        runs.append({
            "scenario": r.scenario, "policy": r.policy, "seed": r.seed, "metrics": r.metrics.to_dict(),
            "counters": r.counters, "anomalies": r.anomalies, "notes": r.notes,
            "core_violation_samples": r.core_violations, "open_requests_at_end": r.open_requests_at_end,
            "simulated_s": r.sim_seconds,
            "wall_s": round(r.wall_seconds, 3), "plot": (plots or {}).get((r.scenario, r.policy)),
            **(extra or {}).get((r.scenario, r.policy), {}),
        })
    return {"mode": mode, "runs": runs}


def write_json(path: Path, results: Sequence[RunResult], plots: dict[tuple[str, str], str] | None = None, *,
               mode: str = "sim", extra: dict[tuple[str, str], dict[str, Any]] | None = None) -> None:
    doc = results_json(results, plots, mode=mode, extra=extra)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- plots
def _series(result: RunResult) -> tuple[Any, list[tuple[str, Any]], float]:
    """x (hours of day) and per-substation utilisation % (bucket maxima, NaN while offline); the peak %."""
    import numpy as np

    trace = result.trace
    n = trace.samples
    bucket = max(1, math.ceil(n / _MAX_POINTS))
    buckets = math.ceil(n / bucket) if n else 0
    x = result.start_hour + np.arange(buckets) * bucket * trace.step_s / 3600.0
    lines = []
    peak = 0.0
    for sub in trace.substations:
        load = np.asarray(sub.load_kw[:n], dtype=float)
        cap = np.asarray(sub.capacity_kw[:n], dtype=float)
        util = np.where(np.asarray(sub.online[:n], dtype=bool), load / cap * 100.0, np.nan)
        padded = np.full(buckets * bucket, np.nan)
        padded[:n] = util
        y = np.fmax.reduce(padded.reshape(buckets, bucket), axis=1)  # NaN only where the whole bucket is
        if np.isfinite(y).any():
            peak = max(peak, float(np.nanmax(y)))
        lines.append((sub.substation_id, y))
    return x, lines, peak


def _draw(ax: Any, result: RunResult, *, title: str, legend: bool) -> None:
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    x, lines, peak = _series(result)
    for name, y in lines:
        ax.plot(x, y, linewidth=1.0, label=name)
    ax.axhline(100.0, color="red", linewidth=1.2, label="capacity (100 %)")
    ax.axhline(LIMIT_PCT, color="red", linewidth=0.8, linestyle="--", alpha=0.6, label=f"limit ({LIMIT_PCT:g} %)")
    top = min(max(110.0, peak + 5.0), 250.0)
    ax.set_ylim(0, top)
    if peak > top:
        ax.text(0.995, 0.97, f"peak {peak:.0f} % (clipped)", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color="red")
    end = result.start_hour + result.duration_s / 3600.0
    if len(x) and x[-1] > end:
        ax.axvspan(end, x[-1], color="grey", alpha=0.08, linewidth=0)
        ax.text(end, top * 0.98, " no more arrivals", va="top", ha="left", fontsize=7, color="dimgrey")
    for t, label in result.events:
        hour = result.start_hour + t / 3600.0
        ax.axvline(hour, color="grey", linestyle=":", linewidth=1.0)
        ax.text(hour, top * 0.02, f" {label}", rotation=90, va="bottom", ha="left", fontsize=7, color="dimgrey")
    ax.set_ylabel("load / capacity (%)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v % 24):02d}:{round(v % 1 * 60) % 60:02d}"))
    span = (x[-1] - x[0]) if len(x) > 1 else 1.0
    ax.xaxis.set_major_locator(MultipleLocator(2.0 if span > 12 else 1.0 if span > 4 else 0.5 if span > 1.5
                                               else 1 / 6))
    ax.grid(True, alpha=0.3)
    m = result.metrics
    undelivered = "-" if m.energy_not_delivered_share is None else f"{m.energy_not_delivered_share * 100:.0f} %"
    ax.set_title(f"{title}   overload {m.overload_s:.0f} s (peak {m.peak_overload_kw:.1f} kW), "
                 f"Jain {_num(m.jain, 2)}, undelivered {undelivered}", fontsize=9, loc="left")
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, framealpha=0.8)


def plot_run(result: RunResult, path: Path, *, note: str = "") -> None:
    """Utilisation per substation over time for one scenario x policy (``note``: appended to the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    _draw(ax, result, title=f"{result.scenario} — {result.policy}{note}", legend=True)
    ax.set_xlabel("time of day")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overview(results: Sequence[RunResult], path: Path, *, note: str = "") -> None:
    """One scenario, one panel per policy (same time axis), to compare them at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.6 * len(results) + 0.8), dpi=100, sharex=True,
                             squeeze=False)
    for i, (ax, result) in enumerate(zip(axes[:, 0], results, strict=True)):
        _draw(ax, result, title=result.policy, legend=i == 0)
    axes[-1, 0].set_xlabel("time of day")
    fig.suptitle(f"{results[0].scenario}: utilisation per substation by policy{note}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
