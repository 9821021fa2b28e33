"""Balancer configuration (``BALANCER_*`` plus the shared ``MQTT_*``/``GRID_*`` variables)."""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from balancer.core.config import CoreConfig
from grid_protocol.ids import ID_PATTERN, is_valid_id
from grid_protocol.messages import DEFAULT_REGION
from grid_runtime.settings import GridSettings, MqttSettings

_CORE_FIELDS = tuple(f.name for f in dataclasses.fields(CoreConfig))


class _FlatCoreEnv(PydanticBaseSettingsSource):
    """``BALANCER_<FIELD>`` for each field of the nested ``core`` (the names the balancer always had)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {key.upper(): value for key, value in os.environ.items()}
        core = {name: env[f"BALANCER_{name.upper()}"] for name in _CORE_FIELDS if f"BALANCER_{name.upper()}" in env}
        return {"core": core} if core else {}


class BalancerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BALANCER_", extra="ignore")

    #: The allocation core's settings (one source: ``balancer.core.CoreConfig``). Set from the flat
    #: ``BALANCER_<FIELD>`` names (BALANCER_POLICY, BALANCER_SAFETY_MARGIN_PCT, ...) or flat keyword arguments.
    #: Its ``offline_grace_s`` is ``lease_s`` in the service (an agent that reconnects within its lease keeps
    #: its sessions).
    core: CoreConfig = Field(default_factory=CoreConfig)
    #: Every command batch says valid_until = now + lease_s; renewed every lease_s / 3. An agent that hears
    #: nothing by then drops its sessions to 0 kW.
    lease_s: float = Field(10.0, gt=0)
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
    #: Operator settings (drains, capacity limits) that survive a restart, in single-node mode: this JSON file
    #: (replaced atomically on every accepted control command; "" keeps them in memory only). In cluster mode
    #: they live in NATS KV instead (bucket ``grid_operator``). See balancer/operator_store.py.
    state_file: str = "state/operator-settings.json"
    #: Cluster mode: NATS servers (comma list of ``nats://host:port``). Set, each region is owned under a lease in
    #: NATS KV (bucket ``grid_leases``, held ``lease_s``, renewed every ``lease_s / 3``; its revision is the epoch
    #: on every command batch) and the region's MQTT session is connected only while the lease is held; a standby
    #: process takes over when the key expires. Unset: single-node mode, one owner, no lease.
    nats_urls: str | None = None
    #: Replicas of the KV buckets (the cluster's size, at most 3): a lease must outlive the loss of a node.
    nats_replicas: int = Field(1, ge=1, le=5)
    #: paho is the default on the hot path (see grid_runtime.mqtt and bench/).
    mqtt_client: Literal["paho", "aiomqtt"] = "paho"
    #: ``BALANCER_REGIONS``: the regions this process owns (comma list). One region service each: its own core,
    #: startup gate, agent leases, retained status and MQTT session (account ``balancer`` for ``default``,
    #: ``<MQTT_USERNAME>.<region>`` for any other, same password; see :meth:`region_mqtt`).
    regions: Annotated[tuple[str, ...], NoDecode] = (DEFAULT_REGION,)

    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    grid: GridSettings = Field(default_factory=GridSettings)

    @field_validator("regions", mode="before")
    @classmethod
    def _split_regions(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        regions = tuple(value)
        if not regions:
            raise ValueError("at least one region")
        bad = [r for r in regions if not isinstance(r, str) or not is_valid_id(r)]
        if bad:
            raise ValueError(f"{bad!r}: a region must match {ID_PATTERN}")
        if len(set(regions)) != len(regions):
            raise ValueError(f"a region is listed twice in {','.join(regions)}")
        return regions

    def region_mqtt(self, region: str) -> tuple[MqttSettings, str]:
        """The MQTT settings and client id of ``region``'s session. The default region keeps today's account and
        client id (``balancer``); region R logs in as ``<username>.R`` (``balancer.R``: the broker takes the
        username as client id, one session per region), or with client id ``balancer-R`` without accounts."""
        username = self.mqtt.username
        if region == DEFAULT_REGION:
            return self.mqtt, username or "balancer"
        if username is None:
            return self.mqtt, f"balancer-{region}"
        regional = f"{username}.{region}"
        return self.mqtt.model_copy(update={"username": regional}), regional

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FlatCoreEnv(settings_cls), dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _gather_core(cls, data: Any) -> Any:
        """Flat keyword arguments (``BalancerSettings(policy=...)``) go to ``core`` too, over the environment."""
        if not isinstance(data, dict) or not any(name in data for name in _CORE_FIELDS):
            return data
        data = dict(data)
        given = data.get("core") or {}
        core = dataclasses.asdict(given) if isinstance(given, CoreConfig) else dict(given)
        core.update({name: data.pop(name) for name in _CORE_FIELDS if name in data})
        data["core"] = core
        return data
