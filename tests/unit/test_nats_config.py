"""broker/nats/config.py: NATS permissions derived from the one role table (broker/roles.py), node configs."""

from __future__ import annotations

import pytest

from broker.accounts import Account
from broker.nats.config import (
    MQTT_INTERNAL_SUBSCRIBE,
    ClusterLayout,
    permissions,
    render_accounts,
    render_node,
    topic_to_subject,
)
from broker.roles import fixed_roles

P = "grid/v1"


def test_topics_map_as_nats_server_maps_them() -> None:
    assert topic_to_subject("grid/v1/ev/+/request") == "grid.v1.ev.*.request"
    assert topic_to_subject("grid/v1/#") == "grid.v1.>"
    assert topic_to_subject("$CONTROL/dynamic-security/v1") == "$CONTROL.dynamic-security.v1"
    for bad in ("a/b.c", "a//b", "a b", "a/", ""):
        with pytest.raises(ValueError):
            topic_to_subject(bad)


def test_ev_permissions_name_only_its_own_topics() -> None:
    perms = permissions(P, "ev.EV_0001")
    # Its own request and release in every region (issue 12: grid.v1.region.<R>. ...), its own assignment in every
    # region, its replies, the balancers' statuses.
    assert perms["publish"] == {"allow": ["grid.v1.ev.EV_0001.request", "grid.v1.ev.EV_0001.release",
                                          "grid.v1.region.*.ev.EV_0001.request",
                                          "grid.v1.region.*.ev.EV_0001.release"]}
    assert perms["subscribe"]["allow"] == ["grid.v1.ev.EV_0001.assignment", "grid.v1.balancer.status",
                                           "grid.v1.region.*.ev.EV_0001.assignment",
                                           "grid.v1.region.*.balancer.status", "grid.v1.reply.EV_0001",
                                           "grid.v1.reply.EV_0001.>", MQTT_INTERNAL_SUBSCRIBE]


def test_every_role_is_expressible_and_denies_stay_denies() -> None:
    for role in [*fixed_roles(), "substation.A", "ev.X"]:
        perms = permissions(P, role)
        assert MQTT_INTERNAL_SUBSCRIBE in perms["subscribe"]["allow"]
        assert perms["publish"].get("allow") or perms["publish"] == {"deny": [">"]}, role
    assert permissions(P, "healthcheck")["publish"] == {"deny": [">"]}  # an empty allow would allow everything
    assert permissions(P, "balancer")["publish"]["deny"] == ["grid.v1.ev.balancer", "grid.v1.ev.balancer.>"]
    with pytest.raises(ValueError):
        permissions(P, "nobody")


def test_accounts_file_limits_connection_types() -> None:
    text = render_accounts(P, [Account("EV_0001", "pw1"), Account("balancer", "pw2")])
    assert '"user": "EV_0001"' in text and '"allowed_connection_types": ["MQTT"]' in text
    assert '"allowed_connection_types": ["MQTT", "STANDARD"]' in text  # the balancer's JetStream key-value
    assert "jetstream: enabled" in text


def test_node_config_routes_to_the_other_nodes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout = ClusterLayout.local([(4001, 6001, 1801, 8001), (4002, 6002, 1802, None), (4003, 6003, 1803, None)],
                                 tls_dir=tmp_path)
    text = render_node(layout, 1, "/data/grid-2")
    assert 'server_name: "grid-2"' in text and 'listen: "127.0.0.1:1802"' in text
    assert '"nats-route://127.0.0.1:6001", "nats-route://127.0.0.1:6003"' in text
    assert "6002\"]" not in text and "http:" not in text
    assert text.count("tls {") == 2 and str(tmp_path / "ca.crt") in text
    assert "stream_replicas: 3" in text  # not left to the number of servers known at the first MQTT login
