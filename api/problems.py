"""Errors as RFC 9457 problem details (``application/problem+json``), for every error the app can answer.

Routes raise :class:`Problem`; Starlette's HTTP errors (404 unknown route, 405), request validation
errors (422) and unexpected exceptions (500, logged, never a stack trace in the body) are turned into
the same shape by the handlers installed by :func:`install`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from grid_runtime.logs import get_logger

log = get_logger("api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: ``type`` URIs name the problem kinds listed in docs/api.md ("Problems"); generic HTTP errors use about:blank.
TYPE_BASE = "urn:gridlb:problem:"


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(Exception):
    """Raise from a route: answered as a problem details document."""

    def __init__(self, status: int, detail: str, *, type_: str | None = None, title: str | None = None,
                 headers: dict[str, str] | None = None, **extensions: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type_
        self.title = title or _title(status)
        self.headers = headers
        self.extensions = extensions


def problem_body(status: int, detail: str, *, instance: str | None = None, type_: str | None = None,
                 title: str | None = None, **extensions: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_ if type_ else "about:blank",
        "title": title or _title(status),
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extensions)
    return body


def problem_response(status: int, detail: str, *, instance: str | None = None, type_: str | None = None,
                     title: str | None = None, headers: dict[str, str] | None = None,
                     **extensions: Any) -> JSONResponse:
    body = problem_body(status, detail, instance=instance, type_=type_, title=title, **extensions)
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.detail, instance=request.url.path, type_=exc.type, title=exc.title,
                            headers=exc.headers, **exc.extensions)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else _title(status)
    if status == 404 and detail == "Not Found":
        detail = f"no such resource: {request.method} {request.url.path}"
        type_: str | None = "not-found"
    elif status == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
        type_ = "method-not-allowed"
    else:
        type_ = None
    return problem_response(status, detail, instance=request.url.path, type_=type_,
                            headers=getattr(exc, "headers", None))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        errors.append({"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")),
                       "type": str(err.get("type", ""))})
    first = errors[0] if errors else None
    detail = (f"invalid request: {'.'.join(first['loc'])}: {first['msg']}" if first else "invalid request")
    return problem_response(422, detail[:500], instance=request.url.path, type_="validation", errors=errors[:20])


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("api_unhandled_error", method=request.method, path=request.url.path, error=type(exc).__name__)
    return problem_response(500, "internal error; it was logged", instance=request.url.path, type_="internal")


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)


class HostCheckMiddleware:
    """Answer 400 (a problem, like every error) to requests whose ``Host`` is not an allowed name: a page on
    another site resolved to 127.0.0.1 (DNS rebinding) must not reach the API. Pure ASGI: streams pass through."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.allowed:
                response = problem_response(400, f"host {host[:100]!r} is not served here (API_ALLOWED_HOSTS)",
                                            instance=scope.get("path"), type_="invalid-host")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
