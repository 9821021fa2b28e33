"""The original HTTP interface: ask for power (``POST /charge``), stop a session (``DELETE /sessions/{id}``) and
withdraw whatever an EV has open, queued or running (``DELETE /evs/{ev_id}/request``).

All go to the balancer over MQTT, exactly as an EV would, and wait (bounded) for its answer. Each needs a
principal that may act for the EV (an operator, or an EV token covering that EV id), checked before anything is
published (:mod:`api.security`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.context import AppContext, get_ctx
from api.mqtt_bridge import NotConnected, new_request_id
from api.problems import Problem
from api.routes.common import EvId, SessionIdPath, problems
from api.schemas import Assignment, ChargeIn, ReleaseOutcome, WithdrawOutcome
from api.security import Writer, audit, ensure_may_act_for
from broker.accounts import SERVICE_ACCOUNTS
from grid_protocol.messages import ChargeRequest

router = APIRouter(tags=["charging"])
Ctx = Annotated[AppContext, Depends(get_ctx)]

#: Rejections the request itself caused (fix it, do not retry as is) answer 422; the rest 409.
_UNPROCESSABLE = {"exceeds_capacity", "invalid_field", "malformed_json", "duplicate_key", "id_mismatch",
                  "payload_too_large", "reserved_id"}


def _not_connected(exc: NotConnected) -> Problem:
    return Problem(503, f"{exc}; try again shortly", type_=exc.problem_type, headers={"Retry-After": "2"})


@router.post(
    "/charge", response_model=Assignment, summary="Ask for power for an EV (the balancer's answer)",
    status_code=200,
    responses={
        200: {"description": "assigned (or the latest state of an earlier request with the same request_id: "
                             "updated, completed, cancelled, revoked)"},
        202: {"model": Assignment, "description": "queued: no headroom now; position and eta_s say where it "
                                                  "stands; it is assigned automatically later"},
        **problems(401, 403, 409, 422, 503, 504),
    },
)
async def charge(body: ChargeIn, ctx: Ctx, principal: Writer, request: Request) -> Any:
    ensure_may_act_for(ctx, request, principal, body.ev_id)
    if body.ev_id in SERVICE_ACCOUNTS:
        raise Problem(422, f"{body.ev_id!r} is a service account name, not an EV id", type_="validation")
    request_id = body.request_id or new_request_id()
    message = ChargeRequest(
        requested_kw=body.requested_kw, request_id=request_id, ev_id=body.ev_id,
        duration_minutes=body.duration_minutes, energy_kwh=body.energy_kwh, min_kw=body.min_kw,
        priority=body.priority, departure=body.departure, expires_at=body.expires_at)
    audit(principal, "charge", ev_id=body.ev_id, request_id=request_id)
    ctx.store.note_request(message)  # GET /sessions shows the session before the retained state does
    try:
        answer = await ctx.bridge.charge(message, ctx.settings.request_timeout_s)
    except NotConnected as exc:
        ctx.metrics.answers.labels("charge", "not_connected").inc()
        raise _not_connected(exc) from None
    if answer is None:
        ctx.metrics.answers.labels("charge", "timeout").inc()
        raise Problem(504, f"no answer from the balancer within {ctx.settings.request_timeout_s:g} s; retry with "
                           f"the same request_id to get its answer without opening a second request",
                      type_="balancer-timeout", request_id=request_id, ev_id=body.ev_id)
    ctx.metrics.answers.labels("charge", answer.status).inc()
    data = msgspec.structs.asdict(answer)
    if answer.status == "rejected":
        status = 422 if answer.reason in _UNPROCESSABLE else 409
        raise Problem(status, f"rejected by the balancer: {answer.reason}"
                              + (f" ({answer.detail})" if answer.detail else ""),
                      type_=f"rejected-{answer.reason}" if answer.reason else "rejected",
                      title="Rejected by the balancer", reason=answer.reason, answer=data)
    return JSONResponse(data, status_code=202 if answer.status == "queued" else 200)


@router.delete(
    "/sessions/{session_id}", response_model=ReleaseOutcome, summary="End a running session (the EV releases it)",
    responses=problems(401, 403, 404, 503, 504),
)
async def end_session(session_id: SessionIdPath, ctx: Ctx, principal: Writer, request: Request) -> dict[str, Any]:
    session = ctx.store.find_session(session_id)
    if session is None:
        raise Problem(404, f"no running session {session_id!r}", type_="not-found")
    ev_id, request_id = session["ev_id"], session["request_id"]
    ensure_may_act_for(ctx, request, principal, ev_id)  # the session's EV, from the retained state
    audit(principal, "end_session", ev_id=ev_id, session_id=session_id)
    try:
        answer = await ctx.bridge.release(ev_id, session_id, request_id, ctx.settings.request_timeout_s)
    except NotConnected as exc:
        raise _not_connected(exc) from None
    if answer is None:
        ctx.metrics.answers.labels("release", "timeout").inc()
        raise Problem(504, f"no answer from the balancer within {ctx.settings.request_timeout_s:g} s",
                      type_="balancer-timeout", session_id=session_id, ev_id=ev_id)
    ctx.metrics.answers.labels("release", answer.status).inc()
    if answer.status == "rejected":
        raise Problem(404, f"session {session_id!r} is not running any more ({answer.reason})", type_="not-found",
                      reason=answer.reason)
    return {"session_id": session_id, "ev_id": ev_id, "substation_id": session["substation_id"],
            "answer": msgspec.structs.asdict(answer)}


@router.delete(
    "/evs/{ev_id}/request", response_model=WithdrawOutcome,
    summary="Withdraw what the EV has open: its queued request, or stop its running session",
    responses=problems(401, 403, 404, 422, 503, 504),
)
async def withdraw(ev_id: EvId, ctx: Ctx, principal: Writer, request: Request) -> dict[str, Any]:
    ensure_may_act_for(ctx, request, principal, ev_id)
    if ev_id in SERVICE_ACCOUNTS:
        raise Problem(422, f"{ev_id!r} is a service account name, not an EV id", type_="validation")
    audit(principal, "withdraw", ev_id=ev_id)
    try:
        answer = await ctx.bridge.withdraw(ev_id, ctx.settings.request_timeout_s)
    except NotConnected as exc:
        raise _not_connected(exc) from None
    if answer is None:
        ctx.metrics.answers.labels("withdraw", "timeout").inc()
        raise Problem(504, f"no answer from the balancer within {ctx.settings.request_timeout_s:g} s",
                      type_="balancer-timeout", ev_id=ev_id)
    ctx.metrics.answers.labels("withdraw", answer.status).inc()
    if answer.status == "rejected":
        raise Problem(404, f"{ev_id} has no queued request or running session", type_="not-found",
                      reason=answer.reason)
    return {"ev_id": ev_id, "answer": msgspec.structs.asdict(answer)}
