"""The core's settings: one typed source, nested as ``core`` in :class:`balancer.settings.BalancerSettings`.

A pydantic dataclass: it stays a plain dataclass for the core (``dataclasses.replace``/``fields`` work, no
I/O) while its bounds are checked once, wherever it is built (environment, replay scenario, test).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from balancer.core.policies.names import POLICIES, PolicyName

Percent = Annotated[float, Field(ge=0, lt=100)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


@dataclass(slots=True)
class CoreConfig:
    safety_margin_pct: Percent = 5.0
    stale_after_s: Positive = 5.0
    lost_after_s: Positive = 30.0
    queue_max: Annotated[int, Field(ge=0)] = 10_000
    default_min_kw: Positive = 1.4
    answer_ttl_s: Positive = 3600.0
    answers_max: Annotated[int, Field(ge=0)] = 200_000
    #: A waiting request may be overtaken by later ones that fit, until it has waited this long; then
    #: capacity is held for it (nobody behind it is placed), so a large request cannot starve.
    overtake_guard_s: NonNegative = 30.0
    #: the baselines (round-robin, polled-least-loaded) ignore capacity and run only with ``allow_baselines``
    #: (replays, never a real grid).
    policy: PolicyName = PolicyName.LEAST_UTILISED
    allow_baselines: bool = False
    #: grant changes smaller than this are not made (unless needed to stay within the limit) ...
    hysteresis_kw: NonNegative = 1.0
    #: ... nor within this long of the session's last change: noise in telemetry must not make power flap.
    min_hold_s: NonNegative = 10.0
    #: The band kept free below the limit (and the smallest raise) is the base-load noise measured per substation:
    #: the range of its uncontrolled load within one hold time (``min_hold_s``), held and decaying over this
    #: long; until one hold time is measured, ``hysteresis_kw``.
    noise_decay_s: Positive = 300.0
    #: ``deadline`` orders sessions by laxity (time to spare at full power) rounded down to this step, so that
    #: two sessions of almost equal laxity do not swap power back and forth as their laxities cross.
    laxity_step_s: Positive = 1800.0
    rebalance_interval_s: Positive = 1.0  # a substation is re-evaluated at least this often
    poll_interval_s: Positive = 5.0  # polled-least-loaded's snapshot age (baseline)
    queue_update_interval_s: Positive = 5.0  # queued EVs hear new positions/ETAs at most this often
    #: An offline substation (its last will, or a clean shutdown) keeps its sessions this long before they are
    #: revoked and re-queued: an agent that reconnects within its lease (the service sets this to the lease)
    #: keeps charging, and nothing is placed twice meanwhile (the power stays counted). 0: revoke at once.
    offline_grace_s: NonNegative = 10.0
    #: Limit schedules: plan with the lowest scheduled limit from now to this far ahead, so sessions have been
    #: reduced when a limit starts (the service uses at least the lease plus a rebalance interval: a balancer
    #: that dies just then leaves nothing running past the start). ``BALANCER_LIMIT_LEAD_S``.
    limit_lead_s: NonNegative = 30.0

    @field_validator("policy", mode="before")
    @classmethod
    def _known_policy(cls, value: object) -> object:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(POLICIES)}")
        return value
