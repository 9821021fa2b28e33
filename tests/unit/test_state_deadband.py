"""The retained substation state is reported by exception (issue 10, session E): its measured numbers (load, base
load, and the headroom and utilisation they move) are published again only when one moved by more than the dead-band
(``BALANCER_STATE_DEADBAND_PCT`` of the capacity) since the last publication; any other change is published at once,
and every state at least every 30 s. Over the real service with an in-memory transport and a hand-held clock."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from balancer.service import BalancerService, _moved
from balancer.settings import BalancerSettings
from tests.unit.test_substation_agent_unit import FakeTransport

T0 = 1_767_225_600.0
TOPIC = "grid/v1/substation/A/state"


class Grid:
    """One substation of 100 kW (the default dead-band, 1 %, is 1 kW) and its published states."""

    def __init__(self, **settings: float) -> None:
        settings.setdefault("telemetry_burst", 1000)  # (the budgets run on the wall clock: a test's seconds are fast)
        self.now = T0
        self.transport = FakeTransport()
        self.service = BalancerService(BalancerSettings(startup_wait_s=0, **settings),  # type: ignore[arg-type]
                                       self.transport, clock=lambda: self.now)  # type: ignore[arg-type]
        self.seq = 0

    def telemetry(self, load: float, capacity: float = 100.0) -> None:
        self.seq += 1
        granted = self.service.core.substations["A"].granted_w / 1000 if "A" in self.service.core.substations else 0
        self.transport.deliver("grid/v1/substation/A/telemetry", json.dumps({
            "substation_id": "A", "ts": self.now, "seq": self.seq, "capacity_kw": capacity,
            "load_kw": load + granted, "base_load_kw": load, "ev_load_kw": granted, "active_sessions": 0}).encode())

    def second(self, load: float | None = None, **kw: float) -> None:
        """A second passes (telemetry first, when given) and the states are due."""
        self.now += 1
        if load is not None:
            self.telemetry(load, **kw)
        self.service.publish_states(self.now)

    def states(self) -> list[dict[str, object]]:
        return [json.loads(p.payload) for p in self.transport.sent if p.topic == TOPIC]


@pytest.fixture
def grid() -> Grid:
    g = Grid()
    g.second(20.0)
    assert len(g.states()) == 1
    return g


def test_moves_within_the_band_are_not_published_beyond_it_they_are(grid: Grid) -> None:
    grid.second(20.8)  # 0.8 kW of 1: load, base load, headroom and utilisation all within the band
    grid.second(19.3)  # 0.7 kW below the last published 20
    assert len(grid.states()) == 1
    grid.second(21.5)
    states = grid.states()
    assert len(states) == 2 and states[-1]["load_kw"] == 21.5 and states[-1]["base_load_kw"] == 21.5


def test_drift_in_small_steps_is_published_once_it_adds_up_to_more_than_the_band(grid: Grid) -> None:
    for load in (20.4, 20.8):  # each step 0.4 kW from the last seen; 0.8 kW from the last published
        grid.second(load)
    assert len(grid.states()) == 1
    grid.second(21.2)  # 1.2 kW from the last published: out
    assert [s["load_kw"] for s in grid.states()] == [20.0, 21.2]
    grid.second(21.9)  # measured from 21.2 now
    assert len(grid.states()) == 2
    grid.second(22.3)
    assert [s["load_kw"] for s in grid.states()] == [20.0, 21.2, 22.3]


def test_sessions_grants_capacity_and_staleness_are_published_whatever_the_band(grid: Grid) -> None:
    grid.transport.deliver("grid/v1/ev/EV_1/request", json.dumps(
        {"request_id": "r1", "requested_kw": 11, "duration_minutes": 60}).encode())
    grid.second()
    states = grid.states()
    assert len(states) == 2 and states[-1]["granted_kw"] == 11 and len(states[-1]["sessions"]) == 1  # type: ignore[arg-type]
    grid.second(20.2, capacity=100.5)  # the capacity moved by 0.5 kW: not a measured number, published
    assert len(grid.states()) == 3 and grid.states()[-1]["capacity_kw"] == 100.5
    stale_after = grid.service.settings.core.stale_after_s
    grid.now += stale_after + 1  # no telemetry: stale (and no headroom), published
    grid.service.publish_states(grid.now)
    states = grid.states()
    assert len(states) == 4 and states[-1]["stale"] is True and states[-1]["base_load_kw"] == 20.2


def test_an_operator_action_publishes_at_once(grid: Grid) -> None:
    grid.second(20.3)
    grid.transport.deliver("grid/v1/balancer/control", json.dumps(
        {"action": "drain", "substation_id": "A", "request_id": "op1"}).encode())
    states = grid.states()
    assert len(states) == 2 and states[-1]["draining"] is True and states[-1]["load_kw"] == 20.3


def test_a_state_within_the_band_is_published_again_after_30_s(grid: Grid) -> None:
    for _ in range(29):
        grid.second(20.5)
    assert len(grid.states()) == 1
    grid.second(20.5)  # 30 s after the last publication: the integrity period
    states = grid.states()
    assert len(states) == 2 and states[-1]["load_kw"] == 20.5


def test_a_dead_band_of_0_publishes_every_change() -> None:
    grid = Grid(state_deadband_pct=0)
    grid.second(20.0)
    grid.second(20.01)
    grid.second(20.01)  # only the clock moved: not news
    assert [s["load_kw"] for s in grid.states()] == [20.0, 20.01]


def test_null_and_a_number_always_differ() -> None:
    assert _moved((None, 1.0), (0.0, 1.0), (1e9, 1e9))
    assert _moved((0.0, 1.0), (None, 1.0), (1e9, 1e9))
    assert not _moved((None, 1.0), (None, 1.5), (1.0, 1.0))


def test_the_dead_band_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BalancerSettings().state_deadband_pct == 1.0
    monkeypatch.setenv("BALANCER_STATE_DEADBAND_PCT", "2.5")
    assert BalancerSettings().state_deadband_pct == 2.5
    with pytest.raises(ValidationError):
        BalancerSettings(state_deadband_pct=-0.1)
