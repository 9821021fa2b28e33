"""The API's state store, fed with hand-made contract messages (no broker, no clock)."""

from __future__ import annotations

import json
from typing import Any

from api.state import StateStore
from grid_protocol.messages import (
    Assignment,
    BalancerStatus,
    ChargeRequest,
    ControlResult,
    QueueEntry,
    QueueState,
    SessionView,
    SubstationState,
    SubstationStatus,
    Telemetry,
)

T0 = 1_767_225_600.0


def session(sid: str, ev: str, granted: float, requested: float = 22.0, started: float = T0) -> SessionView:
    return SessionView(session_id=sid, ev_id=ev, request_id=f"r-{ev}", granted_kw=granted, requested_kw=requested,
                       min_kw=1.4, priority=0, started_at=started, expected_end=started + 3600)


def state(sid: str, ts: float = T0, **kw: Any) -> SubstationState:
    sessions = kw.pop("sessions", [])
    fields: dict[str, Any] = dict(
        substation_id=sid, ts=ts, online=True, stale=False, draining=False, capacity_kw=400.0,
        reported_capacity_kw=400.0, capacity_limit_kw=None, limit_kw=380.0, load_kw=200.0, base_load_kw=156.0,
        granted_kw=sum(s.granted_kw for s in sessions), reserved_kw=0.0, headroom_kw=180.0, utilisation=0.5,
        telemetry_age_s=0.2, sessions_total=len(sessions), sessions=sessions)
    fields.update(kw)
    return SubstationState(**fields)


def tele(sid: str, ts: float = T0, load: float = 100.0, capacity: float = 300.0) -> Telemetry:
    return Telemetry(substation_id=sid, ts=ts, seq=1, capacity_kw=capacity, load_kw=load, base_load_kw=load,
                     ev_load_kw=0.0, active_sessions=0)


def answer(ev: str, status: str = "assigned", ts: float = T0, **kw: Any) -> Assignment:
    return Assignment(request_id=kw.pop("request_id", f"r-{ev}"), ev_id=ev, status=status, ts=ts, **kw)  # type: ignore[arg-type]


def test_substation_view_from_the_balancers_state_with_derived_condition() -> None:
    store = StateStore(stale_after_s=5.0)
    store.on_substation_state("north", state("north", sessions=[session("s1", "EV_1", 22.0)]), T0)
    view = store.substation_view("north", T0 + 1)
    assert view is not None
    assert (view["capacity_kw"], view["load_kw"], view["headroom_kw"], view["sessions_total"]) == (400, 200, 180, 1)
    assert view["online"] and not view["stale"] and not view["overloaded"]
    assert view["condition"] == "ok" and view["source"] == "balancer"
    assert view["telemetry_age_s"] == 1.2  # the balancer's 0.2 s carried forward by 1 s
    # Nothing heard for longer than stale_after_s: stale.
    assert store.substation_view("north", T0 + 10)["condition"] == "stale"  # type: ignore[index]
    # Fresh telemetry keeps it fresh even when the balancer has not republished its state.
    store.on_telemetry("north", tele("north"), T0 + 9)
    assert store.substation_view("north", T0 + 10)["condition"] == "ok"  # type: ignore[index]


def test_condition_order_offline_stale_overloaded_draining() -> None:
    store = StateStore(stale_after_s=5.0)
    store.on_substation_state("a", state("a", draining=True), T0)
    assert store.substation_view("a", T0)["condition"] == "draining"  # type: ignore[index]
    store.on_substation_state("a", state("a", ts=T0 + 1, draining=True, load_kw=420.0), T0 + 1)
    view = store.substation_view("a", T0 + 1)
    assert view is not None and view["overloaded"] and view["condition"] == "overloaded"
    store.on_substation_state("a", state("a", ts=T0 + 2, stale=True), T0 + 2)
    assert store.substation_view("a", T0 + 2)["condition"] == "stale"  # type: ignore[index]
    store.on_substation_status("a", SubstationStatus(state="offline", substation_id="a"), T0 + 3)
    assert store.substation_view("a", T0 + 3)["condition"] == "offline"  # type: ignore[index]
    # The agent is back: online again (the balancer's state said online all along).
    store.on_substation_status("a", SubstationStatus(state="online", substation_id="a", ts=T0 + 4), T0 + 4)
    store.on_telemetry("a", tele("a"), T0 + 4)
    assert store.substation_view("a", T0 + 4)["online"]  # type: ignore[index]


def test_balancer_says_offline_unless_the_agent_announced_itself_since() -> None:
    store = StateStore()
    store.on_substation_status("a", SubstationStatus(state="online", ts=T0), T0)
    store.on_substation_state("a", state("a", ts=T0 + 1, online=False), T0 + 1)
    assert not store.substation_view("a", T0 + 1)["online"]  # type: ignore[index]
    store.on_substation_status("a", SubstationStatus(state="online", ts=T0 + 2), T0 + 2)
    assert store.substation_view("a", T0 + 2)["online"]  # type: ignore[index]


def test_telemetry_only_substation_and_cleared_retained_messages() -> None:
    store = StateStore()
    store.on_telemetry("south", tele("south", load=150.0, capacity=300.0), T0)
    view = store.substation_view("south", T0)
    assert view is not None and view["source"] == "telemetry"
    assert (view["capacity_kw"], view["load_kw"], view["utilisation"], view["headroom_kw"]) == (300, 150, 0.5, None)
    store.on_substation_state("x", state("x"), T0)
    assert store.substation_view("x", T0) is not None
    store.on_substation_state("x", None, T0)  # empty retained message: cleared
    assert store.substation_view("x", T0) is None
    assert [v["substation_id"] for v in store.substation_views(T0)] == ["south"]


def test_an_older_state_never_replaces_a_newer_one() -> None:
    store = StateStore()
    store.on_substation_state("a", state("a", ts=T0 + 5, load_kw=300.0), T0 + 5)
    store.on_substation_state("a", state("a", ts=T0 + 1, load_kw=100.0), T0 + 6)
    assert store.substation_view("a", T0 + 6)["load_kw"] == 300.0  # type: ignore[index]
    # A control result carries the state after the action.
    result = ControlResult(ok=True, action="drain", substation_id="a", ts=T0 + 7,
                           state=state("a", ts=T0 + 7, draining=True))
    store.on_control_result(result, T0 + 7)
    assert store.substation_view("a", T0 + 7)["draining"]  # type: ignore[index]


def test_sessions_status_filters_and_lookup() -> None:
    store = StateStore()
    store.on_substation_state("A", state("A", sessions=[session("s2", "EV_2", 11.0, started=T0 + 1),
                                                        session("s1", "EV_1", 22.0)]), T0)
    store.on_substation_state("B", state("B", sessions=[session("s3", "EV_3", 0.0)], sessions_truncated=True), T0)
    rows = store.sessions()
    assert [r["session_id"] for r in rows] == ["s1", "s2", "s3"]
    assert [r["status"] for r in rows] == ["charging", "reduced", "paused"]
    assert [r["session_id"] for r in store.sessions(substation_id="A", status="reduced")] == ["s2"]
    assert [r["session_id"] for r in store.sessions(ev_id="EV_3")] == ["s3"]
    assert store.sessions(substation_id="C") == []
    assert store.sessions_truncated()
    found = store.find_session("s3")
    assert found is not None and found["substation_id"] == "B" and found["ev_id"] == "EV_3"
    assert store.find_session("nope") is None


def test_ev_view_session_queue_and_latest_answer() -> None:
    store = StateStore(ev_memory=100)
    store.on_substation_state("A", state("A", sessions=[session("s1", "EV_1", 22.0)]), T0)
    store.on_queue(QueueState(ts=T0, length=1, entries=[QueueEntry(
        ev_id="EV_2", request_id="r-2", position=1, requested_kw=11, min_kw=1.4, priority=0,
        waiting_since=T0)]), T0)
    store.on_assignment(answer("EV_1", session_id="s1", substation_id="A", granted_kw=22.0), T0)
    store.on_assignment(answer("EV_3", "completed", reason="released"), T0)
    one = store.ev_view("EV_1", T0)
    assert one is not None and one["state"] == "charging" and one["session"]["session_id"] == "s1"
    assert one["last_answer"]["status"] == "assigned"
    two = store.ev_view("EV_2", T0)
    assert two is not None and two["state"] == "queued" and two["queue_entry"]["position"] == 1
    three = store.ev_view("EV_3", T0)
    assert three is not None and three["state"] == "idle" and three["session"] is None
    assert store.ev_view("EV_9", T0) is None


def test_remembered_evs_and_recent_answers_are_bounded() -> None:
    store = StateStore(ev_memory=100, recent_assignments=5)
    for i in range(250):
        store.on_assignment(answer(f"EV_{i}", ts=T0 + i), T0 + i)
    assert store.ev_view("EV_0", T0) is None
    assert store.ev_view("EV_249", T0) is not None
    recent = store.recent_assignments(10)
    assert [a["ev_id"] for a in recent] == [f"EV_{i}" for i in (249, 248, 247, 246, 245)]


def test_queue_view_totals_and_overview() -> None:
    store = StateStore()
    assert store.queue_view(T0) == {"known": False, "ts": None, "length": 0, "truncated": False, "entries": []}
    entries = [QueueEntry(ev_id=f"EV_{i}", request_id=None, position=i, requested_kw=11, min_kw=1.4, priority=0,
                          waiting_since=T0) for i in range(1, 4)]
    store.on_queue(QueueState(ts=T0, length=250, entries=entries, truncated=True), T0)
    q = store.queue_view(T0, limit=2)
    assert q["known"] and q["length"] == 250 and q["truncated"] and len(q["entries"]) == 2
    store.on_substation_state("A", state("A", load_kw=100.0, capacity_kw=200.0, headroom_kw=90.0), T0)
    store.on_substation_state("B", state("B", load_kw=300.0, capacity_kw=200.0, headroom_kw=0.0), T0)
    store.on_telemetry("C", tele("C"), T0 - 1)  # (heard from, then offline: a leftover status alone is not shown)
    store.on_substation_status("C", SubstationStatus(state="offline", substation_id="C"), T0)
    store.on_balancer_status(BalancerStatus(state="online", ts=T0 - 3, version="0.1.0"), T0)
    ov = store.overview(T0, connected=True)
    t = ov["totals"]
    assert (t["substations"], t["online"], t["offline"], t["overloaded"]) == (3, 2, 1, 1)
    assert (t["capacity_kw"], t["load_kw"], t["utilisation"], t["queue_length"]) == (400.0, 400.0, 1.0, 250)
    assert ov["balancer"] == {"state": "online", "ts": T0 - 3, "version": "0.1.0", "age_s": 3.0}
    assert [s["substation_id"] for s in ov["substations"]] == ["A", "B", "C"]
    store.on_balancer_status(None, T0)
    assert store.overview(T0, connected=False)["balancer"]["state"] == "unknown"


def test_readiness_needs_the_broker_and_fresh_substation_data() -> None:
    store = StateStore()
    r = store.readiness(T0, connected=True, max_age_s=10)
    assert not r["ready"] and not r["checks"]["substation_data"]
    store.on_telemetry("A", tele("A"), T0)
    assert store.readiness(T0 + 1, connected=True, max_age_s=10)["ready"]
    assert not store.readiness(T0 + 1, connected=False, max_age_s=10)["ready"]
    assert not store.readiness(T0 + 11, connected=True, max_age_s=10)["ready"]


def test_every_change_moves_the_version() -> None:
    store = StateStore()
    v = store.version
    store.on_telemetry("A", tele("A"), T0)
    store.on_assignment(answer("EV_1"), T0)
    store.on_queue(QueueState(ts=T0, length=0, entries=[]), T0)
    assert store.version == v + 3
    store.decode_error("substation_state", "invalid_field")
    assert store.decode_errors == {"substation_state:invalid_field": 1}


def test_a_newer_answer_wins_over_the_retained_state_published_before_it() -> None:
    store = StateStore()
    store.on_assignment(answer("EV_1", session_id="s1", substation_id="A", granted_kw=22.0, ts=T0), T0)
    view = store.ev_view("EV_1", T0)
    assert view is not None and view["state"] == "charging" and view["session"] is None  # state not published yet
    store.on_assignment(answer("EV_1", "rejected", ts=T0 + 0.1, request_id="r-2", reason="ev_busy"), T0 + 0.1)
    assert store.ev_view("EV_1", T0 + 0.1)["state"] == "charging"  # type: ignore[index]
    store.on_substation_state("A", state("A", ts=T0 + 0.5, sessions=[session("s1", "EV_1", 22.0)]), T0 + 0.5)
    assert store.ev_view("EV_1", T0 + 0.5)["session"]["session_id"] == "s1"  # type: ignore[index]
    store.on_assignment(answer("EV_1", "rejected", ts=T0 + 0.7, request_id="r-2", reason="ev_busy"), T0 + 0.7)
    view = store.ev_view("EV_1", T0 + 0.7)
    assert view is not None and view["state"] == "charging" and view["last_answer"]["reason"] == "ev_busy"
    store.on_assignment(answer("EV_1", "completed", ts=T0 + 1, session_id="s1", reason="released"), T0 + 1)
    view = store.ev_view("EV_1", T0 + 1)
    assert view is not None and view["state"] == "idle" and view["session"] is None


def test_an_open_answer_a_newer_complete_state_leaves_out_has_ended() -> None:
    """A final answer missed (reconnect, balancer restart): the newer retained state decides, not the old answer."""
    store = StateStore()
    store.on_assignment(answer("EV_1", session_id="s1", substation_id="A", granted_kw=22.0, ts=T0), T0)
    store.on_assignment(answer("EV_2", "queued", ts=T0, position=1), T0)
    assert store.ev_view("EV_1", T0)["state"] == "charging"  # type: ignore[index]
    assert store.ev_view("EV_2", T0)["state"] == "queued"  # type: ignore[index]
    store.on_substation_state("A", state("A", ts=T0 + 600), T0 + 600)  # no sessions
    store.on_queue(QueueState(ts=T0 + 600, length=0, entries=[]), T0 + 600)
    assert store.ev_view("EV_1", T0 + 600)["state"] == "idle"  # type: ignore[index]
    assert store.ev_view("EV_2", T0 + 600)["state"] == "idle"  # type: ignore[index]
    assert store.find_session("s1") is None
    # A truncated state (over 150 sessions) cannot tell: the answer stands.
    store.on_substation_state("A", state("A", ts=T0 + 700, sessions_truncated=True), T0 + 700)
    assert store.ev_view("EV_1", T0 + 700)["state"] == "charging"  # type: ignore[index]


def test_a_session_placed_since_the_last_state_can_be_found_from_its_answer() -> None:
    store = StateStore()
    store.on_substation_state("A", state("A", ts=T0), T0)
    store.on_assignment(answer("EV_1", session_id="s9", substation_id="A", granted_kw=11.0, ts=T0 + 0.3), T0 + 0.3)
    found = store.find_session("s9")
    assert found is not None
    assert (found["ev_id"], found["substation_id"], found["request_id"]) == ("EV_1", "A", "r-EV_1")
    store.on_assignment(answer("EV_1", "completed", ts=T0 + 0.5, session_id="s9", substation_id="A"), T0 + 0.5)
    assert store.find_session("s9") is None


# ------------------------------------------------------------------------------------------------ issue 14
def test_offline_substations_leave_the_totals_and_are_counted_apart() -> None:
    """One of three offline: its capacity and its last load are not in capacity, load or utilisation."""
    store = StateStore(stale_after_s=5.0)
    for sid, load in (("a", 200.0), ("b", 100.0), ("c", 186.0)):
        store.on_substation_state(sid, state(sid, load_kw=load, sessions=[session(f"s-{sid}", f"EV_{sid}", 11.0)]),
                                  T0)
    store.on_substation_status("c", SubstationStatus(state="offline", substation_id="c", ts=T0 + 1), T0 + 1)
    totals = store.totals(store.substation_views(T0 + 1))
    assert (totals["online"], totals["offline"]) == (2, 1)
    assert (totals["capacity_kw"], totals["load_kw"], totals["utilisation"]) == (800.0, 300.0, 0.375)
    assert (totals["offline_capacity_kw"], totals["offline_load_kw"]) == (400.0, 186.0)
    assert totals["sessions"] == 2 and totals["granted_kw"] == 22.0


def test_a_forgotten_substation_is_in_no_view_and_listed_apart_until_it_comes_back() -> None:
    store = StateStore()
    store.on_substation_state("east", state("east", capacity_kw=300.0), T0)
    store.on_telemetry("east", tele("east"), T0)
    store.on_control_result(ControlResult(ok=True, action="forget", substation_id="east", ts=T0 + 1,
                                          detail="forgotten; 0 session(s) moved"), T0 + 1)
    assert store.substation_view("east", T0 + 1) is None and store.substation_views(T0 + 1) == []
    overview = store.overview(T0 + 1, connected=True)
    assert overview["decommissioned"] == [{"substation_id": "east", "at": T0 + 1, "capacity_kw": 300.0}]
    assert overview["totals"]["decommissioned"] == 1 and overview["totals"]["capacity_kw"] == 0
    assert overview["events"][0]["kind"] == "decommissioned" and "east" in overview["events"][0]["text"]
    # The cleared retained messages that follow change nothing; a new agent with that id brings it back.
    store.on_substation_state("east", None, T0 + 2)
    store.on_substation_status("east", None, T0 + 2)
    assert store.substation_views(T0 + 2) == []
    store.on_telemetry("east", tele("east", ts=T0 + 3), T0 + 3)
    assert [v["substation_id"] for v in store.substation_views(T0 + 3)] == ["east"] and not store.decommissioned


def test_a_session_shows_in_sessions_before_the_retained_state_does() -> None:
    """Read-your-writes: an answer newer than its substation's state adds, changes or ends the session at once."""
    store = StateStore()
    store.on_substation_state("a", state("a", sessions=[session("s1", "EV_1", 22.0)]), T0)
    store.note_request(ChargeRequest(requested_kw=22.0, request_id="r-EV_2", ev_id="EV_2", duration_minutes=60))
    store.on_assignment(answer("EV_2", ts=T0 + 0.1, substation_id="a", granted_kw=11.0, session_id="s2"), T0 + 0.1)
    rows = store.sessions()
    assert [(r["session_id"], r["granted_kw"], r["requested_kw"], r["status"]) for r in rows] == [
        ("s1", 22.0, 22.0, "charging"), ("s2", 11.0, 22.0, "reduced")]
    assert store.sessions(ev_id="EV_2")[0]["substation_id"] == "a"
    # The EV releases: gone at once; its state catching up changes nothing more.
    store.on_assignment(answer("EV_1", "completed", ts=T0 + 0.2, substation_id="a", session_id="s1",
                               reason="released"), T0 + 0.2)
    assert [r["session_id"] for r in store.sessions()] == ["s2"]
    store.on_substation_state("a", state("a", ts=T0 + 1, sessions=[session("s2", "EV_2", 11.0)]), T0 + 1)
    assert [r["session_id"] for r in store.sessions()] == ["s2"] and store.sessions()[0]["expected_end"] is not None
    assert not store._fresh  # the state shows them now


def test_probe_noise_is_left_out_of_the_latest_answers_unless_asked_for() -> None:
    store = StateStore()
    store.on_assignment(answer("EV_1", "assigned", substation_id="a", granted_kw=11.0, session_id="s1"), T0)
    for i in range(30):
        store.on_assignment(answer(f"EV_{i + 2}", "rejected", ts=T0 + i, reason="nothing_to_release"), T0 + i)
    assert [a["ev_id"] for a in store.overview(T0 + 30, connected=True)["latest_assignments"]] == ["EV_1"]
    noisy = store.overview(T0 + 30, connected=True, noise=True, assignments_limit=5)["latest_assignments"]
    assert [a["reason"] for a in noisy] == ["nothing_to_release"] * 5


def test_event_log_operator_actions_capacity_revocations_and_conditions() -> None:
    store = StateStore(stale_after_s=5.0)
    store.on_substation_state("a", state("a"), T0)
    store.on_telemetry("a", tele("a", capacity=400.0), T0)
    store.note_conditions(T0)  # first sight: it settles first ...
    store.on_telemetry("a", tele("a", ts=T0 + 0.5, capacity=400.0), T0 + 5.5)
    store.note_conditions(T0 + 5.5)  # ... and is all well: not news
    assert store.events.latest(10) == []
    store.on_control_result(ControlResult(ok=True, action="drain", substation_id="a", ts=T0 + 1), T0 + 1)
    store.on_control_result(ControlResult(ok=True, action="set_capacity", substation_id="a", ts=T0 + 2,
                                          state=state("a", ts=T0 + 2, capacity_limit_kw=250.0)), T0 + 2)
    store.on_control_result(ControlResult(ok=False, action="undrain", substation_id="zz", ts=T0 + 2,
                                          reason="unknown_substation"), T0 + 2)  # refused: no event
    store.on_telemetry("a", tele("a", ts=T0 + 3, capacity=250.0), T0 + 3)  # the agent's own schedule
    for i in range(5):  # a burst on one substation for one reason: one line with a count
        store.on_assignment(answer(f"EV_{i}", "revoked", ts=T0 + 3, substation_id="a", session_id=f"s{i}",
                                   reason="substation_offline"), T0 + 3)
    store.on_telemetry("a", tele("a", ts=T0 + 3, capacity=250.0), T0 + 3)
    store.note_conditions(T0 + 20)  # silent for 17 s: stale
    store.on_telemetry("a", tele("a", ts=T0 + 21, capacity=250.0), T0 + 21)
    store.note_conditions(T0 + 21)
    kinds = [(e["kind"], e["count"]) for e in reversed(store.events.latest(20))]
    assert kinds == [("drain", 1), ("capacity", 1), ("capacity", 1), ("revoked", 5), ("stale", 1), ("recovered", 1)]
    texts = [e["text"] for e in reversed(store.events.latest(20))]
    assert "250 kW" in texts[1] and "reports a capacity of 250 kW (was 400 kW)" in texts[2]
    assert texts[3] == "5 sessions revoked on a (substation_offline)"


def test_a_new_substation_settles_before_its_condition_is_news() -> None:
    """An agent that just connected is stale until its first telemetry: not an event, unless it stays so."""
    store = StateStore(stale_after_s=5.0)
    store.on_substation_status("n", SubstationStatus(state="online", substation_id="n", ts=T0), T0)
    store.note_conditions(T0)
    store.note_conditions(T0 + 2)
    store.on_telemetry("n", tele("n", ts=T0 + 3), T0 + 3)
    store.note_conditions(T0 + 6)
    assert store.events.latest(10) == []
    store.on_substation_status("m", SubstationStatus(state="online", substation_id="m", ts=T0), T0)
    store.note_conditions(T0)
    store.note_conditions(T0 + 6)  # still nothing from it after settling: that is news
    assert [e["text"] for e in store.events.latest(10)] == ["m is stale: no telemetry"]


def test_trends_sample_at_most_every_step_and_keep_fifteen_minutes() -> None:
    store = StateStore()
    store.on_substation_state("a", state("a", limit_kw=380.0), T0)
    for i in range(0, 1200, 2):  # telemetry every 2 s for 20 minutes
        store.on_telemetry("a", Telemetry(substation_id="a", ts=T0 + i, seq=i, capacity_kw=400.0, load_kw=100.0 + i,
                                          base_load_kw=90.0, ev_load_kw=10.0 + i, active_sessions=1), T0 + i)
    view = store.trends.view(T0 + 1198)
    series = view["substations"]["a"]
    assert len(series["t"]) == 90 and series["t"][1] - series["t"][0] == 10.0
    assert T0 + 1198 - series["t"][0] <= 900 and series["limit_kw"][-1] == 380.0
    assert series["load_kw"][-1] == 100.0 + 1190 and series["ev_load_kw"][-1] == 10.0 + 1190
    assert store.trends.view(T0, ["nowhere"])["substations"] == {}


def test_the_session_count_includes_sessions_answered_since_the_states() -> None:
    store = StateStore()
    store.on_substation_state("a", state("a", sessions=[session("s1", "EV_1", 22.0)]), T0)
    assert store.totals(store.substation_views(T0))["sessions"] == 1
    store.on_assignment(answer("EV_2", ts=T0 + 0.1, substation_id="a", granted_kw=11.0, session_id="s2"), T0 + 0.1)
    store.on_assignment(answer("EV_1", "completed", ts=T0 + 0.2, substation_id="a", session_id="s1"), T0 + 0.2)
    store.on_assignment(answer("EV_3", ts=T0 + 0.3, substation_id="a", granted_kw=11.0, session_id="s3"), T0 + 0.3)
    assert store.totals(store.substation_views(T0 + 0.3))["sessions"] == 2
    store.on_substation_state("a", state("a", ts=T0 + 1, sessions=[session("s2", "EV_2", 11.0),
                                                                    session("s3", "EV_3", 11.0)]), T0 + 1)
    assert store.totals(store.substation_views(T0 + 1))["sessions"] == 2


# ------------------------------------------------------------------ a thousand substations (issue 15)
def test_worst_first_region_limit_and_the_compact_form() -> None:
    """order=worst: offline, stale, overloaded, draining, ok, then the fullest first; region and limit select,
    totals stay grid-wide; the compact form is one array per substation, in the order of its fields."""
    store = StateStore(stale_after_s=5.0)
    store.on_substation_state("ok-low", state("ok-low", utilisation=0.2), T0)
    store.on_substation_state("ok-high", state("ok-high", utilisation=0.9), T0)
    store.on_substation_state("drained", state("drained", draining=True, utilisation=0.1), T0)
    store.on_substation_state("over", state("over", load_kw=450.0, utilisation=1.12, region="west"), T0)
    store.on_substation_state("stale", state("stale", stale=True, telemetry_age_s=9.0), T0)
    store.on_substation_state("off", state("off", online=False, utilisation=0.0), T0)
    store.on_substation_status("over", SubstationStatus(state="online", substation_id="over", ts=T0 - 5,
                                                        region="west"), T0)
    ov = store.overview(T0, connected=True, order="worst")
    assert [v["substation_id"] for v in ov["substations"]] == ["off", "stale", "over", "drained", "ok-high", "ok-low"]
    assert ov["substations_matched"] == 6
    assert [v["substation_id"] for v in store.overview(T0, connected=True)["substations"]] == sorted(
        ["off", "stale", "over", "drained", "ok-high", "ok-low"])
    west = store.overview(T0, connected=True, region="west")
    assert [v["substation_id"] for v in west["substations"]] == ["over"] and west["totals"]["substations"] == 6
    assert [v["region"] for v in ov["substations"]] == ["default", "default", "west", "default", "default",
                                                        "default"]
    top = store.overview(T0, connected=True, order="worst", limit=2, compact=True)
    assert top["substations_matched"] == 6 and len(top["substations"]) == 2
    rows = [dict(zip(top["fields"], row, strict=True)) for row in top["substations"]]
    assert [r["substation_id"] for r in rows] == ["off", "stale"]
    assert rows[1]["condition"] == "stale" and rows[1]["heard_at"] == T0 - 9.0  # (known only while stale)
    over = dict(zip(top["fields"], store.overview(T0, connected=True, order="worst", compact=True)["substations"][2],
                    strict=True))
    assert (over["region"], over["condition"], over["load_kw"], over["utilisation"], over["heard_at"]) == (
        "west", "overloaded", 450.0, 1.12, None)
    full = json.dumps(store.overview(T0, connected=True)["substations"])
    compact = json.dumps(store.overview(T0, connected=True, compact=True)["substations"])
    assert len(compact) < len(full) / 3


def test_a_retained_offline_status_alone_is_a_leftover_and_shown_nowhere() -> None:
    """The last will of an agent the balancer holds no state for (forgotten, or of an earlier run) is not a
    substation of this grid: the page, /status and the totals leave it out (the balancer ignores it too)."""
    store = StateStore()
    store.on_substation_state("A", state("A"), T0)
    store.on_substation_status("old", SubstationStatus(state="offline", substation_id="old"), T0)
    assert [v["substation_id"] for v in store.substation_views(T0)] == ["A"]
    assert store.overview(T0, connected=True)["totals"]["offline"] == 0
    store.on_telemetry("old", tele("old"), T0 + 1)  # it speaks again: a substation once more
    assert [v["substation_id"] for v in store.substation_views(T0 + 1)] == ["A", "old"]
    # Decommissioned, then its last will arrives (its account was revoked): still decommissioned, shown nowhere.
    store.forget_substation("A", T0 + 2)
    store.on_substation_status("A", SubstationStatus(state="offline", substation_id="A"), T0 + 3)
    assert [v["substation_id"] for v in store.substation_views(T0 + 3)] == ["old"]
    assert [d["substation_id"] for d in store.overview(T0 + 3, connected=True)["decommissioned"]] == ["A"]


def test_every_regions_balancer_and_queue_and_where_a_substations_commands_go() -> None:
    """Issue 12: one retained status and queue per region; ``region=`` shows that region's; operator commands go
    to the region a substation's status (or the balancer's state) names."""
    store = StateStore()
    store.on_balancer_status(BalancerStatus(state="online", ts=T0, version="0.1.0"), T0)
    store.on_balancer_status(BalancerStatus(state="offline", ts=T0), T0, "east")
    store.on_queue(QueueState(ts=T0, length=0, entries=[]), T0)
    store.on_queue(QueueState(ts=T0, length=7, entries=[]), T0, "east")
    store.on_substation_status("E1", SubstationStatus(state="online", substation_id="E1", region="east"), T0)
    store.on_substation_state("A", state("A"), T0)
    assert store.overview(T0, connected=True)["balancer"]["state"] == "online"
    east = store.overview(T0, connected=True, region="east")
    assert east["balancer"]["state"] == "offline" and east["queue"]["length"] == 7
    assert [s["substation_id"] for s in east["substations"]] == ["E1"]
    assert store.queue_state is not None and store.queue_state.length == 0  # the default region's, as before
    assert (store.region_of("E1"), store.region_of("A"), store.region_of("nobody")) == ("east", "default", "default")
