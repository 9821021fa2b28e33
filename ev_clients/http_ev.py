"""An EV that asks through the HTTP API instead of MQTT: the load tester's ``--url http://…`` (the original HTTP
design's ``test.py`` flag), driving ``POST /charge`` as a charge-point backend would.

Per request: ``POST /charge`` (the same ``request_id`` again after a ``504`` or ``503``, as the API asks), then
``queued`` (``202``): ``GET /evs/{ev_id}`` until the request is placed or ``timeout_s`` passes (then
``DELETE /evs/{ev_id}/request``); ``assigned``: hold the session ``release_after_s`` and end it with
``DELETE /sessions/{id}``. Every answer is recorded like an MQTT EV's, so the summary is the same. The token
(``--token``, ``$API_TOKEN``) is the operator's or an EV token covering the load tester's EV ids.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from ev_clients.ev import EvBehaviour, new_request_id
from ev_clients.stats import FleetStats, RequestRecord
from grid_protocol.messages import CHARGING_STATUSES, FINAL_STATUSES, ChargeRequest
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger

log = get_logger("ev.http")

#: How often a queued request is looked at (GET /evs/{ev_id}).
POLL_S = 0.25


class HttpRefused(Exception):
    """The API refused the token (401/403): no request of this run can succeed."""


class HttpEv:
    """One EV id over the HTTP API; ``http`` is shared by all (one connection pool)."""

    transport = None  # (no MQTT connection of its own)

    def __init__(self, ev_id: str, http: httpx.AsyncClient, stats: FleetStats, behaviour: EvBehaviour, *,
                 stop: asyncio.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self.ev_id = ev_id
        self.http = http
        self.stats = stats
        self.behaviour = behaviour
        self.stop = stop
        self.clock = clock

    async def start(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    async def release_own(self) -> int:
        """After ``ev_busy``: the load tester's HTTP EVs end every request they make, so an open one is not ours."""
        return 0

    def _answer(self, record: RequestRecord, answer: dict[str, Any]) -> None:
        self.stats.on_answer(record, self.clock(), answer["status"], reason=answer.get("reason"),
                             substation_id=answer.get("substation_id"), granted_kw=answer.get("granted_kw"),
                             session_id=answer.get("session_id"), position=answer.get("position"))

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            resp = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            log.warning("http_ev_request_failed", ev_id=self.ev_id, method=method, path=path, error=str(exc))
            return None
        if resp.status_code in (401, 403):
            raise HttpRefused(f"{method} {path}: {resp.status_code} {resp.json().get('detail', '')}")
        return resp

    async def charge(self, request: ChargeRequest) -> RequestRecord:
        request_id = request.request_id or new_request_id()
        record = self.stats.new_record(RequestRecord(
            ev_id=self.ev_id, request_id=request_id, requested_kw=request.requested_kw,
            energy_kwh=request.energy_kwh, duration_minutes=request.duration_minutes, priority=request.priority))
        body = {"ev_id": self.ev_id, "request_id": request_id, "requested_kw": request.requested_kw,
                "energy_kwh": request.energy_kwh, "duration_minutes": request.duration_minutes,
                "min_kw": request.min_kw, "priority": request.priority}
        b = self.behaviour
        answer: dict[str, Any] | None = None
        for _ in range(b.max_attempts):
            if record.sent_at is None:
                record.sent_at = self.clock()
            record.attempts += 1
            resp = await self._call("POST", "/charge", json={k: v for k, v in body.items() if v is not None})
            if resp is not None and resp.status_code in (200, 202):
                answer = resp.json()
            elif resp is not None and resp.status_code in (409, 422) and "answer" in resp.json():
                answer = resp.json()["answer"]  # rejected: the balancer's answer is in the problem
            if answer is not None:
                break
            # 503 (not connected yet), 504 (no answer in time: the same request_id again), network errors
            if self.stop.is_set() or not await self._pause(b.retry_after_s if resp is None else 0.5):
                break
        if answer is None:
            record.outcome = "unanswered"
            return record
        self._answer(record, answer)
        if answer["status"] == "queued":
            answer = await self._wait_placed(record)
        if answer is not None and answer["status"] in CHARGING_STATUSES and answer.get("session_id"):
            await self._pause(b.release_after_s)
            resp = await self._call("DELETE", f"/sessions/{answer['session_id']}")
            record.released = True
            if resp is not None and resp.status_code == 200:
                self._answer(record, resp.json()["answer"])
                record.outcome = "released_at_once" if b.release_after_s == 0 else "released_after_hold"
            else:
                record.outcome = "release_unanswered"
        record.outcome = record.outcome or record.final_status
        return record

    async def _wait_placed(self, record: RequestRecord) -> dict[str, Any] | None:
        """A queued request: look until it is placed (its ``assigned``), or give up after ``timeout_s``."""
        deadline = self.clock() + self.behaviour.timeout_s
        while self.clock() < deadline and not self.stop.is_set():
            await self._pause(POLL_S)
            resp = await self._call("GET", f"/evs/{self.ev_id}")
            last = resp.json().get("last_answer") if resp is not None and resp.status_code == 200 else None
            if last and last.get("request_id") == record.request_id and last["status"] != "queued":
                self._answer(record, last)
                return dict(last) if last["status"] not in FINAL_STATUSES else None
        record.released = True
        record.outcome = "queue_timeout" if not self.stop.is_set() else "stopped"
        resp = await self._call("DELETE", f"/evs/{self.ev_id}/request")
        if resp is not None and resp.status_code == 200:
            self._answer(record, resp.json()["answer"])
        return None

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopped first; ``True`` when the full time passed."""
        if seconds <= 0:
            return not self.stop.is_set()
        return not await wait_event(self.stop, seconds)
