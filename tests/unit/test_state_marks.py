"""Substation states are built only when what they show may have moved (issue 10, session G): the periodic
publication compares each substation's ``views.state_mark`` (plain data: everything the state shows but its clock
fields and measured numbers) and ``views.state_measured`` (held to the dead-band) with those of the state last
published, and builds a state only when one moved or the 30 s refresh is due; the deadline policy, whose session
views move with time, builds every state. Telemetry topics are parsed once each (bounded).

Oracle: the same service with no marks (every state built, as before) publishes the very same messages."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import balancer.core.views as views_module
import balancer.service as service_module
from balancer.core.policies.names import PolicyName
from balancer.core.views import TIME_DEPENDENT, state_mark, state_measured, substation_state
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from grid_protocol import TopicKind, Topics
from tests.unit.test_state_encoding import fresh
from tests.unit.test_substation_agent_unit import FakeTransport

P = "grid/v1"
SUBS = ("A", "B", "C")
TOPIC = f"{P}/substation/A/state"
T0 = 1000.0


class Grid:
    """A service on an in-memory transport with a hand-held clock; ``marks=False``: the oracle, every state built."""

    def __init__(self, policy: PolicyName = PolicyName.LEAST_UTILISED, *, marks: bool = True) -> None:
        self.now = T0
        self.marks = marks
        self.transport = FakeTransport()
        self.svc = BalancerService(BalancerSettings(startup_wait_s=0, policy=policy, ev_burst=1000,
                                                    telemetry_burst=1000),
                                   self.transport, clock=lambda: self.now)  # type: ignore[arg-type]
        self.seq = dict.fromkeys(SUBS, 0)
        self.rid = 0

    def telemetry(self, sid: str = "A", base: float = 20.0, capacity: float = 150.0) -> None:
        self.seq[sid] += 1
        sub = self.svc.core.substations.get(sid)
        granted = sub.granted_w / 1000 if sub is not None else 0.0
        self.transport.deliver(f"{P}/substation/{sid}/telemetry", json.dumps({
            "substation_id": sid, "ts": self.now, "seq": self.seq[sid], "capacity_kw": capacity,
            "load_kw": base + granted, "base_load_kw": base, "ev_load_kw": granted, "active_sessions": 0}).encode())

    def request(self, ev: str, kw: float = 11.0) -> None:
        self.rid += 1
        self.transport.deliver(f"{P}/ev/{ev}/request", json.dumps(
            {"request_id": f"r{self.rid}", "requested_kw": kw, "min_kw": 1.4, "duration_minutes": 30}).encode())

    def release(self, ev: str) -> None:
        self.transport.deliver(f"{P}/ev/{ev}/release", b"{}")

    def control(self, sid: str, action: str) -> None:
        self.rid += 1
        command: dict[str, object] = {"action": action, "substation_id": sid, "request_id": f"op{self.rid}"}
        if action == "set_capacity":
            command["capacity_kw"] = 60.0
        self.transport.deliver(f"{P}/balancer/control", json.dumps(command).encode())

    def publish(self, later: float = 1.0) -> None:
        self.now += later
        self.svc._publish(self.svc.core.tick(self.now))
        if self.marks:
            self.svc.publish_states(self.now)
        else:
            with mock.patch.object(service_module, "state_mark", return_value=TIME_DEPENDENT):
                self.svc.publish_states(self.now)

    def built(self) -> int:
        return self.svc.state_counts["built"]

    def kept(self) -> int:
        return self.svc.state_counts["kept"]

    def states(self, topic: str = TOPIC) -> list[dict[str, object]]:
        return [json.loads(p.payload) for p in self.transport.sent if p.topic == topic]

    def said(self) -> list[tuple[str, bytes, bool]]:
        """Everything published, the instance's random boot id (in session ids) masked."""
        boot = self.svc.instance.encode()
        return [(p.topic, p.payload.replace(boot, b"boot"), p.retain) for p in self.transport.sent]


@pytest.fixture
def grid() -> Grid:
    g = Grid()
    g.telemetry()
    g.request("EV1")
    g.telemetry()  # (its grant in the measured load: none reserved)
    g.publish()
    assert len(g.states()) == 1 and g.built() == 1
    return g


# ------------------------------------------------------------------ oracle: the same messages as building every state
op = st.one_of(
    st.tuples(st.just("telemetry"), st.integers(0, 2), st.integers(0, 130)),
    st.tuples(st.just("noise"), st.integers(0, 2), st.integers(-3, 3)),
    st.tuples(st.just("request"), st.integers(0, 12), st.sampled_from([3.7, 7.4, 11.0, 22.0])),
    st.tuples(st.just("release"), st.integers(0, 12), st.just(0)),
    st.tuples(st.just("control"), st.integers(0, 2), st.sampled_from(["drain", "undrain", "set_capacity"])),
    st.tuples(st.just("publish"), st.just(0), st.sampled_from([0.0, 0.5, 1.0, 1.0, 4.0, 7.0, 31.0])),
)


@pytest.mark.instruments_compiled
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from([PolicyName.LEAST_UTILISED, PolicyName.DEADLINE, PolicyName.WEIGHTED_FAIR]),
       ops=st.lists(op, min_size=1, max_size=70))
def test_the_published_messages_are_those_of_building_every_state(policy: PolicyName,
                                                                   ops: list[tuple[str, int, object]]) -> None:
    grids = (Grid(policy), Grid(policy, marks=False))
    base = dict.fromkeys(SUBS, 20.0)
    for kind, index, arg in ops:
        for g in grids:
            sid = SUBS[index % 3]
            if kind == "telemetry":
                g.telemetry(sid, float(arg))  # type: ignore[arg-type]
            elif kind == "noise":  # a small move, within the dead-band or just past it
                g.telemetry(sid, base[sid] + 0.4 * arg)  # type: ignore[operator]
            elif kind == "request":
                g.request(f"EV{index}", arg)  # type: ignore[arg-type]
            elif kind == "release":
                g.release(f"EV{index}")
            elif kind == "control":
                g.control(sid, arg)  # type: ignore[arg-type]
            else:
                g.publish(arg)  # type: ignore[arg-type]
        if kind == "telemetry":
            base[SUBS[index % 3]] = float(arg)  # type: ignore[arg-type]
        assert grids[0].said() == grids[1].said()
    ours, oracle = grids
    assert ours.built() + ours.kept() == oracle.built()
    if policy == PolicyName.DEADLINE:
        assert ours.kept() == 0


# ------------------------------------------------------------------ built exactly when something moved
def test_nothing_moved_nothing_built(grid: Grid) -> None:
    for _ in range(3):  # (the telemetry still fresh)
        grid.publish()
    for _ in range(3):
        grid.telemetry()
        grid.publish()
    assert grid.built() == 1 and grid.kept() == 6 and len(grid.states()) == 1


def test_measured_noise_within_the_band_builds_nothing(grid: Grid) -> None:
    grid.telemetry(base=20.5)  # 0.5 kW of a 1.5 kW band (1 % of 150 kW)
    grid.publish()
    assert grid.built() == 1 and grid.kept() == 1


def test_measured_move_past_the_band_builds_and_publishes(grid: Grid) -> None:
    grid.telemetry(base=25.0)
    grid.publish()
    assert grid.built() == 2 and len(grid.states()) == 2 and grid.states()[-1]["base_load_kw"] == 25.0


def test_drift_adding_up_past_the_band_is_built_once_it_does(grid: Grid) -> None:
    for step in range(1, 5):
        grid.telemetry(base=20.0 + 0.6 * step)
        grid.publish()
    # 0.6, 1.2 within the band; 1.8 past it (published, the new reference); 2.4 within it again
    assert grid.built() == 2 and len(grid.states()) == 2 and grid.states()[-1]["base_load_kw"] == 21.8


def test_a_new_session_builds(grid: Grid) -> None:
    grid.request("EV2")
    grid.publish()
    assert grid.built() == 2 and grid.states()[-1]["sessions_total"] == 2


def test_a_released_session_builds(grid: Grid) -> None:
    grid.release("EV1")
    grid.publish()
    assert grid.built() == 2 and grid.states()[-1]["sessions_total"] == 0


def test_a_grant_change_builds(grid: Grid) -> None:
    sub = grid.svc.core.substations["A"]
    (session,) = sub.sessions.values()
    grid.svc.core.book.set_grant(session, 5_000, grid.now, "rebalanced", "test")  # type: ignore[arg-type]
    grid.publish()
    assert grid.built() == 2 and grid.states()[-1]["granted_kw"] == 5.0


def test_staleness_builds(grid: Grid) -> None:
    grid.publish(6.0)  # past stale_after_s (5 s) without telemetry
    assert grid.built() == 2 and grid.states()[-1]["stale"] is True
    grid.publish()
    assert grid.built() == 2  # stale and staying so: nothing more to show


def test_the_30_s_refresh_builds_and_publishes(grid: Grid) -> None:
    for _ in range(29):
        grid.telemetry()
        grid.publish()
    assert grid.built() == 1
    grid.telemetry()
    grid.publish(1.0)
    assert grid.built() == 2 and len(grid.states()) == 2


def test_an_operator_action_is_published_at_once_and_its_state_kept_after(grid: Grid) -> None:
    grid.control("A", "drain")
    assert grid.states()[-1]["draining"] is True and grid.built() == 1  # forced, outside the periodic look
    grid.telemetry()
    grid.publish()
    assert grid.built() == 2 and len(grid.states()) == 2  # the forced state left no mark: built once, not published
    grid.telemetry()
    grid.publish()
    assert grid.built() == 2 and grid.kept() == 1


def test_a_state_built_but_not_published_leaves_its_mark() -> None:
    """A grant changed and changed back: the mark moved (shares_version), the state did not: built once."""
    g = Grid()
    g.telemetry()
    g.request("EV1")
    g.publish()
    (session,) = g.svc.core.substations["A"].sessions.values()
    grant = session.granted_w
    g.svc.core.book.set_grant(session, grant - 1000, g.now, "rebalanced", "test")  # type: ignore[arg-type]
    g.svc.core.book.set_grant(session, grant, g.now, "rebalanced", "test")  # type: ignore[arg-type]
    g.publish(0.0)  # (same instant: the view's accounting did not move either)
    assert g.built() == 2 and len(g.states()) == 1
    g.publish(0.0)
    assert g.built() == 2 and g.kept() == 1


def test_the_deadline_policy_builds_every_state() -> None:
    g = Grid(PolicyName.DEADLINE)
    g.telemetry()
    g.request("EV1")
    for _ in range(4):
        g.publish()
    assert g.built() == 4 and g.kept() == 0


def test_a_forgotten_substation_leaves_nothing_kept(grid: Grid) -> None:
    assert grid.svc._state_topics == {"A": TOPIC} and f"{P}/substation/A/telemetry" in grid.svc._telemetry_topics
    grid.svc._forget("A")
    assert TOPIC not in grid.svc._state_sent and not grid.svc._state_topics and not grid.svc._telemetry_topics


# ------------------------------------------------------------------ the mark and the measured numbers
def test_the_mark_is_plain_data_and_the_measured_numbers_are_the_states(grid: Grid) -> None:
    sub = grid.svc.core.substations["A"]
    mark = state_mark(grid.svc.core, sub, grid.now)
    assert isinstance(mark, tuple) and all(x is None or isinstance(x, (bool, int, float, str)) for x in mark)
    hash(mark)
    state = substation_state(grid.svc.core, sub, grid.now)
    assert state_measured(grid.svc.core, sub, grid.now) == (state.load_kw, state.base_load_kw, state.headroom_kw,
                                                            state.utilisation)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40))
def test_equal_marks_mean_equal_states_but_for_clock_and_measured(ops: list[tuple[str, int, object]]) -> None:
    """Whatever happened between two looks, equal marks: the states built at both differ at most in their clock
    fields and measured numbers (the session list is the very same object)."""
    g = Grid()
    g.telemetry()
    seen: dict[object, tuple[object, ...]] = {}
    drop = {"ts": 0.0, "telemetry_age_s": None, "load_kw": None, "base_load_kw": None, "headroom_kw": None,
            "utilisation": 0.0}
    for kind, index, arg in ops:
        if kind == "telemetry":
            g.telemetry(SUBS[index % 1], float(arg))  # type: ignore[arg-type]
        elif kind == "request":
            g.request(f"EV{index}", arg)  # type: ignore[arg-type]
        elif kind == "release":
            g.release(f"EV{index}")
        elif kind == "control":
            g.control("A", arg)  # type: ignore[arg-type]
        elif kind == "publish":
            g.publish(arg)  # type: ignore[arg-type]
        sub = g.svc.core.substations["A"]
        mark = state_mark(g.svc.core, sub, g.now)
        state = substation_state(g.svc.core, sub, g.now)
        rest = tuple(getattr(state, f) for f in state.__struct_fields__ if f not in drop and f != "sessions")
        views = state.sessions
        assert views == fresh(g.svc, "A", g.now).sessions
        if mark in seen:
            assert seen[mark][0] == rest and seen[mark][1] is views
        seen[mark] = (rest, views)


# ------------------------------------------------------------------ telemetry topics parsed once
@pytest.mark.instruments_compiled
def test_a_telemetry_topic_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Grid()
    parsed: list[str] = []
    parse = Topics.parse

    def counting(self: Topics, topic: str) -> tuple[TopicKind, str | None] | None:
        parsed.append(topic)
        return parse(self, topic)

    monkeypatch.setattr(Topics, "parse", counting)
    for _ in range(5):
        g.telemetry("A")
        g.telemetry("B")
    assert len(parsed) == 2
    assert g.svc.received[TopicKind.SUBSTATION_TELEMETRY] == 10
    assert g.svc.core.substations["A"].last_seq == 5


def test_other_topics_and_invalid_ids_are_not_kept() -> None:
    g = Grid()
    g.telemetry()
    g.request("EV1")
    g.transport.deliver(f"{P}/substation/bad id!/telemetry", b"{}")
    assert list(g.svc._telemetry_topics) == [f"{P}/substation/A/telemetry"]
    assert g.svc.counters[f"bad_payload:{TopicKind.SUBSTATION_TELEMETRY}:invalid_topic_id"] == 1


def test_the_parsed_topics_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "_TELEMETRY_TOPICS_MAX", 2)
    g = Grid()
    for sid in SUBS:
        g.telemetry(sid)
        g.telemetry(sid)
    assert len(g.svc._telemetry_topics) == 2
    assert all(g.svc.core.substations[sid].last_seq == 2 for sid in SUBS)  # the third parsed each time, still heard


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 2_000_000), load=st.integers(0, 2_500_000), base=st.integers(0, 2_500_000),
       granted=st.integers(0, 1_000_000), at_telemetry=st.integers(0, 1_000_000),
       heard=st.one_of(st.none(), st.floats(990.0, 1000.0)), status=st.sampled_from([None, "online", "offline"]),
       lost=st.booleans(), draining=st.booleans())
def test_the_measured_numbers_are_those_the_state_shows(capacity: int, load: int, base: int, granted: int,
                                                        at_telemetry: int, heard: float | None, status: str | None,
                                                        lost: bool, draining: bool) -> None:
    """``state_measured`` writes out ``Substation.headroom_w`` and ``used_w``: the same numbers as the state."""
    g = Grid()
    sub = g.svc.core.state.substation("A", T0)
    sub.capacity_w, sub.load_w, sub.base_load_w, sub.granted_w = capacity, load, base, granted
    sub.granted_at_telemetry_w, sub.last_telemetry_at, sub.status = at_telemetry, heard, status
    sub.lost, sub.draining = lost, draining
    state = substation_state(g.svc.core, sub, T0)
    assert state_measured(g.svc.core, sub, T0) == (state.load_kw, state.base_load_kw, state.headroom_kw,
                                                   state.utilisation)
    mark = state_mark(g.svc.core, sub, T0)
    assert mark is not None and mark[4] is (not state.stale)


# ------------------------------------------------------------------ the sessions that changed, named by SessionBook
def _charging(n: int) -> Grid:
    g = Grid()
    g.telemetry(capacity=500.0)
    for i in range(n):
        g.request(f"EV{i}")
    g.telemetry(capacity=500.0)
    g.publish()
    return g


def test_sessionbook_names_the_sessions_that_changed_up_to_a_bound() -> None:
    g = _charging(3)
    sub = g.svc.core.substations["A"]
    assert sub.sessions_changed == set()  # (listed: nothing pending)
    first, second, _ = sub.sessions.values()
    g.svc.core.book.set_grant(first, 5_000, g.now, "rebalanced", "test")  # type: ignore[arg-type]
    g.release("EV1")
    g.request("EV9")
    (new,) = [s for s in sub.sessions.values() if s.request.ev_id == "EV9"]
    assert sub.sessions_changed == {first.session_id, second.session_id, new.session_id}
    for i in range(20):
        g.svc.core.book.set_grant(first, 4_000 + i, g.now, "rebalanced", "test")  # type: ignore[arg-type]
        sub.session_changed(f"x{i}")
    assert sub.sessions_changed is None  # past 16: "any"


@pytest.mark.instruments_compiled
def test_a_grant_change_builds_that_one_view_only(monkeypatch: pytest.MonkeyPatch) -> None:
    g = _charging(6)
    sub = g.svc.core.substations["A"]
    before = list(sub.session_views[1])  # type: ignore[index]
    built: list[str] = []
    view = views_module._view

    def counting(s: object) -> object:
        built.append(s.session_id)  # type: ignore[attr-defined]
        return view(s)  # type: ignore[arg-type]

    monkeypatch.setattr(views_module, "_view", counting)
    changed = list(sub.sessions.values())[3]
    g.svc.core.book.set_grant(changed, 6_000, g.now, "rebalanced", "test")  # type: ignore[arg-type]
    g.publish()
    after = sub.session_views[1]  # type: ignore[index]
    assert built == [changed.session_id]
    assert [a is b for a, b in zip(before, after, strict=True)] == [True, True, True, False, True, True]
    assert after == fresh(g.svc, "A", g.now).sessions


def test_more_changes_than_named_look_at_every_session() -> None:
    g = _charging(20)
    sub = g.svc.core.substations["A"]
    for s in list(sub.sessions.values()):
        g.svc.core.book.set_grant(s, 3_000, g.now, "rebalanced", "test")  # type: ignore[arg-type]
    assert sub.sessions_changed is None
    g.publish()
    assert sub.sessions_changed == set()
    views = sub.session_views[1]  # type: ignore[index]
    assert views == fresh(g.svc, "A", g.now).sessions and all(v.granted_kw == 3.0 for v in views)  # type: ignore[attr-defined]
