"""Settings of the EV fleet / load tester (pydantic-settings): ``EV_*`` variables, CLI flags override them.

=========================  =======================================================================
``EV_COUNT``               distinct EV ids of a fleet (``EV_0001`` ... ``EV_<count>``), default 20
``EV_ARRIVAL_RATE``        fleet arrivals per second, default 1.0
``EV_ARRIVAL_MODE``        ``poisson`` (default) or ``fixed``
``EV_SPEEDUP``             simulated-time speed-up; set it to the agents' ``SIM_SPEEDUP`` (scales
                           early-release timing and how long an EV waits for ``completed``)
``EV_RETRY_AFTER_S``       re-send an unanswered request (same request_id) after this long, default 5
``EV_MAX_ATTEMPTS``        publishes of one request before it counts as never answered, default 6
``EV_TIMEOUT_S``           longest wait in the queue (then the EV releases), and slack past the expected
                           end of a charge before the EV gives up on ``completed``, default 60
``EV_ID_PREFIX``           default ``EV_``
``EV_RELEASE_EARLY_PCT``   share of charging EVs that leave before ``completed`` (a Release), default 10
``EV_CLIENT``              MQTT library: ``aiomqtt`` (default) or ``paho``
``EV_SEED``                random seed (unset: different every run)
``EV_KEEP_RECORDS``        an open-ended fleet (no ``--requests``) keeps only the last N request records
                           and latency samples (percentiles then describe the last N answers; counts stay
                           exact), default 10000. Finite runs keep everything.
``EV_RELEASE_AFTER_S``     load test: hold each session this many real seconds before releasing it
                           (default 0: at once; longer fills the substations, so requests queue)
``EV_API_URL``             load test through the HTTP API (``http://host:port``) instead of MQTT
``EV_API_TOKEN``           its bearer token (default ``API_TOKEN``): the operator's, or an EV token
                           covering the load tester's EV ids
``EV_REGION``              the grid region the EVs charge in: their request, release and assignment
                           topics are that region's (default ``default``: today's topics)
=========================  =======================================================================

Broker address and credentials come from ``MQTT_*`` (:class:`~grid_runtime.settings.MqttSettings`):
each EV logs in as its own id with ``MQTT_PASSWORD`` or, usually, a password derived from
``MQTT_ACCOUNT_SECRET``. ``GRID_TOPIC_PREFIX``/``LOG_*`` come from
:class:`~grid_runtime.settings.GridSettings`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from grid_protocol.ids import checked_id, is_valid_id
from grid_protocol.messages import DEFAULT_REGION
from grid_runtime.settings import GridSettings, MqttSettings


class EvSettings(BaseSettings):
    """``EV_*`` variables plus the embedded MQTT and grid settings."""

    model_config = SettingsConfigDict(env_prefix="EV_", extra="ignore")

    count: int = Field(20, ge=1, le=99_999)
    arrival_rate: float = Field(1.0, gt=0, le=100_000)
    arrival_mode: Literal["poisson", "fixed"] = "poisson"
    speedup: float = Field(1.0, gt=0, le=1e9)
    retry_after_s: float = Field(5.0, gt=0, le=3600)
    max_attempts: int = Field(6, ge=1, le=1000)
    timeout_s: float = Field(60.0, gt=0, le=7 * 86400)
    id_prefix: str = "EV_"
    release_early_pct: float = Field(10.0, ge=0, le=100)
    client: Literal["aiomqtt", "paho"] = "aiomqtt"
    seed: int | None = None
    keep_records: int = Field(10_000, ge=1, le=10_000_000)
    release_after_s: float = Field(0.0, ge=0, le=86_400)
    api_url: str | None = None
    api_token: SecretStr | None = None
    region: str = DEFAULT_REGION

    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    grid: GridSettings = Field(default_factory=GridSettings)

    @field_validator("id_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if value and not is_valid_id(value):
            raise ValueError("EV id prefix may only contain letters, digits, _ and -")
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        return checked_id(value, "region")
