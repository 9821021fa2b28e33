"""NATS server configuration of the grid's cluster: one file per node, one shared accounts file.

Who may do what is not written here: every user's subject permissions are derived from the role table in
``broker/roles.py`` (the same table Mosquitto's dynamic security roles come from), by :func:`permissions`:

* an MQTT topic filter becomes a NATS subject the way nats-server maps them (``/`` → ``.``, ``+`` → ``*``,
  ``#`` → ``>``); a filter ``a/#`` also grants ``a`` (MQTT's ``#`` matches its parent level, and nats-server
  subscribes both subjects for it);
* ``publishClientSend`` grants become ``publish`` allow/deny lists; ``subscribePattern`` grants ``subscribe``.
  Mosquitto also checks each delivered message (``publishClientReceive``); NATS checks the subscription's
  subject against the allowed set, so every delivery on an allowed subscription is inside it: a role whose
  receive grants differ from its subscribe grants cannot be expressed and is refused here;
* a deny must outrank every allow it overlaps (NATS: deny always wins; Mosquitto: the higher priority wins);
* every MQTT user also needs ``subscribe $MQTT.sub.>``: nats-server delivers QoS 1 messages (and retained ones)
  through a JetStream consumer whose deliver subject ``$MQTT.sub.<nuid>`` is subscribed with the client's own
  permissions (measured, 2.9.10: without it every QoS 1 SUBSCRIBE fails with "Unable to create subscription
  for JetStream consumer ... subscribe permission violation"). It does not open other clients' traffic: an
  MQTT client cannot subscribe ``$MQTT/sub/#`` (refused by the MQTT layer), and users are limited to MQTT
  connections (``allowed_connection_types``), so nobody reaches the subject with a plain NATS client.
* the balancers alone (``balancer``, ``balancer.<region>``) may also connect as NATS clients, for their
  JetStream key-value buckets (region leases, operator settings: ``$JS.API.>``, ``$KV.>`` and its ``_INBOX.>`` replies).

nats-server 2.9's config files have no ``%u``-style substitution (permission templates such as
``{{name()}}`` exist only for JWT/operator accounts), so every EV and every substation is a user with its own
permissions, as on Mosquitto where each gets a role of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.accounts import Account, validate_prefix
from broker.roles import RECEIVE, SEND, SUBSCRIBE, role_acls, role_of

__all__ = [
    "ACCOUNT",
    "MQTT_INTERNAL_SUBSCRIBE",
    "NATS_CLIENT_GRANTS",
    "ClusterLayout",
    "NodeAddress",
    "permissions",
    "render_accounts",
    "render_node",
    "topic_to_subject",
]

#: The NATS account holding every grid user (JetStream enabled: MQTT needs it).
ACCOUNT = "GRID"
#: What nats-server's MQTT layer subscribes with the client's own permissions (QoS 1 and retained deliveries).
MQTT_INTERNAL_SUBSCRIBE = "$MQTT.sub.>"
#: Roles that may also connect as plain NATS clients, with what they need there: nats-py JetStream key-value
#: (the balancer's region leases and operator settings, issue 12).
NATS_CLIENT_GRANTS: dict[str, dict[str, list[str]]] = {
    "balancer": {"publish": ["$JS.API.>", "$KV.>"], "subscribe": ["_INBOX.>"]},
}


def topic_to_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic or filter (as nats-server's MQTT layer maps them)."""
    if not topic or "." in topic or any(ch.isspace() for ch in topic) or "//" in topic or topic.endswith("/"):
        # nats-server turns '.' into '//' and refuses empty levels: such a grant would not mean the same.
        raise ValueError(f"topic {topic!r} has no plain NATS subject")
    levels = topic.split("/")
    return ".".join("*" if lv == "+" else ">" if lv == "#" else lv for lv in levels)


def _subjects(topics: Iterable[str]) -> list[str]:
    out: list[str] = []
    for topic in topics:
        subject = topic_to_subject(topic)
        extra = [subject[: -len(".>")]] if subject.endswith(".>") else []
        for s in [*extra, subject]:
            if s not in out:
                out.append(s)
    return out


def permissions(prefix: str, rolename: str) -> dict[str, Any]:
    """NATS ``permissions`` of ``rolename`` (from ``broker.roles.role_acls``; see the module docstring)."""
    acls = role_acls(prefix, rolename)
    subscribe = [a.topic for a in acls if a.acltype == SUBSCRIBE and a.allow]
    receive = [a.topic for a in acls if a.acltype == RECEIVE and a.allow]
    if set(subscribe) != set(receive) or any(not a.allow for a in acls if a.acltype != SEND):
        raise ValueError(f"role {rolename!r}: receive grants differ from subscribe grants (not expressible in NATS)")
    allow = [a for a in acls if a.acltype == SEND and a.allow]
    deny = [a for a in acls if a.acltype == SEND and not a.allow]
    for d in deny:
        if any(a.priority >= d.priority for a in allow):
            raise ValueError(f"role {rolename!r}: deny {d.topic!r} does not outrank every allow (NATS: deny wins)")
    extra = _nats_client_grants(rolename)
    publish: dict[str, Any] = {"allow": _subjects(a.topic for a in allow) + extra.get("publish", [])}
    if deny:
        publish["deny"] = _subjects(d.topic for d in deny)
    if not publish["allow"]:
        # An empty allow list would mean "no restriction" to nats-server: deny everything explicitly.
        publish = {"deny": [">"]}
    return {"publish": publish,
            "subscribe": {"allow": [*_subjects(subscribe), MQTT_INTERNAL_SUBSCRIBE, *extra.get("subscribe", [])]}}


def _nats_client_grants(rolename: str) -> dict[str, list[str]]:
    """A region's balancer (role ``balancer.<region>``) may use the key-value store like the default one."""
    return NATS_CLIENT_GRANTS.get(rolename.split(".", 1)[0], {})


def _user(prefix: str, account: Account) -> dict[str, Any]:
    role = role_of(account.username)
    return {"user": account.username, "password": account.password, "permissions": permissions(prefix, role),
            "allowed_connection_types": ["MQTT", "STANDARD"] if _nats_client_grants(role) else ["MQTT"]}


def render_accounts(prefix: str, accounts: Iterable[Account]) -> str:
    """The shared accounts file every node includes (``accounts { GRID { ... } }``; mode 0600: passwords).

    Passwords are stored as given (nats-server compares them in plain text unless they are bcrypt hashes; the
    file is readable by the server's user only)."""
    prefix = validate_prefix(prefix)
    users = [_user(prefix, a) for a in accounts]
    body = ",\n".join("      " + json.dumps(u, separators=(", ", ": ")) for u in users)
    return ("# Generated by `python -m broker.nats` from broker/roles.py: do not edit (regenerate; then\n"
            "# `nats-server --signal reload=<pid>` on each node, or SIGHUP, picks the change up).\n"
            f"accounts {{\n  {ACCOUNT} {{\n    jetstream: enabled\n    users: [\n{body}\n    ]\n  }}\n}}\n")


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One node's name and listeners (host is where the others and the clients reach it)."""

    name: str
    host: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int | None = None


@dataclass(slots=True)
class ClusterLayout:
    """An N-node cluster: its nodes' addresses and what every node shares."""

    nodes: Sequence[NodeAddress]
    name: str = "grid"
    bind_address: str = "127.0.0.1"
    #: directory with ca.crt / server.crt / server.key (broker/tls/make-certs.sh): TLS on the MQTT and client ports
    tls_dir: str | os.PathLike[str] | None = None
    accounts_file: str = "accounts.conf"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def local(cls, ports: Sequence[tuple[int, int, int, int | None]], *, name: str = "grid",
              host: str = "127.0.0.1", tls_dir: str | os.PathLike[str] | None = None) -> ClusterLayout:
        """A layout of nodes ``<name>-1`` ... on ``host`` with the given (client, cluster, mqtt, http) ports."""
        nodes = [NodeAddress(f"{name}-{i}", host, c, r, m, h) for i, (c, r, m, h) in enumerate(ports, start=1)]
        return cls(nodes, name=name, bind_address=host, tls_dir=tls_dir)


def _q(value: str | os.PathLike[str]) -> str:
    return json.dumps(str(value))


def render_node(layout: ClusterLayout, index: int, store_dir: str | os.PathLike[str]) -> str:
    """The config file of node ``index`` (0-based): listeners, routes to every other node, JetStream, MQTT."""
    node = layout.nodes[index]
    bind = layout.bind_address
    routes = [f"nats-route://{n.host}:{n.cluster_port}" for i, n in enumerate(layout.nodes) if i != index]
    tls = ""
    if layout.tls_dir is not None:
        d = Path(layout.tls_dir)
        tls = (f"  tls {{ cert_file: {_q(d / 'server.crt')}, key_file: {_q(d / 'server.key')}, "
               f"ca_file: {_q(d / 'ca.crt')} }}\n")
    lines = [
        "# Generated by `python -m broker.nats` (broker/nats/config.py): do not edit, regenerate.",
        f"server_name: {_q(node.name)}",
        f"listen: {_q(f'{bind}:{node.client_port}')}",
    ]
    if node.http_port:
        lines.append(f"http: {_q(f'{bind}:{node.http_port}')}  # monitoring: /healthz, /varz, /jsz, /routez")
    if tls:
        lines.append(tls.strip())  # the client port too
    lines += [
        # JetStream holds MQTT sessions, QoS 1 messages and retained messages (replicated on up to 3 nodes).
        f"jetstream {{\n  store_dir: {_q(store_dir)}\n}}",
        "cluster {",
        f"  name: {_q(layout.name)}",
        f"  listen: {_q(f'{bind}:{node.cluster_port}')}",
        "  routes: [" + ", ".join(_q(r) for r in routes) + "]",
        "}",
        "mqtt {",
        f"  listen: {_q(f'{bind}:{node.mqtt_port}')}",
        # Replicas of the MQTT streams (sessions, QoS 1 and retained messages). Left to itself nats-server takes
        # the number of servers it knows when the account's first MQTT client connects: measured 2 on a
        # 3-node cluster still forming, and then losing one of those two nodes stopped every MQTT CONNECT
        # ("unable to persist session ... timeout") until it came back. Fixed, a node's loss keeps a quorum.
        f"  stream_replicas: {min(3, len(layout.nodes))}",
        f"  consumer_replicas: {min(3, len(layout.nodes))}",  # a session's consumer must outlive its node too
        # A QoS 1 message delivered to a client that died before acking it (a killed balancer) goes to the session
        # again only after this (default 30 s): the standby that resumes the session would answer it that late.
        # Redeliveries to a live but slow client are harmless (the balancer and the agents de-duplicate).
        '  ack_wait: "3s"',
        tls.rstrip("\n"),
        "}",
        f"include {_q(layout.accounts_file)}",
    ]
    for key, value in layout.extra.items():
        lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(line for line in lines if line) + "\n"
