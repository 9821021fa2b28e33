"""Pure allocation core: plain data in, decisions (effects) out. No MQTT, no clock, no logging.

Layout: ``engine.Balancer`` is a thin façade over the events; the jobs live in modules of their own:
``ledger`` (idempotency), ``placement``, ``rebalancing``, ``queue_service``, ``liveness`` (substation
telemetry/status/silence), ``agent_events`` (session events, adoption), ``ev_requests``, ``control`` (operator),
``coalescing``; ``sessions`` records a session's life; ``state`` holds the shared data; ``policies/`` one class per
policy behind the ``Policy`` protocol; ``config.CoreConfig`` the settings (nested in ``BalancerSettings``).
"""

from balancer.core.config import CoreConfig
from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.engine import Balancer
from balancer.core.model import OperatorSettings, PendingRequest, Session, Substation
from balancer.core.policies import BASELINES, POLICIES, SAFE_POLICIES, Policy, PolicyName

__all__ = [
    "BASELINES",
    "POLICIES",
    "SAFE_POLICIES",
    "Balancer",
    "CoreConfig",
    "Effect",
    "OperatorSettings",
    "PendingRequest",
    "Policy",
    "PolicyName",
    "Session",
    "Substation",
    "ToEv",
    "ToSubstation",
]
