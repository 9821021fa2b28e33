"""Session files (CSV) for the session benchmark: good files load, bad rows are refused whole with clear
errors, and the mapping to a scenario is the benchmark README's (one site, limit = capacity less margin)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from grid_sim.scenario import ExplicitEv, PointsBaseLoad
from replay.sessions import (
    COLUMNS,
    SessionFileError,
    capacity_for_limit,
    load_sessions,
    parse_sessions,
    resolve_sessions_path,
    sessions_scenario,
)
from replay.sim import run

HEADER = ",".join(COLUMNS)
SLICE = Path(__file__).resolve().parents[1] / "data" / "acn_caltech_2019-03-01_02.csv"


def csv_text(*rows: str) -> str:
    return "\n".join([HEADER, *rows]) + "\n"


def refused(text: str) -> str:
    with pytest.raises(SessionFileError) as info:
        parse_sessions(text, "s.csv")
    return str(info.value)


def test_a_good_file_loads_in_file_order() -> None:
    text = csv_text("a 1,CA-1,380,460,4.216,6.6", "b,CA-2,425,455.5,0.786,7.2")
    sessions = parse_sessions(text, "x/acn/sessions.csv")
    assert [(r.session_id, r.station_id, r.arrival_min, r.departure_min, r.requested_kwh, r.max_kw, r.line)
            for r in sessions.rows] == [("a 1", "CA-1", 380, 460, 4.216, 6.6, 2),
                                        ("b", "CA-2", 425, 455.5, 0.786, 7.2, 3)]
    assert sessions.requested_kwh == pytest.approx(5.002)
    assert sessions.name == "acn"  # a file called sessions.csv is named after its folder
    assert parse_sessions(text, "x/day1.csv").name == "day1"
    assert len(sessions.sha256) == 64 and sessions.sha256 != parse_sessions(text + "\n", "s").sha256


def test_crlf_line_ends_a_bom_and_a_trailing_blank_line_are_fine() -> None:
    text = "\ufeff" + HEADER + "\r\n" + "a,CA-1,0,60,5,6.6\r\n\r\n"
    assert [r.session_id for r in parse_sessions(text).rows] == ["a"]


@pytest.mark.parametrize(("row", "why"), [
    ("a,CA-1,abc,460,4,6.6", "arrival_min 'abc' is not a number"),
    ("a,CA-1,380,nan,4,6.6", "departure_min 'nan' is not a finite number"),
    ("a,CA-1,380,460,inf,6.6", "requested_kwh 'inf' is not a finite number"),
    ("a,CA-1,380,1e999,4,6.6", "departure_min '1e999' is not a finite number"),
    ("a,CA-1,-5,460,4,6.6", "arrival_min -5 is negative"),
    ("a,CA-1,460,460,4,6.6", "departure_min 460 is not after arrival_min 460"),
    ("a,CA-1,460,380,4,6.6", "departure_min 380 is not after arrival_min 460"),
    ("a,CA-1,380,460,0,6.6", "requested_kwh 0 is not in (0, 10000]"),
    ("a,CA-1,380,460,-1,6.6", "requested_kwh -1 is not in (0, 10000]"),
    ("a,CA-1,380,460,4,0", "max_kw 0 is not in (0, 1000]"),
    ("a,CA-1,380,460,4,1001", "max_kw 1001 is not in (0, 1000]"),
    ("a,CA-1,380,460,4", "5 fields, expected 6"),
    ("a,CA-1,380,460,4,6.6,extra", "7 fields, expected 6"),
    (",CA-1,380,460,4,6.6", "session_id is empty"),
    ("a, ,380,460,4,6.6", "station_id is empty"),
])
def test_a_bad_row_is_refused_with_its_line_and_reason(row: str, why: str) -> None:
    message = refused(csv_text("ok,CA-1,0,60,5,6.6", row))
    assert message.startswith("s.csv: 1 bad row, nothing replayed:")
    assert f"line 3: {why}" in message


def test_every_bad_row_is_named_up_to_ten_then_counted() -> None:
    rows = [f"s{i},CA-1,10,{'x' if i % 2 else 20},4,6.6" for i in range(30)]
    message = refused(csv_text(*rows))
    assert message.startswith("s.csv: 15 bad rows")
    assert "line 3: departure_min 'x' is not a number" in message
    assert message.count("line ") == 10 and message.endswith("... and 5 more")


def test_a_repeated_session_id_is_refused() -> None:
    message = refused(csv_text("a,CA-1,0,60,5,6.6", "b,CA-1,0,60,5,6.6", "a,CA-2,5,65,5,6.6"))
    assert "line 4: session_id 'a' repeats line 2" in message


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty file (expected the header session_id,station_id,"),
    (HEADER + "\n", "no sessions (only the header)"),
    ("session_id,station_id,arrival_min,departure_min,requested_kwh\na,b,0,1,2\n", "missing max_kw"),
    (HEADER + ",price\n", "unknown price"),
    ("station_id,session_id,arrival_min,departure_min,requested_kwh,max_kw\n", "in this order"),
])
def test_a_file_without_a_usable_header_or_rows_is_refused(text: str, why: str) -> None:
    assert why in refused(text)


def test_unreadable_files_are_refused_with_the_path(tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes((csv_text("caf\xe9,CA-1,0,60,5,6.6")).encode("latin-1"))
    with pytest.raises(SessionFileError, match=r"latin\.csv: not UTF-8 text"):
        load_sessions(latin)
    with pytest.raises(SessionFileError, match=r"no session file 'missing\.csv' \(tried .*missing\.csv"):
        load_sessions("missing.csv")


def test_a_relative_path_is_found_from_the_repository_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: tests/data/... only exists relative to the repo root
    found = resolve_sessions_path("tests/data/acn_caltech_2019-03-01_02.csv")
    assert found == SLICE
    (tmp_path / "tests" / "data").mkdir(parents=True)
    own = tmp_path / "tests" / "data" / "acn_caltech_2019-03-01_02.csv"
    own.write_text(csv_text("a,CA-1,0,60,5,6.6"), encoding="utf-8")
    assert resolve_sessions_path("tests/data/acn_caltech_2019-03-01_02.csv") == own  # the current directory first


@pytest.mark.parametrize("margin", [0.0, 5.0, 7.5, 10.0, 33.3])
def test_capacity_less_margin_is_the_limit_to_the_watt(margin: float) -> None:
    for limit_w in (1, 999, 10_000, 12_345, 20_000, 50_000, 60_000, 1_000_001):
        capacity_w = round(capacity_for_limit(limit_w / 1000, margin) * 1000)
        # The balancer's own limit computation (balancer.core.model.Substation.limit_w) gives exactly the limit:
        assert math.floor(capacity_w * (1 - margin / 100)) == limit_w
        assert math.floor((capacity_w - 1) * (1 - margin / 100)) < limit_w  # and no watt more capacity than needed
    with pytest.raises(ValueError):
        capacity_for_limit(0, 5)
    with pytest.raises(ValueError):
        capacity_for_limit(10, 100)


def test_sessions_become_one_site_with_one_ev_each() -> None:
    sessions = parse_sessions(csv_text("a,CA-1,380,460,4.2,6.6", "b,CA-2,425,1500,30,7.2"), "bench/sessions.csv")
    sc = sessions_scenario(sessions, 10, margin_pct=5, step_s=5)
    (site,) = sc.substations
    assert site.capacity_kw == capacity_for_limit(10, 5) == 10.527
    assert isinstance(site.base_load, PointsBaseLoad) and site.base_load.points == [(0, 0)]
    assert sc.step_s == 5 and sc.telemetry.interval_s == 5 and sc.telemetry.lag_s == 0
    assert sc.start_hour == pytest.approx(380 / 60)  # time 0 is the first arrival, at 06:20
    assert sc.name == "bench_10kW"
    assert sc.arrivals.explicit == [
        ExplicitEv(at=0, ev_id="EV_00001", requested_kw=6.6, min_kw=0, energy_kwh=4.2, departure=80 * 60),
        ExplicitEv(at=45 * 60, ev_id="EV_00002", requested_kw=7.2, min_kw=0, energy_kwh=30, departure=1120 * 60),
    ]
    assert sessions_scenario(sessions, 12.5, margin_pct=0).name == "bench_12p5kW"


def test_an_uncongested_site_delivers_what_the_rate_allows() -> None:
    # Two EVs, plenty of room: each gets its full rate; b cannot get more than 6.6 kW x 1 h in its stay.
    sessions = parse_sessions(csv_text("a,CA-1,0,120,5,6.6", "b,CA-2,30,90,10,6.6"))
    result = run(sessions_scenario(sessions, 50, margin_pct=5), "least-utilised", core={"safety_margin_pct": 5})
    delivered = {ev.ev_id: ev.delivered_kwh for ev in result.evs}
    assert delivered["EV_00001"] == pytest.approx(5.0)
    assert delivered["EV_00002"] == pytest.approx(6.6, abs=0.01)  # left at its departure with what it got
    assert not result.anomalies


def test_the_shipped_slice_is_the_first_two_days_of_the_benchmark() -> None:
    sessions = load_sessions(SLICE)
    assert len(sessions.rows) == 39
    assert max(r.arrival_min for r in sessions.rows) < 2 * 1440
