"""Shared route pieces: documented error responses and path parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path

from api.problems import PROBLEM_MEDIA_TYPE
from api.schemas import ProblemDetails
from grid_protocol.ids import ID_PATTERN, REQUEST_ID_PATTERN

_DESCRIPTIONS = {
    400: "Bad request", 401: "Missing or wrong bearer token (reads: only while API_PUBLIC_READS is off)",
    403: "The token's role or EV ids do not cover this request", 404: "Not found",
    409: "The balancer refused", 422: "Invalid request (problem details list the errors)",
    503: "Not available (not connected to the broker, no tokens configured for it, ...)",
    504: "The balancer did not answer in time (API_REQUEST_TIMEOUT_S)",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: these statuses answer problem details."""
    return {s: {"model": ProblemDetails, "description": _DESCRIPTIONS.get(s, "Error"),
                "content": {PROBLEM_MEDIA_TYPE: {}}} for s in statuses}


SubstationId = Annotated[str, Path(pattern=ID_PATTERN, description="substation id", examples=["north"])]
EvId = Annotated[str, Path(pattern=ID_PATTERN, description="EV id", examples=["EV_1234"])]
SessionIdPath = Annotated[str, Path(pattern=REQUEST_ID_PATTERN, description="session id",
                                    examples=["9f1c0e2a-17"])]
