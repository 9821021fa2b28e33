"""Regional partitions (issue 12) on a real Mosquitto with real processes: the default region and region ``east``,
each with its own substation agents.

* Two balancer processes (one per region; on Mosquitto, and in cluster mode on a 3-node NATS cluster with a lease
  per region): each answers only its own region's EVs and commands only its own
  region's substations; ``kill -9`` of one leaves the other serving (a new EV request there is answered).
* One process owning both regions serves both.
* The broker's roles for the regional topics, on Mosquitto and on a 3-node NATS cluster: a region's balancer
  account reaches only its region; an EV may request in any region and read only its own assignment there; an agent
  only its own topics, in any region.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from probe import Probe, Received, Service, start_balancer

from broker.accounts import SERVICE_ACCOUNTS
from broker.local import LocalBroker
from broker.nats.cluster import LocalCluster
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


def test_two_regions_in_cluster_mode_on_the_nats_cluster_survive_each_other(
        make_cluster: Callable[..., LocalCluster], tmp_path: Path, stopper: list[Callable[[], Any]]) -> None:
    """The same on the 3-node NATS cluster in cluster mode (MQTT 3.1.1, a lease per region in NATS KV): each region's
    balancer process on its own node answers only its region; kill -9 of one leaves the other answering."""
    cluster = make_cluster(substation_ids=list(REGION_OF), services=(*SERVICE_ACCOUNTS, "balancer.east"),
                           service_passwords={"balancer": BALANCER_PW, "balancer.east": BALANCER_PW})
    n1, n2, n3 = cluster.nodes
    hosts = ",".join(f"{n.host}:{n.port}" for n in (n3, n2, n1))
    for subs, region in (("A:100,B:50", "default"), ("E1:100,E2:50", "east")):
        agents = Service("substation_agents", n3, tmp_path, SUBSTATIONS=subs, SUBSTATION_REGION=region,
                         MQTT_PROTOCOL="3.1.1", MQTT_HOSTS=hosts, MQTT_ACCOUNT_SECRET=cluster.secret,
                         SUBSTATION_INTERVAL_S="0.2", MQTT_KEEPALIVE_S="5", SIM_SPEEDUP="60")
        stopper.append(agents.stop)
    nats_urls = ",".join(n.nats_url for n in cluster.nodes)
    balancers = {}
    for region, node in (("default", n1), ("east", n2)):
        balancers[region] = start_balancer(node, tmp_path, MQTT_PROTOCOL="3.1.1", MQTT_PASSWORD=BALANCER_PW,
                                           BALANCER_REGIONS=region, BALANCER_NATS_URLS=nats_urls,
                                           BALANCER_NATS_REPLICAS="3", BALANCER_LEASE_S="6",
                                           BALANCER_STARTUP_WAIT_S="2")
        stopper.append(balancers[region].stop)
    observer = Probe(n3, "observer", "grid/v1/#", protocol=mqtt.MQTTv311)
    stopper.append(observer.close)
    _online(observer, T)
    _online(observer, EAST)
    _grid_ready(observer)
    evs = {ev: Probe(n3, ev, *T.filters_all_regions(TopicKind.EV_ASSIGNMENT, ev), protocol=mqtt.MQTTv311)
           for ev in ("EV_0001", "EV_0002", "EV_0003")}
    for ev in evs.values():
        stopper.append(ev.close)
    a1 = _request(evs["EV_0001"], T, "d-1")
    a2 = _request(evs["EV_0002"], EAST, "e-1")
    assert a1["status"] == "assigned" and a1["substation_id"] in ("A", "B"), a1
    assert a2["status"] == "assigned" and a2["substation_id"] in ("E1", "E2"), a2
    for sid in (a1["substation_id"], a2["substation_id"]):
        assert observer.wait_for_topic(REGION_OF[sid].command(sid), 10), f"no command to {sid}"
    commands = _commands(observer)
    assert commands and all(REGION_OF[sid].region == region for region, sid in commands), commands

    balancers["default"].signal(signal.SIGKILL)
    balancers["default"].proc.wait(10)
    a3 = _request(evs["EV_0003"], EAST, "e-2")
    assert a3["status"] == "assigned" and a3["substation_id"] in ("E1", "E2"), a3
    assert balancers["east"].proc.poll() is None
    log = balancers["east"].log()
    assert "region_lease_acquired" in log and "region=east" in log  # (cluster mode: it held east's lease)
    assert "region_lease_renewal_failed" not in log


# --- ACL on the regional topics ---------------------------------------------------------------
# Against Mosquitto (MQTT 5: refusals have reason codes) and a real 3-node NATS cluster (MQTT 3.1.1, accounts from the
# same role table: a refused publish is acknowledged and dropped, a refused subscription gets SUBACK 0x80), with the
# clients of one test spread over its nodes. What decides is what the receivers see, behind a barrier: a permitted
# message to the same receiver, awaited (the broker keeps order per subscriber, so a leak would have arrived first).

Broker = LocalBroker | LocalCluster


@pytest.fixture(scope="module")
def regional_cluster(tmp_path_factory: pytest.TempPathFactory, nats_bin: str) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("regions-cluster"), substation_ids=list(REGION_OF),
                           ev_ids=["EV_0001", "EV_0002"], services=(*SERVICE_ACCOUNTS, "balancer.east"),
                           service_passwords={"balancer": BALANCER_PW, "balancer.east": BALANCER_PW},
                           secret="regions-secret", nats_bin=nats_bin)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["mosquitto", "nats-cluster"])
def acl_broker(request: pytest.FixtureRequest, broker: LocalBroker) -> Broker:
    if request.param == "mosquitto":
        return broker
    cluster: LocalCluster = request.getfixturevalue("regional_cluster")
    return cluster


@pytest.fixture
def peers() -> Iterator[Callable[..., Probe]]:
    made: list[Probe] = []

    def connect(broker: Broker, username: str, *subscriptions: str, **kwargs: Any) -> Probe:
        if username.startswith("balancer"):
            kwargs.setdefault("password", BALANCER_PW)
        if isinstance(broker, LocalCluster):
            node = broker.nodes[len(made) % len(broker.nodes)]
            kwargs.setdefault("protocol", mqtt.MQTTv311)
            peer = Probe(node, username, *subscriptions, **kwargs)  # type: ignore[arg-type]
        else:
            peer = Probe(broker, username, *subscriptions, **kwargs)
        made.append(peer)
        return peer

    yield connect
    for peer in made:
        peer.close()


def _not_delivered(broker: Broker, sender: Probe, topic: str, receiver: Probe, barrier: str,
                   barrier_sender: Probe | None = None) -> None:
    """``sender`` may not publish on ``topic``: Mosquitto says so (0x87); on either broker ``receiver`` (who may read
    it) gets only the barrier after it."""
    rc = sender.try_publish(topic, b"refused?")
    if isinstance(broker, LocalBroker):
        assert rc is not None and rc.value == NOT_AUTHORIZED, (topic, rc)
    since = receiver.messages[-1].at if receiver.messages else 0.0
    (barrier_sender or sender).publish(barrier, b"barrier")
    receiver.wait_one(lambda m: m.topic == barrier, 10, since, f"barrier {barrier}")
    assert not [m for m in receiver.messages if m.topic == topic and m.payload == b"refused?"], topic


def _subscription_refused(peer: Probe, topic: str) -> bool:
    return all(rc.is_failure for rc in peer.subscribe(topic))


def test_a_regions_balancer_account_reaches_only_its_region(acl_broker: Broker,
                                                            peers: Callable[..., Probe]) -> None:
    obs = peers(acl_broker, "observer", "grid/v1/#")
    east = peers(acl_broker, "balancer.east")
    assert not any(rc.is_failure for rc in east.subscribe(EAST.filter(TopicKind.EV_REQUEST)))
    for topic in (T.filter(TopicKind.EV_REQUEST), "grid/v1/region/west/ev/+/request",
                  "grid/v1/region/+/ev/+/request", "grid/v1/#"):
        assert _subscription_refused(east, topic), topic
    # It may answer and command only in its region (and the default region's balancer likewise).
    for topic in (T.assignment("EV_0001"), T.command("A"), T.balancer_status(),
                  "grid/v1/region/west/substation/A/command"):
        _not_delivered(acl_broker, east, topic, obs, EAST.command("E1"))
    default = peers(acl_broker, "balancer")
    for topic in (EAST.assignment("EV_0001"), EAST.command("E1"), EAST.balancer_status()):
        _not_delivered(acl_broker, default, topic, obs, T.command("A"))


def test_an_ev_requests_in_any_region_and_reads_only_its_own_assignment(acl_broker: Broker,
                                                                        peers: Callable[..., Probe]) -> None:
    east = peers(acl_broker, "balancer.east", EAST.filter(TopicKind.EV_REQUEST), EAST.filter(TopicKind.EV_RELEASE))
    ev1 = peers(acl_broker, "EV_0001")
    assert not any(rc.is_failure for rc in ev1.subscribe(*T.filters_all_regions(TopicKind.EV_ASSIGNMENT, "EV_0001")))
    for topic in (EAST.assignment("EV_0002"), "grid/v1/region/+/ev/+/assignment", "grid/v1/region/east/#",
                  EAST.command("E1")):
        assert _subscription_refused(ev1, topic), topic
    # Its own request and release, in any region; not another EV's, nor an assignment.
    for topic in (EAST.request("EV_0002"), EAST.release("EV_0002")):
        _not_delivered(acl_broker, ev1, topic, east, EAST.request("EV_0001"))
    ev1.publish(EAST.release("EV_0001"), b"{}")
    east.wait_one(lambda m: m.topic == EAST.release("EV_0001"), 10, 0, "its own release in east")
    # It reads only its own assignment there.
    east.publish(EAST.assignment("EV_0002"), b"not yours")
    east.publish(EAST.assignment("EV_0001"), b"yours")
    ev1.wait_one(lambda m: m.topic == EAST.assignment("EV_0001"), 10, 0, "its own assignment in east")
    assert [m.topic for m in ev1.messages] == [EAST.assignment("EV_0001")]


def test_a_substation_agent_uses_only_its_own_topics_in_any_region(acl_broker: Broker,
                                                                   peers: Callable[..., Probe]) -> None:
    obs = peers(acl_broker, "observer", "grid/v1/#")
    e1 = peers(acl_broker, "substation.E1")
    for topic in (EAST.telemetry("E2"), EAST.substation_status("E2"), EAST.command("E1"), EAST.request("EV_0001"),
                  EAST.balancer_status()):
        _not_delivered(acl_broker, e1, topic, obs, EAST.session_events("E1"))
    for topic in (EAST.command("E2"), "grid/v1/region/+/substation/+/command"):
        assert _subscription_refused(e1, topic), topic
    assert not any(rc.is_failure for rc in e1.subscribe(EAST.command("E1"), EAST.balancer_status()))
    since = time.monotonic()
    for topic in (EAST.telemetry("E1"), T.telemetry("E1")):  # its own, in any region
        e1.publish(topic, b"{}")
    obs.wait_one(lambda m: m.topic == T.telemetry("E1"), 10, since, "its telemetry")
    assert [m.topic for m in obs.messages if m.at >= since] == [EAST.telemetry("E1"), T.telemetry("E1")]
