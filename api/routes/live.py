"""The live page (``GET /``, files under ``/static``) and its Server-Sent Events feed (``GET /events``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from sse_starlette.sse import EventSourceResponse

from api.context import AppContext, get_ctx
from api.live import TooManyClients
from api.problems import Problem
from api.routes.common import problems
from api.security import require_grid_reader

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
router = APIRouter(tags=["live page"])
Ctx = Annotated[AppContext, Depends(get_ctx)]


@router.get("/", response_class=FileResponse, summary="The live page (HTML)",
            responses={200: {"content": {"text/html": {}}, "description": "the page"}})
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


@router.get(
    "/events", summary="Live feed (Server-Sent Events): a `snapshot` event (GET /status?compact=true&order=worst "
                       "with `seq`), then `diff` events with what changed (at most every API_SSE_INTERVAL_S)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "event: snapshot / data: {seq, ts, fields, substations: [[...]], totals, ...}; "
                                    "then event: diff / data: {seq: previous + 1, ts, upsert?: [[...]], "
                                    "remove?: [id], and each other part only when it changed}. A diff whose seq "
                                    "is not the previous + 1 means: reconnect (docs/api.md)"},
               **problems(401, 403, 503)},
    dependencies=[Depends(require_grid_reader)],
)
async def events(request: Request, ctx: Ctx,
                 noise: Annotated[bool, Query(description="include probe noise (nothing_to_release) in the "
                                                          "latest answers")] = False) -> EventSourceResponse:
    hub = ctx.hub
    if hub.full():
        raise Problem(503, f"too many live clients ({hub.max_clients})", type_="too-many-clients",
                      headers={"Retry-After": "10"})

    async def stream() -> AsyncIterator[dict[str, Any]]:
        # Registered here, not before the response starts: a request cancelled before its stream runs must not
        # keep a client slot (the finally below only runs once the generator has started).
        try:
            queue = hub.add_client(noise)
        except TooManyClients:
            return
        try:
            while True:
                try:
                    async with asyncio.timeout(5.0):  # (not wait_for: in 3.11 it can drop the disconnect's cancel)
                        item = await queue.get()
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if item is None:
                    return
                yield {"event": item[0], "data": item[1]}
        finally:
            hub.remove_client(queue)

    return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
