"""Measurements of an EV fleet or load test: pure data, no I/O, time passed in.

* percentiles are exact (nearest rank, ``grid_runtime.percentiles``: no interpolation);
* :class:`LatencyRecorder` keeps every sample, or only the most recent ``window`` of them;
* :class:`RequestRecord` is one charge request as the EV saw it: each answer, the latencies;
* :class:`FleetStats` aggregates records into counts, percentiles, throughput and the JSON summary.

Bounded memory: a finite run (a load test, a fleet with ``--requests``, a scenario) keeps every record and
every latency sample, so its summary and saved file are exact. An open-ended fleet runs for days, so its
:class:`FleetStats` is made with ``keep_records=N`` (``EV_KEEP_RECORDS``): it keeps the ``N`` most recently
created records and the ``N`` most recent samples of each latency. Every count (requests sent, retries,
answers by status, final status, outcomes, ...) is a running counter updated where the event happens (a
record's ``attempts``/``released``/``outcome`` report their changes to the stats that created it), so counts
stay exact and neither the summary nor a ``/metrics`` scrape walks the records.

Latencies are differences of ``time.monotonic()`` values taken by the caller; they are reported in
milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grid_protocol.messages import CHARGING_STATUSES, FINAL_STATUSES
from grid_runtime.percentiles import percentile, percentiles

#: Percentiles reported everywhere (summary, live line, saved JSON).
PERCENTILES: tuple[float, ...] = (50.0, 95.0, 99.0)



class LatencyRecorder:
    """Samples of one latency (seconds); percentiles and summary in milliseconds.

    Without ``window`` every sample is kept and everything is exact. With ``window=N`` only the ``N`` most
    recent samples are kept: ``count``, ``min``, ``mean`` and ``max`` still cover every sample ever added,
    the percentiles describe the most recent ``N`` (a sliding window: what the system does *now*).
    ``len()`` is the number of samples ever added, :attr:`kept` the number the percentiles are taken from.
    """

    __slots__ = ("_count", "_max", "_min", "_samples", "_sum", "window")

    def __init__(self, samples: Iterable[float] = (), *, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError(f"latency window must be >= 1, got {window}")
        self.window = window
        self._samples: deque[float] | list[float] = [] if window is None else deque(maxlen=window)
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf
        for s in samples:
            self.add(s)

    def add(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"latency must be a finite non-negative number, got {seconds!r}")
        self._samples.append(seconds)
        self._count += 1
        self._sum += seconds
        self._min = min(self._min, seconds)
        self._max = max(self._max, seconds)

    def __len__(self) -> int:
        """Samples ever added (not only the kept ones)."""
        return self._count

    @property
    def count(self) -> int:
        return self._count

    @property
    def kept(self) -> int:
        """Samples kept: the ones the percentiles are taken from."""
        return len(self._samples)

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile in seconds (``None`` without samples); of the window when there is one."""
        return percentile(self._samples, p)

    def percentiles(self, ps: Sequence[float] = PERCENTILES) -> list[float | None]:
        """Several percentiles at once (one pass over the samples)."""
        return percentiles(self._samples, ps)

    def summary(self) -> dict[str, Any]:
        """``count``, ``min/mean/max`` (all samples) and ``p50/p95/p99`` in milliseconds (``None`` when empty).

        A windowed recorder adds ``window``: how many of the most recent samples the percentiles describe.
        """
        n = self._count
        out: dict[str, Any] = {"count": n}

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        out["min_ms"] = ms(self._min) if n else None
        out["mean_ms"] = ms(self._sum / n) if n else None
        for p, v in zip(PERCENTILES, self.percentiles(PERCENTILES), strict=True):
            out[f"p{p:g}_ms"] = ms(v)
        out["max_ms"] = ms(self._max) if n else None
        if self.window is not None:
            out["window"] = len(self._samples)
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
    polls: int = 0  # re-sends while waiting in the queue or for ``completed`` (state queries)
    events: list[AnswerEvent] = field(default_factory=list)
    duplicates: int = 0  # repeated answers (from retries or redelivery), ignored
    first_answer_s: float | None = None
    assigned_s: float | None = None  # time to the first ``assigned``
    substation_id: str | None = None
    granted_kw: float | None = None  # first grant
    session_id: str | None = None
    # ``attempts``, ``released`` and ``outcome`` are properties over these: a change is reported to the stats
    # that created the record (its running counters), see :meth:`FleetStats.new_record`.
    _attempts: int = field(default=0, init=False)  # publishes of the request (1 = answered without a retry)
    _released: bool = field(default=False, init=False)  # the EV sent a Release for this request
    _outcome: str | None = field(default=None, init=False)  # why the EV stopped (set by the EV)
    _stats: FleetStats | None = field(default=None, init=False, repr=False, compare=False)
    _pending: bool = field(default=False, init=False, repr=False, compare=False)  # counted as unanswered

    @property
    def attempts(self) -> int:
        """Publishes of the request (1 = answered without a retry)."""
        return self._attempts

    @attempts.setter
    def attempts(self, value: int) -> None:
        before = self._tally()
        self._attempts = value
        self._changed(before)

    @property
    def released(self) -> bool:
        """The EV sent a Release for this request."""
        return self._released

    @released.setter
    def released(self, value: bool) -> None:
        before = self._tally()
        self._released = value
        self._changed(before)

    @property
    def outcome(self) -> str | None:
        """Why the EV stopped following the request (``completed``, ``released_early``, ``unanswered``, ...)."""
        return self._outcome

    @outcome.setter
    def outcome(self, value: str | None) -> None:
        before = self._tally()
        self._outcome = value
        self._changed(before)

    def _tally(self) -> _Tally | None:
        return _Tally.of(self) if self._stats is not None else None

    def _changed(self, before: _Tally | None) -> None:
        if self._stats is not None and before is not None:
            self._stats._record_changed(self, before)

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
        return self.final_status in FINAL_STATUSES

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
        # (an HTTP client polls snapshots: its first sight of a placed session may be an ``updated`` that replaced
        # the ``assigned``; either way the session was placed, on ``substation_id``)
        if status in CHARGING_STATUSES and self.assigned_s is None:
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


@dataclass(frozen=True, slots=True)
class _Tally:
    """What one record adds to the running counters of :class:`FleetStats`."""

    attempts: int
    sent: int  # 1 once published
    retries: int  # publishes after the first
    retried: int  # 1 when published more than once
    released: int
    final_status: str | None  # counted for sent records only
    outcome: str | None

    @classmethod
    def of(cls, r: RequestRecord) -> _Tally:
        a = r._attempts
        return cls(a, int(a > 0), max(0, a - 1), int(a > 1), int(r._released),
                   r.final_status if a > 0 else None, r._outcome)


def _bump(counter: Counter[str], key: str | None, delta: int) -> None:
    if key is None or delta == 0:
        return
    value = counter[key] + delta
    if value:
        counter[key] = value
    else:
        del counter[key]


class FleetStats:
    """Everything a fleet or load test measured. All times are monotonic seconds passed in.

    ``keep_records=None`` (a finite run) keeps every record and latency sample: exact. ``keep_records=N`` (an
    open-ended fleet) keeps the ``N`` most recently created records, the latency percentiles of the ``N`` most
    recent answers, and the ids of at most ``N`` unanswered requests (the most recent); every count is exact
    either way (running counters, see the module docstring).
    """

    def __init__(self, *, mode: str, total: int | None = None, started_at: float = 0.0,
                 keep_records: int | None = None) -> None:
        if keep_records is not None and keep_records < 1:
            raise ValueError(f"keep_records must be >= 1 (or None: keep all), got {keep_records}")
        self.mode = mode
        self.total = total  # requests planned (None: open-ended fleet)
        self.started_at = started_at
        self.ended_at: float | None = None
        self.keep_records = keep_records  # None: every record is kept
        #: The records kept: all of them, or the ``keep_records`` most recently created.
        self.records: deque[RequestRecord] = deque(maxlen=keep_records)
        self.records_created = 0  # records ever created (kept or not)
        self.first_answer = LatencyRecorder(window=keep_records)
        self.to_assigned = LatencyRecorder(window=keep_records)
        # running counters (see _record_changed); read by the metrics thread, so each only ever moves the way
        # its record field moves (requests and retries never go down)
        self.sent = 0  # requests published at least once
        self.retries = 0  # publishes of a request after its first
        self.retried_requests = 0  # requests published more than once
        self.total_attempts = 0
        self.released_by_ev = 0
        self.duplicate_answers = 0
        self.unanswered_count = 0  # sent, no answer (yet)
        self._final: Counter[str] = Counter()  # final status of every sent request
        self.outcomes: Counter[str] = Counter()  # why each EV stopped following its request
        #: id() -> record of the requests counted in ``unanswered_count``, oldest first; when bounded, trimmed
        #: to the newest ``keep_records`` whenever it holds twice that many
        self._unanswered: dict[int, RequestRecord] = {}
        self.status_events: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.active_sessions = 0  # EVs charging right now (assigned, not yet completed)
        self.queued_now = 0  # EVs waiting in the balancer's queue right now
        self.connected_evs = 0
        self.connect_failures = 0
        self.arrivals_delayed = 0  # arrivals that had to wait for a free EV id
        #: where requests were placed (their first ``assigned``): the spread the original design's users looked at
        self.placed_on: Counter[str] = Counter()
        #: Called with each request's first-answer latency in seconds (the metrics histogram observes it).
        self.on_first_answer: Callable[[float], None] | None = None
        self._rate_mark: tuple[float, int] | None = None

    # --- recording ----------------------------------------------------------------------------
    def new_record(self, record: RequestRecord) -> RequestRecord:
        """Keep ``record`` (dropping the oldest kept one when bounded) and count it from now on: later changes
        of its ``attempts``/``released``/``outcome`` and answers through :meth:`on_answer` update the counters."""
        if record._stats is not None and record._stats is not self:
            raise ValueError("the record already belongs to another FleetStats")
        if record._stats is None:
            record._stats = self
            self.records_created += 1
            self._record_changed(record, _Tally(0, 0, 0, 0, 0, None, None))
            self.records.append(record)
        return record

    def _record_changed(self, record: RequestRecord, before: _Tally) -> None:
        """Apply what changed in ``record`` since ``before`` to the running counters. Each counter gets one
        in-place add, so a scrape from another thread never sees a counter step back and forth."""
        after = _Tally.of(record)
        if after != before:
            if after.sent != before.sent:
                self.sent += after.sent - before.sent
            if after.retries != before.retries:
                self.retries += after.retries - before.retries
            if after.retried != before.retried:
                self.retried_requests += after.retried - before.retried
            if after.attempts != before.attempts:
                self.total_attempts += after.attempts - before.attempts
            if after.released != before.released:
                self.released_by_ev += after.released - before.released
            if after.final_status != before.final_status:
                _bump(self._final, after.final_status, 1)
                _bump(self._final, before.final_status, -1)
            if after.outcome != before.outcome:
                _bump(self.outcomes, after.outcome, 1)
                _bump(self.outcomes, before.outcome, -1)
        pending = record._attempts > 0 and not record.answered
        if pending != record._pending:
            record._pending = pending
            if pending:
                self.unanswered_count += 1
                self._unanswered[id(record)] = record
                keep = self.keep_records
                if keep is not None and len(self._unanswered) > 2 * keep:
                    # amortised: trim to the newest ``keep`` only when twice that many; trimming one at a time
                    # would let every request in flight push out an old never-answered one
                    for key in list(self._unanswered)[:-keep]:
                        del self._unanswered[key]
            else:
                self.unanswered_count -= 1
                self._unanswered.pop(id(record), None)

    def on_answer(self, record: RequestRecord, now: float, status: str, **fields: Any) -> bool:
        """Record one answer for ``record``; updates latencies and live counters. ``False``: a duplicate."""
        was_answered = record.answered
        was_assigned = record.assigned_s is not None
        previous = record.final_status
        before = _Tally.of(record)
        if not record.record_answer(now, status, **fields):
            self.duplicate_answers += 1
            return False
        if record._stats is self:
            self._record_changed(record, before)
        self.status_events[status] += 1
        if fields.get("reason"):
            self.reasons[f"{status}:{fields['reason']}"] += 1
        if not was_answered and record.first_answer_s is not None:
            self.first_answer.add(record.first_answer_s)
            if self.on_first_answer is not None:
                self.on_first_answer(record.first_answer_s)
        if not was_assigned and record.assigned_s is not None:
            self.to_assigned.add(record.assigned_s)
            self.placed_on[record.substation_id or "?"] += 1
        self._track_live(previous, status)
        return True

    def _track_live(self, previous: str, status: str) -> None:
        charging_before = previous in CHARGING_STATUSES
        charging_after = status in CHARGING_STATUSES
        self.active_sessions += int(charging_after) - int(charging_before)
        self.queued_now += int(status == "queued") - int(previous == "queued")

    # --- derived (from the running counters: nothing here walks the records) -------------------
    @property
    def answered(self) -> int:
        """Requests answered (first answers, all of them, also when the latency window is bounded)."""
        return self.first_answer.count

    def sent_and_retries(self) -> tuple[int, int]:
        """Requests sent, and re-sends of requests not answered yet (publishes after each one's first)."""
        return self.sent, self.retries

    def unanswered(self) -> list[RequestRecord]:
        """Requests sent and not answered (yet), oldest first; when bounded, at most the ``keep_records``
        most recent of them (:attr:`unanswered_count` is the exact number)."""
        records = list(self._unanswered.values())
        return records if self.keep_records is None else records[-self.keep_records:]

    def final_counts(self) -> Counter[str]:
        """Sent requests by their last status heard (``unanswered`` without an answer)."""
        return Counter(self._final)

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
            "requests_unanswered": self.unanswered_count,
            "unanswered_request_ids": [f"{r.ev_id}/{r.request_id}" for r in unanswered],
            "elapsed_s": round(elapsed, 3),
            "throughput_rps": round(self.answered / elapsed, 3) if elapsed > 0 else 0.0,
            "latency_first_answer": self.first_answer.summary(),
            "latency_to_assigned": self.to_assigned.summary(),
            "status_events": dict(sorted(self.status_events.items())),
            "final_status": dict(sorted(self.final_counts().items())),
            "reasons": dict(sorted(self.reasons.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "retried_requests": self.retried_requests,
            "total_attempts": self.total_attempts,
            "duplicate_answers": self.duplicate_answers,
            "released_by_ev": self.released_by_ev,
            "active_sessions": self.active_sessions,
            "connect_failures": self.connect_failures,
            "arrivals_delayed": self.arrivals_delayed,
            "sessions_by_substation": dict(sorted(self.placed_on.items())),
            # what ``requests`` of the saved file holds: every record (limit None) or the most recent ones
            "records_limit": self.keep_records,
            "records_kept": len(self.records),
            "records_dropped": self.records_created - len(self.records),
        }

    def report(self, now: float, **extra: Any) -> dict[str, Any]:
        """Summary plus the request records that were sent: what ``--save`` writes.

        Exact (every record) unless the stats are bounded (``keep_records``, an open-ended fleet): then
        ``requests`` holds the sent ones among the ``keep_records`` most recently created records (oldest
        first; a long charge that started earlier may be missing), and ``summary.records_dropped`` says how
        many older records were let go. The summary's counts always cover the whole run."""
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
        p = self.first_answer.percentiles(PERCENTILES)
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
                window = lat.get("window")
                of_last = f" (p of last {window})" if window is not None and window < lat["count"] else ""
                rows.append((label, f"n={lat['count']} p50={lat['p50_ms']:.2f} p95={lat['p95_ms']:.2f} "
                                    f"p99={lat['p99_ms']:.2f} max={lat['max_ms']:.2f} ms{of_last}"))
            else:
                rows.append((label, "n=0"))
        rows.append(("answers by status", ", ".join(f"{k}={v}" for k, v in s["status_events"].items()) or "-"))
        placed = s["sessions_by_substation"]
        total = sum(placed.values())
        rows.append(("sessions per substation", ", ".join(
            f"{k}={v} ({100 * v / total:.0f} %)" for k, v in sorted(placed.items(), key=lambda kv: (-kv[1], kv[0])))
            or "-"))
        rows.append(("final status", ", ".join(f"{k}={v}" for k, v in s["final_status"].items()) or "-"))
        if s["reasons"]:
            rows.append(("reasons", ", ".join(f"{k}={v}" for k, v in s["reasons"].items())))
        if s["records_dropped"]:
            rows.append(("records kept", f"last {s['records_kept']} (older {s['records_dropped']} counted, "
                                         f"not kept: EV_KEEP_RECORDS)"))
        width = max(len(r[0]) for r in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        if s["unanswered_request_ids"]:
            ids = s["unanswered_request_ids"]
            more = s["requests_unanswered"] - len(ids)
            lines.append("never answered: " + " ".join(ids) + (f" (and {more} older)" if more > 0 else ""))
        return "\n".join(lines)
