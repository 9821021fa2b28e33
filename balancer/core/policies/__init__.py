"""Balancing policies: one class per policy behind the :class:`Policy` protocol, chosen by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from balancer.core.policies.base import Policy
from balancer.core.policies.baselines import PolledLeastLoaded, RoundRobin
from balancer.core.policies.fair import Deadline, WeightedFair
from balancer.core.policies.least_utilised import LeastUtilised
from balancer.core.policies.names import BASELINES, COMPRESSIBLE, POLICIES, SAFE_POLICIES, PolicyName

if TYPE_CHECKING:
    from balancer.core.config import CoreConfig

_CLASSES: dict[PolicyName, type[LeastUtilised | WeightedFair | Deadline | RoundRobin | PolledLeastLoaded]] = {
    PolicyName.LEAST_UTILISED: LeastUtilised,
    PolicyName.WEIGHTED_FAIR: WeightedFair,
    PolicyName.DEADLINE: Deadline,
    PolicyName.ROUND_ROBIN: RoundRobin,
    PolicyName.POLLED_LEAST_LOADED: PolledLeastLoaded,
}


def make_policy(config: CoreConfig) -> Policy:
    """The configured policy. Baselines ignore capacity: only with ``allow_baselines`` (replays)."""
    name = PolicyName(config.policy)
    if name in BASELINES and not config.allow_baselines:
        raise ValueError(f"{name.value!r} is a comparison baseline that ignores capacity; "
                         "it runs only with allow_baselines (replays, never a real grid)")
    return _CLASSES[name](config)


__all__ = ["BASELINES", "COMPRESSIBLE", "POLICIES", "SAFE_POLICIES", "Policy", "PolicyName", "make_policy"]
