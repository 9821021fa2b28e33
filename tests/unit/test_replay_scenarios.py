"""Replay scenario files: the shipped ones load and validate, bad ones are refused with clear errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from grid_sim.scenario import (
    SCENARIO_DIR,
    ScenarioError,
    generate_evs,
    load_scenario,
    parse_duration,
    parse_scenario,
    shipped_scenarios,
)

REQUIRED = {"steady_day", "evening_peak", "burst_1000", "substation_loss", "capacity_cut"}

MINIMAL = """
name: tiny
description: two substations, a few EVs
duration_s: 30m
seed: 7
substations:
  - {id: a, capacity_kw: 100, base_load: {profile: points, points: [[0, 20], [30m, 40]]}}
  - {id: b, capacity_kw: 50, base_load: {profile: daily, peak_pct: 40}}
arrivals:
  ev: {requested_kw: {11: 1}, energy_kwh: [5, 10], stay: [10m, 20m]}
  rate: [{from: 0, to: 30m, per_hour: 30}]
"""


def scenario_text(extra: str = "", **replace: str) -> str:
    text = MINIMAL
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text + textwrap.dedent(extra)


def test_the_required_scenarios_are_shipped() -> None:
    assert set(shipped_scenarios()) >= REQUIRED


@pytest.mark.parametrize("name", shipped_scenarios())
def test_every_shipped_scenario_loads_and_draws_its_evs(name: str) -> None:
    scenario = load_scenario(name)
    assert scenario.name == name  # the file name and the name inside agree
    assert scenario.description.strip()
    evs = generate_evs(scenario)
    assert evs, "a scenario without EVs measures nothing"
    assert [e.arrival for e in evs] == sorted(e.arrival for e in evs)
    assert len({e.ev_id for e in evs}) == len(evs)
    assert all(e.departure > e.arrival and e.arrival <= scenario.duration_s for e in evs)
    assert all(e.min_kw is None or e.min_kw <= e.requested_kw for e in evs)


def test_load_scenario_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(MINIMAL)
    assert load_scenario(path).name == "tiny"
    assert load_scenario(str(SCENARIO_DIR / "burst_1000.yaml")).name == "burst_1000"


def test_the_burst_asks_1000_times_in_the_same_instant() -> None:
    scenario = load_scenario("burst_1000")
    evs = generate_evs(scenario)
    burst_at = next(e.at for e in scenario.events if e.type == "burst")
    assert sum(1 for e in evs if e.arrival == burst_at) == 1000


def test_generated_evs_are_deterministic_per_seed() -> None:
    scenario = parse_scenario(MINIMAL)
    assert generate_evs(scenario) == generate_evs(scenario)
    assert generate_evs(scenario, seed=8) != generate_evs(scenario)


def test_explicit_evs_keep_their_ids_and_departure() -> None:
    scenario = parse_scenario(scenario_text("""
        events: [{type: burst, at: 60, count: 2}]
        """).replace("  rate:", "  explicit:\n"
                     "    - {at: 90s, ev_id: EV_00001, requested_kw: 22, min_kw: 6, energy_kwh: 30, departure: 1h}\n"
                     "    - {at: 2m, requested_kw: 7.4, energy_kwh: 10, stay: 15m, priority: 9}\n"
                     "  rate:"))
    evs = {e.ev_id: e for e in generate_evs(scenario)}
    fixed = evs["EV_00001"]
    assert (fixed.arrival, fixed.departure, fixed.min_kw, fixed.requested_kw) == (90.0, 3600.0, 6.0, 22.0)
    by_hand = next(e for e in evs.values() if e.arrival == 120.0)
    assert (by_hand.departure, by_hand.priority) == (120.0 + 900.0, 9)
    assert sum(1 for e in evs.values() if e.arrival == 60.0) == 2


@pytest.mark.parametrize(("text", "seconds"), [
    (90, 90), (2.5, 2.5), ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("1d", 86400),
    ("0.5h", 1800),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "expected"), [
    # (scenario text, what the error must say)
    (scenario_text(**{"seed: 7": "seed: 7\ncolour: blue"}), "colour: Extra inputs are not permitted"),
    (scenario_text(**{"capacity_kw: 100": "capacity_kw: -5"}), "substations.0.capacity_kw: Input should be greater"),
    (scenario_text(**{"duration_s: 30m": "duration_s: 2 hours"}), "duration_s: not a duration: '2 hours'"),
    (scenario_text(**{"id: b": "id: a"}), "duplicate substation ids: a"),
    (scenario_text(**{"id: b": "id: b/c"}), "substations.1.id: String should match pattern"),
    (scenario_text(**{"profile: daily": "profile: hourly"}), "substations.1.base_load: Input tag 'hourly'"),
    (scenario_text(**{"[[0, 20], [30m, 40]]": "[[10m, 20], [5m, 40]]"}), "times must be strictly increasing"),
    (scenario_text("events: [{type: offline, at: 10m, substation: z}]"), "events.0: unknown substation 'z'"),
    (scenario_text("events: [{type: offline, at: 2h, substation: a}]"), "must lie within duration_s"),
    (scenario_text("events: [{type: capacity, at: 10m, substation: a, capacity_kw: 5, capacity_pct: 5}]"),
     "give exactly one of capacity_kw and capacity_pct"),
    (scenario_text("events: [{type: capacity, at: 10s, substation: a, capacity_kw: 5, notice_s: 1m}]"),
     "notice_s (60) reaches before the start"),
    (scenario_text("events: [{type: meteor, at: 10m}]"), "events.0: Input tag 'meteor'"),
    (scenario_text(**{"to: 30m, per_hour: 30}]": "to: 20m, per_hour: 30}, {from: 10m, to: 30m, per_hour: 5}]"}),
     "rate windows overlap"),
    (scenario_text(**{"from: 0, to: 30m": "from: 20m, to: 10m"}), "window to (600 s) must be after from"),
    (scenario_text(**{"  ev: {requested_kw: {11: 1}, energy_kwh: [5, 10], stay: [10m, 20m]}\n": ""}),
     "rate arrivals need an ev profile"),
    (scenario_text(**{"energy_kwh: [5, 10]": "energy_kwh: [10, 5]"}), "energy_kwh: range [10.0, 5.0] is empty"),
    (scenario_text(**{"requested_kw: {11: 1}": "requested_kw: {11: 0}"}), "weights must be finite"),
    (scenario_text(**{"requested_kw: {11: 1}": "requested_kw: {2000: 1}"}), "less than or equal to 1000"),
    (scenario_text(**{"seed: 7": "seed: 7\nstep_s: 2\ntelemetry: {interval_s: 3}"}),
     "interval_s (3) must be a multiple of step_s (2)"),
    ("name: x\n  bad: [indent", "not valid YAML"),
    ("- just\n- a list\n", "a scenario is a mapping"),
    ("name: x\n", "description: Field required"),
])
def test_bad_scenarios_are_refused_with_clear_errors(text: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    assert expected in message, message


def test_explicit_ev_needs_exactly_one_of_stay_and_departure() -> None:
    text = MINIMAL + "  explicit: [{at: 1m, requested_kw: 11, energy_kwh: 5, stay: 1h, departure: 2h}]\n"
    with pytest.raises(ScenarioError, match=r"arrivals\.explicit\.0: give exactly one of stay and departure"):
        parse_scenario(text)


def test_unknown_scenario_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ScenarioError, match=r"no scenario 'nope'.*evening_peak"):
        load_scenario("nope")
