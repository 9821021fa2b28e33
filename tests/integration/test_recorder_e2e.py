"""The recorder in a real scenario: Mosquitto, the balancer, telemetry, EV requests and session events,
recorded into a real VictoriaMetrics (InfluxDB v2 writes) and read back.

Everything the recorder wrote is compared with what was published: telemetry values sample by sample,
assignments by status, substation and reason, session events; bad payloads are counted and do not stop it.
EV and session ids are fields, not tags (bounded series): VictoriaMetrics keeps string fields as 0-valued
samples, so per-EV values are checked in InfluxDB's terms by the unit tests, and here by count.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from probe import Probe, Service, start_balancer
from tsdb import VictoriaMetrics, metric, recorder_ready, samples, start_recorder, wait_metrics

from broker.local import LocalBroker

pytestmark = pytest.mark.integration
P = "grid/v1"


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path / "vm").start()
    yield server
    server.stop()


def ms(ts: float) -> int:
    """The millisecond VictoriaMetrics stores for a point written at microsecond precision (it truncates)."""
    return round(ts * 1_000_000) // 1000


def stop_cleanly(service: Service) -> str:
    code = service.stop()
    log = service.log()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    return log


def test_records_a_real_scenario(broker: LocalBroker, vm: VictoriaMetrics, tmp_path: Path) -> None:
    recorder = start_recorder(broker, tmp_path, vm)
    balancer: Service | None = None
    fake = Probe(broker, "loadtest", f"{P}/ev/+/assignment")  # plays substations and EVs, sees the answers
    try:
        url = recorder_ready(recorder)
        balancer = start_balancer(broker, tmp_path, BALANCER_STALE_AFTER_S="30")
        status = Probe(broker, "api", f"{P}/balancer/status")
        status.wait_for(lambda m: json.loads(m.payload)["state"] == "online", timeout=15, what="balancer online")
        status.close()
        views = Probe(broker, "api", f"{P}/substation/+/state", f"{P}/balancer/queue")  # the balancer's views

        # Substations: retained status, then telemetry with known values (A: 100 kW, B: 50 kW capacity).
        for sid, cap in (("A", 100.0), ("B", 50.0)):
            fake.publish(f"{P}/substation/{sid}/status", {"state": "online", "substation_id": sid,
                                                          "ts": time.time(), "capacity_kw": cap}, retain=True)
        published: dict[str, list[tuple[int, float]]] = {"A": [], "B": []}
        for seq in range(1, 11):
            for sid, cap, base in (("A", 100.0, 10.0 + seq), ("B", 50.0, 5.0 + seq / 2)):
                ts = time.time()
                fake.publish(f"{P}/substation/{sid}/telemetry", {
                    "substation_id": sid, "ts": ts, "seq": seq, "capacity_kw": cap, "load_kw": base,
                    "base_load_kw": base, "ev_load_kw": 0.0, "active_sessions": 0})
                published[sid].append((ms(ts), base))
            time.sleep(0.02)
        # Bad input: counted by the recorder, not recorded, and it carries on.
        fake.publish(f"{P}/substation/A/telemetry", b'{"substation_id": "A", "load_kw": NaN}')
        fake.publish(f"{P}/substation/A/telemetry", {"substation_id": "B", "ts": time.time(), "seq": 99,
                                                     "capacity_kw": 1, "load_kw": 1, "base_load_kw": 1,
                                                     "ev_load_kw": 0, "active_sessions": 0})

        # EVs: 8 x 22 kW (A fits at most 4, B at most 2: some queue), one too large for any substation,
        # one malformed.
        evs = [f"EV_{i:04d}" for i in range(1, 9)]
        for i, ev in enumerate(evs):
            fake.publish(f"{P}/ev/{ev}/request", {"request_id": f"r{i}", "requested_kw": 22, "min_kw": 22,
                                                  "energy_kwh": 10})
        fake.publish(f"{P}/ev/EV_0100/request", {"request_id": "big", "requested_kw": 500, "min_kw": 500,
                                                      "energy_kwh": 10})
        fake.publish(f"{P}/ev/EV_0101/request", b'{"requested_kw": NaN}')
        fake.wait_for(lambda m: "/assignment" in m.topic, count=10, timeout=10, what="answers")
        first = {m.topic.split("/")[3]: m.json() for m in reversed(fake.messages) if "/assignment" in m.topic}
        assigned = {ev: a for ev, a in first.items() if a["status"] == "assigned"}
        statuses = Counter(a["status"] for a in first.values())
        assert statuses["assigned"] >= 3 and statuses["queued"] >= 2 and statuses["rejected"] == 2, statuses

        # Session events from the substations: all started; one ends early with energy delivered.
        ended_ev = sorted(assigned)[0]
        for ev, a in sorted(assigned.items()):
            fake.publish(f"{P}/substation/{a['substation_id']}/session", {
                "event": "started", "session_id": a["session_id"], "ev_id": ev, "ts": time.time(),
                "substation_id": a["substation_id"], "granted_kw": a["granted_kw"]})
        a = assigned[ended_ev]
        fake.publish(f"{P}/substation/{a['substation_id']}/session", {
            "event": "ended", "session_id": a["session_id"], "ev_id": ended_ev, "ts": time.time(),
            "substation_id": a["substation_id"], "reason": "energy_delivered", "energy_delivered_kwh": 3.5})

        # The freed 22 kW may go to a queued EV (more answers): let the answers settle, then compare counts.
        time.sleep(0.5)
        answers = [m.json() for m in fake.messages if "/assignment" in m.topic]
        m = wait_metrics(url, lambda m: metric(m, "gridlb_recorder_messages_total", kind="ev_assignment")
                         >= len(answers) and metric(m, "gridlb_recorder_points_written_total")
                         == metric(m, "gridlb_recorder_points_queued_total"), what="every answer written")
        assert metric(m, "gridlb_recorder_messages_total", kind="ev_assignment") == len(answers)
        assert metric(m, "gridlb_recorder_bad_payloads_total", reason="malformed_json") == 1
        assert metric(m, "gridlb_recorder_bad_payloads_total", reason="id_mismatch") == 1
        assert metric(m, "gridlb_recorder_points_dropped_total") == 0
        assert metric(m, "gridlb_mqtt_connected", client="recorder") == 1

        # --- read back from VictoriaMetrics and compare with what was published ---
        telemetry = vm.wait_export('{__name__="substation_telemetry_load_kw"}',
                                   lambda s: len(samples(s)) >= 20)
        for sid in ("A", "B"):
            assert samples(telemetry, substation_id=sid) == published[sid]
        seqs = vm.export('{__name__="substation_telemetry_seq",substation_id="A"}')
        assert [v for _, v in samples(seqs)] == list(range(1, 11))  # the id_mismatch one (seq 99) is not there

        granted = vm.wait_export('{__name__="ev_assignment_granted_kw"}',
                                 lambda s: len(samples(s)) >= len(answers))
        def key(labels: dict[str, str | None]) -> tuple[str | None, str | None, str | None]:
            return labels.get("status"), labels.get("substation_id"), labels.get("reason")

        recorded = Counter(key(s["metric"]) for s in granted for _ in s["values"])
        assert recorded == Counter(key(a) for a in answers)
        assert all("ev_id" not in s["metric"] for s in granted)  # a field, never a label
        ev_ids = vm.wait_export('{__name__="ev_assignment_ev_id"}', lambda s: len(samples(s)) >= len(answers))
        assert len(samples(ev_ids)) == len(answers)  # every answer carried its EV (a string: stored as 0 here)
        for sid in {a["substation_id"] for a in assigned.values()}:
            here = [a for a in answers if a["status"] == "assigned" and a["substation_id"] == sid]
            assert [v for _, v in samples(granted, status="assigned", substation_id=sid)] == [22.0] * len(here)
        rejected = Counter(s["metric"]["reason"] for s in granted if s["metric"]["status"] == "rejected"
                           for _ in s["values"])
        assert rejected == Counter({"exceeds_capacity": 1, "malformed_json": 1})
        positions = vm.export('{__name__="ev_assignment_position",status="queued"}')
        assert sorted(v for _, v in samples(positions)) == sorted(
            a["position"] for a in answers if a["status"] == "queued")

        events = vm.wait_export('{__name__=~"session_event_.*"}', lambda s: len(samples(s)) >= 2 * len(assigned) + 2)
        started = samples(events, __name__="session_event_session_id", event="started")
        assert len(started) == len(assigned)
        assert samples(events, __name__="session_event_energy_delivered_kwh", event="ended",
                       substation_id=assigned[ended_ev]["substation_id"], reason="energy_delivered") == [
            (samples(events, __name__="session_event_energy_delivered_kwh")[0][0], 3.5)]
        assert len(samples(events, __name__="session_event_ev_id")) == len(assigned) + 1
        online = vm.export('{__name__="substation_status_online"}')
        assert {s["metric"]["substation_id"]: s["values"][-1] for s in online} == {"A": 1.0, "B": 1.0}

        # The balancer's retained views (substation state, queue), as far as this balancer publishes them.
        state_msgs = [(m.topic.split("/")[3], m.json()) for m in views.messages if m.topic.endswith("/state")]
        queue_msgs = [m.json() for m in views.messages if m.topic.endswith("/balancer/queue")]
        if state_msgs:
            headroom = vm.wait_export('{__name__="substation_state_headroom_kw"}',
                                      lambda s: len(samples(s)) >= len(state_msgs))
            for sid, st in state_msgs:
                assert (ms(st["ts"]), st["headroom_kw"]) in samples(headroom, substation_id=sid)
        if queue_msgs:
            length = vm.wait_export('{__name__="balancer_queue_length"}', lambda s: len(samples(s)) >= 1)
            assert {(ms(q["ts"]), float(q["length"])) for q in queue_msgs} <= set(samples(length))
        views.close()
    finally:
        fake.close()
        if balancer is not None:
            stop_cleanly(balancer)
    log = stop_cleanly(recorder)
    assert "recorder_stopped" in log and "shutdown_flushed" in log
