"""``/metrics`` of the substation agents and the EV fleet, scraped from real processes.

A private Mosquitto, ``python -m balancer``, ``python -m substation_agents`` and ``python -m ev_clients fleet`` as
subprocesses (loopback only); each service serves ``/metrics`` on a free port picked here. Three EVs ask
for 7.4 kW and charge for hours (simulated time runs at real speed), so the sessions are still running when
the metrics are read; the values are checked against what the agents were configured with and what the
balancer told the EVs (seen by an observer on the broker).
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probe import Probe, Service, start_balancer
from prometheus_client.parser import text_string_to_metric_families

from broker.local import LocalBroker

pytestmark = pytest.mark.integration

CAPACITY_KW = {"A": 100.0, "B": 50.0}
EVS = 3
KW = 7.4

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def wait_scrape(port: int, ready: Callable[[Samples], bool], what: str, service: Service,
                timeout: float = 15.0) -> Samples:
    """Scrape until ``ready`` (bounded); the endpoint may not be up yet."""
    deadline = time.monotonic() + timeout
    last: Samples = {}
    while time.monotonic() < deadline:
        try:
            last = scrape(port)
        except (urllib.error.URLError, ConnectionError):
            last = {}
        if last and ready(last):
            return last
        if service.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{what}: not seen within {timeout} s; last scrape {sorted(last.items())[:40]}\n"
                         f"--- {service.module} log ---\n{service.log()[-3000:]}")


@pytest.fixture
def services(broker: LocalBroker, tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()


def test_agents_and_fleet_metrics(broker: LocalBroker, tmp_path: Path, services: list[Service]) -> None:
    agents_port, fleet_port = free_port(), free_port()
    watch = Probe(broker, "observer", "grid/v1/#")
    try:
        services.append(start_balancer(broker, tmp_path, METRICS_PORT="0"))
        agents = Service("substation_agents", broker, tmp_path, MQTT_ACCOUNT_SECRET=broker.secret,
                         SUBSTATIONS=",".join(f"{s}:{c:g}" for s, c in CAPACITY_KW.items()),
                         SUBSTATION_INTERVAL_S="0.2", SIM_SPEEDUP="1", METRICS_PORT=str(agents_port))
        services.append(agents)

        # The agents' endpoint: configured capacities, connected, nothing charging yet.
        before = wait_scrape(agents_port, lambda s: all(
            s.get(("gridlb_mqtt_connected", frozenset({("client", sid)}))) == 1 for sid in CAPACITY_KW),
            "agents connected", agents)
        for sid, capacity in CAPACITY_KW.items():
            assert value(before, "gridlb_agent_capacity_watts", substation=sid) == capacity * 1000
            assert value(before, "gridlb_agent_sessions", substation=sid) == 0
            assert value(before, "gridlb_agent_ev_load_watts", substation=sid) == 0
            assert 0 < value(before, "gridlb_agent_base_load_watts", substation=sid) < capacity * 1000
            assert value(before, "gridlb_agent_commands_total", substation=sid, command="start") == 0
        watch.wait_for(lambda m: m.topic == "grid/v1/balancer/status" and m.json()["state"] == "online",
                       timeout=15, what="balancer online status")
        for topic in (f"grid/v1/substation/{sid}/telemetry" for sid in CAPACITY_KW):
            assert watch.wait_for_topic(topic, timeout=10), f"no {topic}"  # the balancer hears the substations

        fleet = Service("ev_clients", broker, tmp_path, "fleet", "--evs", str(EVS), "--requests", str(EVS),
                        "--rate", "50", "--arrivals", "fixed", "--kw-mix", f"{KW}:1", "--energy-kwh", "50-60",
                        "--duration-pct", "0", "--priority-pct", "0", "--min-kw-pct", "0",
                        "--release-early-pct", "0", "--report-every", "0", "--seed", "1",
                        MQTT_ACCOUNT_SECRET=broker.secret, METRICS_PORT=str(fleet_port))
        services.append(fleet)

        # The fleet's endpoint: every EV assigned and charging, its connection up.
        ev = wait_scrape(fleet_port, lambda s: s.get(("gridlb_ev_answers_total", frozenset({("status", "assigned")})))
                         == EVS and s.get(("gridlb_ev_active_sessions", frozenset())) == EVS, "EVs assigned", fleet)
        assigned = {m.topic.split("/")[3]: m.json() for m in watch.messages
                    if m.topic.endswith("/assignment") and m.json()["status"] == "assigned"}
        assert len(assigned) == EVS  # what the balancer said, as seen on the broker
        assert value(ev, "gridlb_ev_answers_total", status="assigned") == len(assigned)
        assert value(ev, "gridlb_ev_requests_total") == EVS
        assert value(ev, "gridlb_ev_active_sessions") == EVS
        assert value(ev, "gridlb_ev_answers_total", status="rejected") == 0
        assert value(ev, "gridlb_ev_answer_latency_seconds_count") == EVS
        assert value(ev, "gridlb_ev_answer_latency_seconds_bucket", le="+Inf") == EVS
        assert 0 < value(ev, "gridlb_ev_answer_latency_seconds_sum") < EVS * 10
        assert value(ev, "gridlb_mqtt_connected", client="ev_fleet") == EVS  # a count of EV connections
        assert value(ev, "gridlb_mqtt_connects_total", client="ev_fleet") == EVS
        assert value(ev, "gridlb_mqtt_messages_received_total", client="ev_fleet") >= EVS
        assert not [k for k in ev if any(label == "client" and v != "ev_fleet" for label, v in k[1])]

        # The agents run exactly the sessions the balancer assigned, at the granted power.
        granted_w: dict[str, float] = {sid: 0.0 for sid in CAPACITY_KW}
        for answer in assigned.values():
            granted_w[answer["substation_id"]] += answer["granted_kw"] * 1000
        now = wait_scrape(agents_port, lambda s: total(s, "gridlb_agent_sessions") == EVS, "sessions on agents",
                          agents)
        assert total(now, "gridlb_agent_commands_total") == EVS  # three starts, nothing else
        for sid, capacity in CAPACITY_KW.items():
            sessions = sum(1 for a in assigned.values() if a["substation_id"] == sid)
            assert value(now, "gridlb_agent_sessions", substation=sid) == sessions
            assert value(now, "gridlb_agent_commands_total", substation=sid, command="start") == sessions
            assert value(now, "gridlb_agent_ev_load_watts", substation=sid) == pytest.approx(granted_w[sid])
            assert value(now, "gridlb_agent_load_watts", substation=sid) == pytest.approx(
                value(now, "gridlb_agent_base_load_watts", substation=sid) + granted_w[sid])
            assert value(now, "gridlb_agent_capacity_watts", substation=sid) == capacity * 1000
            assert value(now, "gridlb_agent_lease_expiries_total", substation=sid) == 0
            assert value(now, "gridlb_mqtt_connected", client=sid) == 1
        assert sum(granted_w.values()) == pytest.approx(EVS * KW * 1000)

        assert fleet.stop() == 0, fleet.log()[-3000:]  # SIGTERM: EVs release, every request was answered
        assert agents.stop() == 0, agents.log()[-3000:]
    finally:
        watch.close()
