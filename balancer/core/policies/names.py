"""The policies by name (the values are what ``BALANCER_POLICY`` and replay scenarios say)."""

from __future__ import annotations

from enum import StrEnum


class PolicyName(StrEnum):
    LEAST_UTILISED = "least-utilised"
    WEIGHTED_FAIR = "weighted-fair"
    DEADLINE = "deadline"
    ROUND_ROBIN = "round-robin"
    POLLED_LEAST_LOADED = "polled-least-loaded"


#: Real policies: they never exceed a limit.
SAFE_POLICIES = (PolicyName.LEAST_UTILISED, PolicyName.WEIGHTED_FAIR, PolicyName.DEADLINE)
#: Comparison baselines for the replay only: they ignore capacity, as the original HTTP design did.
BASELINES = (PolicyName.ROUND_ROBIN, PolicyName.POLLED_LEAST_LOADED)
POLICIES = SAFE_POLICIES + BASELINES
#: Policies that admit a request by squeezing running sessions toward their minimum.
COMPRESSIBLE = (PolicyName.WEIGHTED_FAIR, PolicyName.DEADLINE)
