"""Compatibility names: the policies now live in :mod:`balancer.core.policies` (one class per policy)."""

from __future__ import annotations

from balancer.core.policies.names import BASELINES, COMPRESSIBLE, POLICIES, SAFE_POLICIES, PolicyName
from balancer.core.policies.scan import baseline_candidates, compressible_room_w, fair_placement, least_utilised

LEAST_UTILISED = PolicyName.LEAST_UTILISED
WEIGHTED_FAIR = PolicyName.WEIGHTED_FAIR
DEADLINE = PolicyName.DEADLINE
ROUND_ROBIN = PolicyName.ROUND_ROBIN
POLLED_LEAST_LOADED = PolicyName.POLLED_LEAST_LOADED

__all__ = [
    "BASELINES", "COMPRESSIBLE", "DEADLINE", "LEAST_UTILISED", "POLICIES", "POLLED_LEAST_LOADED", "ROUND_ROBIN",
    "SAFE_POLICIES", "WEIGHTED_FAIR", "baseline_candidates", "compressible_room_w", "fair_placement",
    "least_utilised",
]
