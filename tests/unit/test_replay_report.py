"""Replay output: the table, the JSON document, the PNG plots and the CLI around them."""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from pathlib import Path

import pytest

from grid_sim.scenario import parse_scenario
from replay.cli import main
from replay.report import format_notes, format_table, plot_overview, plot_run, results_json
from replay.sim import DEFAULT_POLICY, RunResult, run

SMALL = """
name: small
description: one substation, a handful of EVs and an outage
duration_s: 20m
seed: 3
start_hour: 23.5
substations:
  - {id: a, capacity_kw: 60, base_load: {profile: points, points: [[0, 20]]}}
  - {id: b, capacity_kw: 30, base_load: {profile: points, points: [[0, 5]]}}
arrivals:
  ev: {requested_kw: {11: 1}, energy_kwh: [1, 3], stay: [5m, 15m]}
  rate: [{from: 0, to: 15m, per_hour: 60}]
events: [{type: offline, at: 5m, substation: b}, {type: online, at: 10m, substation: b}]
"""


@cache
def result() -> RunResult:
    return run(parse_scenario(SMALL), DEFAULT_POLICY)


def test_table_has_a_header_and_one_aligned_row_per_run() -> None:
    lines = format_table([result(), result()]).splitlines()
    assert lines[0].split()[:3] == ["scenario", "policy", "EVs"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 4 and lines[2] == lines[3]
    assert lines[2].startswith("small") and DEFAULT_POLICY in lines[2]
    assert len({len(line) for line in lines[:2]}) == 1


def test_json_carries_the_metrics_and_is_serialisable() -> None:
    doc = json.loads(json.dumps(results_json([result()], {("small", DEFAULT_POLICY): "small.png"})))
    (entry,) = doc["runs"]
    assert entry["scenario"] == "small" and entry["plot"] == "small.png"
    assert entry["metrics"]["evs"] == result().metrics.evs
    assert set(entry["metrics"]) >= {"overload_s", "peak_overload_kw", "spread_mean", "jain", "wait_p95_s",
                                     "energy_not_delivered_kwh", "changes_max", "rejected_by_reason"}


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    plot_run(result(), tmp_path / "one.png")
    plot_overview([result(), result()], tmp_path / "overview.png")
    for name in ("one.png", "overview.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_a_scenario_file_and_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    out = tmp_path / "out"
    assert main(["--scenario", str(path), "--policy", DEFAULT_POLICY, "--out", str(out), "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "small" in printed and "overload s" in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["runs"][0]["seed"] == 4
    assert (out / f"small__{DEFAULT_POLICY}.png").exists()


def test_cli_counts_every_plot_it_writes_and_explains_the_columns(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    out = tmp_path / "out"
    assert main(["--scenario", str(path), "--policy", f"{DEFAULT_POLICY},round-robin", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 3 and "small__overview.png" in pngs
    assert f"and {len(pngs)} plots (2 runs + 1 overview) to {out}" in printed
    assert "columns:" in printed and "Jain" in printed.split("columns:")[1]
    assert "burst_1000:" not in printed  # a scenario's note only when it is in the table
    assert "burst_1000:" in format_notes([dataclasses.replace(result(), scenario="burst_1000")])


def test_cli_live_mode_checks_its_arguments_before_starting_anything(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--mode", "live", "--scenario", "nope", "--out", str(tmp_path)]) == 2
    assert "no scenario 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="command-delay is for --mode sim"):
        main(["--mode", "live", "--command-delay", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--mode", "live", "--speedup", "0", "--out", str(tmp_path)])


def test_cli_refuses_unknown_scenarios_and_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scenario", "nope", "--out", str(tmp_path)]) == 2
    assert "no scenario 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown policy 'fifo'"):
        main(["--scenario", "burst_1000", "--policy", "fifo", "--out", str(tmp_path)])


def test_cli_lists_scenarios_and_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    printed = capsys.readouterr().out
    assert "evening_peak" in printed and DEFAULT_POLICY in printed
