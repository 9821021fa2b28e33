"""The limit-schedule routes (GET/PUT/DELETE /substations/{id}/limits...): validation at the boundary, operator
tokens, and the balancer's answers. The broker is a fake transport; the answers come from the real pure core."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi.testclient import TestClient

from balancer.core import Balancer, CoreConfig
from balancer.core.limits import schedule_state
from grid_protocol import ControlResult, LimitSchedule, ScheduleState, Telemetry, decode, encode
from grid_protocol.messages import MAX_SCHEDULE_PAYLOAD_BYTES
from tests.unit.test_api_app import AUTH, FakeTransport, Responder, assert_problem, client, fake, feed  # noqa: F401


def core_answering(core: Balancer) -> Responder:
    """Answers a LimitSchedule as the balancer does, with a pure core holding substation A."""
    def respond(topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        if not topic.endswith("/limits"):
            return []
        sid = topic.split("/")[-2]
        now = time.time()
        msg = decode(payload, LimitSchedule, max_bytes=MAX_SCHEDULE_PAYLOAD_BYTES)
        reason, detail, _ = core.on_limits(sid, msg, now)
        schedule = core.schedules.get(sid)
        state = schedule_state(sid, schedule, now) if reason is None and schedule is not None else None
        if reason is None and state is None:
            state = ScheduleState(substation_id=sid, ts=now, limit_kw=None, source=None, entries=[], composite=[])
        result = ControlResult(ok=reason is None, action="set_limits", substation_id=sid, ts=now,
                               request_id=msg.request_id, reason=reason, detail=detail, schedule=state)
        return [("grid/v1/balancer/control/result", encode(result))]
    return respond


def a_core() -> Balancer:
    core = Balancer(CoreConfig())
    core.on_telemetry(Telemetry(substation_id="A", ts=time.time(), seq=0, capacity_kw=400, load_kw=100,
                                base_load_kw=100, ev_load_kw=0, active_sessions=0), time.time())
    return core


def test_put_get_and_delete_a_sources_limits(client: TestClient, fake: FakeTransport) -> None:  # noqa: F811
    fake.responder = core_answering(a_core())
    start = time.time() + 3600
    body: dict[str, Any] = {"entries": [{"start": start, "end": start + 3 * 3600, "limit_kw": 250}]}
    r = client.put("/substations/A/limits/dso-north", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["ok"], out["action"]) == (True, "set_limits") and "1 entry from dso-north" in out["detail"]
    assert [(c["limit_kw"], c["source"]) for c in out["schedule"]["composite"]] == [(250.0, "dso-north")]
    topic, payload = fake.published[-1]
    sent = json.loads(payload)
    assert topic == "grid/v1/substation/A/limits" and sent["source"] == "dso-north" and sent["request_id"]

    # a tighter event from another source inside it: the lowest binds there (what the retained schedule shows)
    r = client.put("/substations/A/limits/openadr", headers=AUTH,
                   json={"entries": [{"start": start + 3600, "end": start + 7200, "limit_kw": 180}]})
    feed(client, fake, "grid/v1/substation/A/schedule", r.json()["schedule"])
    got = client.get("/substations/A/limits").json()
    assert [(c["limit_kw"], c["source"]) for c in got["composite"]] == [
        (250.0, "dso-north"), (180.0, "openadr"), (250.0, "dso-north")]

    r = client.delete("/substations/A/limits/openadr", headers=AUTH)
    assert r.status_code == 200 and "openadr withdrawn" in r.json()["detail"]
    assert [e["source"] for e in r.json()["schedule"]["entries"]] == ["dso-north"]


def test_bad_schedules_are_refused_at_the_boundary_with_clear_errors(client: TestClient,  # noqa: F811
                                                                     fake: FakeTransport) -> None:  # noqa: F811
    fake.responder = core_answering(a_core())
    now = time.time()
    for body, words in [
        ({"entries": [{"start": now, "end": now, "limit_kw": 1}]}, "end must be after start"),
        ({"entries": [{"start": now, "end": now + 1, "limit_kw": -1}]}, "greater than or equal to 0"),
        ({"entries": [{"start": now, "end": now + 1, "limit_kw": 1, "oops": 1}]}, "oops"),
        ({"entries": [{"start": now + i, "end": now + i + 1, "limit_kw": 1} for i in range(101)]}, "100"),
    ]:
        p = assert_problem(client.put("/substations/A/limits/dso", headers=AUTH, json=body), 422)
        assert words in json.dumps(p), p
    p = assert_problem(client.put("/substations/A/limits/capacity", headers=AUTH, json={"entries": []}), 422)
    assert "reserved" in p["detail"]
    assert_problem(client.put("/substations/A/limits/a.b", headers=AUTH, json={"entries": []}), 422)  # id rule
    assert not any(t.endswith("/limits") for t, _ in fake.published)  # nothing bad reached the broker
    # refusals of the balancer: unknown substation 404, too many entries over all sources 409
    p = assert_problem(client.put("/substations/Q/limits/dso", headers=AUTH, json={"entries": []}), 404)
    assert p["reason"] == "unknown_substation"
    entries = [{"start": now + 10 * i, "end": now + 10 * i + 5, "limit_kw": 1} for i in range(100)]
    assert client.put("/substations/A/limits/a", headers=AUTH, json={"entries": entries}).status_code == 200
    p = assert_problem(client.put("/substations/A/limits/b", headers=AUTH, json={"entries": entries[:1]}), 409)
    assert p["reason"] == "schedule_full"


def test_only_operators_may_set_limits(client: TestClient, fake: FakeTransport) -> None:  # noqa: F811
    fake.responder = core_answering(a_core())
    body = {"entries": []}
    assert_problem(client.put("/substations/A/limits/dso", json=body), 401)
    assert_problem(client.put("/substations/A/limits/dso", json=body, headers={"Authorization": "Bearer x"}), 401)
    assert_problem(client.delete("/substations/A/limits/dso"), 401)
    assert not any(t.endswith("/limits") for t, _ in fake.published)
    assert_problem(client.get("/substations/nowhere/limits"), 404)


def test_the_live_page_snapshot_carries_the_schedule_and_the_binding_source() -> None:
    from api.live import SCHEDULE_SLOTS, LiveHub
    from api.state import StateStore
    from tests.unit.test_api_app import sub_state

    core = a_core()
    now = time.time()
    entries = [{"start": now - 60 + 3600 * i, "end": now + 3000 + 3600 * i, "limit_kw": 200 + i} for i in range(6)]
    msg = decode(json.dumps({"source": "dso-north", "entries": entries}).encode(), LimitSchedule)
    assert core.on_limits("A", msg, now)[0] is None
    store = StateStore()
    store.on_substation_state("A", sub_state("A", capacity_kw=200.0, schedule_limit_kw=200.0,
                                             limit_source="dso-north"), now)
    store.on_schedule("A", schedule_state("A", core.schedules["A"], now), now)
    snap = LiveHub(store, lambda: True).snapshot()
    sched = snap["schedules"]["A"]
    assert (sched["limit_kw"], sched["source"], sched["limit_source"]) == (200.0, "dso-north", "dso-north")
    assert len(sched["composite"]) == SCHEDULE_SLOTS and sched["composite"][0]["source"] == "dso-north"
    store.on_schedule("A", None, now)  # cleared (the substation was forgotten)
    assert LiveHub(store, lambda: True).snapshot()["schedules"] == {}


def test_a_schedule_change_is_in_the_event_log_and_status_still_answers(client: TestClient,  # noqa: F811
                                                                       fake: FakeTransport) -> None:  # noqa: F811
    from tests.unit.test_api_app import sub_state
    fake.responder = core_answering(a_core())
    feed(client, fake, "grid/v1/substation/A/state", sub_state("A"))
    now = time.time()
    assert client.put("/substations/A/limits/dso", headers=AUTH,
                      json={"entries": [{"start": now, "end": now + 60, "limit_kw": 10}]}).status_code == 200
    kinds = [e["kind"] for e in client.get("/event-log").json()["events"]]
    assert "schedule" in kinds
    for query in ("", "?compact=true"):  # the event's kind is part of the documented response
        assert client.get(f"/status{query}").status_code == 200
