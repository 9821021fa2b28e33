"""Settings of the substation agents process, from environment variables.

==============================  =========================================================  ==========================
Variable                        Meaning                                                    Default
==============================  =========================================================  ==========================
``SUBSTATIONS``                 ``id:capacity_kw`` list, one agent (and MQTT connection)   ``north:400,central:300,``
                                each                                                       ``south:250``
``SUBSTATION_INTERVAL_S``       real seconds between telemetry messages                    ``1.0``
``SIM_SPEEDUP``                 simulated seconds per real second                          ``1.0``
``SIM_START_HOUR``              simulated time of day at start (0-24)                      ``17``
``SUBSTATION_BASE_LOAD_PCT``    daily peak of the base load, % of capacity                 ``55``
``SUBSTATION_SEED``             seed of the base-load noise                                ``1``
``SUBSTATION_REGION``           the grid region of these agents: their topics and status   ``default``
``SUBSTATION_SCENARIO``         a replay scenario (file or shipped name): its substations  unset
                                and events instead of ``SUBSTATIONS`` and the daily
                                curve (see ``substation_agents/scenario_agents.py``)
``SUBSTATION_SCENARIO_START``   epoch seconds of the scenario's time 0                     process start
``MQTT_*``, ``LOG_*``, ...      :class:`~grid_runtime.settings.MqttSettings`,              see there
                                :class:`~grid_runtime.settings.GridSettings`
==============================  =========================================================  ==========================

With ``SUBSTATION_SCENARIO`` the scenario decides the substations, the start hour, the base loads and their
seed, and the telemetry interval (sped up by ``SIM_SPEEDUP``; ``SUBSTATION_INTERVAL_S`` overrides it).

``MQTT_USERNAME`` is ignored: each agent logs in as ``substation.<id>``. Its password is
``MQTT_PASSWORD`` (the same for all) or, when that is unset, derived per account from
``MQTT_ACCOUNT_SECRET``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from grid_protocol.ids import checked_id
from grid_protocol.messages import DEFAULT_REGION
from grid_runtime.settings import GridSettings, MqttSettings

__all__ = ["DEFAULT_SUBSTATIONS", "AgentSettings", "SubstationSpec", "parse_substations"]

DEFAULT_SUBSTATIONS = "north:400,central:300,south:250"
MAX_CAPACITY_KW = 1_000_000.0  # the contract's limit for capacity_kw


@dataclass(frozen=True, slots=True)
class SubstationSpec:
    substation_id: str
    capacity_kw: float


def parse_substations(value: str) -> tuple[SubstationSpec, ...]:
    """Parse ``id:capacity_kw[,id:capacity_kw...]``; raise :class:`ValueError` saying what is wrong."""
    specs: list[SubstationSpec] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        sid, sep, cap = item.partition(":")
        sid = sid.strip()
        if not sep:
            raise ValueError(f"{item!r}: expected id:capacity_kw, e.g. north:400")
        checked_id(sid, "substation id")
        try:
            capacity = float(cap)
        except ValueError:
            raise ValueError(f"{item!r}: capacity {cap.strip()!r} is not a number") from None
        if not 0 < capacity <= MAX_CAPACITY_KW:  # also false for NaN
            raise ValueError(f"{item!r}: capacity must be > 0 and <= {MAX_CAPACITY_KW:g} kW")
        specs.append(SubstationSpec(sid, capacity))
    if not specs:
        raise ValueError("no substations configured")
    ids = [s.substation_id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate substation ids: {', '.join(duplicates)}")
    return tuple(specs)


class AgentSettings(BaseSettings):
    """Everything ``python -m substation_agents`` reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    substations: Annotated[tuple[SubstationSpec, ...], NoDecode] = parse_substations(DEFAULT_SUBSTATIONS)
    substation_interval_s: float = Field(1.0, gt=0, le=3600)
    sim_speedup: float = Field(1.0, gt=0, le=1_000_000)
    sim_start_hour: float = Field(17.0, ge=0, lt=24)
    substation_base_load_pct: float = Field(55.0, ge=0, le=200)
    substation_seed: int = 1
    #: The grid region every agent of this process reports in its status (and its last will).
    substation_region: str = DEFAULT_REGION
    #: A replay scenario (path or shipped name): run its substations and play its events (see scenario.py).
    substation_scenario: str | None = None
    #: Epoch seconds at which the scenario's time 0 happens (default: when the process starts).
    substation_scenario_start: float | None = Field(None, ge=0)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    grid: GridSettings = Field(default_factory=GridSettings)

    @field_validator("substation_region")
    @classmethod
    def _region(cls, value: str) -> str:
        return checked_id(value, "region")

    @field_validator("substations", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_substations(value)
        if isinstance(value, Sequence) and all(isinstance(v, SubstationSpec) for v in value):
            return parse_substations(",".join(f"{v.substation_id}:{v.capacity_kw}" for v in value))
        return value
