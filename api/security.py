"""Who may call a route: FastAPI dependencies over the principals of :mod:`api.tokens`.

Every write has a principal, checked before anything is published over MQTT:

* operator routes: ``dependencies=[Depends(require_operator)]`` on the router (or a parameter ``_: Operator``
  where the route wants the principal, e.g. for its audit line);
* writes for an EV: a parameter ``principal: Writer``, then :func:`ensure_may_act_for` with the EV id the
  route acts for (an EV token only for its own EV ids; operators for all);
* reads: ``GridReader`` (grid-wide views) or ``EvReader`` + :func:`ensure_may_read` (per-EV views); both let
  everyone in while ``API_PUBLIC_READS`` is on.

Refusals are problem details: ``401`` without a token or with one nobody holds (``WWW-Authenticate: Bearer``,
``error="invalid_token"`` for the latter), ``403`` when the token's role or EV ids do not cover the request
(``error="insufficient_scope"``), ``503`` when no token is configured for it at all. Each is counted in
``gridlb_api_auth_refused_total{reason}`` and logged (``api_auth_refused``, at most every 10 s per reason).

The OpenAPI schema names one bearer scheme per role (``operator``, ``ev``, ``viewer``; the same header), so
``/docs`` shows which roles each operation accepts.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.context import AppContext, get_ctx
from api.problems import Problem
from api.tokens import Principal
from grid_runtime.logs import get_logger

log = get_logger("api.auth")

REALM = 'Bearer realm="gridlb"'

operator_scheme = HTTPBearer(
    scheme_name="operator", auto_error=False, bearerFormat="opaque token",
    description="Operator: every route. `API_TOKEN`, or an `operator` entry of `API_TOKENS_FILE`.")
ev_scheme = HTTPBearer(
    scheme_name="ev", auto_error=False, bearerFormat="opaque token",
    description="An EV or a charge-point backend (`ev` entry of `API_TOKENS_FILE`): charge, end sessions and "
                "withdraw requests for its own EV ids only; with closed reads it reads only those EVs.")
viewer_scheme = HTTPBearer(
    scheme_name="viewer", auto_error=False, bearerFormat="opaque token",
    description="Read only (`viewer` entry of `API_TOKENS_FILE`): needed for reads when `API_PUBLIC_READS` is "
                "off (the default).")

Ctx = Annotated[AppContext, Depends(get_ctx)]
Creds = HTTPAuthorizationCredentials | None


def _refuse(ctx: AppContext, request: Request, status: int, reason: str, detail: str, *,
            principal: Principal | None = None, www: str | None = None, type_: str = "unauthorized") -> Problem:
    ctx.metrics.auth_refused.labels(reason).inc()
    ctx.auth_log(reason, "api_auth_refused", reason=reason, method=request.method, path=request.url.path,
                 client=request.client.host if request.client else None,
                 principal=principal.name if principal else None)
    headers = {"WWW-Authenticate": www} if www else None
    return Problem(status, detail, type_=type_, headers=headers)


def _authenticate(ctx: AppContext, request: Request, credentials: Creds, what: str) -> Principal:
    if credentials is None:
        raise _refuse(ctx, request, 401, "missing_token", f"{what} need 'Authorization: Bearer <token>'", www=REALM)
    principal = ctx.tokens.authenticate(credentials.credentials)
    if principal is None:
        raise _refuse(ctx, request, 401, "invalid_token", "unknown or wrong bearer token",
                      www=f'{REALM}, error="invalid_token"')
    return principal


def _a(role: str) -> str:
    return ("an " if role[0] in "aeiou" else "a ") + role


def _forbidden(ctx: AppContext, request: Request, principal: Principal, detail: str) -> Problem:
    return _refuse(ctx, request, 403, "forbidden", detail, principal=principal, type_="forbidden",
                   www=f'{REALM}, error="insufficient_scope"')


async def require_operator(ctx: Ctx, request: Request,
                           credentials: Annotated[Creds, Depends(operator_scheme)]) -> Principal:
    """Operators only."""
    if not ctx.tokens.has_operator:
        ctx.metrics.auth_refused.labels("not_configured").inc()
        raise Problem(503, "operator actions disabled: set API_TOKEN (or add an operator to API_TOKENS_FILE)",
                      type_="operator-disabled")
    principal = _authenticate(ctx, request, credentials, "operator actions")
    if not principal.is_operator:
        raise _forbidden(ctx, request, principal,
                         f"operator actions need an operator token; {principal.name!r} is {_a(principal.role)} token")
    return principal


async def require_writer(ctx: Ctx, request: Request, ev: Annotated[Creds, Depends(ev_scheme)],
                         operator: Annotated[Creds, Depends(operator_scheme)]) -> Principal:
    """An operator or an EV token; the route then checks the EV id with :func:`ensure_may_act_for`."""
    if not ctx.tokens.configured:
        ctx.metrics.auth_refused.labels("not_configured").inc()
        raise Problem(503, "writes disabled: no tokens configured (API_TOKEN, API_TOKENS_FILE)",
                      type_="writes-disabled")
    principal = _authenticate(ctx, request, ev or operator, "writes")
    if principal.role not in ("operator", "ev"):
        raise _forbidden(ctx, request, principal,
                         f"{principal.name!r} is {_a(principal.role)} token: it may only read")
    return principal


def ensure_may_act_for(ctx: AppContext, request: Request, principal: Principal, ev_id: str) -> None:
    """403 unless ``principal`` may act for ``ev_id``."""
    if not principal.may_act_for(ev_id):
        raise _forbidden(ctx, request, principal,
                         f"token {principal.name!r} may act for {principal.scope()}, not for {ev_id}")


async def require_grid_reader(ctx: Ctx, request: Request, viewer: Annotated[Creds, Depends(viewer_scheme)],
                              operator: Annotated[Creds, Depends(operator_scheme)]) -> Principal | None:
    """Grid-wide reads: anyone while reads are public (``None``), else a viewer or an operator."""
    if ctx.settings.public_reads:
        return None
    principal = _authenticate(ctx, request, viewer or operator, "reads (API_PUBLIC_READS is off)")
    if not principal.reads_grid:
        raise _forbidden(ctx, request, principal,
                         f"{principal.name!r} is an EV token: it reads /evs/{{ev_id}} and /sessions?ev_id=… of its "
                         "own EVs; grid-wide views need a viewer or operator token")
    return principal


async def require_reader(ctx: Ctx, request: Request, viewer: Annotated[Creds, Depends(viewer_scheme)],
                         ev: Annotated[Creds, Depends(ev_scheme)],
                         operator: Annotated[Creds, Depends(operator_scheme)]) -> Principal | None:
    """Per-EV reads: anyone while reads are public (``None``), else any token; then :func:`ensure_may_read`."""
    if ctx.settings.public_reads:
        return None
    return _authenticate(ctx, request, viewer or ev or operator, "reads (API_PUBLIC_READS is off)")


def ensure_may_read(ctx: AppContext, request: Request, principal: Principal | None, ev_id: str | None) -> None:
    """403 unless reads are public, ``principal`` reads the whole grid, or ``ev_id`` is one of its EVs."""
    if principal is None or principal.reads_grid:
        return
    if ev_id is None:
        raise _forbidden(ctx, request, principal,
                         f"{principal.name!r} is an EV token: name one of its EVs (ev_id) to read")
    if not principal.may_act_for(ev_id):
        raise _forbidden(ctx, request, principal,
                         f"token {principal.name!r} may read {principal.scope()}, not {ev_id}")


def identify(ctx: AppContext, request: Request) -> Principal | None:
    """The principal of the request's bearer token, ``None`` without one; 401 for a token nobody holds."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return None
    if scheme.lower() != "bearer" or not token.strip():
        raise _refuse(ctx, request, 401, "missing_token", "expected 'Authorization: Bearer <token>'", www=REALM)
    principal = ctx.tokens.authenticate(token.strip())
    if principal is None:
        raise _refuse(ctx, request, 401, "invalid_token", "unknown or wrong bearer token",
                      www=f'{REALM}, error="invalid_token"')
    return principal


def audit(principal: Principal, action: str, **fields: Any) -> None:
    """One log line per accepted write: who did what."""
    log.info("api_write", action=action, principal=principal.name, role=principal.role, **fields)


Operator = Annotated[Principal, Depends(require_operator)]
Writer = Annotated[Principal, Depends(require_writer)]
GridReader = Annotated[Principal | None, Depends(require_grid_reader)]
EvReader = Annotated[Principal | None, Depends(require_reader)]
