"""Pure allocation core: plain data in, decisions (effects) out. No MQTT, no clock, no logging."""

from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.engine import Balancer, CoreConfig
from balancer.core.model import PendingRequest, Session, Substation
from balancer.core.policy import BASELINES, POLICIES, SAFE_POLICIES

__all__ = [
    "BASELINES",
    "POLICIES",
    "SAFE_POLICIES",
    "Balancer",
    "CoreConfig",
    "Effect",
    "PendingRequest",
    "Session",
    "Substation",
    "ToEv",
    "ToSubstation",
]
