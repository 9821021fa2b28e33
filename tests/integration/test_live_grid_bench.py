"""``python -m bench live-grid`` at a tiny size (10 substations, 20 EVs, 5 s): the whole live run works end to end
through a real Mosquitto, balancer, agents and fleet, and says what it measured. Figures are not judged here (a
benchmark is not a test); outcomes are: every request answered, nothing stale, no overload, telemetry read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import live_grid

pytestmark = pytest.mark.integration


def test_live_grid_runs_at_a_tiny_size(tmp_path: Path, mosquitto_bin: str) -> None:
    out = tmp_path / "live_grid.json"
    rc = live_grid.main(["--substations", "10", "--agent-processes", "2", "--evs", "20", "--rate", "4",
                         "--seconds", "5", "--settle", "1", "--json", str(out)])
    row = json.loads(out.read_text())
    assert rc == 0, row
    assert row["substations"] == 10 and row["agent_processes"] == 2
    assert row["requests_sent"] == row["requests_answered"] == 20
    assert row["requests_unanswered"] == 0 and row["connect_failures"] == 0
    assert row["final_status"] == {"completed": 20}  # placed, then released by the fleet at its end
    assert row["telemetry_per_s"] > 0 and row["telemetry_refused"] == 0
    assert row["stale_in_window"] == 0 and row["stale_at_end"] == 0 and row["overload_s"] == 0
    assert row["balancer_cpu_pct"] > 0 and row["balancer_rss_mb_peak"] > 0
    assert row["first_answer_ms"]["p99_ms"] is not None
