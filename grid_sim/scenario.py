"""Replay scenarios: a YAML file describing a grid, a day of EV arrivals and the events that hit it.

The file is validated with pydantic (unknown keys are errors, every error names its place in the file),
then turned into plain data: :func:`generate_evs` draws the EVs from the scenario's seed, so a scenario
and a seed always produce the same EVs whatever the policy under test.

Times (``duration_s``, ``at``, ``stay``, window bounds, ``lag_s``, ...) are seconds from the start of the
scenario, given as numbers or as strings with units: ``"90s"``, ``"15m"``, ``"2h"``, ``"1h30m"``.
A complete example with every option is ``grid_sim/scenarios/README.md``.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from grid_protocol.ids import ID_PATTERN

__all__ = [
    "SCENARIO_DIR",
    "EvSpec",
    "Scenario",
    "ScenarioError",
    "generate_evs",
    "load_scenario",
    "parse_duration",
    "parse_scenario",
    "shipped_scenarios",
]

SCENARIO_DIR = Path(__file__).parent / "scenarios"

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
                       r"(?:(\d+(?:\.\d+)?)s)?\s*$")


class ScenarioError(ValueError):
    """A scenario file that cannot be read or is invalid; the message says where and why."""


def parse_duration(value: Any) -> Any:
    """Seconds from a number or a string like ``"1h30m"``; anything else is left for pydantic to refuse."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not value.strip() or match is None or not any(match.groups()):
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '90s', '15m', '2h', '1h30m')")
        d, h, m, s = (float(g) if g else 0.0 for g in match.groups())
        return d * 86_400 + h * 3600 + m * 60 + s
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, allow_inf_nan=False)]
Kw = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]
Id = Annotated[str, Field(pattern=ID_PATTERN)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _weights(mix: Mapping[Any, float], what: str) -> Mapping[Any, float]:
    if not mix:
        raise ValueError(f"{what}: give at least one value")
    if any(not (w >= 0 and math.isfinite(w)) for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"{what}: weights must be finite, >= 0 and not all 0")
    return mix


def _range(lo_hi: tuple[float, float], what: str) -> tuple[float, float]:
    if lo_hi[0] > lo_hi[1]:
        raise ValueError(f"{what}: range [{lo_hi[0]}, {lo_hi[1]}] is empty (first must be <= second)")
    return lo_hi


class TelemetrySpec(_Model):
    """Telemetry measured at ``t`` reaches the balancer at ``t + lag_s``."""

    interval_s: PositiveSeconds = 1.0
    lag_s: Seconds = 0.0


class DailyBaseLoad(_Model):
    """Daily residential/commercial curve of ``grid_sim.load_curve`` peaking at ``peak_pct`` of
    capacity. ``residential_share`` left out: drawn per substation from the seed (55-85 %), as the agents do."""

    profile: Literal["daily"]
    peak_pct: Annotated[float, Field(ge=0, le=200)]
    residential_share: Annotated[float, Field(ge=0, le=1)] | None = None
    noise_pct: Annotated[float, Field(ge=0, le=50)] = 3.0
    noise_tau_s: PositiveSeconds = 900.0


class PointsBaseLoad(_Model):
    """Explicit base load: ``[time, kW]`` points, linear in between, held flat before the first and after the last."""

    profile: Literal["points"]
    points: Annotated[list[tuple[Seconds, Annotated[float, Field(ge=0, allow_inf_nan=False)]]], Field(min_length=1)]

    @model_validator(mode="after")
    def _increasing(self) -> PointsBaseLoad:
        times = [t for t, _ in self.points]
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError("points: times must be strictly increasing")
        return self


BaseLoadSpec = Annotated[DailyBaseLoad | PointsBaseLoad, Field(discriminator="profile")]


class SubstationSpec(_Model):
    id: Id
    capacity_kw: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)]
    base_load: BaseLoadSpec


class EvProfile(_Model):
    """How generated EVs (rate arrivals and bursts) look. Mixes map a value to its weight."""

    requested_kw: dict[Kw, Annotated[float, Field(ge=0)]]
    #: ``min_kw`` = share x ``requested_kw``; left out: the balancer's default minimum applies.
    min_kw_share: Annotated[float, Field(ge=0, le=1)] | None = None
    energy_kwh: tuple[Annotated[float, Field(gt=0, le=10_000)], Annotated[float, Field(gt=0, le=10_000)]]
    #: How long the EV stays plugged in: ``departure`` = arrival + stay (uniform in the range).
    stay: tuple[PositiveSeconds, PositiveSeconds]
    priority: dict[Annotated[int, Field(ge=0, le=9)], Annotated[float, Field(ge=0)]] = Field(default={0: 1.0})

    @model_validator(mode="after")
    def _check(self) -> EvProfile:
        _weights(self.requested_kw, "requested_kw")
        _weights(self.priority, "priority")
        _range(self.energy_kwh, "energy_kwh")
        _range(self.stay, "stay")
        return self


class RateWindow(_Model):
    """Poisson arrivals at ``per_hour`` between ``from`` and ``to``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    start: Seconds = Field(alias="from")
    end: Seconds = Field(alias="to")
    per_hour: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)]

    @model_validator(mode="after")
    def _ordered(self) -> RateWindow:
        if self.end <= self.start:
            raise ValueError(f"window to ({self.end:g} s) must be after from ({self.start:g} s)")
        return self


class ExplicitEv(_Model):
    """One EV given by hand; exactly one of ``stay`` and ``departure`` (seconds from the start)."""

    at: Seconds
    ev_id: Id | None = None
    requested_kw: Kw
    min_kw: Annotated[float, Field(ge=0, le=1000)] | None = None
    energy_kwh: Annotated[float, Field(gt=0, le=10_000)]
    stay: PositiveSeconds | None = None
    departure: Seconds | None = None
    priority: Annotated[int, Field(ge=0, le=9)] = 0

    @model_validator(mode="after")
    def _check(self) -> ExplicitEv:
        if (self.stay is None) == (self.departure is None):
            raise ValueError("give exactly one of stay and departure")
        if self.departure is not None and self.departure <= self.at:
            raise ValueError("departure must be after at")
        if self.min_kw is not None and self.min_kw > self.requested_kw:
            raise ValueError("min_kw must not exceed requested_kw")
        return self


class Arrivals(_Model):
    ev: EvProfile | None = None
    rate: list[RateWindow] = Field(default_factory=list)
    explicit: list[ExplicitEv] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Arrivals:
        if self.rate and self.ev is None:
            raise ValueError("rate arrivals need an ev profile (arrivals.ev)")
        ordered = sorted(self.rate, key=lambda w: w.start)
        for a, b in itertools.pairwise(ordered):
            if b.start < a.end:
                raise ValueError(f"rate windows overlap: [{a.start:g}, {a.end:g}) and [{b.start:g}, {b.end:g})")
        return self


class OfflineEvent(_Model):
    """The substation drops off: its sessions stop at once, it stops reporting, its status turns offline."""

    type: Literal["offline"]
    at: Seconds
    substation: Id


class OnlineEvent(_Model):
    type: Literal["online"]
    at: Seconds
    substation: Id


class CapacityEvent(_Model):
    """The substation's physical capacity becomes ``capacity_kw`` (or ``capacity_pct`` of its nominal one) at
    ``at``. Its telemetry reports a lower capacity from ``at - notice_s`` (an operator's curtailment notice);
    a raise is reported when it happens, never earlier."""

    type: Literal["capacity"]
    at: Seconds
    substation: Id
    capacity_kw: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] | None = None
    capacity_pct: Annotated[float, Field(gt=0, le=1000)] | None = None
    notice_s: Seconds = 0.0

    @model_validator(mode="after")
    def _one(self) -> CapacityEvent:
        if (self.capacity_kw is None) == (self.capacity_pct is None):
            raise ValueError("give exactly one of capacity_kw and capacity_pct")
        return self


class LimitWindow(_Model):
    """One entry of a :class:`LimitsEvent`: at most ``limit_kw`` on the substation from ``start`` to ``end``."""

    start: Seconds
    end: Seconds
    limit_kw: Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]
    priority: Annotated[int, Field(ge=0, le=9)] = 0

    @model_validator(mode="after")
    def _ordered(self) -> LimitWindow:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class LimitsEvent(_Model):
    """At ``at`` the grid operator (``source``, e.g. a DSO) sends the substation's limit schedule: the ``entries``
    replace what that source sent before (the balancer's ``LimitSchedule``). The limits are the grid's: load above
    one in force counts as overload, whatever the substation's capacity."""

    type: Literal["limits"]
    at: Seconds
    substation: Id
    source: Id
    entries: Annotated[list[LimitWindow], Field(max_length=100)]


class BurstEvent(_Model):
    """``count`` EVs ask at the same instant (drawn from ``ev``, else from the arrivals' profile)."""

    type: Literal["burst"]
    at: Seconds
    count: Annotated[int, Field(ge=1, le=100_000)]
    ev: EvProfile | None = None


EventSpec = Annotated[OfflineEvent | OnlineEvent | CapacityEvent | LimitsEvent | BurstEvent,
                      Field(discriminator="type")]


class Scenario(_Model):
    """A whole replay scenario. ``start_hour`` is the time of day at t = 0 (for the daily curves)."""

    name: Id
    description: str
    duration_s: PositiveSeconds
    seed: int = 1
    start_hour: Annotated[float, Field(ge=0, lt=24)] = 0.0
    #: Simulation step: substations are stepped, sampled and the balancer ticked every ``step_s``.
    step_s: PositiveSeconds = 1.0
    telemetry: TelemetrySpec = Field(default_factory=TelemetrySpec)
    substations: Annotated[list[SubstationSpec], Field(min_length=1)]
    arrivals: Arrivals = Field(default_factory=Arrivals)
    events: list[EventSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        ids = [s.id for s in self.substations]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate substation ids: {', '.join(dup)}")
        ratio = self.telemetry.interval_s / self.step_s
        if abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(f"telemetry.interval_s ({self.telemetry.interval_s:g}) must be a multiple of "
                             f"step_s ({self.step_s:g})")
        late = [w for w in self.arrivals.rate if w.end > self.duration_s]
        late_at = [e.at for e in (*self.arrivals.explicit, *self.events) if e.at > self.duration_s]
        if late or late_at:
            raise ValueError(f"arrivals and events must lie within duration_s ({self.duration_s:g} s)")
        for i, event in enumerate(self.events):
            if isinstance(event, BurstEvent):
                if event.ev is None and self.arrivals.ev is None:
                    raise ValueError(f"events.{i}: a burst needs an ev profile (its own or arrivals.ev)")
            elif event.substation not in ids:
                raise ValueError(f"events.{i}: unknown substation {event.substation!r} (known: {', '.join(ids)})")
            if isinstance(event, CapacityEvent) and event.notice_s > event.at:
                raise ValueError(f"events.{i}: notice_s ({event.notice_s:g}) reaches before the start")
        explicit = [e.ev_id for e in self.arrivals.explicit if e.ev_id is not None]
        if len(explicit) != len(set(explicit)):
            raise ValueError("arrivals.explicit: ev_id values must be unique")
        return self

    def capacity_kw(self, substation_id: str) -> float:
        return next(s.capacity_kw for s in self.substations if s.id == substation_id)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Validate a scenario from YAML (or JSON) text; errors name the file and the place in it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a mapping (name:, duration_s:, substations:, ...)")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: invalid scenario:\n{_format_errors(exc)}") from None


def shipped_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A shipped scenario by name (``evening_peak``) or any scenario file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ScenarioError(f"no scenario {str(name_or_path)!r}: neither a file nor one of "
                            f"{', '.join(shipped_scenarios())}")
    return parse_scenario(path.read_text(encoding="utf-8"), str(path))


# ---------------------------------------------------------------------------------------------- EVs
@dataclass(frozen=True, slots=True)
class EvSpec:
    """One EV of a run: it asks at ``arrival`` and leaves at ``departure`` (seconds from the start)."""

    ev_id: str
    arrival: float
    departure: float
    requested_kw: float
    min_kw: float | None
    energy_kwh: float
    priority: int


def _pick(rng: random.Random, mix: Mapping[Any, float]) -> Any:
    values = list(mix)
    return rng.choices(values, weights=[mix[v] for v in values])[0]


def _draw(rng: random.Random, profile: EvProfile, ev_id: str, at: float) -> EvSpec:
    kw = float(_pick(rng, profile.requested_kw))
    min_kw = None if profile.min_kw_share is None else round(kw * profile.min_kw_share, 3)
    energy = round(rng.uniform(*profile.energy_kwh), 3)
    stay = rng.uniform(*profile.stay)
    return EvSpec(ev_id, at, at + stay, kw, min_kw, energy, int(_pick(rng, profile.priority)))


def generate_evs(scenario: Scenario, seed: int | None = None) -> list[EvSpec]:
    """Every EV of the scenario, ordered by arrival; the same for the same scenario and seed.

    Rate windows draw Poisson arrivals (exponential gaps); bursts add ``count`` EVs at one instant;
    explicit EVs are taken as given. Ids are ``EV_00001``... in arrival order unless given.
    """
    rng = random.Random(scenario.seed if seed is None else seed)
    drafts: list[tuple[float, int, EvProfile | ExplicitEv]] = []
    for window in sorted(scenario.arrivals.rate, key=lambda w: w.start):
        assert scenario.arrivals.ev is not None  # checked by Arrivals
        t = window.start
        while window.per_hour > 0:
            t += rng.expovariate(window.per_hour / 3600.0)
            if t >= window.end:
                break
            drafts.append((t, len(drafts), scenario.arrivals.ev))
    for event in scenario.events:
        if isinstance(event, BurstEvent):
            profile = event.ev or scenario.arrivals.ev
            assert profile is not None  # checked by Scenario
            drafts.extend((event.at, len(drafts) + i, profile) for i in range(event.count))
    drafts.extend((e.at, len(drafts) + i, e) for i, e in enumerate(scenario.arrivals.explicit))
    drafts.sort(key=lambda d: (d[0], d[1]))
    taken = {e.ev_id for e in scenario.arrivals.explicit if e.ev_id is not None}
    evs: list[EvSpec] = []
    number = 0
    for at, _, what in drafts:
        if isinstance(what, ExplicitEv) and what.ev_id is not None:
            ev_id = what.ev_id
        else:
            number += 1
            while f"EV_{number:05d}" in taken:
                number += 1
            ev_id = f"EV_{number:05d}"
        if isinstance(what, ExplicitEv):
            departure = what.departure if what.departure is not None else at + (what.stay or 0.0)
            evs.append(EvSpec(ev_id, at, departure, what.requested_kw, what.min_kw, what.energy_kwh, what.priority))
        else:
            evs.append(_draw(rng, what, ev_id, at))
    return evs
