"""Percentiles, defined once for every report (EV fleet, replay metrics, benchmarks): numpy's nearest rank.

Nearest rank (numpy's ``inverted_cdf``): the smallest sample with at least ``p`` % of the samples at or below it.
Always a measured value, never an interpolation between two; for the samples 1..10 the median is 5.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["percentile", "percentiles"]


def percentiles(values: Iterable[float], ps: Sequence[float]) -> list[float | None]:
    """The nearest-rank percentiles ``ps`` (each in (0, 100]) of ``values``, in any order; all ``None`` for none."""
    for p in ps:
        if not 0 < p <= 100:
            raise ValueError(f"percentile {p} is not in (0, 100]")
    data = np.fromiter(values, dtype=float)
    if data.size == 0:
        return [None for _ in ps]
    return [float(v) for v in np.percentile(data, ps, method="inverted_cdf")]


def percentile(values: Iterable[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (``p`` in (0, 100]) of ``values``; ``None`` for no values.

    ``percentile([1, 2, 3, 4], 50) == 2``, ``percentile([1, 2, 3, 4], 51) == 3``.
    """
    return percentiles(values, (p,))[0]
