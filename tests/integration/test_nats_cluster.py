"""The local NATS cluster fixture against real nats-server processes: it forms, serves MQTT 3.1.1 on every node
with QoS 1 across nodes, and a node killed with SIGKILL comes back on its ports and data dir."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from probe import Probe

from broker.accounts import Account
from broker.nats.cluster import ClusterNode, LocalCluster, mqtt_connect_rc

pytestmark = pytest.mark.integration

P = "grid/v1"
ROOT = Path(__file__).resolve().parents[2]


def _jsz(cluster: LocalCluster, i: int) -> dict:
    node = cluster.nodes[i]
    with urllib.request.urlopen(f"http://{node.host}:{node.http_port}/jsz", timeout=2) as r:
        return json.loads(r.read())


def test_cluster_forms_and_carries_qos1_across_nodes(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    assert len(cluster.nodes) == 3 and len(cluster.mqtt_hosts.split(",")) == 3
    meta = _jsz(cluster, 0)["meta_cluster"]
    assert meta["cluster_size"] == 3 and meta.get("leader")
    ev = Probe(cluster.nodes[0], "EV_0001", protocol=mqtt.MQTTv311)
    balancer = Probe(cluster.nodes[2], "balancer", f"{P}/ev/+/request", protocol=mqtt.MQTTv311)
    try:
        for i in range(20):
            ev.publish(f"{P}/ev/EV_0001/request", f"{i}")
        balancer.wait_for(lambda m: True, count=20)
        assert [m.payload for m in balancer.messages] == [f"{i}".encode() for i in range(20)]
        # MQTT 5 is refused by nats-server (the services run 3.1.1 on the cluster).
        refused = Probe(cluster.nodes[1], "EV_0002", connect=False)
        refused.client.reconnect_delay_set(60, 60)
        with pytest.raises((AssertionError, OSError)):
            assert not refused.connect().is_failure
        refused.close()
    finally:
        ev.close()
        balancer.close()


def _replicas(cluster: LocalCluster, stream: str) -> int:
    n = cluster.nodes[0]
    with urllib.request.urlopen(f"http://{n.host}:{n.http_port}/jsz?accounts=true&streams=true&config=true",
                                timeout=2) as r:
        doc = json.loads(r.read())
    for account in doc.get("account_details", []):
        for s in account.get("stream_detail", []):
            if s["name"] == stream:
                return int(s["config"]["num_replicas"])
    raise AssertionError(f"no stream {stream} on {n.name}")


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_killed_node_comes_back_with_its_state(make_cluster: Callable[..., LocalCluster], victim: int) -> None:
    """Whichever node dies (the JetStream meta leader among them), the other two keep serving MQTT logins."""
    cluster = make_cluster()
    # Every MQTT stream on all three nodes (left to itself, nats-server may create them with 2: then losing one
    # of those two stops every login)
    for stream in ("$MQTT_sess", "$MQTT_msgs", "$MQTT_rmsgs"):
        assert _replicas(cluster, stream) == 3, stream
    node = cluster.nodes[victim]
    before = _jsz(cluster, victim)
    port, pid = node.port, node.pid
    node.kill()
    assert not node.running
    # The other two keep serving MQTT while it is down (once JetStream has a leader again: a few seconds when the
    # killed node led it).
    for other in cluster.nodes:
        if other is not node:
            assert _accepted_within(cluster, other, 15.0), other
    node.start()
    assert node.running and node.port == port and node.pid != pid
    after = _jsz(cluster, victim)
    assert after["streams"] >= before["streams"] > 0  # the MQTT streams are back from its data dir


def _accepted_within(cluster: LocalCluster, node: ClusterNode, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if mqtt_connect_rc(node.host, node.port, "healthcheck", cluster.password_for("healthcheck"),
                               f"probe-{time.monotonic_ns()}") == 0:
                return True
        time.sleep(0.2)
    return False


def _refused(node: ClusterNode, username: str, password: str) -> bool:
    """nats-server answers a bad login with CONNACK 5 or by closing the connection."""
    try:
        # a client id of its own: nats-server refuses an id whose session is still settling on another node
        return mqtt_connect_rc(node.host, node.port, username, password, f"x-{time.monotonic_ns()}") != 0
    except ConnectionError:
        return True


def test_wrong_password_is_refused_on_every_node(nats_cluster: LocalCluster) -> None:
    for node in nats_cluster.nodes:
        assert _refused(node, "EV_0001", "wrong")
        assert _refused(node, "EV_0001", nats_cluster.password_for("EV_0002"))
        assert mqtt_connect_rc(node.host, node.port, "EV_0001", nats_cluster.password_for("EV_0001"),
                               f"ok-{node.name}") == 0  # an id per node (see the cross-node takeover in docs)


def test_tls_listeners_with_the_project_ca(tmp_path: Path, make_cluster: Callable[..., LocalCluster]) -> None:
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(ROOT / "broker" / "tls" / "make-certs.sh"), str(certs)], check=True,
                   capture_output=True, timeout=30)
    cluster = make_cluster(tls_dir=certs, ev_ids=["EV_0001"], substation_ids=[])  # ready = a TLS CONNECT worked
    ca = str(certs / "ca.crt")
    node = cluster.nodes[2]
    assert mqtt_connect_rc(node.host, node.port, "EV_0001", cluster.password_for("EV_0001"), "tls", ca_file=ca) == 0
    with pytest.raises(OSError):  # a plain client gets no MQTT answer on the TLS listener
        mqtt_connect_rc(node.host, node.port, "EV_0001", cluster.password_for("EV_0001"), "plain", timeout=2)
    other = tmp_path / "other"
    subprocess.run(["sh", str(ROOT / "broker" / "tls" / "make-certs.sh"), str(other)], check=True,
                   capture_output=True, timeout=30)
    with pytest.raises(ssl.SSLCertVerificationError):
        mqtt_connect_rc(node.host, node.port, "EV_0001", "x", "stranger", ca_file=other / "ca.crt")


def test_balancer_uses_the_key_value_store_and_others_cannot_reach_nats(nats_cluster: LocalCluster) -> None:
    """The balancer's NATS grants are enough for a replicated KV bucket with create-if-absent and compare-and-swap
    (its region lease); every other account is MQTT only (allowed_connection_types)."""
    import nats
    import nats.errors
    import nats.js.errors

    def url(user: str, node: int) -> str:
        n = nats_cluster.nodes[node]
        return f"nats://{user}:{nats_cluster.password_for(user)}@{n.host}:{n.client_port}"

    async def scenario() -> None:
        nc = await nats.connect(servers=[url("balancer", 0), url("balancer", 1)], connect_timeout=3,
                                max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            kv = await js.create_key_value(bucket="grid_leases_test", history=1, ttl=30, replicas=3)
            rev = await kv.create("region.default", b"owner-1")
            with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
                await kv.create("region.default", b"owner-2")  # taken
            rev2 = await kv.update("region.default", b"owner-1", last=rev)
            assert rev2 > rev
            with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update("region.default", b"owner-2", last=rev)  # a stale revision loses
            assert (await kv.get("region.default")).value == b"owner-1"
        finally:
            await nc.close()
        for user in ("EV_0001", "substation.A", "api", "observer"):
            bad = nats.NATS()
            try:
                with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError)):
                    await bad.connect(servers=[url(user, 2)], connect_timeout=2, max_reconnect_attempts=0,
                                      allow_reconnect=False)
            finally:
                await bad.close()  # (nats-py leaves a refused connection's socket open: ResourceWarning)

    asyncio.run(scenario())


def test_accounts_change_by_rewriting_the_file_and_reloading(make_cluster: Callable[..., LocalCluster]) -> None:
    """How accounts change on the cluster (no runtime provisioning API): rewrite accounts.conf, SIGHUP every node.
    A new EV can log in on every node; a removed one cannot, and its open connection is closed."""
    cluster = make_cluster(ev_ids=["EV_0001"], substation_ids=[])
    node = cluster.nodes[0]
    assert _refused(node, "EV_0777", "new-password")
    cluster.add_accounts([Account("EV_0777", "new-password")])
    for n in cluster.nodes:
        deadline = time.monotonic() + 5
        while _refused(n, "EV_0777", "new-password"):
            assert time.monotonic() < deadline, f"{n.name} did not reload"
            time.sleep(0.1)
    ev = Probe(cluster.nodes[1], "EV_0777", protocol=mqtt.MQTTv311)
    ev.client.reconnect_delay_set(60, 60)
    try:
        assert ev.client.is_connected()
        cluster.remove_accounts(["EV_0777"])
        assert ev.wait_until(lambda: not ev.client.is_connected(), timeout=5), "still connected after removal"
        assert all(_refused(n, "EV_0777", "new-password") for n in cluster.nodes)
    finally:
        ev.close()


def test_a_port_taken_before_the_first_start_is_replaced(make_cluster: Callable[..., LocalCluster]) -> None:
    import socket

    cluster = make_cluster(start=False, ev_ids=[], substation_ids=[])
    taken = cluster.nodes[1].client_port
    with socket.socket() as blocker:  # another process binds the port between choosing and starting
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        cluster.start()
        assert cluster.nodes[1].client_port != taken and all(n.running for n in cluster.nodes)
        assert len({p for n in cluster.nodes for p in (n.port, n.client_port, n.address.cluster_port)}) == 9
