"""Settings every service shares, read from environment variables (pydantic-settings).

Service-specific settings classes embed these so one process is configured the same way locally,
in tests and in docker compose.
"""

from __future__ import annotations

import sys
from typing import Literal, Protocol, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from grid_runtime.logs import configure_logging


class MqttSettings(BaseSettings):
    """``MQTT_*`` variables: where the broker is and who we are to it."""

    model_config = SettingsConfigDict(env_prefix="MQTT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    #: CA file for a TLS listener (``broker/tls/make-certs.sh``); unset = plain TCP.
    tls_ca: str | None = None
    #: Secret from which simulators derive per-account passwords (``grid_runtime.credentials.derive_password``).
    account_secret: str | None = None
    #: Broker session kept this long after a disconnect so QoS 1 messages wait for us. On MQTT 3.1.1 (no session
    #: expiry) any value above 0 means a persistent session (clean session false), kept as long as the broker
    #: keeps sessions (Mosquitto ``persistent_client_expiration``, NATS: until the client comes back clean).
    session_expiry_s: int = Field(3600, ge=0)
    #: ``5`` (default) or ``3.1.1`` (NATS, or any broker without MQTT 5): docs/protocol.md "MQTT 3.1.1" says what
    #: degrades (no response topics, message expiry, retain-as-published, PUBACK reason codes) and what replaces it.
    protocol: Literal["5", "3.1.1"] = "5"
    #: Several brokers (nodes of one cluster) as ``host:port,host:port``; overrides ``host``/``port`` when set. A
    #: lost or refused connection moves to the next one (round robin; back-off only after a full round).
    hosts: str = ""

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        _parse_hosts(value)
        return value

    @property
    def mqtt5(self) -> bool:
        return self.protocol == "5"

    def addresses(self) -> list[tuple[str, int]]:
        """The brokers to try, in order: ``hosts`` when set, else ``host``/``port``."""
        return _parse_hosts(self.hosts) or [(self.host, self.port)]


def _parse_hosts(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` (an IPv6 host in brackets: ``[::1]:1883``) as a list; ValueError if malformed."""
    out: list[tuple[str, int]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"broker address {item!r} is not host:port (port 1-65535)")
        out.append((host, int(port)))
    return out


class MetricsSettings(BaseSettings):
    """``METRICS_*``: where a service serves Prometheus ``/metrics``."""

    model_config = SettingsConfigDict(env_prefix="METRICS_", extra="ignore")

    enabled: bool = True
    host: str = "127.0.0.1"
    #: None: the service's own default port (balancer 9101, agents 9102, EV fleet 9103, recorder 9104);
    #: 0: any free port (tests), logged as ``metrics_listening``.
    port: int | None = Field(None, ge=0, le=65535)


class GridSettings(BaseSettings):
    """``GRID_*`` and ``LOG_*`` variables common to all services."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    grid_topic_prefix: str = "grid/v1"
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    #: Append logs to this file instead of stderr (``gridlb run`` keeps the terminal for the fleet's live line).
    log_file: str | None = None
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)


class _ServiceSettings(Protocol):
    grid: GridSettings


_S = TypeVar("_S", bound=_ServiceSettings)


def load_settings(cls: type[_S]) -> _S | None:
    """A service's settings from the environment, with its logging configured from them (``LOG_*``).

    On a bad value print what is wrong to stderr and return ``None`` (the service's CLI then exits 2), so a
    misconfigured service says why instead of a traceback.
    """
    try:
        settings = cls()
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return None
    grid = settings.grid
    configure_logging(grid.log_level, grid.log_format, grid.log_file)
    return settings
