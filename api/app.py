"""The FastAPI application: :func:`create_app` wires settings, state store, MQTT bridge, live hub and metrics.

The store and bridge exist from construction on (routes answer even before the broker is reached);
the lifespan connects to the broker and starts the live hub, and closes both on shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from api import VERSION, problems
from api.context import AppContext
from api.live import LiveHub
from api.metrics import ApiMetrics, MetricsMiddleware
from api.mqtt_bridge import Bridge
from api.problems import PROBLEM_MEDIA_TYPE
from api.routes import accounts, charge, limits, live, metrics, operator, status
from api.settings import ApiSettings
from api.state import StateStore
from api.tokens import TokenStore
from broker.provisioning import DynsecProvisioner
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import Transport, make_transport
from grid_runtime.ratelimit import RateLimitedLog

log = get_logger("api")

DESCRIPTION = """
Status API and live page of the Smart Grid Load Balancer. Everything shown is learnt from MQTT (the
balancer's retained substation and queue state, retained statuses, live telemetry and assignments), so
replicas agree and a restarted API answers at once. `POST /charge`, `DELETE /sessions/{id}` and the
operator actions go to the balancer over MQTT and return its answer; `POST`/`DELETE /substations` and `/evs` add
and remove broker accounts at runtime. Errors are RFC 9457 problem details (`application/problem+json`). Guide with
curl examples: `docs/api.md`.
"""


def create_app(settings: ApiSettings | None = None, *, transport: Transport | None = None,
               clock: Callable[[], float] = time.time, provisioner_transport: Transport | None = None) -> FastAPI:
    """The app; raises :class:`~api.tokens.TokenFileError` when ``API_TOKENS_FILE`` cannot be used.
    ``provisioner_transport``: the provisioner's connection (default: one made from the settings when
    ``API_PROVISIONER_PASSWORD`` is set)."""
    settings = settings or ApiSettings()
    tokens = TokenStore(settings.token, settings.tokens_file)
    store = StateStore(stale_after_s=settings.stale_after_s, recent_assignments=settings.recent_assignments,
                       ev_memory=settings.ev_memory, started_at=clock(), trend_step_s=settings.trend_step_s)
    bridge = Bridge(settings, store, transport, clock)
    hub = LiveHub(store, lambda: bridge.connected, interval_s=settings.sse_interval_s,
                  queue_size=settings.sse_queue_size, max_clients=settings.sse_max_clients, clock=clock)
    bridge.add_listener(hub.changed)
    if provisioner_transport is None and settings.provisioner_password is not None:
        mqtt = settings.mqtt.model_copy(update={"username": settings.provisioner_username, "session_expiry_s": 0,
                                                "password": settings.provisioner_password.get_secret_value()})
        provisioner_transport = make_transport(settings.mqtt_client, mqtt, client_id=mqtt.username, clean_start=True)
    provisioner = None
    if provisioner_transport is not None:
        provisioner = DynsecProvisioner(provisioner_transport, settings.grid.grid_topic_prefix,
                                        timeout_s=settings.request_timeout_s)
    ctx = AppContext(settings, store, bridge, hub, ApiMetrics(bridge.transport, store, hub, clock), tokens,
                     RateLimitedLog(log.warning, interval_s=10.0), clock, provisioner)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await bridge.start()
        provisioning = (asyncio.create_task(provisioner_transport.run(), name="api-provisioner")
                        if provisioner_transport is not None else None)
        hub.start()
        log.info("api_started", mqtt_host=settings.mqtt.host, mqtt_port=settings.mqtt.port,
                 tokens=len(tokens), operator_actions=tokens.has_operator, public_reads=settings.public_reads,
                 provisioning=provisioner is not None)
        try:
            yield
        finally:
            await hub.stop()
            if provisioner_transport is not None and provisioning is not None:
                await provisioner_transport.close()
                provisioning.cancel()
            await bridge.stop()
            log.info("api_stopped")

    app = FastAPI(title="Smart Grid Load Balancer API", version=VERSION, description=DESCRIPTION.strip(),
                  lifespan=lifespan, redirect_slashes=False)
    app.state.ctx = ctx
    problems.install(app)
    app.add_middleware(MetricsMiddleware, metrics=lambda: ctx.metrics)
    if "*" not in settings.allowed_hosts:
        app.add_middleware(problems.HostCheckMiddleware, allowed=settings.allowed_hosts)
    for module in (status, charge, operator, limits, accounts, live, metrics):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=live.STATIC_DIR), name="static")
    app.openapi = lambda: _openapi(app, public_reads=settings.public_reads)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, *, public_reads: bool) -> dict[str, Any]:
    """FastAPI's schema, with every error response as ``application/problem+json`` ProblemDetails, and each
    operation's security as the roles it accepts (no token needed for reads while ``API_PUBLIC_READS`` is on)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    ref = {"$ref": "#/components/schemas/ProblemDetails"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            if "security" in operation:
                security: list[dict[str, list[str]]] = []
                for requirement in operation["security"]:  # a router's and a route's dependency: listed twice
                    if requirement not in security:
                        security.append(requirement)
                if public_reads and {"viewer": []} in security:
                    security.insert(0, {})  # optional: anyone may read
                operation["security"] = security
            responses = operation.setdefault("responses", {})
            for code, response in responses.items():
                if code.isdigit() and int(code) >= 400:
                    if code == "422":
                        response["description"] = "Invalid request (problem details list the errors)"
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": ref}}
    schemes = schema.get("components", {}).get("securitySchemes", {})
    order = ("operator", "ev", "viewer")  # the Authorize dialog of /docs lists them so
    schema.get("components", {})["securitySchemes"] = dict(sorted(schemes.items(), key=lambda kv: order.index(kv[0])))
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema
