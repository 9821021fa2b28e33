"""Base (non-EV) load of a substation over simulated time: a daily shape plus seeded AR(1) noise.

Pure: the result depends only on the simulated time, the parameters and the random generator the
caller passes in (never the wall clock), so a run is reproducible from its seed and tests can walk a
simulated day in microseconds.

The daily shape mixes two hourly profiles, scaled so the mix peaks at exactly ``peak_kw``:

* residential: night trough (~3-4 h), morning peak (~7-8 h), midday plateau, evening peak (~19 h);
* commercial: low at night, a plateau during office hours (~9-16 h), falling in the evening.

A mostly residential feeder therefore peaks in the evening, exactly when EVs come home to charge:
the situation the balancer exists for.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

__all__ = [
    "COMMERCIAL_PROFILE",
    "DAY_S",
    "RESIDENTIAL_PROFILE",
    "BaseLoad",
    "LoadCurveParams",
    "daily_shape",
    "expected_base_load_kw",
    "make_base_load",
]

DAY_S = 86_400.0

#: Hourly load as a fraction of the profile's own peak (hour 0 = midnight to 1 am).
RESIDENTIAL_PROFILE: tuple[float, ...] = (
    0.45, 0.38, 0.34, 0.32, 0.32, 0.36, 0.50, 0.70, 0.74, 0.62, 0.55, 0.53,
    0.56, 0.54, 0.51, 0.53, 0.62, 0.80, 0.94, 1.00, 0.96, 0.86, 0.70, 0.55,
)
COMMERCIAL_PROFILE: tuple[float, ...] = (
    0.35, 0.33, 0.32, 0.32, 0.33, 0.37, 0.48, 0.66, 0.85, 0.96, 1.00, 1.00,
    0.97, 0.98, 0.99, 0.97, 0.92, 0.82, 0.66, 0.55, 0.48, 0.43, 0.40, 0.37,
)


@dataclass(frozen=True, slots=True)
class LoadCurveParams:
    """How one substation's base load behaves.

    ``noise_pct`` is the stationary standard deviation of the AR(1) noise as % of ``peak_kw``;
    ``noise_tau_s`` its correlation time in simulated seconds (load wanders, it does not flicker).
    """

    peak_kw: float
    residential_share: float = 0.7
    noise_pct: float = 3.0
    noise_tau_s: float = 900.0

    def __post_init__(self) -> None:
        if not (self.peak_kw >= 0 and math.isfinite(self.peak_kw)):
            raise ValueError(f"peak_kw must be finite and >= 0, got {self.peak_kw!r}")
        if not 0.0 <= self.residential_share <= 1.0:
            raise ValueError(f"residential_share must be within [0, 1], got {self.residential_share!r}")
        if not (self.noise_pct >= 0 and math.isfinite(self.noise_pct)):
            raise ValueError(f"noise_pct must be finite and >= 0, got {self.noise_pct!r}")
        if not self.noise_tau_s > 0:
            raise ValueError(f"noise_tau_s must be > 0, got {self.noise_tau_s!r}")


def _interpolate(profile: tuple[float, ...], hour: float) -> float:
    """Cosine interpolation between hourly points: smooth, and never beyond its two neighbours."""
    i = math.floor(hour)
    frac = hour - i
    a = profile[i % 24]
    b = profile[(i + 1) % 24]
    w = (1.0 - math.cos(math.pi * frac)) / 2.0
    return a * (1.0 - w) + b * w


@functools.cache
def _mix_peak(residential_share: float) -> float:
    # Cosine interpolation is monotone between knots, so the daily maximum sits on an hourly knot.
    return max(
        residential_share * r + (1.0 - residential_share) * c
        for r, c in zip(RESIDENTIAL_PROFILE, COMMERCIAL_PROFILE, strict=True)
    )


def daily_shape(hour_of_day: float, residential_share: float = 0.7) -> float:
    """Load at ``hour_of_day`` (any real number; taken modulo 24) as a fraction of the daily peak (0-1]."""
    hour = hour_of_day % 24.0
    mix = (residential_share * _interpolate(RESIDENTIAL_PROFILE, hour)
           + (1.0 - residential_share) * _interpolate(COMMERCIAL_PROFILE, hour))
    return mix / _mix_peak(residential_share)


def expected_base_load_kw(sim_time_s: float, params: LoadCurveParams) -> float:
    """The noise-free base load at ``sim_time_s`` (seconds since simulated midnight of day 0)."""
    return params.peak_kw * daily_shape(sim_time_s / 3600.0, params.residential_share)


class BaseLoad:
    """Base load generator: call it with increasing simulated times to get kW.

    Holds the AR(1) noise state, so successive samples are correlated over ``noise_tau_s`` whatever
    the step size; asking for the same (or an earlier) time again returns the same noise.
    """

    __slots__ = ("_last_t", "_noise", "_rng", "params")

    def __init__(self, params: LoadCurveParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng
        sigma = params.noise_pct / 100.0
        self._noise = rng.gauss(0.0, sigma) if sigma > 0 else 0.0  # start in the stationary distribution
        self._last_t: float | None = None

    def __call__(self, sim_time_s: float) -> float:
        p = self.params
        sigma = p.noise_pct / 100.0
        if self._last_t is not None and sim_time_s > self._last_t and sigma > 0:
            phi = math.exp(-(sim_time_s - self._last_t) / p.noise_tau_s)
            self._noise = phi * self._noise + sigma * math.sqrt(1.0 - phi * phi) * self._rng.gauss(0.0, 1.0)
        if self._last_t is None or sim_time_s > self._last_t:
            self._last_t = sim_time_s
        shape = daily_shape(sim_time_s / 3600.0, p.residential_share)
        return max(0.0, p.peak_kw * (shape + self._noise))


def make_base_load(substation_id: str, capacity_kw: float, base_load_pct: float, seed: int) -> BaseLoad:
    """The base load of one substation, reproducible from ``seed``.

    Each substation gets its own generator (seeded from ``seed`` and its id, so adding a substation
    does not change the others) and its own residential/commercial mix (55-85 % residential), so
    substations do not move in lockstep.
    """
    rng = random.Random(f"{seed}:{substation_id}")
    share = rng.uniform(0.55, 0.85)
    return BaseLoad(LoadCurveParams(peak_kw=capacity_kw * base_load_pct / 100.0, residential_share=share), rng)
