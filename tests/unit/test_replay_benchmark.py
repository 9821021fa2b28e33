"""The session benchmark end to end on a slice of the real sessions (two days of the Caltech ACN data), its
scoring (over-limit seconds against the site limit, goals) and the published figures' matching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from replay.benchmark import (
    BENCHMARK_DIR,
    GOAL_MAX_CHANGES,
    BenchRun,
    find_published,
    goal_misses,
    score_run,
)
from replay.cli import main
from replay.metrics import Metrics, SubstationTrace, Trace
from replay.sessions import load_sessions

SLICE = Path(__file__).resolve().parents[1] / "data" / "acn_caltech_2019-03-01_02.csv"


def test_the_benchmark_runs_end_to_end_on_a_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--sessions", str(SLICE), "--limit-kw", "10,25", "--policy", "least-utilised,deadline,round-robin",
                 "--step", "10", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "no published results are known for this file" in out  # a slice is not the data set they were for
    doc = json.loads((tmp_path / "bench_acn_caltech_2019-03-01_02.json").read_text())
    sessions = load_sessions(SLICE)
    assert doc["sessions"]["count"] == 39 and doc["sessions"]["sha256"] == sessions.sha256
    assert doc["step_s"] == 10 and doc["margin_pct"] == 5
    assert [lim["limit_kw"] for lim in doc["limits"]] == [10, 25]
    for lim in doc["limits"]:
        optimum = lim["optimum"]["delivered_pct"]
        assert 0 < optimum <= 100 and lim["published"] is None
        runs = {r["policy"]: r for r in lim["runs"]}
        assert list(runs) == ["least-utilised", "deadline", "round-robin"]
        for policy, r in runs.items():
            assert r["requested_kwh"] == pytest.approx(sessions.requested_kwh)
            assert r["metrics"]["evs"] == 39 and not r["anomalies"]
            if policy == "round-robin":  # ignores the limit: it may beat the optimum only by breaking it
                continue
            assert r["over_limit_s"] == 0 and r["peak_over_limit"] <= 1.0 + 1e-9  # (a float sum of whole-watt grants)
            assert 0 < r["delivered_pct"] <= optimum + 1e-6  # nothing real-time beats the offline optimum
            line = next(x for x in out.splitlines() if x.split()[:2] == [f"{lim['limit_kw']:g}", policy])
            assert f"{r['delivered_pct']:.2f}" in line and f"{optimum:.2f}" in line
        # At 10 kW the slice's peak demand (many EVs at 6.6 kW) is far above the limit: round-robin breaks it.
        if lim["limit_kw"] == 10:
            assert runs["round-robin"]["over_limit_s"] > 0 and runs["round-robin"]["peak_over_limit"] > 2


def test_published_figures_are_matched_by_the_file_hash(tmp_path: Path) -> None:
    sessions = load_sessions(SLICE)
    assert find_published(sessions.sha256) is None
    shipped = find_published("bfa37be8e1911b3271d208c684dc02c5a68653b3c1cfe27bbdf116a1a9ffb242")
    assert shipped is not None and shipped.limits == [10, 20, 30, 40, 50, 60]
    assert shipped.columns == ("FCFS", "Round Robin", "EDF", "LLF")
    assert shipped.at(30) == {"FCFS": 93.16, "Round Robin": 92.87, "EDF": 98.16, "LLF": 99.03}
    # The same figures for a copy whose hash is listed are found; an entry lacking a column is refused.
    text = (BENCHMARK_DIR / "acn-caltech-2019-03.yaml").read_text().replace(shipped.sessions_sha256, sessions.sha256)
    (tmp_path / "slice.yaml").write_text(text)
    found = find_published(sessions.sha256, tmp_path)
    assert found is not None and found.at(10) == shipped.at(10)
    (tmp_path / "slice.yaml").write_text(text.replace("LLF: 87.57", "Other: 87.57"))
    with pytest.raises(ValueError, match="no figure for 20 kW: LLF"):
        find_published(sessions.sha256, tmp_path)


def test_the_published_table_is_the_shared_readme_s(tmp_path: Path) -> None:
    readme = Path(__file__).resolve().parents[2] / ".." / "shared" / "benchmarks" / "acn-caltech-2019-03" / "README.md"
    shipped = find_published("bfa37be8e1911b3271d208c684dc02c5a68653b3c1cfe27bbdf116a1a9ffb242")
    assert shipped is not None
    if not readme.is_file():
        pytest.skip(f"the shared benchmark folder is not beside this checkout ({readme})")
    rows = [line.split("|")[1:-1] for line in readme.read_text().splitlines() if line.startswith("| ")]
    table = {float(r[0]): [float(x) for x in r[1:]] for r in rows if r[0].strip().replace(".", "").isdigit()}
    assert table == {k: [shipped.by_limit_kw[k][c] for c in shipped.columns] for k in shipped.limits}


def _run(load_kw: list[float], step: float = 5.0, policy: str = "deadline") -> object:
    class Result:  # the parts of replay.sim.RunResult that score_run reads
        trace = Trace(step, [SubstationTrace("site", load_kw, [10.527] * len(load_kw), [True] * len(load_kw))])
        evs: list[object] = []
        metrics = None
        counters: dict[str, int] = {}
        anomalies: dict[str, int] = {}
        notes: dict[str, int] = {}
        sim_seconds = step * len(load_kw)
        wall_seconds = 0.0

    return Result()


def test_over_limit_counts_time_above_the_site_limit_not_the_capacity() -> None:
    # Capacity 10.527 kW; the site limit is 10 kW: 10.2 kW is over the limit (but not the capacity).
    scored = score_run(10, "deadline", _run([9.0, 10.0, 10.2, 10.0000001, 12.0]), 0.0)
    assert scored.over_limit_s == 10.0  # two samples of 5 s: 10.2 and 12 (watts, not float noise, count)
    assert scored.peak_kw == 12.0 and scored.peak_over_limit == pytest.approx(1.2)


def _bench(policy: str, delivered_pct: float, changes: float | None = 5.0, over_s: float = 0.0) -> BenchRun:
    metrics = Metrics(evs=1, served=1, never_served=0, rejected=0, rejected_by_reason={}, overload_s=0,
                      peak_overload_kw=0, peak_utilisation=0, spread_mean=0, spread_max=0, jain=None,
                      energy_demand_kwh=100, energy_not_delivered_kwh=0, energy_not_delivered_share=0,
                      wait_p50_s=None, wait_p95_s=None, wait_queued_p50_s=None, wait_queued_p95_s=None,
                      changes_mean=changes, changes_max=0)
    return BenchRun(30, policy, 100.0, delivered_pct, 30, over_s, metrics, {}, {}, {}, 0, 0, 0)


def test_goals_name_every_miss_by_how_much() -> None:
    published = {"FCFS": 93.16, "Round Robin": 92.87, "EDF": 98.16, "LLF": 99.03}
    assert goal_misses(_bench("deadline", 99.10), 99.26, published) == []
    assert goal_misses(_bench("deadline", 98.00, changes=26.8, over_s=3), 99.26, published) == [
        "1.03 below LLF", "0.27 below 99% of optimum", "26.8 changes", "3 s over"]
    assert goal_misses(_bench("weighted-fair", 92.00), 99.26, published) == ["0.87 below Round Robin"]
    assert goal_misses(_bench("least-utilised", 92.87, changes=GOAL_MAX_CHANGES), 99.26, published) == []
    assert goal_misses(_bench("least-utilised", 50.0), 99.26, None) == []  # nothing published to compare with
    assert goal_misses(_bench("round-robin", 50.0, over_s=100), 99.26, published) is None  # baselines: no goals


def test_a_bad_session_file_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    shutil.copy(SLICE, bad)
    with bad.open("a") as f:
        f.write("x,CA-1,100,50,4,6.6\n")
    assert main(["--sessions", str(bad), "--limit-kw", "10", "--out", str(tmp_path)]) == 2
    assert "line 41: departure_min 50 is not after arrival_min 100" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
    with pytest.raises(SystemExit, match="--limit-kw is needed"):
        main(["--sessions", str(SLICE), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="takes no --mode live"):
        main(["--sessions", str(SLICE), "--mode", "live", "--limit-kw", "10"])
