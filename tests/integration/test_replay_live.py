"""The live replay end to end: a private Mosquitto, ``python -m balancer``, the scenario's substation agents and
EV fleet as subprocesses, an observer recording everything (``replay.live``).

One small scenario (``tests/data/live_small.yaml``, 34 EVs, about 40 minutes of scenario time played in about
12 s): a burst that round-robin herds onto the small substation, the big one losing its link for 8 minutes
(the broker publishes its last will) and coming back, and a capacity cut announced a minute early.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grid_protocol.messages import FINAL_STATUSES
from grid_sim.scenario import generate_evs, load_scenario
from replay.cli import main
from replay.live import run_live

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "tests" / "data" / "live_small.yaml"
SPEEDUP = "200"


def test_least_utilised_live_accounts_for_every_ev_and_never_overloads(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIO)
    work = tmp_path / "run"
    # At 100x the 8-minute outage is 4.8 s of wall time against the balancer's lease (its offline grace) of
    # 2 s, the floor a live run keeps: at 200x it was 2.4 s, and a loaded machine's delays ate the margin.
    live = run_live(scenario, "least-utilised", speedup=100.0, work_dir=work)
    r, m = live.result, live.result.metrics
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((work / "logs").glob("*.log")))
    # every EV asked, was answered and its request was closed: none lost
    assert live.lost == [] and r.open_requests_at_end == 0, (live.lost, logs)
    assert r.anomalies == {}, (r.anomalies, logs)
    assert m.evs == len(generate_evs(scenario)) == m.served + m.never_served + m.rejected
    assert all(ev.answers and ev.answers[-1].status in FINAL_STATUSES for ev in r.evs)
    assert set(live.info["exit_codes"].values()) == {0}, live.info["exit_codes"]
    assert m.served > 20 and m.energy_not_delivered_share is not None
    # the real policy keeps every substation within its capacity, through the burst, the outage and the cut
    assert m.overload_s == 0 and m.peak_overload_kw == 0
    # the outage: north is offline from its last will (10 min) until it is back (18 min)
    north = next(s for s in r.trace.substations if s.substation_id == "north")
    assert all(north.online[:595]) and not any(north.online[610:1075]) and all(north.online[1110:1200])
    assert r.counters["answers:revoked"] > 0  # its sessions were taken away (and placed again or queued)
    statuses = [json.loads(line) for line in (work / "recording.jsonl").read_text().splitlines()
                if json.loads(line)["topic"] == "grid/v1/substation/north/status"]
    offline = [json.loads(s["payload"]) for s in statuses if '"offline"' in s["payload"]]
    assert offline and offline[0].get("ts") is None  # the will (the agent's own goodbye carries a ts)


def test_round_robin_live_overloads_and_the_cli_writes_the_live_outputs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["--mode", "live", "--scenario", str(SCENARIO), "--policy", "round-robin", "--speedup", SPEEDUP,
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "mode: live" in printed.out and "live_small" in printed.out
    doc = json.loads((out / "results.json").read_text())
    assert doc["mode"] == "live"
    (run,) = doc["runs"]
    assert run["policy"] == "round-robin" and run["live"]["speedup"] == float(SPEEDUP)
    assert run["open_requests_at_end"] == 0 and run["anomalies"] == {}, run
    assert run["metrics"]["evs"] == run["metrics"]["served"] == 34  # round-robin serves everyone at once ...
    assert run["metrics"]["overload_s"] > 0 and run["metrics"]["peak_overload_kw"] > 20  # ... over capacity
    assert (out / "live_small__round-robin.png").read_bytes()[:4] == b"\x89PNG"
