"""What the simulated EVs ask for and when they arrive: pure and deterministic for a given seed.

* :class:`RequestMix` turns a random generator into realistic :class:`ChargeRequest` values;
* :func:`arrival_gaps` yields the time between arrivals (Poisson or fixed rate);
* :class:`EvIdPool` hands out EV ids (``EV_0001`` ...) and takes one back only after its EV left;
* :func:`parse_kw_mix`, :func:`parse_range` read the CLI forms ``7.4:3,11:4,22:2,50:1`` and ``10-60``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from grid_protocol.ids import is_valid_id
from grid_protocol.messages import ChargeRequest

ArrivalMode = Literal["poisson", "fixed"]

#: Typical charger powers (kW) and how often they occur: AC 7.4/11/22, DC 50.
DEFAULT_KW_MIX: tuple[tuple[float, float], ...] = ((7.4, 3.0), (11.0, 4.0), (22.0, 2.0), (50.0, 1.0))


def parse_kw_mix(text: str) -> tuple[tuple[float, float], ...]:
    """``"7.4:3,11:4,22"`` -> ``((7.4, 3.0), (11.0, 4.0), (22.0, 1.0))`` (weight 1 when omitted)."""
    mix: list[tuple[float, float]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        kw_text, _, weight_text = item.partition(":")
        kw = float(kw_text)
        weight = float(weight_text) if weight_text else 1.0
        if not (0 < kw <= 1000) or not math.isfinite(kw):
            raise ValueError(f"power {kw_text!r} must be in (0, 1000] kW")
        if not (weight > 0) or not math.isfinite(weight):
            raise ValueError(f"weight {weight_text!r} must be positive")
        mix.append((kw, weight))
    if not mix:
        raise ValueError(f"empty power mix {text!r}")
    return tuple(mix)


def parse_range(text: str) -> tuple[float, float]:
    """``"10-60"`` -> ``(10.0, 60.0)``; a single number ``"5"`` -> ``(5.0, 5.0)``."""
    lo_text, sep, hi_text = text.strip().partition("-")
    lo = float(lo_text)
    hi = float(hi_text) if sep else lo
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi < lo:
        raise ValueError(f"range {text!r} must be LOW-HIGH with 0 < LOW <= HIGH")
    return lo, hi


@dataclass(frozen=True, slots=True)
class RequestMix:
    """The shape of the charge requests a fleet sends."""

    kw_mix: tuple[tuple[float, float], ...] = DEFAULT_KW_MIX
    energy_kwh: tuple[float, float] = (10.0, 60.0)
    duration_minutes: tuple[float, float] = (30.0, 240.0)
    duration_pct: float = 20.0  # share of requests by duration instead of energy
    priority_pct: float = 15.0  # share of requests with a priority above 0
    min_kw_pct: float = 20.0  # share of requests that name a minimum acceptable power

    def __post_init__(self) -> None:
        for name in ("duration_pct", "priority_pct", "min_kw_pct"):
            value = getattr(self, name)
            if not 0 <= value <= 100:
                raise ValueError(f"{name} must be within 0..100, got {value}")

    def make(self, rng: random.Random, ev_id: str, request_id: str) -> ChargeRequest:
        """One request; the same ``rng`` state gives the same request."""
        kws = [kw for kw, _ in self.kw_mix]
        weights = [w for _, w in self.kw_mix]
        requested_kw = rng.choices(kws, weights)[0]
        energy: float | None = None
        duration: float | None = None
        if rng.random() * 100 < self.duration_pct:
            duration = round(rng.uniform(*self.duration_minutes), 1)
        else:
            energy = round(rng.uniform(*self.energy_kwh), 2)
        priority = 0
        if rng.random() * 100 < self.priority_pct:
            # Most urgent requests are mildly urgent; 9 is rare (a fleet vehicle, an emergency).
            priority = rng.choices((1, 2, 3, 5, 9), (5, 4, 3, 2, 1))[0]
        min_kw: float | None = None
        if rng.random() * 100 < self.min_kw_pct:
            min_kw = round(min(requested_kw, max(1.4, requested_kw * rng.choice((0.25, 0.5)))), 2)
        return ChargeRequest(
            requested_kw=requested_kw, request_id=request_id, ev_id=ev_id,
            energy_kwh=energy, duration_minutes=duration, min_kw=min_kw, priority=priority,
        )


def expected_charge_s(request: ChargeRequest, granted_kw: float | None, speedup: float) -> float:
    """Simulated seconds until the session should complete at ``granted_kw`` (agents' ``SIM_SPEEDUP``)."""
    speedup = max(speedup, 1e-9)
    candidates: list[float] = []
    if request.duration_minutes is not None:
        candidates.append(request.duration_minutes * 60)
    if request.energy_kwh is not None and granted_kw:
        candidates.append(request.energy_kwh / granted_kw * 3600)
    if not candidates:
        return 0.0
    return min(candidates) / speedup


def arrival_gaps(rate_per_s: float, mode: ArrivalMode, rng: random.Random) -> Iterator[float]:
    """Endless seconds between consecutive arrivals: exponential (Poisson process) or constant."""
    if not (rate_per_s > 0) or not math.isfinite(rate_per_s):
        raise ValueError(f"arrival rate must be positive, got {rate_per_s}")
    while True:
        yield rng.expovariate(rate_per_s) if mode == "poisson" else 1.0 / rate_per_s


def ramp_offsets(workers: int, ramp_up_s: float) -> list[float]:
    """Start times of ``workers`` spread evenly over ``ramp_up_s`` (the first at 0)."""
    if workers <= 0:
        return []
    if ramp_up_s <= 0 or workers == 1:
        return [0.0] * workers
    step = ramp_up_s / workers
    return [round(i * step, 6) for i in range(workers)]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` shares differing by at most one, larger shares first."""
    if parts <= 0:
        return []
    base, extra = divmod(max(total, 0), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def ev_ids(prefix: str, count: int, start: int = 1) -> list[str]:
    """``EV_0001``, ``EV_0002``, ... (zero-padded to 4 digits, wider when needed)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    width = max(4, len(str(start + count - 1)))
    ids = [f"{prefix}{i:0{width}d}" for i in range(start, start + count)]
    bad = [i for i in ids[:1] + ids[-1:] if not is_valid_id(i)]
    if bad:
        raise ValueError(f"EV id {bad[0]!r} is not a valid id (letters, digits, _ and -, at most 64)")
    return ids


@dataclass(slots=True)
class EvIdPool:
    """EV ids that are free to arrive: the lowest free id first; an id comes back only after its EV left."""

    ids: Sequence[str]
    _free: list[tuple[int, str]] = field(init=False)
    _busy: set[str] = field(init=False, default_factory=set)
    _index: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("EV ids must be distinct")
        self._free = [(i, ev) for i, ev in enumerate(self.ids)]
        heapq.heapify(self._free)
        self._index = {ev: i for i, ev in enumerate(self.ids)}

    def acquire(self) -> str | None:
        """A free id (now busy), or ``None`` when every EV is on the road."""
        if not self._free:
            return None
        _, ev = heapq.heappop(self._free)
        self._busy.add(ev)
        return ev

    def release(self, ev_id: str) -> None:
        if ev_id not in self._busy:
            raise KeyError(f"{ev_id!r} is not in use")
        self._busy.remove(ev_id)
        heapq.heappush(self._free, (self._index[ev_id], ev_id))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def busy(self) -> int:
        return len(self._busy)
