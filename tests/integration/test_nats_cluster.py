"""The local NATS cluster fixture against real nats-server processes: it forms, serves MQTT 3.1.1 on every node
with QoS 1 across nodes, and a node killed with SIGKILL comes back on its ports and data dir."""

from __future__ import annotations

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


def test_killed_node_comes_back_with_its_state(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    node = cluster.nodes[1]
    before = _jsz(cluster, 1)
    port, pid = node.port, node.pid
    node.kill()
    assert not node.running
    # The other two keep serving MQTT while it is down (once JetStream has a leader again: a few seconds when the
    # killed node led it).
    for other in (cluster.nodes[0], cluster.nodes[2]):
        assert _accepted_within(cluster, other, 15.0), other
    node.start()
    assert node.running and node.port == port and node.pid != pid
    after = _jsz(cluster, 1)
    assert after["streams"] >= before["streams"] > 0  # the MQTT streams are back from its data dir


def _accepted_within(cluster: LocalCluster, node: ClusterNode, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if mqtt_connect_rc(node.host, node.port, "healthcheck", cluster.password_for("healthcheck"), "probe") == 0:
                return True
        time.sleep(0.2)
    return False


def _refused(node: ClusterNode, username: str, password: str) -> bool:
    """nats-server answers a bad login with CONNACK 5 or by closing the connection."""
    try:
        return mqtt_connect_rc(node.host, node.port, username, password, "x") != 0
    except ConnectionError:
        return True


def test_wrong_password_is_refused_on_every_node(nats_cluster: LocalCluster) -> None:
    for node in nats_cluster.nodes:
        assert _refused(node, "EV_0001", "wrong")
        assert _refused(node, "EV_0001", nats_cluster.password_for("EV_0002"))
        assert mqtt_connect_rc(node.host, node.port, "EV_0001", nats_cluster.password_for("EV_0001"), "x") == 0


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
