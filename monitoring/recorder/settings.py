"""Recorder configuration: ``INFLUX_*`` (where to write), ``RECORDER_*`` (buffering, batching, back-off)
plus the shared ``MQTT_*``, ``GRID_*``, ``LOG_*`` and ``METRICS_*`` variables.

The MQTT account defaults to ``recorder`` (read-only under the topic prefix): the recorder never publishes.
The defaults suit a local InfluxDB 2 (``http://127.0.0.1:8086``); VictoriaMetrics accepts the same writes
and ignores the token, org and bucket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from grid_runtime.settings import GridSettings, MqttSettings


class InfluxSettings(BaseSettings):
    """``INFLUX_*``: the InfluxDB v2 write endpoint."""

    model_config = SettingsConfigDict(env_prefix="INFLUX_", extra="ignore")

    url: str = "http://127.0.0.1:8086"
    token: SecretStr = SecretStr("")
    #: Read the token from this file instead (docker compose: a write-only token made by
    #: ``python -m monitoring.influx_tokens``, never the admin's).
    token_file: Path | None = None
    org: str = "gridlb"
    bucket: str = "gridlb"
    #: One HTTP write may take this long; it also bounds how long a shutdown can wait for one.
    timeout_s: float = Field(5.0, gt=0, le=300)
    gzip: bool = False

    @model_validator(mode="after")
    def _token_from_file(self) -> InfluxSettings:
        if self.token_file is not None:
            try:
                self.token = SecretStr(self.token_file.read_text(encoding="utf-8").strip())
            except OSError as exc:
                raise ValueError(f"INFLUX_TOKEN_FILE {self.token_file}: {exc.strerror}") from None
        return self


class RecorderSettings(BaseSettings):
    """``RECORDER_*``: the bounded buffer, batching and retry schedule."""

    model_config = SettingsConfigDict(env_prefix="RECORDER_", extra="ignore")

    #: Points kept in memory while the database is slow or down; beyond this the oldest are dropped (counted).
    buffer_max_points: int = Field(100_000, ge=1)
    batch_size: int = Field(5_000, ge=1, le=100_000)
    #: A partial batch is written at least this often.
    flush_interval_s: float = Field(1.0, gt=0, le=3600)
    #: Failed writes are retried after backoff_min_s, doubling up to backoff_max_s.
    backoff_min_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    #: On SIGINT/SIGTERM, keep writing what is buffered for at most this long; the rest is counted and logged.
    shutdown_timeout_s: float = Field(5.0, ge=0, le=600)
    #: At most one "dropping" / "bad payload" log line per this many seconds (each says how many since).
    log_interval_s: float = Field(10.0, gt=0)
    #: paho costs ~5x less CPU per message than aiomqtt (grid_runtime.mqtt); the recorder reads every message.
    mqtt_client: Literal["paho", "aiomqtt"] = "paho"

    influx: InfluxSettings = Field(default_factory=InfluxSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    grid: GridSettings = Field(default_factory=GridSettings)

    @model_validator(mode="after")
    def _check(self) -> RecorderSettings:
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("RECORDER_BACKOFF_MAX_S must be >= RECORDER_BACKOFF_MIN_S")
        if self.mqtt.username is None:
            self.mqtt = self.mqtt.model_copy(update={"username": "recorder"})
        return self
