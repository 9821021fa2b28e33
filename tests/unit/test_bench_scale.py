"""``python -m bench scale`` at a tiny size (3 substations x 60 EVs, 1 grid-second, 20 steady pairs, 10 saturated
releases): the scale benchmark runs end to end through both paths, in a process per size as shipped, prints its
table and writes its JSON. Figures are not judged here (a benchmark is not a test); outcomes are: the pure core and
the service path (in-memory transport) decide the same (sessions, queue, answers), nothing is over a limit, every
figure is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("fill_us_per_request", "steady_us_per_request", "steady_us_per_answer", "steady_gc_us_per_request",
           "rebalance_churned_ms_per_grid_s", "rebalance_settled_ms_per_grid_s", "rss_mb", "saturated_us_per_request",
           "saturated_us_per_answer")


def test_bench_scale_runs_both_paths_and_they_decide_alike(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, "-m", "bench", "scale", "--sizes", "3x60", "--seconds", "1",
                          "--steady", "20", "--saturated", "10", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    header, *lines, core_line = run.stdout.splitlines()
    assert core_line.startswith("balancer core: ")  # (compiled or interpreted, and why)
    for column in ("fill µs/req", "steady µs/req", "rebal. churned ms/s", "settled ms/s", "RSS MB", "sat. µs/req",
                   "sat. µs/answer"):
        assert column in header
    assert len(lines) == 2 and not any("failed" in line for line in lines), run.stdout
    rows = {row["path"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"core", "service"}
    core, service = rows["core"], rows["service"]
    assert (core["substations"], core["evs"]) == (service["substations"], service["evs"]) == (3, 60)
    assert core["sessions"] > 0 and core["queued"] > 0  # the grid filled up and a queue formed
    # the saturated phase: ten releases, each followed by at least one request, the queue back at the fill's length
    assert core["saturated_calls"] >= 20 and core["saturated_answers"] >= 10
    for key in ("sessions", "queued", "steady_answers", "saturated_calls", "saturated_answers"):
        assert core[key] == service[key], key
    for row in rows.values():
        assert row["violations"] == 0
        assert all(row[figure] >= 0 for figure in FIGURES) and row["rss_mb"] > 0


def test_bench_scale_with_operator_limits_is_deterministic_and_within_limits(tmp_path: Path) -> None:
    """``--schedules``/``--limited``/``--digest``: two runs give the same digest; nothing is over a limit."""
    digests = []
    for k in range(2):
        out = tmp_path / f"scale{k}.json"
        run = subprocess.run([sys.executable, "-m", "bench", "scale", "--sizes", "3x60", "--paths", "core",
                              "--seconds", "1", "--steady", "20", "--schedules", "3", "--limited", "2",
                              "--distinct-limits", "--digest", "--json", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr
        (row,) = json.loads(out.read_text())["rows"]
        assert row["violations"] == 0 and row["sessions"] > 0
        digests.append(row["digest"])
    assert digests[0] == digests[1] and len(digests[0]) == 64
