"""What the routes share: settings, the state store, the MQTT bridge, the live hub, the metrics, the tokens and the
provisioner of broker accounts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from api.live import LiveHub
from api.metrics import ApiMetrics
from api.mqtt_bridge import Bridge
from api.settings import ApiSettings
from api.state import StateStore
from api.tokens import TokenStore
from broker.provisioning import Provisioner
from grid_runtime.ratelimit import RateLimitedLog


@dataclass
class AppContext:
    settings: ApiSettings
    store: StateStore
    bridge: Bridge
    hub: LiveHub
    metrics: ApiMetrics
    tokens: TokenStore
    #: refused credentials: logged at most every 10 s per reason (a guessing client must not flood the log)
    auth_log: RateLimitedLog
    clock: Callable[[], float] = time.time
    #: broker accounts at runtime; None when API_PROVISIONER_PASSWORD is unset
    provisioner: Provisioner | None = None
    started_monotonic: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return self.clock()


async def get_ctx(request: Request) -> AppContext:  # async: no threadpool hop per request
    ctx: AppContext = request.app.state.ctx
    return ctx
