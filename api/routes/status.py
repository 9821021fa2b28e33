"""Read-only views: health, readiness, overview, substations, sessions, EVs, queue, trends, the event log, and who
the caller is.

Health and readiness are always open; the rest need a token while ``API_PUBLIC_READS`` is off (api/security.py):
grid-wide views a viewer or operator, an EV's own views (``/evs/{ev_id}``, ``/sessions?ev_id=``) its EV token.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from api import VERSION
from api.context import AppContext, get_ctx
from api.problems import Problem, problem_response
from api.routes.common import EvId, SubstationId, problems
from api.schemas import (
    ID_PATTERN,
    Ev,
    EventLog,
    Health,
    Queue,
    Ready,
    SessionPage,
    SessionStatus,
    Status,
    StatusCompact,
    Substation,
    Trends,
    WhoAmI,
)
from api.security import EvReader, ensure_may_read, identify, require_grid_reader

router = APIRouter()
Ctx = Annotated[AppContext, Depends(get_ctx)]
#: Grid-wide reads: open while API_PUBLIC_READS is on, else a viewer or operator token.
_GRID = [Depends(require_grid_reader)]
_READS = problems(401, 403)


@router.get("/health", response_model=Health, tags=["health"], summary="Liveness: the process answers")
async def health(ctx: Ctx) -> dict[str, object]:
    return {"status": "ok", "version": VERSION, "uptime_s": round(time.monotonic() - ctx.started_monotonic, 3)}


@router.get("/ready", response_model=Ready, tags=["health"],
            summary="Readiness: connected to the broker and holding fresh substation data",
            responses=problems(503))
async def ready(ctx: Ctx) -> object:
    result = ctx.store.readiness(ctx.now(), connected=ctx.bridge.connected,
                                 max_age_s=ctx.settings.ready_max_age_s)
    if not result["ready"]:
        failing = [k for k in ("mqtt_connected", "substation_data") if not result["checks"][k]]
        return problem_response(503, f"not ready: {', '.join(failing)}", instance="/ready", type_="not-ready",
                                ready=False, checks=result["checks"])
    return result


@router.get("/status", response_model=Status | StatusCompact, tags=["status"], responses=_READS, dependencies=_GRID,
            summary="Overview: substations, totals, queue, balancer, latest assignments")
async def status(
    ctx: Ctx,
    noise: Annotated[bool, Query(description="latest answers with probe noise (nothing_to_release)")] = False,
    order: Annotated[Literal["name", "worst"], Query(
        description="substations by id, or worst first: offline, stale, overloaded, draining, ok, then the "
                    "fullest first")] = "name",
    region: Annotated[str | None, Query(pattern=ID_PATTERN, description="only this region's substations")] = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description="at most this many substations")] = None,
    compact: Annotated[bool, Query(description="each substation as one array of `fields` (what the live page "
                                               "reads: ~100 bytes a substation instead of ~450)")] = False,
) -> dict[str, object]:
    return ctx.store.overview(ctx.now(), connected=ctx.bridge.connected, noise=noise, order=order, region=region,
                              limit=limit, compact=compact)


@router.get("/substations", response_model=list[Substation], tags=["status"], responses=_READS, dependencies=_GRID,
            summary="Every known substation")
async def substations(ctx: Ctx) -> list[dict[str, object]]:
    return ctx.store.substation_views(ctx.now())


@router.get("/substations/{substation_id}", response_model=Substation, tags=["status"],
            summary="One substation", responses=problems(401, 403, 404), dependencies=_GRID)
async def substation(substation_id: SubstationId, ctx: Ctx) -> dict[str, object]:
    view = ctx.store.substation_view(substation_id, ctx.now())
    if view is None:
        raise Problem(404, f"no substation {substation_id!r}", type_="not-found")
    return view


@router.get("/sessions", response_model=SessionPage, tags=["status"], responses=_READS,
            summary="Running sessions (from the balancer's retained state), filtered and paginated")
async def sessions(
    ctx: Ctx,
    reader: EvReader,
    request: Request,
    substation_id: Annotated[str | None, Query(pattern=ID_PATTERN, description="only this substation")] = None,
    status: Annotated[SessionStatus | None, Query(description="charging, reduced or paused")] = None,
    ev_id: Annotated[str | None, Query(pattern=ID_PATTERN, description="only this EV")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict[str, object]:
    ensure_may_read(ctx, request, reader, ev_id)
    rows = ctx.store.sessions(substation_id=substation_id, status=status, ev_id=ev_id)
    page = rows[offset:offset + limit]
    nxt = offset + limit if offset + limit < len(rows) else None
    return {"total": len(rows), "limit": limit, "offset": offset, "next_offset": nxt,
            "truncated": ctx.store.sessions_truncated(), "items": page}


@router.get("/evs/{ev_id}", response_model=Ev, tags=["status"], responses=problems(401, 403, 404),
            summary="An EV's current session, queue place and latest answer")
async def ev(ev_id: EvId, ctx: Ctx, reader: EvReader, request: Request) -> dict[str, object]:
    ensure_may_read(ctx, request, reader, ev_id)
    view = ctx.store.ev_view(ev_id, ctx.now())
    if view is None:
        raise Problem(404, f"nothing known about EV {ev_id!r} (no session, not queued, no answer seen)",
                      type_="not-found")
    return view


@router.get("/queue", response_model=Queue, tags=["status"], responses=_READS, dependencies=_GRID,
            summary="The waiting line, in order")
async def queue(ctx: Ctx) -> dict[str, object]:
    return ctx.store.queue_view(ctx.now())




@router.get("/trends", response_model=Trends, tags=["status"], responses=_READS, dependencies=_GRID,
            summary="The last 15 minutes per substation: load, EV load and limit (sampled by this API)")
async def trends(ctx: Ctx, substation_id: Annotated[list[str] | None, Query(
        description="only these substations (repeat the parameter); default all")] = None) -> dict[str, object]:
    return ctx.store.trends.view(ctx.now(), substation_id)


@router.get("/event-log", response_model=EventLog, tags=["status"], responses=_READS, dependencies=_GRID,
            summary="What changed on the grid: operator actions, capacity changes, revocations, substations "
                    "going stale, offline or overloaded and back, decommissioning")
async def event_log(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=200)] = 100) -> dict[str, object]:
    return {"events": ctx.store.events.latest(limit)}


@router.get("/whoami", response_model=WhoAmI, tags=["status"], responses=problems(401),
            summary="The caller's token: its name and role (the live page shows operator actions to operators)")
async def whoami(ctx: Ctx, request: Request) -> dict[str, object]:
    principal = identify(ctx, request)
    if principal is None:
        return {"name": None, "role": None, "may_read_grid": ctx.settings.public_reads, "may_operate": False}
    return {"name": principal.name, "role": principal.role,
            "may_read_grid": ctx.settings.public_reads or principal.reads_grid,
            "may_operate": principal.is_operator}
