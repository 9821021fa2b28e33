"""Operator actions (an operator token: ``API_TOKEN`` or an operator of ``API_TOKENS_FILE``): drain, undrain,
change a substation's capacity.

They go to the balancer as :class:`~grid_protocol.messages.ControlCommand` on ``balancer/control`` and
answer with its :class:`~grid_protocol.messages.ControlResult`; the API never changes state itself.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from api.context import AppContext, get_ctx
from api.mqtt_bridge import NotConnected, new_request_id
from api.problems import Problem
from api.routes.common import SubstationId, problems
from api.schemas import CapacityIn, ControlOutcome
from api.security import Operator, audit, require_operator
from api.tokens import Principal
from grid_protocol.messages import ControlAction, ControlCommand, ControlResult
from grid_protocol.reasons import Reason

Ctx = Annotated[AppContext, Depends(get_ctx)]
#: Operators only, for every route of this router (more operator endpoints: add them here, or give a route of
#: another router ``dependencies=[Depends(require_operator)]`` or a parameter ``operator: Operator``).
router = APIRouter(tags=["operator"], dependencies=[Depends(require_operator)],
                   responses=problems(401, 403, 404, 409, 503, 504))


async def send_control(ctx: AppContext, operator: Principal, action: ControlAction, substation_id: str,
                       capacity_kw: float | None = None) -> ControlResult:
    """Send one control command and return the balancer's result (refusals included); 503 when nothing can be
    sent, 504 when the balancer does not answer in time."""
    command = ControlCommand(action=action, substation_id=substation_id, capacity_kw=capacity_kw,
                             request_id=new_request_id())
    audit(operator, action, substation_id=substation_id, capacity_kw=capacity_kw, request_id=command.request_id)
    try:
        result = await ctx.bridge.control(command, ctx.settings.request_timeout_s)
    except NotConnected as exc:
        raise Problem(503, f"{exc}; try again shortly", type_=exc.problem_type,
                      headers={"Retry-After": "2"}, request_id=command.request_id) from None
    if result is None:
        ctx.metrics.answers.labels(action, "timeout").inc()
        raise Problem(504, f"no answer from the balancer within {ctx.settings.request_timeout_s:g} s",
                      type_="balancer-timeout", action=action, substation_id=substation_id,
                      request_id=command.request_id)
    ctx.metrics.answers.labels(action, "ok" if result.ok else (result.reason or "refused")).inc()
    return result


async def _control(ctx: AppContext, operator: Principal, action: ControlAction, substation_id: str,
                   capacity_kw: float | None = None) -> dict[str, Any]:
    result = await send_control(ctx, operator, action, substation_id, capacity_kw)
    if not result.ok:
        status = 404 if result.reason == Reason.UNKNOWN_SUBSTATION else 409
        raise Problem(status, f"{action} {substation_id!r} refused by the balancer: {result.reason}"
                              + (f" ({result.detail})" if result.detail else ""),
                      type_="not-found" if status == 404 else f"control-{result.reason or 'refused'}",
                      reason=result.reason, action=action, substation_id=substation_id)
    return {"ok": result.ok, "action": result.action, "substation_id": result.substation_id,
            "request_id": result.request_id, "ts": result.ts, "reason": result.reason, "detail": result.detail,
            "substation": ctx.store.substation_view(substation_id, ctx.now())}


@router.post("/substations/{substation_id}/drain", response_model=ControlOutcome,
             summary="Drain: no new sessions there; running ones finish")
async def drain(substation_id: SubstationId, ctx: Ctx, operator: Operator) -> dict[str, Any]:
    return await _control(ctx, operator, "drain", substation_id)


@router.post("/substations/{substation_id}/undrain", response_model=ControlOutcome,
             summary="Undrain: the substation takes new sessions again")
async def undrain(substation_id: SubstationId, ctx: Ctx, operator: Operator) -> dict[str, Any]:
    return await _control(ctx, operator, "undrain", substation_id)


@router.put("/substations/{substation_id}/capacity", response_model=ControlOutcome,
            summary="Limit the capacity the balancer plans with (null removes the limit)",
            responses=problems(422))
async def set_capacity(substation_id: SubstationId, body: CapacityIn, ctx: Ctx,
                       operator: Operator) -> dict[str, Any]:
    return await _control(ctx, operator, "set_capacity", substation_id, body.capacity_kw)
