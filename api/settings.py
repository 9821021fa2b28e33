"""API configuration: ``API_*`` plus the shared ``MQTT_*`` / ``GRID_*`` / ``LOG_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from grid_runtime.settings import GridSettings, MqttSettings


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: The operator's bearer token: every route, including drain, undrain and capacity. Unset, and no operator in
    #: ``tokens_file``: operator actions answer 503.
    token: SecretStr | None = None
    #: JSON file of scoped tokens, stored as SHA-256 hashes (api/tokens.py): EVs and charge-point backends that
    #: act only for their own EV ids, viewers (reads), more operators. Re-read when it changes.
    tokens_file: Path | None = None
    #: Reads (status, substations, sessions, EVs, queue, live feed) without a token. Off by default: they show
    #: which EV charges where and when (personal data) and how loaded each substation is; a deployment opens
    #: them deliberately (a control-room network), ``./gridctl run`` opens them on loopback for hand testing.
    #: /health, /ready, /metrics and the page itself are always open (probes, scrapers; no EV data).
    public_reads: bool = False
    #: How long POST /charge, DELETE /sessions/{id} and operator actions wait for the balancer's answer.
    request_timeout_s: float = Field(5.0, gt=0, le=120)
    #: A substation with no telemetry (or balancer state) for this long is shown stale.
    stale_after_s: float = Field(5.0, gt=0)
    #: /ready needs some substation data (state or telemetry) at most this old.
    ready_max_age_s: float = Field(10.0, gt=0)
    #: The live page gets at most one update per this interval (a full snapshot when anything changed).
    sse_interval_s: float = Field(0.5, ge=0.05, le=10)
    #: Snapshots waiting per live-page client; a slow client loses the oldest (each one is complete).
    sse_queue_size: int = Field(8, ge=1, le=1000)
    #: Concurrent live-page clients; more get 503.
    sse_max_clients: int = Field(100, ge=1, le=10_000)
    #: The live page's trends: at most one sample per substation this often, 15 minutes kept (GET /trends).
    trend_step_s: float = Field(10.0, ge=0.1, le=300)
    #: Latest assignments kept for the live page and /status.
    recent_assignments: int = Field(50, ge=1, le=1000)
    #: EVs whose latest answer is remembered for GET /evs/{ev_id} (least recently updated dropped first).
    ev_memory: int = Field(20_000, ge=100, le=1_000_000)
    #: Host names the API answers to (``["*"]``: any). The local run allows only loopback names, so a web page
    #: cannot read its open reads through DNS rebinding; in compose add the service name.
    allowed_hosts: list[str] = Field(default_factory=lambda: ["*"])
    #: The broker account that adds and removes substation and EV accounts at runtime (POST/DELETE /substations,
    #: /evs). Unset password: those endpoints answer 503. It administers the broker: keep it to the API.
    provisioner_username: str = "provisioner"
    provisioner_password: SecretStr | None = None
    #: The broker as clients reach it, told to new accounts (default ``mqtt://MQTT_HOST:MQTT_PORT``; in compose
    #: the API reaches ``mosquitto:1883`` while clients outside use the published port).
    mqtt_public_url: str | None = None
    #: MQTT client library. ``paho``: at 1,000 substations the API reads ~2,000 messages a second (telemetry and
    #: states); measured (bench live-page) paho took ~150 us of CPU a message, aiomqtt ~1 ms and fell behind.
    mqtt_client: Literal["aiomqtt", "paho"] = "paho"

    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    grid: GridSettings = Field(default_factory=GridSettings)
