"""What a scenario means over time (pure: a scenario in, plain data out).

The fast replay (``replay.sim``) and the live replay's three processes (substation agents, EV fleet,
orchestrator) must agree on a scenario exactly: they all read it through this module.

* :class:`Timebase`: scenario time (seconds from the start) <-> wall clock (epoch seconds) at a speed-up;
* :func:`grid_actions`: the substation events as they are applied (offline/online, a capacity cut
  announced ``notice_s`` early, the capacity change itself);
* :func:`capacity_steps` / :func:`capacity_at`: each substation's physical capacity over time (the
  orchestrator's reference for overload);
* :func:`daily_curve` / :func:`points_curve`: a substation's base-load curve from its scenario spec;
  :func:`scenario_base_load`: the same on the agents' simulated clock (seconds since midnight of day 0),
  sampled on the simulation's grid;
* :func:`shorten` and :func:`auto_speedup`: a shorter scenario for a quick live run, and the speed-up that
  fits a run into a wall-time budget.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from grid_sim.load_curve import BaseLoad, LoadCurveParams, make_base_load
from grid_sim.scenario import (
    BurstEvent,
    CapacityEvent,
    DailyBaseLoad,
    EvSpec,
    OfflineEvent,
    OnlineEvent,
    PointsBaseLoad,
    Scenario,
    SubstationSpec,
)

__all__ = [
    "GridAction",
    "StepSampled",
    "Timebase",
    "auto_speedup",
    "capacity_at",
    "capacity_steps",
    "daily_curve",
    "event_labels",
    "grid_actions",
    "points_curve",
    "run_span",
    "scenario_base_load",
    "shorten",
]

ActionKind = Literal["offline", "online", "announce", "capacity"]


@dataclass(frozen=True, slots=True)
class Timebase:
    """Scenario time ``t`` (seconds from the start) happens at wall time ``t0 + t / speedup`` (epoch seconds)."""

    t0: float
    speedup: float

    def __post_init__(self) -> None:
        if not (self.speedup > 0 and math.isfinite(self.speedup)):
            raise ValueError(f"speedup must be > 0, got {self.speedup!r}")

    def wall(self, t: float) -> float:
        return self.t0 + t / self.speedup

    def scenario(self, wall: float) -> float:
        return (wall - self.t0) * self.speedup


@dataclass(frozen=True, slots=True)
class GridAction:
    """One thing that happens to a substation at scenario time ``at``.

    ``announce``: its telemetry starts reporting ``capacity_kw`` (a curtailment notice, never above the
    physical capacity); ``capacity``: its physical capacity becomes ``capacity_kw``.
    """

    at: float
    substation: str
    kind: ActionKind
    capacity_kw: float | None = None
    label: str | None = None


def _new_capacity(scenario: Scenario, event: CapacityEvent) -> float:
    if event.capacity_kw is not None:
        return event.capacity_kw
    return scenario.capacity_kw(event.substation) * (event.capacity_pct or 0.0) / 100.0


def grid_actions(scenario: Scenario) -> list[GridAction]:
    """The scenario's substation events in the order they happen (bursts are the EVs' business)."""
    out: list[tuple[float, int, GridAction]] = []
    for i, event in enumerate(scenario.events):
        if isinstance(event, OfflineEvent):
            out.append((event.at, i, GridAction(event.at, event.substation, "offline",
                                                label=f"{event.substation} offline")))
        elif isinstance(event, OnlineEvent):
            out.append((event.at, i, GridAction(event.at, event.substation, "online",
                                                label=f"{event.substation} online")))
        elif isinstance(event, CapacityEvent):
            new = _new_capacity(scenario, event)
            if event.notice_s > 0:
                at = event.at - event.notice_s
                out.append((at, i, GridAction(at, event.substation, "announce", new)))
            out.append((event.at, i, GridAction(event.at, event.substation, "capacity", new,
                                                label=f"{event.substation} capacity {new:g} kW")))
    out.sort(key=lambda x: (x[0], x[1]))
    return [a for _, _, a in out]


def event_labels(scenario: Scenario) -> list[tuple[float, str]]:
    """(time, label) of every scenario event, for the plots (the labels the fast replay uses too)."""
    labels = [(a.at, a.label) for a in grid_actions(scenario) if a.label is not None]
    labels += [(e.at, f"burst of {e.count}") for e in scenario.events if isinstance(e, BurstEvent)]
    return sorted(labels, key=lambda x: x[0])


def capacity_steps(scenario: Scenario, substation: str) -> list[tuple[float, float]]:
    """Physical capacity of ``substation`` as ``(from time, kW)`` steps, the first at time 0."""
    steps = [(0.0, scenario.capacity_kw(substation))]
    for action in grid_actions(scenario):
        if action.substation == substation and action.kind == "capacity" and action.capacity_kw is not None:
            steps.append((action.at, action.capacity_kw))
    return steps


def capacity_at(steps: Sequence[tuple[float, float]], t: float) -> float:
    """The value of a step function from :func:`capacity_steps` at ``t`` (a change at ``t`` applies at ``t``)."""
    value = steps[0][1]
    for at, kw in steps:
        if at > t + 1e-9:
            break
        value = kw
    return value


class StepSampled:
    """``curve`` evaluated only at ``origin + k * step`` (k = 0, 1, 2, ... in order, each once) and held in
    between: what the fast simulation does when it steps its substations. A noisy curve (the daily one draws
    its noise from a random generator at each new time) then gives the same values, draw for draw, however
    irregularly it is asked. Times before ``origin`` get the first value."""

    __slots__ = ("_curve", "_next", "_origin", "_step", "_value")

    def __init__(self, curve: Callable[[float], float], origin: float, step: float) -> None:
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step!r}")
        self._curve = curve
        self._origin = origin
        self._step = step
        self._next = 0  # the next grid point not evaluated yet
        self._value = 0.0

    def __call__(self, t: float) -> float:
        k = max(0, math.floor((t - self._origin) / self._step + 1e-9))
        while self._next <= k:
            self._value = self._curve(self._origin + self._next * self._step)
            self._next += 1
        return self._value


def scenario_base_load(scenario: Scenario, spec: SubstationSpec, seed: int | None = None) -> Callable[[float], float]:
    """Base load in kW as a function of simulated seconds since midnight of day 0 (the agents' ``SimClock``).

    The curves the fast replay uses: the daily curve of ``grid_sim.load_curve`` seeded from the
    scenario's seed and the substation id, or the explicit points (whose times count from the start),
    evaluated on the simulation's grid of ``step_s`` (:class:`StepSampled`), so an agent's base load is the
    simulation's, sample for sample.
    """
    seed = scenario.seed if seed is None else seed
    load = spec.base_load
    start = scenario.start_hour * 3600.0
    if isinstance(load, DailyBaseLoad):
        return StepSampled(daily_curve(spec, load, seed), start, scenario.step_s)
    points = points_curve(load)
    return StepSampled(lambda sim_s: points(sim_s - start), start, scenario.step_s)


def daily_curve(spec: SubstationSpec, load: DailyBaseLoad, seed: int) -> Callable[[float], float]:
    """The daily curve of ``load`` for ``spec`` in kW over seconds since midnight of day 0, seeded from ``seed`` and
    the substation id; with the default options exactly the curve the stand-alone agents run (``make_base_load``)."""
    if load.residential_share is None and load.noise_pct == 3.0 and load.noise_tau_s == 900.0:
        return make_base_load(spec.id, spec.capacity_kw, load.peak_pct, seed)  # exactly what the agents run
    rng = random.Random(f"{seed}:{spec.id}")
    share = rng.uniform(0.55, 0.85) if load.residential_share is None else load.residential_share
    return BaseLoad(LoadCurveParams(peak_kw=spec.capacity_kw * load.peak_pct / 100.0, residential_share=share,
                                    noise_pct=load.noise_pct, noise_tau_s=load.noise_tau_s), rng)


def points_curve(load: PointsBaseLoad) -> Callable[[float], float]:
    """Explicit ``(seconds from the start, kW)`` points, linearly interpolated and held flat beyond both ends."""
    times = [t for t, _ in load.points]
    kws = [kw for _, kw in load.points]

    def at(t: float) -> float:
        if t <= times[0]:
            return kws[0]
        for i in range(1, len(times)):
            if t <= times[i]:
                f = (t - times[i - 1]) / (times[i] - times[i - 1])
                return kws[i - 1] + f * (kws[i] - kws[i - 1])
        return kws[-1]

    return at


def run_span(scenario: Scenario, evs: Sequence[EvSpec]) -> float:
    """Scenario time by which everything has happened: the end of the scenario or the last departure."""
    return max(scenario.duration_s, max((ev.departure for ev in evs), default=0.0))


def auto_speedup(span_s: float, target_wall_s: float = 40.0) -> float:
    """The speed-up that plays ``span_s`` scenario seconds in about ``target_wall_s``: rounded up to two
    significant digits (540, 2800, ...), at least 1."""
    if not (span_s > 0 and target_wall_s > 0):
        raise ValueError("span_s and target_wall_s must be > 0")
    raw = span_s / target_wall_s
    if raw <= 1:
        return 1.0
    scale = 10.0 ** (math.floor(math.log10(raw)) - 1)
    return math.ceil(raw / scale - 1e-9) * scale


def shorten(scenario: Scenario, duration_s: float) -> Scenario:
    """The scenario cut to its first ``duration_s`` seconds: rate windows clipped, later explicit EVs and
    events dropped. EVs that arrived before the cut still stay until their departure (as in a full run).
    The EVs are drawn afresh from the seed, so sim and live runs of the shortened scenario get the same ones."""
    if not duration_s > 0:
        raise ValueError("duration_s must be > 0")
    if duration_s >= scenario.duration_s:
        return scenario
    data: dict[str, Any] = scenario.model_dump(mode="json", by_alias=True)
    data["duration_s"] = duration_s
    arrivals = data["arrivals"]
    arrivals["rate"] = [{**w, "to": min(w["to"], duration_s)} for w in arrivals["rate"] if w["from"] < duration_s]
    arrivals["explicit"] = [e for e in arrivals["explicit"] if e["at"] <= duration_s]
    data["events"] = [e for e in data["events"] if e["at"] <= duration_s]
    return Scenario.model_validate(data)
