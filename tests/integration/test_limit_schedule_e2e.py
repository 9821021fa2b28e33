"""A DSO limit schedule end to end: real Mosquitto with the project's ACL, ``python -m balancer`` and
``python -m substation_agents`` as subprocesses, the operator's schedule sent over MQTT by the ``api`` account.

The substation's measured load (the agent's telemetry) must be under the scheduled limit before the limit starts,
the schedule must be published retained, and a restarted balancer must plan with it again without being told."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from probe import Probe, Service, start_balancer

from broker.local import LocalBroker

pytestmark = pytest.mark.integration
P = "grid/v1"
LIMIT_KW = 60.0


def test_operator_schedule_over_mqtt_lowers_load_before_the_start_and_is_retained(
        broker: LocalBroker, tmp_path: Path) -> None:
    watch = Probe(broker, "observer", f"{P}/#")
    agent = Service("substation_agents", broker, tmp_path, SUBSTATIONS="A:200", MQTT_ACCOUNT_SECRET="test-secret",
                    SUBSTATION_INTERVAL_S="0.2", SUBSTATION_BASE_LOAD_PCT="10")
    # Lead time: max(BALANCER_LIMIT_LEAD_S, lease + rebalance interval) = max(2, 2 + 1) = 3 s.
    env = {"BALANCER_LIMIT_LEAD_S": "2", "BALANCER_LEASE_S": "2", "BALANCER_STATE_INTERVAL_S": "0.2"}
    first = start_balancer(broker, tmp_path, **env)
    second: Service | None = None
    api = Probe(broker, "api")
    try:
        watch.wait_for(lambda m: m.topic == f"{P}/balancer/status" and m.json()["state"] == "online", timeout=15)
        watch.wait_for(lambda m: m.topic == f"{P}/substation/A/telemetry", what="A telemetry")
        ev = Probe(broker, "EV_0001", f"{P}/ev/EV_0001/assignment")
        ev.publish(f"{P}/ev/EV_0001/request", {"request_id": "r1", "requested_kw": 80, "duration_minutes": 600})
        ev.wait_for(lambda m: m.json()["status"] == "assigned", what="assigned")  # (queued until A is known)
        assert watch.wait_until(lambda: any(
            m.json()["ev_load_kw"] == 80.0 for m in watch.on(f"{P}/substation/A/telemetry")), timeout=5)

        # The operator (the api account) sends the DSO's evening cut: 60 kW from 8 s from now, for an hour.
        start = time.time() + 8
        api.publish(f"{P}/substation/A/limits", {
            "source": "dso-north", "request_id": "dso-1",
            "entries": [{"start": start, "end": start + 3600, "limit_kw": LIMIT_KW}]})
        result = watch.wait_one(lambda m: m.topic == f"{P}/balancer/control/result" and b"dso-1" in m.payload,
                                what="set_limits result").json()
        assert (result["ok"], result["action"]) == (True, "set_limits")
        assert result["schedule"]["entries"][0]["source"] == "dso-north"
        assert time.time() < start - 3, "too slow to see the reduction come before the start"

        # Reduced before the start (reason limit_scheduled), and the measured load follows before the start.
        update = watch.wait_one(lambda m: m.topic == f"{P}/substation/A/command" and any(
            c["command"] == "update" for c in m.json()["commands"]), timeout=10, what="reduction").json()
        cut = next(c for c in update["commands"] if c["command"] == "update")
        assert cut["reason"] == "limit_scheduled" and update["ts"] < start
        assert cut["granted_kw"] <= LIMIT_KW * 0.95
        assert watch.wait_until(lambda: any(
            m.json()["load_kw"] <= LIMIT_KW and m.json()["ts"] < start
            for m in watch.on(f"{P}/substation/A/telemetry")), timeout=max(0.1, start - time.time()))
        told = ev.wait_one(lambda m: m.json()["status"] == "updated", what="the EV hears the cut").json()
        assert told["reason"] == "limit_scheduled" and "dso-north" in told["detail"]
        # From the start on, every telemetry sample is within the limit.
        time.sleep(max(0.0, start - time.time()) + 1.0)
        after = [m.json() for m in watch.on(f"{P}/substation/A/telemetry") if m.json()["ts"] >= start]
        assert after and all(t["load_kw"] <= LIMIT_KW for t in after), after

        # Retained: a newcomer gets the schedule and the state that shows which source binds (another reader account
        # than the watch's: one connection per account).
        with Probe(broker, "recorder", f"{P}/substation/A/schedule", f"{P}/substation/A/state") as late:
            retained = late.wait_for(lambda m: m.retain and m.topic.endswith("/schedule"), what="schedule")[0].json()
            assert (retained["limit_kw"], retained["source"]) == (LIMIT_KW, "dso-north")
            assert [s["source"] for s in retained["composite"]] == ["dso-north"]
            state = late.wait_for(lambda m: m.retain and m.topic.endswith("/state"), what="state")[0].json()
            assert (state["capacity_kw"], state["limit_source"]) == (LIMIT_KW, "dso-north")

        # Only operators may send schedules (broker ACL: refused, never delivered).
        with Probe(broker, "loadtest") as intruder:
            assert intruder.try_publish(f"{P}/substation/A/limits", {"source": "x", "entries": []}) == 0x87
        # Bad input is answered to the sender with a clear error.
        api.publish(f"{P}/substation/A/limits", {"source": "dso-north", "request_id": "dso-2",
                                                 "entries": [{"start": start, "end": start - 1, "limit_kw": 1}]})
        refused = watch.wait_one(lambda m: m.topic == f"{P}/balancer/control/result" and b"dso-2" in m.payload,
                                 what="refusal").json()
        assert (refused["ok"], refused["reason"], refused["action"]) == (False, "invalid_field", "set_limits")
        assert "end must be after start" in refused["detail"]

        # A restarted balancer reads the retained schedule back: it plans with the limit without being told again.
        assert first.stop() == 0, first.log()[-3000:]
        watch.clear()
        second = start_balancer(broker, tmp_path, **env)
        restarted = watch.wait_one(lambda m: m.topic == f"{P}/substation/A/state"
                                   and m.json()["limit_source"] == "dso-north", timeout=15, what="restored").json()
        assert restarted["capacity_kw"] == LIMIT_KW
        assert "schedule_restored" in second.log()
        ev.close()
    finally:
        api.close()
        if second is not None:
            assert second.stop() == 0, second.log()[-3000:]
        if first.proc.poll() is None:
            first.stop()
        assert agent.stop() == 0
        watch.close()
        for service in (first, second, agent):
            if service is not None:
                assert "Traceback" not in service.log(), service.log()[-3000:]


def test_schedule_set_over_the_api_is_shown_on_the_live_page(broker: LocalBroker, tmp_path: Path,
                                                             stopper: list) -> None:  # type: ignore[type-arg]
    """PUT /substations/{id}/limits/{source} with an operator token, then the page in headless Chromium shows the
    substation's schedule (the interval in force marked) and which source binds."""
    from browser import chromium
    from selenium.webdriver.common.by import By
    from test_api_e2e import Substations, start_api, wait_for

    subs = Substations(broker, north=(400.0, 100.0), south=(300.0, 100.0)).__enter__()
    stopper.append(lambda: subs.__exit__())
    balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="2", BALANCER_STATE_INTERVAL_S="0.2")
    stopper.append(balancer.stop)
    api = start_api(broker, tmp_path, API_PUBLIC_READS="true")
    stopper.append(api.stop)
    wait_for(lambda: len(api.http.get("/substations").json()) == 2, 15, "two substations")
    now = time.time()
    r = api.http.put("/substations/north/limits/dso-north", json={"entries": [
        {"start": now - 60, "end": now + 3600, "limit_kw": 250},
        {"start": now + 3600, "end": now + 7200, "limit_kw": 300}]})
    assert r.status_code == 200, r.text
    assert api.http.put("/substations/north/limits/dso-north", json={"entries": [
        {"start": now + 10, "end": now, "limit_kw": 1}]}).status_code == 422  # end before start: never sent
    wait_for(lambda: api.http.get("/substations/north").json()["limit_source"] == "dso-north", 10, "state")
    got = api.http.get("/substations/north/limits").json()
    assert [(c["limit_kw"], c["source"]) for c in got["composite"]] == [(250.0, "dso-north"), (300.0, "dso-north")]

    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get(api.url + "/")

        def text_of(selector: str) -> str:  # read in one step in the page (rows are redrawn while we look)
            return str(driver.execute_script(
                "const e = document.querySelector(arguments[0]);"
                "return e && !e.hidden && !e.closest('[hidden]') ? e.textContent : '';", selector))

        def schedule_text() -> str:
            return text_of('.sub[data-substation="north"] .schedule')

        try:
            wait_for(lambda: "dso-north" in schedule_text(), 15, "the schedule on the page")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nbrowser log: {driver.get_log('browser')}") from None
        text = schedule_text()
        assert "limit set by dso-north" in text and "250.0 kW" in text and "300.0 kW" in text
        assert "250.0" in text_of('.sub[data-substation="north"] .schedule .slot.now')  # the one in force, marked
        assert driver.find_elements(By.CSS_SELECTOR, '.sub[data-substation="south"]')  # shown, ...
        assert text_of('.sub[data-substation="south"] .schedule') == ""  # ... without a schedule: nothing
        assert api.http.delete("/substations/north/limits/dso-north").status_code == 200
        wait_for(lambda: schedule_text() == "", 10, "the schedule gone from the page")
    log = api.service.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 300:][:4000]
