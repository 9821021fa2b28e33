"""Limit schedules (a DSO's time-bounded limits on a substation): read the one the balancer holds, and set or
withdraw a source's (operators only).

A schedule goes to the balancer as a :class:`~grid_protocol.messages.LimitSchedule` on
``substation/{id}/limits`` and is answered with its ``set_limits`` :class:`~grid_protocol.messages.ControlResult`;
the API never changes state itself. What it reads is the balancer's retained ``substation/{id}/schedule``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Path

from api.context import AppContext, get_ctx
from api.mqtt_bridge import NotConnected, new_request_id
from api.problems import Problem
from api.routes.common import SubstationId, problems
from api.schemas import ID_PATTERN, LimitsIn, LimitsOutcome, Schedule
from api.security import Operator, audit, require_grid_reader, require_operator
from api.tokens import Principal
from grid_protocol.messages import LimitEntry, LimitSchedule, ScheduleState
from grid_protocol.reasons import Reason

Ctx = Annotated[AppContext, Depends(get_ctx)]
Source = Annotated[str, Path(pattern=ID_PATTERN, description="who sets the limits (e.g. a DSO feed); not "
                                                             "capacity or operator", examples=["dso-north"])]
router = APIRouter(tags=["limits"])


def _schedule_dict(state: ScheduleState | None, substation_id: str) -> dict[str, Any]:
    if state is None:
        return {"substation_id": substation_id, "ts": None, "limit_kw": None, "source": None, "entries": [],
                "composite": []}
    built: dict[str, Any] = msgspec.to_builtins(state)
    return built


@router.get("/substations/{substation_id}/limits", response_model=Schedule, dependencies=[Depends(require_grid_reader)],
            summary="The substation's limit schedule and its composite (which source binds when)",
            responses=problems(401, 403, 404))
async def get_limits(substation_id: SubstationId, ctx: Ctx) -> dict[str, Any]:
    state = ctx.store.schedules.get(substation_id)
    if state is None and substation_id not in ctx.store.substations:
        raise Problem(404, f"substation {substation_id!r} is not known", type_="not-found")
    return _schedule_dict(state, substation_id)


async def _send(ctx: AppContext, operator: Principal, substation_id: str, source: str,
                entries: list[LimitEntry]) -> dict[str, Any]:
    try:
        schedule = LimitSchedule(source=source, entries=entries, substation_id=substation_id,
                                 request_id=new_request_id())
    except (ValueError, msgspec.ValidationError) as exc:  # e.g. a reserved source name
        raise Problem(422, str(exc), type_="invalid-schedule", source=source) from None
    audit(operator, "set_limits", substation_id=substation_id, source=source, entries=len(entries),
          request_id=schedule.request_id)
    try:
        result = await ctx.bridge.limits(substation_id, schedule, ctx.settings.request_timeout_s)
    except NotConnected as exc:
        raise Problem(503, f"{exc}; try again shortly", type_=exc.problem_type, headers={"Retry-After": "2"},
                      request_id=schedule.request_id) from None
    if result is None:
        ctx.metrics.answers.labels("set_limits", "timeout").inc()
        raise Problem(504, f"no answer from the balancer within {ctx.settings.request_timeout_s:g} s",
                      type_="balancer-timeout", action="set_limits", substation_id=substation_id,
                      request_id=schedule.request_id)
    ctx.metrics.answers.labels("set_limits", "ok" if result.ok else (result.reason or "refused")).inc()
    if not result.ok:
        status = 404 if result.reason == Reason.UNKNOWN_SUBSTATION else 409
        raise Problem(status, f"limit schedule for {substation_id!r} refused by the balancer: {result.reason}"
                              + (f" ({result.detail})" if result.detail else ""),
                      type_="not-found" if status == 404 else f"limits-{result.reason or 'refused'}",
                      reason=result.reason, action="set_limits", substation_id=substation_id)
    return {"ok": True, "action": "set_limits", "substation_id": substation_id, "request_id": result.request_id,
            "ts": result.ts, "reason": None, "detail": result.detail,
            "schedule": _schedule_dict(result.schedule, substation_id)}


@router.put("/substations/{substation_id}/limits/{source}", response_model=LimitsOutcome,
            dependencies=[Depends(require_operator)],
            summary="Set a source's limits on the substation (replaces what that source set before)",
            responses=problems(401, 403, 404, 409, 422, 503, 504))
async def put_limits(substation_id: SubstationId, source: Source, body: LimitsIn, ctx: Ctx,
                     operator: Operator) -> dict[str, Any]:
    entries = [LimitEntry(start=e.start, end=e.end, limit_kw=e.limit_kw, priority=e.priority) for e in body.entries]
    return await _send(ctx, operator, substation_id, source, entries)


@router.delete("/substations/{substation_id}/limits/{source}", response_model=LimitsOutcome,
               dependencies=[Depends(require_operator)], summary="Withdraw every limit a source set on the substation",
               responses=problems(401, 403, 404, 409, 422, 503, 504))
async def delete_limits(substation_id: SubstationId, source: Source, ctx: Ctx, operator: Operator) -> dict[str, Any]:
    return await _send(ctx, operator, substation_id, source, [])
