"""Per-account MQTT passwords derived from one secret: the simulators' and the broker's shared convention.

The broker's account writer (``broker.accounts``) and every client (through :func:`mqtt_password`) derive the
same password from ``MQTT_ACCOUNT_SECRET`` and the username, so fleets of EVs and substations log in with
distinct passwords while the operator keeps a single secret. Real deployments issue independent credentials.
"""

from __future__ import annotations

import hashlib
import hmac

from grid_runtime.settings import MqttSettings

__all__ = ["derive_password", "mqtt_password"]


def derive_password(secret: str, username: str) -> str:
    """Per-account password: the first 32 hex chars of HMAC-SHA256(secret, username)."""
    if not secret:
        raise ValueError("secret must not be empty")
    return hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def mqtt_password(settings: MqttSettings) -> str | None:
    """The password a client logs in with: the explicit one, else derived from the account secret, else none."""
    if settings.password is not None:
        return settings.password
    if settings.account_secret and settings.username:
        return derive_password(settings.account_secret, settings.username)
    return None
