"""Regional partitions (issue 12) on a real Mosquitto with real processes: the default region and region ``east``,
each with its own substation agents.

* Two balancer processes (one per region): each answers only its own region's EVs and commands only its own
  region's substations; ``kill -9`` of one leaves the other serving (a new EV request there is answered).
* One process owning both regions serves both.
* The broker's roles for the regional topics: a region's balancer account reaches only its region; an EV may
  request in any region and read only its own assignment there; an agent only its own topics.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from probe import Probe, Received, Service, start_balancer

from broker.accounts import SERVICE_ACCOUNTS
from broker.local import LocalBroker
from grid_protocol.topics import TopicKind, Topics

pytestmark = pytest.mark.integration

T = Topics()
EAST = T.for_region("east")
REGION_OF = {"A": T, "B": T, "E1": EAST, "E2": EAST}
NOT_AUTHORIZED = 0x87
BALANCER_PW = "balancer-pw"  # one process may own several regions: its regions' accounts share its password


@pytest.fixture
def broker(make_broker: Callable[..., LocalBroker]) -> LocalBroker:
    return make_broker(substation_ids=list(REGION_OF), services=(*SERVICE_ACCOUNTS, "balancer.east"),
                       service_passwords={"balancer": BALANCER_PW, "balancer.east": BALANCER_PW})


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()


def _agents(broker: LocalBroker, log_dir: Path, subs: str, region: str) -> Service:
    return Service("substation_agents", broker, log_dir, MQTT_ACCOUNT_SECRET=broker.secret, MQTT_KEEPALIVE_S="5",
                   SUBSTATIONS=subs, SUBSTATION_REGION=region, SUBSTATION_INTERVAL_S="0.2", SIM_SPEEDUP="60")


def _balancer(broker: LocalBroker, log_dir: Path, regions: str) -> Service:
    return start_balancer(broker, log_dir, MQTT_PASSWORD=BALANCER_PW, BALANCER_REGIONS=regions,
                          BALANCER_STARTUP_WAIT_S="2")


def _online(observer: Probe, topics: Topics, since: float = 0.0) -> None:
    observer.wait_one(lambda m: m.topic == topics.balancer_status() and b'"online"' in m.payload, 20, since,
                      f"{topics.region}'s balancer online")


def _request(ev: Probe, topics: Topics, rid: str, kw: float = 11.0) -> dict[str, Any]:
    """Publish a request in ``topics``' region and return its answer (which must arrive on that region's topic)."""
    since = time.monotonic()
    ev_id = ev.username
    assert ev_id is not None
    ev.publish(topics.request(ev_id), {"request_id": rid, "requested_kw": kw, "duration_minutes": 60})
    answer = ev.wait_one(lambda m: m.json().get("request_id") == rid, 15, since, f"answer to {rid}")
    assert answer.topic == topics.assignment(ev_id), answer.topic
    return dict(answer.json())


def _grid_ready(observer: Probe) -> None:
    """Every substation known to its region's balancer, online with fresh telemetry and room (its retained state,
    under its region's topics)."""
    def fit(topic: str) -> Callable[[Received], bool]:
        return lambda m: m.topic == topic and m.json()["online"] and not m.json()["stale"] and \
            m.json()["headroom_kw"] > 20

    for sid, topics in REGION_OF.items():
        observer.wait_one(fit(topics.substation_state(sid)), 20, 0, f"a fresh state of {sid}")


def _commands(observer: Probe) -> list[tuple[str | None, str]]:
    """(region, substation) of every command the observer saw."""
    out = []
    for m in list(observer.messages):
        parsed = T.parse_any_region(m.topic)
        if parsed is not None and parsed[1] == TopicKind.SUBSTATION_COMMAND and parsed[2] is not None:
            out.append((parsed[0], parsed[2]))
    return out


def _ev(broker: LocalBroker, ev_id: str) -> Probe:
    # Its own assignment in every region (the ACL allows exactly that: see the ACL test below).
    return Probe(broker, ev_id, *T.filters_all_regions(TopicKind.EV_ASSIGNMENT, ev_id))


def test_two_regions_on_two_balancer_processes_serve_only_their_own_and_survive_each_other(
        broker: LocalBroker, services: list[Service], tmp_path: Path) -> None:
    with Probe(broker, "observer", "grid/v1/#") as observer:
        services.append(_agents(broker, tmp_path, "A:100,B:50", "default"))
        services.append(_agents(broker, tmp_path, "E1:100,E2:50", "east"))
        default = _balancer(broker, tmp_path, "default")
        east = _balancer(broker, tmp_path, "east")
        services += [default, east]
        _online(observer, T)
        _online(observer, EAST)
        _grid_ready(observer)
        ev1, ev2, ev3, ev4 = (_ev(broker, f"EV_000{i}") for i in range(1, 5))
        try:
            a1 = _request(ev1, T, "d-1")
            a2 = _request(ev2, EAST, "e-1")
            assert a1["status"] == "assigned" and a1["substation_id"] in ("A", "B"), a1
            assert a2["status"] == "assigned" and a2["substation_id"] in ("E1", "E2"), a2
            # An EV drives into the other region: its request there is that region's balancer's.
            a3 = _request(ev1, EAST, "e-2")
            assert a3["status"] == "assigned" and a3["substation_id"] in ("E1", "E2"), a3
            for sid in (a1["substation_id"], a2["substation_id"], a3["substation_id"]):
                assert observer.wait_for_topic(REGION_OF[sid].command(sid), 10), f"no command to {sid}"
            # Each balancer commands only its own region's substations, under its region's topics.
            commands = _commands(observer)
            assert commands and all(REGION_OF[sid].region == region for region, sid in commands), commands
            # No EV was answered twice (one owner per region), and only in the region it asked in.
            assert [m.topic for m in ev1.messages] == [T.assignment("EV_0001"), EAST.assignment("EV_0001")]
            assert [m.topic for m in ev2.messages] == [EAST.assignment("EV_0002")]

            # kill -9 the default region's balancer: the east region goes on serving.
            killed_at = time.monotonic()
            default.signal(signal.SIGKILL)
            default.proc.wait(10)
            observer.wait_one(lambda m: m.topic == T.balancer_status() and b'"offline"' in m.payload, 30,
                              killed_at, "the killed balancer's last will")
            a4 = _request(ev3, EAST, "e-3")
            assert a4["status"] == "assigned" and a4["substation_id"] in ("E1", "E2"), a4
            # ... and is still online itself: the other region's loss never reached it.
            assert not [m for m in observer.on(EAST.balancer_status(), killed_at) if b'"offline"' in m.payload]
            assert east.proc.poll() is None
            # The dead region answers nobody (its EVs wait for their owner, or a standby: issue 12 item 4).
            since = time.monotonic()
            ev3.publish(T.request("EV_0003"), {"request_id": "d-2", "requested_kw": 11, "duration_minutes": 60})
            assert _request(ev4, EAST, "e-4")["status"] == "assigned"  # (a barrier: east answered after it)
            assert not [m for m in ev3.messages if m.at >= since and m.json().get("request_id") == "d-2"]
        finally:
            for ev in (ev1, ev2, ev3, ev4):
                ev.close()
    assert "region_mismatch" not in east.log()


def test_one_process_owning_two_regions_serves_both(broker: LocalBroker, services: list[Service],
                                                    tmp_path: Path) -> None:
    with Probe(broker, "observer", "grid/v1/#") as observer:
        services.append(_agents(broker, tmp_path, "A:100,B:50", "default"))
        services.append(_agents(broker, tmp_path, "E1:100,E2:50", "east"))
        both = _balancer(broker, tmp_path, "default,east")
        services.append(both)
        _online(observer, T)
        _online(observer, EAST)
        _grid_ready(observer)
        with _ev(broker, "EV_0001") as ev1, _ev(broker, "EV_0002") as ev2:
            a1 = _request(ev1, T, "d-1")
            a2 = _request(ev2, EAST, "e-1")
        assert a1["status"] == "assigned" and a1["substation_id"] in ("A", "B"), a1
        assert a2["status"] == "assigned" and a2["substation_id"] in ("E1", "E2"), a2
        for sid in (a1["substation_id"], a2["substation_id"]):
            assert observer.wait_for_topic(REGION_OF[sid].command(sid), 10), f"no command to {sid}"
        commands = _commands(observer)
        assert commands and all(REGION_OF[sid].region == region for region, sid in commands), commands
        # Two independent partitions: each status has its own instance.
        instances = {json.loads(m.payload)["instance"] for m in observer.messages
                     if m.topic in (T.balancer_status(), EAST.balancer_status()) and b'"online"' in m.payload}
        assert len(instances) == 2, instances
    assert both.stop() == 0


# --- ACL on the regional topics ---------------------------------------------------------------


def _barrier(sender: Probe, receiver: Probe, topic: str) -> None:
    """A permitted message, awaited: anything refused before it would have arrived by now (the broker keeps order
    per subscriber)."""
    assert sender.try_publish(topic, b"barrier") == 0
    assert receiver.wait_until(lambda: any(m.topic == topic for m in receiver.messages))


def _refused(rc: Any) -> bool:
    return rc is not None and rc.value == NOT_AUTHORIZED


def test_a_regions_balancer_account_reaches_only_its_region(broker: LocalBroker) -> None:
    with Probe(broker, "balancer.east", password=BALANCER_PW) as east, Probe(broker, "observer", "grid/v1/#") as obs:
        # Its region's input, not another's.
        codes = east.subscribe(EAST.filter(TopicKind.EV_REQUEST), T.filter(TopicKind.EV_REQUEST),
                               "grid/v1/region/west/ev/+/request", "grid/v1/region/+/ev/+/request")
        assert [rc.value for rc in codes][1:] == [NOT_AUTHORIZED] * 3 and not codes[0].is_failure
        # It may answer and command only in its region.
        for topic in (T.assignment("EV_0001"), T.command("A"), T.balancer_status(),
                      "grid/v1/region/west/substation/A/command"):
            assert _refused(east.try_publish(topic, b"x")), topic
        _barrier(east, obs, EAST.command("E1"))
        assert [m.topic for m in obs.messages] == [EAST.command("E1")]
    with Probe(broker, "balancer", password=BALANCER_PW) as default:  # and the default region's likewise
        for topic in (EAST.assignment("EV_0001"), EAST.command("E1"), EAST.balancer_status()):
            assert _refused(default.try_publish(topic, b"x")), topic


def test_an_ev_requests_in_any_region_and_reads_only_its_own_assignment(broker: LocalBroker) -> None:
    with Probe(broker, "balancer.east", EAST.filter(TopicKind.EV_REQUEST), password=BALANCER_PW) as east, \
            Probe(broker, "EV_0001") as ev1:
        codes = ev1.subscribe(*T.filters_all_regions(TopicKind.EV_ASSIGNMENT, "EV_0001"))
        assert not any(rc.is_failure for rc in codes)
        refused = ev1.subscribe(EAST.assignment("EV_0002"), "grid/v1/region/+/ev/+/assignment",
                                "grid/v1/region/east/#", EAST.command("E1"))
        assert [rc.value for rc in refused] == [NOT_AUTHORIZED] * 4
        assert _refused(ev1.try_publish(EAST.request("EV_0002")))
        assert _refused(ev1.try_publish(EAST.assignment("EV_0001")))
        assert ev1.try_publish(EAST.request("EV_0001")) == 0
        rc = ev1.try_publish("grid/v1/region/west/ev/EV_0001/release")  # any region (0x10: nobody listens there)
        assert rc is not None and not rc.is_failure
        assert east.wait_until(lambda: len(east.messages) == 1)
        assert east.try_publish(EAST.assignment("EV_0002"), b"not yours") is not None
        _barrier(east, ev1, EAST.assignment("EV_0001"))
        assert [m.topic for m in ev1.messages] == [EAST.assignment("EV_0001")]


def test_a_substation_agent_uses_only_its_own_topics_in_any_region(broker: LocalBroker) -> None:
    with Probe(broker, "substation.E1") as e1, Probe(broker, "observer", "grid/v1/#") as obs:
        for topic in (EAST.telemetry("E2"), EAST.substation_status("E2"), EAST.command("E1"),
                      EAST.request("EV_0001"), EAST.balancer_status()):
            assert _refused(e1.try_publish(topic, b"x")), topic
        refused = e1.subscribe(EAST.command("E2"), "grid/v1/region/+/substation/+/command")
        assert [rc.value for rc in refused] == [NOT_AUTHORIZED] * 2
        assert not any(rc.is_failure for rc in e1.subscribe(EAST.command("E1"), EAST.balancer_status()))
        for topic in (EAST.telemetry("E1"), T.telemetry("E1")):  # its own, in any region
            assert e1.try_publish(topic, b"{}") == 0
        _barrier(e1, obs, EAST.session_events("E1"))
        assert [m.topic for m in obs.messages] == [EAST.telemetry("E1"), T.telemetry("E1"), EAST.session_events("E1")]
