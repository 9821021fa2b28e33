"""Substations and EVs added and removed while the grid runs (operators only).

``POST /substations`` and ``POST /evs`` create a broker account with its role (through the
:class:`~broker.provisioning.Provisioner`, Mosquitto's dynamic security plugin) and return its password once.
``DELETE /substations/{id}`` takes a substation out of service in order: drain it (nothing new lands there), revoke
its account (its agent is disconnected and cannot come back), let the balancer forget it (its sessions are revoked
and placed elsewhere or queued; its retained state is cleared) and clear its retained status, so no reader shows it
again. ``DELETE /evs/{id}`` ends what the EV has open, then revokes its account.

Nothing is changed unless the balancer can be reached (503/504 first): a substation removed behind the balancer's
back would keep its sessions counted there.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.context import AppContext, get_ctx
from api.mqtt_bridge import NotConnected
from api.problems import Problem
from api.routes.common import EvId, SubstationId, problems
from api.routes.operator import send_control
from api.schemas import AccountCreated, EvIn, EvRemoved, SubstationIn, SubstationRemoved
from api.security import Operator, audit, require_operator
from broker.accounts import SERVICE_ACCOUNTS
from broker.provisioning import AccountExists, Credentials, Provisioner, ProvisionerUnavailable, ProvisioningError
from grid_protocol.reasons import Reason

Ctx = Annotated[AppContext, Depends(get_ctx)]
router = APIRouter(tags=["accounts"], dependencies=[Depends(require_operator)],
                   responses=problems(401, 403, 503, 504))


def _provisioner(ctx: AppContext) -> Provisioner:
    if ctx.provisioner is None:
        raise Problem(503, "account provisioning is not configured: set API_PROVISIONER_PASSWORD (the broker's "
                           "provisioner account)", type_="provisioning-disabled")
    return ctx.provisioner


def _failed(exc: ProvisioningError) -> Problem:
    if isinstance(exc, ProvisionerUnavailable):
        return Problem(503, f"the broker's account service is not reachable: {exc}", type_="provisioning-unavailable",
                       headers={"Retry-After": "2"})
    return Problem(502, f"the broker refused: {exc}", type_="provisioning-failed")


async def _create(ctx: AppContext, creating: Awaitable[Credentials], kind: str, id_: str, **ids: str) -> Credentials:
    """A new account (``creating``), its refusals as problems, and the event that says it was created."""
    try:
        creds = await creating
    except AccountExists:
        raise Problem(409, f"{kind} {id_!r} has an account already (DELETE it first to issue a new one)",
                      type_="account-exists") from None
    except ProvisioningError as exc:
        raise _failed(exc) from None
    ctx.store.events.add(ctx.now(), "account_added", f"account of {kind} {id_} created", **ids)
    return creds


def _mqtt_url(ctx: AppContext) -> str:
    host, port = ctx.settings.mqtt.addresses()[0]  # (MQTT_HOSTS: the first node; set API_MQTT_PUBLIC_URL for more)
    return ctx.settings.mqtt_public_url or f"mqtt://{host}:{port}"


def _created(ctx: AppContext, id_: str, creds: Credentials, command: str) -> JSONResponse:
    body = {"id": id_, "username": creds.username, "password": creds.password, "mqtt_url": _mqtt_url(ctx),
            "command": command}
    return JSONResponse(body, status_code=201, headers={"Cache-Control": "no-store"})


def _host_port(ctx: AppContext) -> tuple[str, str]:
    url = _mqtt_url(ctx)
    host, _, port = url.split("://", 1)[-1].rpartition(":")
    return host or url, port or "1883"


@router.post("/substations", status_code=201, response_model=AccountCreated, responses=problems(409, 422, 502),
             summary="Add a substation: create its broker account (the password is shown once)")
async def add_substation(body: SubstationIn, ctx: Ctx, operator: Operator) -> JSONResponse:
    provisioner = _provisioner(ctx)
    sid = body.substation_id
    audit(operator, "add_substation", substation_id=sid)
    creds = await _create(ctx, provisioner.add_substation(sid), "substation", sid, substation_id=sid)
    host, port = _host_port(ctx)
    capacity = f"{body.capacity_kw:g}" if body.capacity_kw is not None else "<capacity_kw>"
    command = (f"MQTT_HOST={shlex.quote(host)} MQTT_PORT={port} MQTT_PASSWORD={shlex.quote(creds.password)} "
               f"SUBSTATIONS={sid}:{capacity} python -m substation_agents")
    return _created(ctx, sid, creds, command)


@router.delete("/substations/{substation_id}", response_model=SubstationRemoved, responses=problems(404, 502),
               summary="Remove a substation: drain, revoke its account, move its sessions, forget it")
async def remove_substation(substation_id: SubstationId, ctx: Ctx, operator: Operator) -> dict[str, Any]:
    provisioner = _provisioner(ctx)
    sid = substation_id
    view = ctx.store.substation_view(sid, ctx.now())
    sessions = len(ctx.store.sessions(substation_id=sid))  # (with those placed since its last retained state)
    audit(operator, "remove_substation", substation_id=sid)
    drained = await send_control(ctx, operator, "drain", sid)  # 503/504 here: nothing changed yet
    if not drained.ok and drained.reason != Reason.UNKNOWN_SUBSTATION:
        raise Problem(409, f"the balancer refused to drain {sid!r}: {drained.reason} ({drained.detail}); nothing "
                           "was changed", type_=f"control-{drained.reason or 'refused'}", reason=drained.reason)
    try:
        existed = await provisioner.remove_substation(sid, ctx.store.region_of(sid))
    except ProvisioningError as exc:
        raise _failed(exc) from None
    forgotten = await send_control(ctx, operator, "forget", sid) if drained.ok else drained
    if not (view is not None or drained.ok or existed):
        raise Problem(404, f"no substation {sid!r}: no account, and neither the balancer nor this API knows it",
                      type_="not-found")
    ctx.store.forget_substation(sid, ctx.now(), forgotten.detail if forgotten.ok else "account removed")
    if existed:
        ctx.store.events.add(ctx.now(), "account_removed", f"account of substation {sid} revoked", substation_id=sid)
    return {"substation_id": sid, "account_removed": existed, "balancer": "forgotten" if forgotten.ok else "unknown",
            "sessions_moved": max(sessions, int(view["sessions_total"] or 0) if view is not None else 0),
            "detail": forgotten.detail if forgotten.ok else None}


@router.post("/evs", status_code=201, response_model=AccountCreated, responses=problems(409, 422, 502),
             summary="Add an EV: create its broker account (the password is shown once)")
async def add_ev(body: EvIn, ctx: Ctx, operator: Operator) -> JSONResponse:
    provisioner = _provisioner(ctx)
    ev_id = body.ev_id
    if ev_id in SERVICE_ACCOUNTS:
        raise Problem(422, f"{ev_id!r} is a service account name, not an EV id", type_="validation")
    audit(operator, "add_ev", ev_id=ev_id)
    creds = await _create(ctx, provisioner.add_ev(ev_id), "EV", ev_id, ev_id=ev_id)
    prefix = ctx.bridge.topics.prefix
    return _created(ctx, ev_id, creds, f"publish to {prefix}/ev/{ev_id}/request, read "
                                       f"{prefix}/ev/{ev_id}/assignment (username {ev_id})")


@router.delete("/evs/{ev_id}", response_model=EvRemoved, responses=problems(404, 422, 502),
               summary="Remove an EV: end its request or session, revoke its account")
async def remove_ev(ev_id: EvId, ctx: Ctx, operator: Operator) -> dict[str, Any]:
    provisioner = _provisioner(ctx)
    if ev_id in SERVICE_ACCOUNTS:
        raise Problem(422, f"{ev_id!r} is a service account name, not an EV id", type_="validation")
    audit(operator, "remove_ev", ev_id=ev_id)
    try:
        answer = await ctx.bridge.withdraw(ev_id, ctx.settings.request_timeout_s)
    except NotConnected as exc:
        raise Problem(503, f"{exc}; try again shortly", type_=exc.problem_type, headers={"Retry-After": "2"}) from None
    if answer is None:
        raise Problem(504, f"no answer from the balancer within {ctx.settings.request_timeout_s:g} s",
                      type_="balancer-timeout", ev_id=ev_id)
    try:
        existed = await provisioner.remove_ev(ev_id)
    except ProvisioningError as exc:
        raise _failed(exc) from None
    released = answer if answer.status != "rejected" else None
    if not existed and released is None:
        raise Problem(404, f"no EV {ev_id!r}: no account and nothing open", type_="not-found")
    if existed:
        ctx.store.events.add(ctx.now(), "account_removed", f"account of EV {ev_id} revoked", ev_id=ev_id)
    return {"ev_id": ev_id, "account_removed": existed,
            "released": msgspec.structs.asdict(released) if released is not None else None}
