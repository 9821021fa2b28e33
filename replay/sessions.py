"""Real charging sessions as a replay scenario: a CSV file in, a one-substation :class:`Scenario` out.

The file has one session per row and exactly these columns (the format of
``../shared/benchmarks/acn-caltech-2019-03/sessions.csv``)::

    session_id,station_id,arrival_min,departure_min,requested_kwh,max_kw

Times are minutes from the file's own origin. A file with a bad row is refused whole: every bad row is
named (file, line, column, value, why), so nothing is replayed from data that was only half read.

The mapping (:func:`sessions_scenario`) is the honest one of the benchmark's README: one substation whose
usable limit equals the site limit (capacity = limit / (1 - margin), rounded up to the watt so the
balancer's integer-watt limit is exactly the site limit), base load 0, and every session one EV that asks
at ``arrival_min`` for ``requested_kwh`` at up to ``max_kw``, says when it leaves (``departure`` is sent
with the request), and leaves at ``departure_min`` whatever it got. Its ``min_kw`` is 0: the study's EVSEs
(ACN-Sim's basic EVSEs) take any rate from 0 to the maximum, so a plugged-in EV may wait at 0 kW (the balancer
holds it at its smallest grant, 1 W) while others charge.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grid_sim.scenario import Scenario

__all__ = [
    "COLUMNS",
    "MAX_ENERGY_KWH",
    "MAX_KW",
    "REPO_ROOT",
    "SessionFile",
    "SessionFileError",
    "SessionRow",
    "capacity_for_limit",
    "load_sessions",
    "parse_sessions",
    "resolve_sessions_path",
    "sessions_scenario",
]

COLUMNS = ("session_id", "station_id", "arrival_min", "departure_min", "requested_kwh", "max_kw")
#: The scenario format's bounds for one EV (``grid_sim.scenario.ExplicitEv``).
MAX_KW = 1000.0
MAX_ENERGY_KWH = 10_000.0
#: Bad rows named in the error before it says "and N more".
_SHOWN_ERRORS = 10
REPO_ROOT = Path(__file__).resolve().parents[1]


class SessionFileError(ValueError):
    """A session file that cannot be read or has bad rows; the message names the file, lines and reasons."""


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One charging session as the file gives it (``line``: its line in the file, for messages)."""

    line: int
    session_id: str
    station_id: str
    arrival_min: float
    departure_min: float
    requested_kwh: float
    max_kw: float


@dataclass(frozen=True, slots=True)
class SessionFile:
    """A whole session file: its rows in file order, where it came from and its SHA-256 (to recognise the
    data set whose published results it is compared against)."""

    source: str
    sha256: str
    rows: tuple[SessionRow, ...]

    @property
    def requested_kwh(self) -> float:
        return math.fsum(r.requested_kwh for r in self.rows)

    @property
    def name(self) -> str:
        """The data set's name: the folder of a file called ``sessions.csv``, else the file's stem."""
        path = Path(self.source)
        return path.parent.name if path.stem == "sessions" and path.parent.name else path.stem


def _number(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{column} {text!r} is not a finite number")
    return value


def _row(line: int, fields: list[str]) -> SessionRow:
    if len(fields) != len(COLUMNS):
        raise ValueError(f"{len(fields)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})")
    session_id, station_id = fields[0].strip(), fields[1].strip()
    if not session_id:
        raise ValueError("session_id is empty")
    if not station_id:
        raise ValueError("station_id is empty")
    arrival, departure, energy, max_kw = (_number(f, c) for f, c in zip(fields[2:], COLUMNS[2:], strict=True))
    if arrival < 0:
        raise ValueError(f"arrival_min {arrival:g} is negative")
    if departure <= arrival:
        raise ValueError(f"departure_min {departure:g} is not after arrival_min {arrival:g}")
    if not 0 < energy <= MAX_ENERGY_KWH:
        raise ValueError(f"requested_kwh {energy:g} is not in (0, {MAX_ENERGY_KWH:g}]")
    if not 0 < max_kw <= MAX_KW:
        raise ValueError(f"max_kw {max_kw:g} is not in (0, {MAX_KW:g}]")
    return SessionRow(line, session_id, station_id, arrival, departure, energy, max_kw)


def parse_sessions(text: str, source: str = "<sessions>") -> SessionFile:
    """Read and check a session CSV. Raises :class:`SessionFileError` naming every bad row (the first ten)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SessionFileError(f"{source}: line 1: not valid CSV: {exc}") from None
    if header is None:
        raise SessionFileError(f"{source}: empty file (expected the header {','.join(COLUMNS)})")
    header = [h.strip().lstrip("\ufeff") for h in header]
    if tuple(header) != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        unknown = [c for c in header if c not in COLUMNS]
        why = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                          f"unknown {', '.join(unknown)}" if unknown else "") if part)
        raise SessionFileError(f"{source}: line 1: the header must be exactly {','.join(COLUMNS)}"
                               f" ({why or 'in this order'})")
    rows: list[SessionRow] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    try:
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue  # a blank line (a trailing newline) is not a session
            try:
                row = _row(line, fields)
            except ValueError as exc:
                errors.append(f"line {line}: {exc}")
                continue
            if row.session_id in seen:
                errors.append(f"line {line}: session_id {row.session_id!r} repeats line {seen[row.session_id]}")
                continue
            seen[row.session_id] = line
            rows.append(row)
    except csv.Error as exc:
        errors.append(f"line {reader.line_num}: not valid CSV: {exc}")
    if errors:
        more = f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        raise SessionFileError(f"{source}: {len(errors)} bad row{'s' if len(errors) > 1 else ''}, nothing "
                               "replayed:\n  " + "\n  ".join(errors[:_SHOWN_ERRORS]) + more)
    if not rows:
        raise SessionFileError(f"{source}: no sessions (only the header)")
    return SessionFile(source, hashlib.sha256(text.encode("utf-8")).hexdigest(), tuple(rows))


def resolve_sessions_path(path: str | Path) -> Path:
    """An absolute path as it is; a relative one against the current directory, else the repository root
    (so ``../shared/...`` works from the repository and from anywhere else)."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise SessionFileError(f"no session file {str(path)!r} (tried {tried})")


def load_sessions(path: str | Path) -> SessionFile:
    resolved = resolve_sessions_path(path)
    try:
        raw = resolved.read_bytes()
    except OSError as exc:
        raise SessionFileError(f"{resolved}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SessionFileError(f"{resolved}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_sessions(text, str(resolved))


def capacity_for_limit(limit_kw: float, margin_pct: float) -> float:
    """The substation capacity whose usable limit (capacity less the margin, in whole watts as the balancer
    computes it) is exactly ``limit_kw``: ``limit / (1 - margin)`` rounded up to the watt."""
    if not (limit_kw > 0 and math.isfinite(limit_kw)):
        raise ValueError(f"limit_kw must be a finite number > 0, got {limit_kw!r}")
    if not 0 <= margin_pct < 100:
        raise ValueError(f"margin_pct must be in [0, 100), got {margin_pct!r}")
    limit_w = round(limit_kw * 1000)
    capacity_w = math.ceil(limit_w / (1 - margin_pct / 100) - 1e-9)
    while math.floor(capacity_w * (1 - margin_pct / 100)) < limit_w:  # float rounding of the product
        capacity_w += 1
    return capacity_w / 1000


def _limit_label(limit_kw: float) -> str:
    return f"{limit_kw:g}".replace(".", "p") + "kW"


def sessions_scenario(sessions: SessionFile | Sequence[SessionRow], limit_kw: float, *, margin_pct: float,
                      step_s: float = 1.0, name: str | None = None) -> Scenario:
    """The benchmark's mapping: one substation ``site`` whose usable limit is ``limit_kw`` (capacity from
    :func:`capacity_for_limit`), base load 0, one EV per session (ids ``EV_00001``... in file order), asking
    for ``requested_kwh`` at ``max_kw`` (``min_kw`` 0: it may be paused) with its departure, leaving at its
    departure whatever it got.

    Scenario time 0 is the first arrival; ``start_hour`` is its time of day (minutes from the file's origin,
    taken as midnight). Telemetry every step, without lag (the study's simulator sees its site exactly)."""
    rows = sessions.rows if isinstance(sessions, SessionFile) else tuple(sessions)
    if not rows:
        raise ValueError("no sessions")
    if not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"step_s must be > 0, got {step_s!r}")
    label = name or (sessions.name if isinstance(sessions, SessionFile) else "sessions")
    origin_min = min(r.arrival_min for r in rows)
    evs = [{"at": (r.arrival_min - origin_min) * 60.0, "ev_id": f"EV_{i:05d}", "requested_kw": r.max_kw,
            "min_kw": 0.0, "energy_kwh": r.requested_kwh, "departure": (r.departure_min - origin_min) * 60.0}
           for i, r in enumerate(rows, start=1)]
    last = max(r.departure_min for r in rows) - origin_min
    scenario_name = "".join(c if c.isalnum() or c in "_-" else "_" for c in f"{label}_{_limit_label(limit_kw)}")
    return Scenario.model_validate({
        "name": scenario_name[-64:],
        "description": f"{len(rows)} sessions from {label} at a site limit of {limit_kw:g} kW "
                       f"(capacity {capacity_for_limit(limit_kw, margin_pct):g} kW less a {margin_pct:g} % margin)",
        "duration_s": last * 60.0,
        "start_hour": (origin_min % 1440) / 60.0,
        "step_s": step_s,
        "telemetry": {"interval_s": step_s, "lag_s": 0},
        "substations": [{"id": "site", "capacity_kw": capacity_for_limit(limit_kw, margin_pct),
                         "base_load": {"profile": "points", "points": [[0, 0]]}}],
        "arrivals": {"explicit": evs},
    })
