"""Operator control (drain, undrain, capacity limit), the retained state views and the metrics the core keeps
(overload-seconds, stale transitions, queue waits). Pure core: no broker, the clock is passed in."""

from __future__ import annotations

import pytest

from balancer.core.views import queue_state, substation_state
from grid_protocol import ControlCommand, QueueState, Reason, SubstationState, decode, encode
from grid_protocol.messages import MAX_STATE_SESSIONS
from tests.unit.test_core_table import Harness, answer, answers, assert_healthy, commands


def control(h: Harness, action: str, sid: str, capacity_kw: float | None = None):  # type: ignore[no-untyped-def]
    return h.b.on_control(ControlCommand(action=action, substation_id=sid, capacity_kw=capacity_kw),  # type: ignore[arg-type]
                          h.now)


def test_drained_substation_gets_no_new_sessions_and_running_ones_continue() -> None:
    h = Harness()
    h.tel("A")
    h.tel("B")
    assert answer(h.req("EV_1", 10), "EV_1").substation_id == "A"  # tie on utilisation: first id
    reason, _, effects = control(h, "drain", "A")
    assert reason is None and effects == []
    for i in range(2, 6):
        assert answer(h.req(f"EV_{i}", 10), f"EV_{i}").substation_id == "B"
    assert h.session("EV_1").substation_id == "A"  # still running where it was
    assert substation_state(h.b, h.b.substations["A"], h.now).headroom_kw == 0
    assert_healthy(h)


def test_drain_of_the_only_substation_queues_and_undrain_serves_the_queue() -> None:
    h = Harness()
    h.tel("A")
    control(h, "drain", "A")
    assert answer(h.req("EV_1", 10), "EV_1").status == "queued"
    reason, _, effects = control(h, "undrain", "A")
    assert reason is None
    assert answer(effects, "EV_1").status == "assigned"
    assert [c.command for _, c in commands(effects)] == ["start"]


def test_set_capacity_below_what_runs_reduces_at_once_and_clearing_it_restores() -> None:
    h = Harness()
    h.tel("A", capacity_kw=100)  # limit 90 kW
    h.req("EV_1", 40)
    h.req("EV_2", 40)
    reason, detail, effects = control(h, "set_capacity", "A", 50)  # limit 45 kW
    assert reason is None and "50" in detail
    assert h.b.substations["A"].capacity_w == 50_000
    assert sum(h.sessions_on("A").values()) <= 45_000
    assert {c.reason for _, c in commands(effects, "update")} == {Reason.CAPACITY_REDUCED}
    state = substation_state(h.b, h.b.substations["A"], h.now)
    assert (state.capacity_kw, state.reported_capacity_kw, state.capacity_limit_kw) == (50.0, 100.0, 50.0)
    h.tel("A")  # the agent still reports 100 kW: the operator's limit stays
    assert h.b.substations["A"].capacity_w == 50_000
    reason, _, _ = control(h, "set_capacity", "A", None)
    assert reason is None and h.b.substations["A"].capacity_w == 100_000
    h.advance(11)  # past the hold time: grants rise again
    h.tel("A")
    effects = h.tick()
    assert sum(h.sessions_on("A").values()) == 80_000, effects
    assert_healthy(h)


def test_capacity_limit_below_every_minimum_revokes_and_requeues() -> None:
    h = Harness()
    h.tel("A", capacity_kw=100)
    h.tel("B", capacity_kw=100)
    h.req("EV_1", 20, min_kw=20)
    _, _, effects = control(h, "set_capacity", "A", 10)
    revoked = [a for a in answers(effects) if a.status == "revoked"]
    assert [a.ev_id for a in revoked] == ["EV_1"]
    assert h.session("EV_1").substation_id == "B"  # re-placed elsewhere at once
    assert_healthy(h)


@pytest.mark.parametrize("limit_kw", [0.0, 0.0004])
def test_a_limit_of_zero_watts_revokes_every_session(limit_kw: float) -> None:
    """A limit that is 0 W once rounded ("nothing may be drawn") stops what runs there; it is not mistaken for a
    substation whose capacity was never reported."""
    h = Harness()
    h.tel("A", capacity_kw=100)
    h.req("EV_1", 20)
    h.req("EV_2", 20)
    reason, _, effects = control(h, "set_capacity", "A", limit_kw)
    assert reason is None and h.b.substations["A"].capacity_w == 0
    assert sorted(a.ev_id for a in answers(effects) if a.status == "revoked") == ["EV_1", "EV_2"]
    assert h.sessions_on("A") == {}
    assert {c.command for _, c in commands(effects)} == {"stop"}
    assert answer(h.req("EV_3", 10), "EV_3").status == "queued"
    assert_healthy(h)


def test_a_reported_capacity_of_zero_revokes_every_session() -> None:
    """An agent that reports 0 kW (a transformer out of service) gets nothing to run: its sessions move elsewhere."""
    h = Harness()
    h.tel("A", capacity_kw=100)
    h.tel("B", capacity_kw=100)
    h.req("EV_1", 20)
    assert h.session("EV_1").substation_id == "A"
    effects = h.tel("A", capacity_kw=0)
    assert [a.ev_id for a in answers(effects) if a.status == "revoked"] == ["EV_1"]
    assert h.sessions_on("A") == {} and h.session("EV_1").substation_id == "B"
    assert_healthy(h)


def test_control_of_an_unknown_substation_is_refused() -> None:
    h = Harness()
    reason, detail, effects = control(h, "drain", "nowhere")
    assert reason == Reason.UNKNOWN_SUBSTATION and "nowhere" in detail and effects == []
    assert "nowhere" not in h.b.substations


def test_substation_state_round_trips_and_reports_reservations() -> None:
    h = Harness()
    h.tel("A", capacity_kw=100, base_kw=20)
    h.req("EV_1", 11)
    h.advance(2)
    state = substation_state(h.b, h.b.substations["A"], h.now)
    assert decode(encode(state), SubstationState) == state
    assert (state.granted_kw, state.reserved_kw, state.load_kw) == (11.0, 11.0, 20.0)
    assert state.headroom_kw == 90 - 20 - 11
    assert state.utilisation == pytest.approx(31 / 100)
    assert state.telemetry_age_s == 2.0 and not state.stale and state.online
    assert [s.ev_id for s in state.sessions] == ["EV_1"] and state.sessions_total == 1
    h.tel("A", load_kw=31)  # the grant shows in the measurement now
    assert substation_state(h.b, h.b.substations["A"], h.now).reserved_kw == 0
    h.advance(6)
    assert substation_state(h.b, h.b.substations["A"], h.now).stale


def test_substation_state_lists_at_most_the_limit_and_fits_the_broker() -> None:
    h = Harness()
    h.tel("A", capacity_kw=100_000)
    for i in range(MAX_STATE_SESSIONS + 20):
        h.req(f"EV_{'x' * 50}{i:05d}", 1.5, rid="r" * 100 + str(i))
    state = substation_state(h.b, h.b.substations["A"], h.now)
    assert state.sessions_total == MAX_STATE_SESSIONS + 20 and len(state.sessions) == MAX_STATE_SESSIONS
    assert state.sessions_truncated
    assert len(encode(state)) < 65536


def test_queue_state_lists_the_line_in_order() -> None:
    h = Harness()
    h.tel("A", capacity_kw=10)  # limit 9 kW
    h.req("EV_1", 9, min_kw=9)
    h.req("EV_2", 5, min_kw=5)
    h.req("EV_3", 5, min_kw=5, priority=3)
    q = queue_state(h.b, h.now)
    assert decode(encode(q), QueueState) == q
    assert (q.length, [e.ev_id for e in q.entries], [e.position for e in q.entries]) == (2, ["EV_3", "EV_2"], [1, 2])
    assert q.entries[0].priority == 3 and q.entries[0].requested_kw == 5.0


def test_queue_waits_are_recorded_when_a_queued_request_is_placed() -> None:
    h = Harness()
    h.tel("A", capacity_kw=10)
    h.req("EV_1", 9, min_kw=9)
    h.req("EV_2", 5, min_kw=5)
    h.advance(42)
    h.tel("A")
    h.release("EV_1")
    assert list(h.b.queue_waits) == [42.0]


def test_overload_seconds_and_stale_transitions_are_counted() -> None:
    h = Harness()
    h.tel("A", capacity_kw=100, base_kw=10)
    h.advance(1)
    h.tel("A", load_kw=120)  # overloaded from here ...
    h.advance(2)
    h.tel("A", load_kw=50)  # ... to here: 2 s
    h.advance(1)
    h.tel("A", load_kw=50)
    sub = h.b.substations["A"]
    assert sub.overload_s == pytest.approx(2.0)
    h.advance(6)
    h.tick()
    h.tick()
    assert (sub.stale, sub.stale_transitions) == (True, 1)
    h.tel("A")
    h.advance(6)
    h.tick()
    assert sub.stale_transitions == 2
    assert h.b.counters["stale_telemetry"] == 2


def test_worst_case_queue_state_fits_the_broker_limit() -> None:
    from grid_protocol import QueueEntry
    from grid_protocol.messages import MAX_STATE_QUEUE_ENTRIES
    entry = QueueEntry(ev_id="E" * 64, request_id="r" * 128, position=99_999, requested_kw=999.123456789,
                       min_kw=999.123456789, priority=9, waiting_since=1767225602.123456, eta_s=123456.7)
    state = QueueState(ts=1767225602.123456, length=10**6, entries=[entry] * MAX_STATE_QUEUE_ENTRIES, truncated=True)
    assert len(encode(state)) < 65536


def test_forget_moves_the_sessions_and_drops_the_substation() -> None:
    """A decommissioned substation: its sessions are revoked (the agent told to stop) and re-placed elsewhere
    or queued; the balancer no longer knows it, so nothing is placed there and its state is not published."""
    h = Harness()
    h.tel("A", capacity_kw=100)
    h.tel("B", capacity_kw=30)  # limit 28.5 kW: room for two of the three
    control(h, "drain", "B")
    for i in range(1, 4):
        assert answer(h.req(f"EV_{i}", 10, min_kw=10), f"EV_{i}").substation_id == "A"
    control(h, "undrain", "B")
    reason, detail, effects = control(h, "forget", "A")
    assert reason is None and "3 session(s)" in detail
    assert "A" not in h.b.substations
    stops = commands(effects, "stop")
    assert {sid for sid, _ in stops} == {"A"} and {c.reason for _, c in stops} == {Reason.DECOMMISSIONED}
    finals = {ev: answers(effects, ev)[-1] for ev in ("EV_1", "EV_2", "EV_3")}
    assert [a.reason for ev in finals for a in answers(effects, ev) if a.status == "revoked"] == \
        [Reason.DECOMMISSIONED] * 3
    placed = [ev for ev, a in finals.items() if a.status == "assigned"]
    assert len(placed) == 2 and all(finals[ev].substation_id == "B" for ev in placed)
    assert h.queue() == [ev for ev, a in finals.items() if a.status == "queued"]
    assert_healthy(h)
    # Unknown now: another action names it as never heard of; an offline will of it does not bring it back.
    assert control(h, "drain", "A")[0] == Reason.UNKNOWN_SUBSTATION
    assert h.status("A", "offline") == [] and "A" not in h.b.substations
    # A new agent with the same id (telemetry) is learnt afresh, not drained: the one left waiting goes there.
    (waiting,) = h.queue()
    effects = h.tel("A", capacity_kw=100)
    assert h.b.substations["A"].draining is False
    assert (answer(effects, waiting).status, answer(effects, waiting).substation_id) == ("assigned", "A")


def test_forget_of_an_unknown_substation_is_refused() -> None:
    h = Harness()
    reason, _, effects = control(h, "forget", "nowhere")
    assert reason == Reason.UNKNOWN_SUBSTATION and effects == []


# --- operator settings that survive a restart (balancer/operator_store.py keeps them) --------------------------


def test_operator_settings_follow_the_control_commands() -> None:
    from balancer.core import OperatorSettings
    h = Harness()
    h.tel("A")
    h.tel("B")
    assert h.b.operator_settings() == {}
    control(h, "drain", "A")
    control(h, "set_capacity", "B", 50)
    assert h.b.operator_settings() == {"A": OperatorSettings(draining=True),
                                       "B": OperatorSettings(capacity_limit_w=50_000)}
    control(h, "undrain", "A")
    control(h, "set_capacity", "B", None)
    assert h.b.operator_settings() == {}


def test_restored_settings_wait_for_their_substation_and_apply_when_it_is_heard_of() -> None:
    from balancer.core import OperatorSettings
    h = Harness()
    saved = {"A": OperatorSettings(draining=True), "B": OperatorSettings(capacity_limit_w=40_000)}
    assert h.b.restore_operator(saved, h.now) == []
    assert h.b.operator_settings() == saved  # kept while nobody has heard of A or B
    h.tel("A")
    h.tel("B", capacity_kw=100)
    assert h.b.substations["A"].draining
    assert h.b.substations["B"].capacity_w == 40_000
    assert answer(h.req("EV_1", 10), "EV_1").substation_id == "B"  # nothing new on the drained A
    assert h.b.operator_settings() == saved
    control(h, "forget", "A")
    assert h.b.operator_settings() == {"B": OperatorSettings(capacity_limit_w=40_000)}
    assert_healthy(h)


def test_restore_on_a_known_substation_reduces_what_runs_above_the_limit() -> None:
    from balancer.core import OperatorSettings
    h = Harness()
    h.tel("A", capacity_kw=100)
    h.req("EV_1", 40)
    h.req("EV_2", 40)
    h.b.restore_operator({"A": OperatorSettings(capacity_limit_w=50_000)}, h.now)
    assert h.b.substations["A"].capacity_w == 50_000
    assert sum(h.sessions_on("A").values()) <= 45_000
