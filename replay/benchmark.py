"""The session benchmark: real charging sessions (a CSV) replayed against every policy at several site limits,
beside the offline optimum (:mod:`replay.optimum`) and the published results of the data set, if known.

For each limit the sessions become a one-substation scenario (:func:`replay.sessions.sessions_scenario`) and
run through the same simulation of the pure core as the shipped scenarios (:func:`replay.sim.run`); what is
scored is what the simulated site actually did:

* **delivered %**: energy the EVs really got / energy requested, over every session;
* **peak / limit**: the highest site load over the site limit (> 1: the limit was broken);
* **over-limit s**: seconds the load was above the site limit (the limit itself, not the capacity the balancer
  was told, which is the limit plus its safety margin);
* **changes**: power changes per EV after its first assignment (``replay.metrics.power_changes``).

Published figures (``replay/benchmarks/*.yaml``) are matched by the session file's SHA-256, so a slice or an
edited copy of a data set is never set beside results that were computed for the whole of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from balancer.core import BASELINES, CoreConfig
from balancer.core.policies import PolicyName
from replay.metrics import Metrics
from replay.optimum import Optimum, optimal_delivery
from replay.sessions import SessionFile, capacity_for_limit, sessions_scenario
from replay.sim import RunResult, run

__all__ = [
    "BENCHMARK_DIR",
    "DEFAULT_MARGIN_PCT",
    "DEFAULT_STEP_S",
    "GOAL_MAX_CHANGES",
    "GOAL_OPTIMUM_SHARE",
    "GOAL_REFERENCE",
    "BenchRun",
    "LimitResult",
    "Published",
    "PublishedError",
    "benchmark_json",
    "find_published",
    "format_benchmark",
    "goal_misses",
    "optimum_for",
    "run_benchmark",
    "score_run",
]

BENCHMARK_DIR = Path(__file__).parent / "benchmarks"
DEFAULT_MARGIN_PCT = CoreConfig().safety_margin_pct
#: Simulation step (and telemetry interval) of the benchmark. The balancer's real cadence is 1 s; on the ACN month
#: 5 s gave the same delivered energy within 0.06 points and the same power changes within 0.1 per session, at
#: a fifth of the CPU (docs/balancing.md, "Step").
DEFAULT_STEP_S = 5.0
#: The goals of issue 13 (section 2): a published column each policy must reach, a share of the offline
#: optimum for ``deadline``, and no flapping and no overload for every real policy.
GOAL_REFERENCE: Mapping[str, str] = {PolicyName.DEADLINE: "LLF", PolicyName.LEAST_UTILISED: "Round Robin",
                                     PolicyName.WEIGHTED_FAIR: "Round Robin"}
GOAL_OPTIMUM_SHARE: Mapping[str, float] = {PolicyName.DEADLINE: 0.99}
GOAL_MAX_CHANGES = 20.0
#: Loads are sums of whole-watt grants: anything above the limit by more than this is a real excess.
_OVER_EPS_KW = 1e-6


class PublishedError(ValueError):
    """A published-results file in ``replay/benchmarks/`` that is not valid."""


class _Published(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str
    sessions_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    sessions: Annotated[int, Field(gt=0)]
    requested_kwh: Annotated[float, Field(gt=0)]
    unit: str
    uncontrolled_pct: Annotated[float, Field(ge=0, le=100)]
    columns: Annotated[list[str], Field(min_length=1)]
    by_limit_kw: dict[Annotated[float, Field(gt=0)], dict[str, Annotated[float, Field(ge=0, le=100)]]]


@dataclass(frozen=True, slots=True)
class Published:
    """Published results of one data set: % delivered by scheduler (``columns`` first) and site limit."""

    name: str
    source: str
    sessions_sha256: str
    uncontrolled_pct: float
    columns: tuple[str, ...]
    by_limit_kw: Mapping[float, Mapping[str, float]]

    @property
    def limits(self) -> list[float]:
        return sorted(self.by_limit_kw)

    def at(self, limit_kw: float) -> Mapping[str, float] | None:
        return next((v for k, v in self.by_limit_kw.items() if math.isclose(k, limit_kw)), None)


def _load_published(path: Path) -> Published:
    try:
        data = _Published.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as exc:
        raise PublishedError(f"{path}: {exc}") from None
    missing = [f"{k:g} kW: {c}" for k, row in data.by_limit_kw.items() for c in data.columns if c not in row]
    if missing:
        raise PublishedError(f"{path}: no figure for {', '.join(missing)}")
    return Published(data.name, " ".join(data.source.split()), data.sessions_sha256, data.uncontrolled_pct,
                     tuple(data.columns), {k: dict(v) for k, v in data.by_limit_kw.items()})


def find_published(sha256: str, directory: Path = BENCHMARK_DIR) -> Published | None:
    """The published results for the session file with this SHA-256, if any file in ``directory`` has them."""
    for path in sorted(directory.glob("*.yaml")):
        published = _load_published(path)
        if published.sessions_sha256 == sha256:
            return published
    return None


@dataclass(frozen=True, slots=True)
class BenchRun:
    """One policy at one limit: the benchmark's figures and the replay's full metrics."""

    limit_kw: float
    policy: str
    requested_kwh: float
    delivered_kwh: float
    peak_kw: float
    over_limit_s: float
    metrics: Metrics
    counters: dict[str, int]
    anomalies: dict[str, int]
    notes: dict[str, int]
    simulated_s: float
    cpu_s: float
    wall_s: float

    @property
    def delivered_pct(self) -> float:
        return 100.0 * self.delivered_kwh / self.requested_kwh if self.requested_kwh > 0 else 0.0

    @property
    def peak_over_limit(self) -> float:
        return self.peak_kw / self.limit_kw


@dataclass(frozen=True, slots=True)
class LimitResult:
    """Every policy at one site limit, with the optimum and the published figures there."""

    limit_kw: float
    capacity_kw: float
    optimum: Optimum
    published: Mapping[str, float] | None
    runs: list[BenchRun]

    @property
    def optimum_pct(self) -> float:
        return 100.0 * self.optimum.delivered_share


def score_run(limit_kw: float, policy: str, result: RunResult, cpu_s: float) -> BenchRun:
    """The benchmark's figures of one :class:`replay.sim.RunResult` (a one-substation run)."""
    (site,) = result.trace.substations
    step = result.trace.step_s
    peak = max(site.load_kw, default=0.0)
    over = sum(step for load in site.load_kw if load > limit_kw + _OVER_EPS_KW)
    requested = math.fsum(ev.energy_kwh for ev in result.evs)
    delivered = math.fsum(min(ev.delivered_kwh, ev.energy_kwh) for ev in result.evs)
    return BenchRun(limit_kw, policy, requested, delivered, peak, over, result.metrics, result.counters,
                    result.anomalies, result.notes, result.sim_seconds, cpu_s, result.wall_seconds)


def _one(sessions: SessionFile, limit_kw: float, policy: str, margin_pct: float, step_s: float,
         core: Mapping[str, Any] | None) -> BenchRun:
    scenario = sessions_scenario(sessions, limit_kw, margin_pct=margin_pct, step_s=step_s)
    started = time.process_time()
    result = run(scenario, policy, core={**(core or {}), "safety_margin_pct": margin_pct})
    return score_run(limit_kw, policy, result, time.process_time() - started)


def optimum_for(sessions: SessionFile, limit_kw: float) -> Optimum:
    rows = sessions.rows
    return optimal_delivery([r.arrival_min / 60 for r in rows], [r.departure_min / 60 for r in rows],
                            [r.requested_kwh for r in rows], [r.max_kw for r in rows], limit_kw)


def run_benchmark(sessions: SessionFile, limits: Sequence[float], policies: Sequence[str], *,
                  margin_pct: float = DEFAULT_MARGIN_PCT, step_s: float = DEFAULT_STEP_S, jobs: int = 1,
                  core: Mapping[str, Any] | None = None, published: Published | None = None,
                  progress: Any = None) -> list[LimitResult]:
    """Every policy at every limit (``jobs`` > 1: runs in that many processes), the optimum at each limit.
    ``progress(run)`` is called as each run finishes."""
    tasks = [(limit, policy) for limit in limits for policy in policies]
    done: dict[tuple[float, str], BenchRun] = {}
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
            futures = [pool.submit(_one, sessions, limit, policy, margin_pct, step_s, core) for limit, policy in tasks]
            for future in futures:
                bench = future.result()
                done[(bench.limit_kw, bench.policy)] = bench
                if progress is not None:
                    progress(bench)
    else:
        for limit, policy in tasks:
            bench = _one(sessions, limit, policy, margin_pct, step_s, core)
            done[(limit, policy)] = bench
            if progress is not None:
                progress(bench)
    return [LimitResult(limit, capacity_for_limit(limit, margin_pct), optimum_for(sessions, limit),
                        published.at(limit) if published is not None else None,
                        [done[(limit, policy)] for policy in policies])
            for limit in limits]


def goal_misses(run: BenchRun, optimum_pct: float, published: Mapping[str, float] | None) -> list[str] | None:
    """How ``run`` misses the issue's goals (empty: all met; None: a baseline, which has none)."""
    if run.policy in BASELINES:
        return None
    misses = []
    reference = GOAL_REFERENCE.get(run.policy)
    if reference is not None and published is not None and reference in published:
        gap = published[reference] - run.delivered_pct
        if gap > 0:
            misses.append(f"{gap:.2f} below {reference}")
    share = GOAL_OPTIMUM_SHARE.get(run.policy)
    if share is not None and run.delivered_pct < share * optimum_pct:
        misses.append(f"{share * optimum_pct - run.delivered_pct:.2f} below {share:.0%} of optimum")
    changes = run.metrics.changes_mean
    if changes is not None and changes > GOAL_MAX_CHANGES:
        misses.append(f"{changes:.1f} changes")
    if run.over_limit_s > 0:
        misses.append(f"{run.over_limit_s:g} s over")
    return misses


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_benchmark(results: Sequence[LimitResult], published: Published | None) -> str:
    """One row per limit x policy: delivered %, the optimum's %, the published figures, peak / limit,
    over-limit seconds, changes per session (mean/max) and how the run stands against the goals."""
    columns = list(published.columns) if published is not None else []
    header = ["limit kW", "policy", "delivered %", "optimum %", *columns, "peak/limit", "over-limit s",
              "changes mean/max", "goals"]
    rows = [header]
    for lim in results:
        for r in lim.runs:
            misses = goal_misses(r, lim.optimum_pct, lim.published)
            goals = "-" if misses is None else ("met" if not misses else "; ".join(misses))
            changes = "-" if r.metrics.changes_mean is None else f"{r.metrics.changes_mean:.1f}"
            rows.append([f"{lim.limit_kw:g}", r.policy, _pct(r.delivered_pct), _pct(lim.optimum_pct),
                         *(_pct((lim.published or {}).get(c)) for c in columns),
                         f"{r.peak_over_limit:.3f}", f"{r.over_limit_s:.0f}", f"{changes}/{r.metrics.changes_max}",
                         goals])
    left = {1, len(header) - 1}
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                             strict=True))).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])])


def benchmark_json(sessions: SessionFile, results: Sequence[LimitResult], published: Published | None, *,
                   margin_pct: float, step_s: float, core: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The results document (``replay/results/bench_<data set>.json``)."""
    return {
        "mode": "sessions",
        "sessions": {"file": sessions.source, "name": sessions.name, "sha256": sessions.sha256,
                     "count": len(sessions.rows), "requested_kwh": round(sessions.requested_kwh, 3)},
        "margin_pct": margin_pct, "step_s": step_s, "core_overrides": dict(core or {}),
        "published": None if published is None else {"name": published.name, "source": published.source,
                                                     "uncontrolled_pct": published.uncontrolled_pct},
        "goals": {"reference": dict(GOAL_REFERENCE), "optimum_share": dict(GOAL_OPTIMUM_SHARE),
                  "max_changes_mean": GOAL_MAX_CHANGES, "over_limit_s": 0},
        "limits": [{
            "limit_kw": lim.limit_kw, "capacity_kw": lim.capacity_kw,
            "optimum": {"delivered_pct": lim.optimum_pct, "delivered_kwh": lim.optimum.delivered_kwh_total,
                        "variables": lim.optimum.variables, "constraints": lim.optimum.constraints,
                        "cpu_s": round(lim.optimum.cpu_s, 3)},
            "published": None if lim.published is None else dict(lim.published),
            "runs": [{
                "policy": r.policy, "delivered_pct": r.delivered_pct, "delivered_kwh": r.delivered_kwh,
                "requested_kwh": r.requested_kwh, "peak_kw": r.peak_kw, "peak_over_limit": r.peak_over_limit,
                "over_limit_s": r.over_limit_s, "goal_misses": goal_misses(r, lim.optimum_pct, lim.published),
                "metrics": r.metrics.to_dict(), "counters": r.counters, "anomalies": r.anomalies,
                "notes": r.notes, "simulated_s": r.simulated_s, "cpu_s": round(r.cpu_s, 2),
                "wall_s": round(r.wall_s, 2),
            } for r in lim.runs],
        } for lim in results],
    }
