"""Measurements of an EV fleet or load test: pure data, no I/O, time passed in.

* :func:`percentile` is exact (nearest rank on the sorted sample, no interpolation);
* :class:`LatencyRecorder` keeps every sample (a load test has thousands, not millions);
* :class:`RequestRecord` is one charge request as the EV saw it: each answer, the latencies;
* :class:`FleetStats` aggregates records into counts, percentiles, throughput and the JSON summary.

Latencies are differences of ``time.monotonic()`` values taken by the caller; they are reported in
milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Percentiles reported everywhere (summary, live line, saved JSON).
PERCENTILES: tuple[float, ...] = (50.0, 95.0, 99.0)

#: Statuses after which a request is finished: nothing more will be said about it.
TERMINAL_STATUSES = frozenset({"rejected", "completed", "cancelled"})


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence: the smallest value with at least ``p`` % of the
    sample at or below it (``p`` in (0, 100]); ``None`` for an empty sample.

    ``percentile([1, 2, 3, 4], 50) == 2``, ``percentile([1, 2, 3, 4], 51) == 3``.
    """
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is not in (0, 100]")
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, math.ceil(p / 100 * n - 1e-9))  # tolerance: 0.95 * 100 must stay rank 95
    return sorted_values[min(rank, n) - 1]


class LatencyRecorder:
    """All samples of one latency (seconds); percentiles and summary in milliseconds."""

    __slots__ = ("_samples", "_sorted")

    def __init__(self, samples: Iterable[float] = ()) -> None:
        self._samples: list[float] = []
        self._sorted = True
        for s in samples:
            self.add(s)

    def add(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"latency must be a finite non-negative number, got {seconds!r}")
        if self._samples and seconds < self._samples[-1]:
            self._sorted = False
        self._samples.append(seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def _ordered(self) -> list[float]:
        if not self._sorted:
            self._samples.sort()
            self._sorted = True
        return self._samples

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile in seconds (``None`` without samples)."""
        return percentile(self._ordered(), p)

    def summary(self) -> dict[str, Any]:
        """``count``, ``min/mean/max`` and ``p50/p95/p99`` in milliseconds (``None`` when empty)."""
        values = self._ordered()
        out: dict[str, Any] = {"count": len(values)}

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        out["min_ms"] = ms(values[0]) if values else None
        out["mean_ms"] = ms(sum(values) / len(values)) if values else None
        for p in PERCENTILES:
            out[f"p{p:g}_ms"] = ms(percentile(values, p))
        out["max_ms"] = ms(values[-1]) if values else None
        return out


@dataclass(slots=True)
class AnswerEvent:
    """One assignment message received for a request (duplicates are not recorded)."""

    status: str
    at_s: float  # seconds since the request was first sent
    reason: str | None = None
    substation_id: str | None = None
    granted_kw: float | None = None
    position: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "at_ms": round(self.at_s * 1000, 3),
            "reason": self.reason,
            "substation_id": self.substation_id,
            "granted_kw": self.granted_kw,
            "position": self.position,
        }


@dataclass(slots=True)
class RequestRecord:
    """One charge request from send to its end, as the EV saw it."""

    ev_id: str
    request_id: str
    requested_kw: float
    energy_kwh: float | None = None
    duration_minutes: float | None = None
    priority: int = 0
    sent_at: float | None = None  # monotonic time of the first publish
    attempts: int = 0  # publishes of the request (1 = answered without a retry)
    polls: int = 0  # re-sends while waiting in the queue or for ``completed`` (state queries)
    events: list[AnswerEvent] = field(default_factory=list)
    duplicates: int = 0  # repeated answers (from retries or redelivery), ignored
    first_answer_s: float | None = None
    assigned_s: float | None = None  # time to the first ``assigned``
    substation_id: str | None = None
    granted_kw: float | None = None  # first grant
    session_id: str | None = None
    released: bool = False  # the EV sent a Release for this request
    outcome: str | None = None  # why the EV stopped: see ``RequestRecord.finish``

    @property
    def answered(self) -> bool:
        return self.first_answer_s is not None

    @property
    def statuses(self) -> list[str]:
        return [e.status for e in self.events]

    @property
    def final_status(self) -> str:
        """Last status heard, or ``unanswered``."""
        return self.events[-1].status if self.events else "unanswered"

    @property
    def finished(self) -> bool:
        return self.final_status in TERMINAL_STATUSES

    def record_answer(self, now: float, status: str, *, reason: str | None = None,
                      substation_id: str | None = None, granted_kw: float | None = None,
                      session_id: str | None = None, position: int | None = None) -> bool:
        """Add one answer received at monotonic ``now``; returns ``False`` for a duplicate of the last one."""
        at = max(0.0, now - self.sent_at) if self.sent_at is not None else 0.0
        last = self.events[-1] if self.events else None
        if (last is not None and last.status == status and last.reason == reason
                and last.granted_kw == granted_kw and last.substation_id == substation_id
                and last.position == position):
            self.duplicates += 1
            return False
        self.events.append(AnswerEvent(status, at, reason, substation_id, granted_kw, position))
        if self.first_answer_s is None:
            self.first_answer_s = at
        if status == "assigned" and self.assigned_s is None:
            self.assigned_s = at
            self.substation_id = substation_id
            self.granted_kw = granted_kw
        if session_id is not None:
            self.session_id = session_id
        return True

    def to_dict(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        return {
            "ev_id": self.ev_id,
            "request_id": self.request_id,
            "requested_kw": self.requested_kw,
            "energy_kwh": self.energy_kwh,
            "duration_minutes": self.duration_minutes,
            "priority": self.priority,
            "answered": self.answered,
            "final_status": self.final_status,
            "statuses": self.statuses,
            "first_answer_ms": ms(self.first_answer_s),
            "assigned_ms": ms(self.assigned_s),
            "substation_id": self.substation_id,
            "granted_kw": self.granted_kw,
            "session_id": self.session_id,
            "attempts": self.attempts,
            "polls": self.polls,
            "duplicates": self.duplicates,
            "released": self.released,
            "outcome": self.outcome,
            "events": [e.to_dict() for e in self.events],
        }


class FleetStats:
    """Everything a fleet or load test measured. All times are monotonic seconds passed in."""

    def __init__(self, *, mode: str, total: int | None = None, started_at: float = 0.0) -> None:
        self.mode = mode
        self.total = total  # requests planned (None: open-ended fleet)
        self.started_at = started_at
        self.ended_at: float | None = None
        self.records: list[RequestRecord] = []
        self.first_answer = LatencyRecorder()
        self.to_assigned = LatencyRecorder()
        self.status_events: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.active_sessions = 0  # EVs charging right now (assigned, not yet completed)
        self.queued_now = 0  # EVs waiting in the balancer's queue right now
        self.connected_evs = 0
        self.connect_failures = 0
        self.arrivals_delayed = 0  # arrivals that had to wait for a free EV id
        #: Called with each request's first-answer latency in seconds (the metrics histogram observes it).
        self.on_first_answer: Callable[[float], None] | None = None
        self._rate_mark: tuple[float, int] | None = None

    # --- recording ----------------------------------------------------------------------------
    def new_record(self, record: RequestRecord) -> RequestRecord:
        self.records.append(record)
        return record

    def on_answer(self, record: RequestRecord, now: float, status: str, **fields: Any) -> bool:
        """Record one answer for ``record``; updates latencies and live counters. ``False``: a duplicate."""
        was_answered = record.answered
        was_assigned = record.assigned_s is not None
        previous = record.final_status
        if not record.record_answer(now, status, **fields):
            return False
        self.status_events[status] += 1
        if fields.get("reason"):
            self.reasons[f"{status}:{fields['reason']}"] += 1
        if not was_answered and record.first_answer_s is not None:
            self.first_answer.add(record.first_answer_s)
            if self.on_first_answer is not None:
                self.on_first_answer(record.first_answer_s)
        if not was_assigned and record.assigned_s is not None:
            self.to_assigned.add(record.assigned_s)
        self._track_live(previous, status)
        return True

    def _track_live(self, previous: str, status: str) -> None:
        charging_before = previous in ("assigned", "updated")
        charging_after = status in ("assigned", "updated")
        self.active_sessions += int(charging_after) - int(charging_before)
        self.queued_now += int(status == "queued") - int(previous == "queued")

    # --- derived ------------------------------------------------------------------------------
    @property
    def sent(self) -> int:
        return sum(1 for r in self.records if r.attempts > 0)

    @property
    def answered(self) -> int:
        return len(self.first_answer)

    def sent_and_retries(self) -> tuple[int, int]:
        """Requests sent, and re-sends of requests not answered yet (publishes after each one's first)."""
        sent = retries = 0
        for r in list(self.records):  # a copy: the metrics read this from their own thread
            if r.attempts > 0:
                sent += 1
                retries += r.attempts - 1
        return sent, retries

    def unanswered(self) -> list[RequestRecord]:
        return [r for r in self.records if r.attempts > 0 and not r.answered]

    def final_counts(self) -> Counter[str]:
        return Counter(r.final_status for r in self.records if r.attempts > 0)

    def elapsed(self, now: float) -> float:
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - self.started_at)

    def throughput(self, now: float) -> float:
        """Answered requests per second since the start."""
        elapsed = self.elapsed(now)
        return self.answered / elapsed if elapsed > 0 else 0.0

    def recent_rate(self, now: float) -> float:
        """Answered requests per second since the previous call (the live line's rate)."""
        mark = self._rate_mark
        self._rate_mark = (now, self.answered)
        if mark is None:
            return self.throughput(now)
        dt = now - mark[0]
        return (self.answered - mark[1]) / dt if dt > 0 else 0.0

    def summary(self, now: float) -> dict[str, Any]:
        """JSON-ready summary (no per-request records: see :meth:`report`)."""
        elapsed = self.elapsed(now)
        unanswered = self.unanswered()
        return {
            "mode": self.mode,
            "requests_planned": self.total,
            "requests_sent": self.sent,
            "requests_answered": self.answered,
            "requests_unanswered": len(unanswered),
            "unanswered_request_ids": [f"{r.ev_id}/{r.request_id}" for r in unanswered],
            "elapsed_s": round(elapsed, 3),
            "throughput_rps": round(self.answered / elapsed, 3) if elapsed > 0 else 0.0,
            "latency_first_answer": self.first_answer.summary(),
            "latency_to_assigned": self.to_assigned.summary(),
            "status_events": dict(sorted(self.status_events.items())),
            "final_status": dict(sorted(self.final_counts().items())),
            "reasons": dict(sorted(self.reasons.items())),
            "retried_requests": sum(1 for r in self.records if r.attempts > 1),
            "total_attempts": sum(r.attempts for r in self.records),
            "duplicate_answers": sum(r.duplicates for r in self.records),
            "released_by_ev": sum(1 for r in self.records if r.released),
            "active_sessions": self.active_sessions,
            "connect_failures": self.connect_failures,
            "arrivals_delayed": self.arrivals_delayed,
        }

    def report(self, now: float, **extra: Any) -> dict[str, Any]:
        """Summary plus every request record: what ``--save`` writes."""
        doc: dict[str, Any] = {"summary": self.summary(now)}
        doc.update(extra)
        requests = []
        for r in self.records:
            if r.attempts > 0:
                d = r.to_dict()
                d["sent_at_s"] = round(r.sent_at - self.started_at, 6) if r.sent_at is not None else None
                requests.append(d)
        doc["requests"] = requests
        return doc

    # --- rendering ----------------------------------------------------------------------------
    def live_line(self, now: float) -> str:
        """One line: progress, statuses, percentiles, active sessions, rate."""
        total = self.total if self.total is not None else self.sent
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.status_events.items())) or "-"
        p = [self.first_answer.percentile(q) for q in PERCENTILES]
        lat = "/".join("-" if v is None else f"{v * 1000:.1f}" for v in p)
        return (f"[{self.elapsed(now):6.1f}s] answered {self.answered}/{total} | {counts} | "
                f"p50/p95/p99 {lat} ms | charging {self.active_sessions} queued {self.queued_now} | "
                f"{self.recent_rate(now):.1f} req/s")

    def table(self, now: float) -> str:
        """Final multi-line summary for humans."""
        s = self.summary(now)
        rows: list[tuple[str, str]] = [
            ("mode", str(s["mode"])),
            ("requests sent / answered", f"{s['requests_sent']} / {s['requests_answered']}"),
            ("unanswered", str(s["requests_unanswered"])),
            ("elapsed", f"{s['elapsed_s']:.2f} s"),
            ("throughput", f"{s['throughput_rps']:.1f} answered/s"),
            ("retried requests", str(s["retried_requests"])),
        ]
        for label, key in (("request -> first answer", "latency_first_answer"),
                           ("request -> assigned", "latency_to_assigned")):
            lat = s[key]
            if lat["count"]:
                rows.append((label, f"n={lat['count']} p50={lat['p50_ms']:.2f} p95={lat['p95_ms']:.2f} "
                                    f"p99={lat['p99_ms']:.2f} max={lat['max_ms']:.2f} ms"))
            else:
                rows.append((label, "n=0"))
        rows.append(("answers by status", ", ".join(f"{k}={v}" for k, v in s["status_events"].items()) or "-"))
        rows.append(("final status", ", ".join(f"{k}={v}" for k, v in s["final_status"].items()) or "-"))
        if s["reasons"]:
            rows.append(("reasons", ", ".join(f"{k}={v}" for k, v in s["reasons"].items())))
        width = max(len(r[0]) for r in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        if s["unanswered_request_ids"]:
            lines.append("never answered: " + " ".join(s["unanswered_request_ids"]))
        return "\n".join(lines)
