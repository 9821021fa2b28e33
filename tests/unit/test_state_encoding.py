"""The retained substation states as the service publishes them (issue 10, session D): the change key is the
numbers and the session list is encoded once per kept list and spliced in (``BalancerService._send_state``).

Property: over random requests, releases, telemetry and operator actions, every published payload is byte for
byte the encoding of the state built afresh (session views rebuilt, nothing kept), the contract's decoder takes
it, and a state is left unpublished only when nothing but its clock fields changed, and its measured numbers by at
most the dead-band since the last publication (and less than 30 s passed; see also test_state_deadband.py).
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.core.policies.names import PolicyName
from balancer.core.views import substation_state
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from grid_protocol import decode, encode
from grid_protocol.messages import MAX_STATE_PAYLOAD_BYTES, SubstationState
from tests.unit.test_substation_agent_unit import FakeTransport

P = "grid/v1"
SUBS = ("A", "B", "C")
CLOCK_FIELDS = ("ts", "telemetry_age_s")
MEASURED = ("load_kw", "base_load_kw", "headroom_kw", "utilisation")

op = st.one_of(
    st.tuples(st.just("telemetry"), st.integers(0, 2), st.integers(0, 130)),
    st.tuples(st.just("request"), st.integers(0, 15), st.sampled_from([3.7, 7.4, 11.0, 22.0])),
    st.tuples(st.just("release"), st.integers(0, 15), st.just(0)),
    st.tuples(st.just("control"), st.integers(0, 2), st.sampled_from(["drain", "undrain", "set_capacity"])),
    st.tuples(st.just("publish"), st.integers(0, 2), st.sampled_from([0.0, 0.5, 1.0, 7.0, 31.0])),
)


def fresh(svc: BalancerService, sid: str, now: float) -> SubstationState:
    """The state built from scratch: the kept session views put aside, then put back."""
    sub = svc.core.substations[sid]
    kept, sub.session_views = sub.session_views, None
    changed = sub.sessions_changed
    try:
        return substation_state(svc.core, sub, now)
    finally:
        sub.session_views, sub.sessions_changed = kept, changed


def without_clock(payload: bytes) -> dict[str, object]:
    body = json.loads(payload)
    for name in CLOCK_FIELDS:
        body.pop(name)
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from([PolicyName.LEAST_UTILISED, PolicyName.DEADLINE]),
       ops=st.lists(op, min_size=1, max_size=60))
def test_published_states_are_the_fresh_states_encoding(policy: PolicyName,
                                                          ops: list[tuple[str, int, object]]) -> None:
    clock = [1000.0]
    transport = FakeTransport()
    svc = BalancerService(BalancerSettings(startup_wait_s=0, policy=policy, ev_burst=1000, telemetry_burst=1000),
                          transport, clock=lambda: clock[0])  # type: ignore[arg-type]
    seq = dict.fromkeys(SUBS, 0)
    last: dict[str, tuple[bytes, float]] = {}  # per substation: the last state payload published, when
    rid = 0

    def check_sent(start: int, now: float, periodic: bool) -> None:
        sent = {p.topic: p for p in transport.sent[start:]}
        for sid in svc.core.substations:
            topic = f"{P}/substation/{sid}/state"
            expected = encode(fresh(svc, sid, now))
            if topic in sent:
                assert sent[topic].retain
                assert sent[topic].payload == expected
                decode(sent[topic].payload, SubstationState, max_bytes=MAX_STATE_PAYLOAD_BYTES)
                last[sid] = (sent[topic].payload, now)
            elif periodic:  # left out: only its clock fields moved, its measured numbers within the dead-band of
                payload, at = last[sid]  # those last published, and it was published less than 30 s ago
                was, is_ = without_clock(payload), without_clock(expected)
                band = svc.settings.state_deadband_pct / 100
                for name in MEASURED:
                    a, b = was.pop(name), is_.pop(name)
                    assert (a is None) == (b is None)
                    if a is not None:
                        assert abs(b - a) <= band * (1 if name == "utilisation" else is_["capacity_kw"])  # type: ignore[operator]
                assert was == is_
                assert now - at < 30.0

    for kind, index, arg in ops:
        start = len(transport.sent)
        now = clock[0]
        if kind == "telemetry":
            sid = SUBS[index]
            seq[sid] += 1
            granted = svc.core.substations[sid].granted_w / 1000 if sid in svc.core.substations else 0.0
            base = float(arg)
            transport.deliver(f"{P}/substation/{sid}/telemetry", json.dumps({
                "substation_id": sid, "ts": now, "seq": seq[sid], "capacity_kw": 150, "load_kw": base + granted,
                "base_load_kw": base, "ev_load_kw": granted, "active_sessions": 0}).encode())
        elif kind == "request":
            rid += 1
            transport.deliver(f"{P}/ev/EV{index}/request", json.dumps(
                {"request_id": f"r{rid}", "requested_kw": arg, "min_kw": 1.4, "duration_minutes": 30}).encode())
        elif kind == "release":
            transport.deliver(f"{P}/ev/EV{index}/release", b"{}")
        elif kind == "control":
            sid = SUBS[index]
            command: dict[str, object] = {"action": arg, "substation_id": sid, "request_id": f"op{rid}"}
            if arg == "set_capacity":
                command["capacity_kw"] = 40.0 + 10 * index
            transport.deliver(f"{P}/balancer/control", json.dumps(command).encode())
            check_sent(start, now, periodic=False)  # published at once, forced
        else:
            clock[0] = now = now + float(arg)  # type: ignore[arg-type]
            svc._publish(svc.core.tick(now))
            svc.publish_states(now)
            check_sent(start, now, periodic=True)


def test_an_unchanged_session_list_is_encoded_once_and_spliced() -> None:
    """The kept list is the same object from one second to the next: its encoding is reused, not redone."""
    clock = [1000.0]
    transport = FakeTransport()
    svc = BalancerService(BalancerSettings(startup_wait_s=0), transport, clock=lambda: clock[0])  # type: ignore[arg-type]
    for seq, base in enumerate((10.0, 20.0), start=1):
        transport.deliver(f"{P}/substation/A/telemetry", json.dumps({
            "substation_id": "A", "ts": clock[0], "seq": seq, "capacity_kw": 150, "load_kw": base,
            "base_load_kw": base, "ev_load_kw": 0, "active_sessions": 0}).encode())
        if seq == 1:
            transport.deliver(f"{P}/ev/EV1/request", json.dumps(
                {"request_id": "r1", "requested_kw": 11, "duration_minutes": 30}).encode())
        svc.publish_states(clock[0])
        if seq == 1:
            first = svc._state_sent[f"{P}/substation/A/state"]
        clock[0] += 1.0
    second = svc._state_sent[f"{P}/substation/A/state"]
    assert second.at == 1001.0 and second.key != first.key  # published again: its numbers moved
    assert second.raw is first.raw and second.views is first.views  # the session list: kept, not re-encoded
    (state,) = [p for p in transport.sent if p.topic == f"{P}/substation/A/state"][-1:]
    assert json.loads(state.payload)["sessions"][0]["ev_id"] == "EV1"


def service_with_sessions(n: int, clock: list[float], **request: object) -> tuple[BalancerService, FakeTransport]:
    """A service on an in-memory transport, its clock ``clock[0]``, with substation A (500 kW) reporting and ``n``
    EVs charging there at 11 kW (``request``: more fields of their requests)."""
    transport = FakeTransport()
    svc = BalancerService(BalancerSettings(startup_wait_s=0, ev_burst=1000), transport,
                          clock=lambda: clock[0])  # type: ignore[arg-type]
    transport.deliver(f"{P}/substation/A/telemetry", json.dumps({
        "substation_id": "A", "ts": clock[0], "seq": 1, "capacity_kw": 500, "load_kw": 0, "base_load_kw": 0,
        "ev_load_kw": 0, "active_sessions": 0}).encode())
    for i in range(n):
        transport.deliver(f"{P}/ev/EV{i}/request", json.dumps(
            {"request_id": f"r{i}", "requested_kw": 11, "energy_kwh": 20, **request}).encode())
    return svc, transport


@settings(max_examples=40, deadline=None)
@given(changes=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 22_000), st.sampled_from([0.0, 0.0, 5.0])),
                        max_size=20))
def test_kept_session_views_are_rebuilt_only_where_a_session_changed(changes: list[tuple[int, int, float]]) -> None:
    """A rebuilt list reuses each unchanged session's view and rebuilds the changed ones: equal to a fresh build."""
    clock = [1000.0]
    svc, _ = service_with_sessions(8, clock, duration_minutes=60)
    sub = svc.core.substations["A"]
    sessions = list(sub.sessions.values())
    assert len(sessions) == 8
    before = substation_state(svc.core, sub, clock[0]).sessions
    for index, granted_w, later in changes:
        clock[0] += later
        session = sessions[index]
        # as the core changes a grant (accounted first; the session named in ``sessions_changed``)
        svc.core.book.set_grant(session, granted_w, clock[0], "rebalanced", "test")  # type: ignore[arg-type]
        after = substation_state(svc.core, sub, clock[0]).sessions
        assert after == fresh(svc, "A", clock[0]).sessions
        for s, old, new in zip(sessions, before, after, strict=True):
            if s is not session:
                assert new is old  # unchanged: the kept view, not a new one
        before = after
