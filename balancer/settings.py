"""Balancer configuration (``BALANCER_*`` plus the shared ``MQTT_*``/``GRID_*`` variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from grid_runtime.settings import GridSettings, MqttSettings


class BalancerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BALANCER_", extra="ignore")

    safety_margin_pct: float = Field(5.0, ge=0, lt=100)
    stale_after_s: float = Field(5.0, gt=0)
    lost_after_s: float = Field(30.0, gt=0)
    queue_max: int = Field(10_000, ge=0)
    default_min_kw: float = Field(1.4, gt=0)
    answer_ttl_s: float = Field(3600.0, gt=0)
    overtake_guard_s: float = Field(30.0, ge=0)
    #: least-utilised | weighted-fair | deadline; the baselines round-robin and polled-least-loaded ignore
    #: capacity and run only with BALANCER_ALLOW_BASELINES=true (for comparisons, never on a real grid).
    policy: Literal["least-utilised", "weighted-fair", "deadline", "round-robin", "polled-least-loaded"] = (
        "least-utilised")
    allow_baselines: bool = False
    hysteresis_kw: float = Field(1.0, ge=0)
    min_hold_s: float = Field(10.0, ge=0)
    #: Every command batch says valid_until = now + lease_s; renewed every lease_s / 3. An agent that hears
    #: nothing by then drops its sessions to 0 kW.
    lease_s: float = Field(10.0, gt=0)
    rebalance_interval_s: float = Field(1.0, gt=0)  # a substation is re-evaluated at least this often
    #: Limit schedules are planned with this far ahead, so sessions are reduced before a limit starts; the balancer
    #: uses at least lease_s + rebalance_interval_s (a balancer that dies just then leaves nothing past the start).
    limit_lead_s: float = Field(30.0, ge=0)
    queue_update_interval_s: float = Field(5.0, gt=0)  # queued EVs hear new positions/ETAs at most this often
    poll_interval_s: float = Field(5.0, gt=0)  # polled-least-loaded's snapshot age (baseline)
    tick_interval_s: float = Field(0.5, gt=0)
    #: retained substation/{id}/state and balancer/queue are republished when they change, at most this often
    state_interval_s: float = Field(1.0, gt=0)
    stats_interval_s: float = Field(30.0, gt=0)
    max_payload_bytes: int = Field(4096, ge=256, le=65536)
    #: After a start, EV and operator input waits (in order) until the grid is known: every substation that was
    #: online has re-announced its sessions to this instance, or this long has passed (see balancer/startup.py).
    startup_wait_s: float = Field(5.0, ge=0)
    #: Input held during the startup wait; beyond, a request is refused with reason "starting" (retry later).
    startup_buffer_max: int = Field(5000, ge=0)
    #: Per-EV budget on its request/release topics, and per-substation budget on its telemetry topic: messages
    #: per second on average, bursts of ..._burst; a refused message costs 4. The excess is shed unread, counted
    #: and answered (rate_limited) at most once a second per sender. A real EV sends a few messages a minute (a
    #: load tester's worker, back to back, up to the budget); a real agent one a second.
    ev_rate_per_s: float = Field(50.0, gt=0)
    ev_burst: float = Field(100.0, ge=1)
    telemetry_rate_per_s: float = Field(10.0, gt=0)
    telemetry_burst: float = Field(20.0, ge=1)
    #: paho is the default on the hot path (see grid_runtime.mqtt and bench/).
    mqtt_client: Literal["paho", "aiomqtt"] = "paho"

    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    grid: GridSettings = Field(default_factory=GridSettings)
