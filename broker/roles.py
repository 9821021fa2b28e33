"""Who may publish and subscribe what: the broker's roles, defined once.

Mosquitto's dynamic security plugin holds the accounts (clients), their roles and the roles' ACLs, and changes them
at runtime (``broker/dynsec.py``). Its 2.0 ACLs substitute no ``%u``/``%c`` (checked against 2.0.11: a role with
``publishClientSend grid/v1/ev/%u/request`` refuses the client's own topic), so an acl_file ``pattern`` cannot be
carried over. Instead every EV and every substation gets a role of its own naming only its own topics
(``ev.<id>``, ``substation.<id>``); the services share fixed roles. ``.`` is not allowed in ids, so these role
names never collide with each other or with the service roles.

Each grant is explicit and everything else is refused (the plugin's default access is set to deny publishing,
receiving and subscribing). "Read" grants both the subscription (``subscribePattern``: a filter within the
granted one) and the delivery of each message (``publishClientReceive``), so a subscription to ``#`` is refused
and even a permitted subscription delivers nothing outside the grant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.accounts import BALANCER_REGION_PREFIX, SUBSTATION_PREFIX, is_api_replica, validate_prefix
from grid_protocol.ids import is_valid_id
from grid_protocol.messages import DEFAULT_REGION
from grid_protocol.topics import REGION_LEVEL, Topics

__all__ = [
    "DYNSEC_RESPONSE_TOPIC",
    "DYNSEC_TOPIC",
    "SERVICE_ROLES",
    "Acl",
    "ev_role_name",
    "fixed_roles",
    "is_own_role",
    "read",
    "role_acls",
    "role_of",
    "write",
]

#: Where the plugin takes commands, and where it answers.
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE_TOPIC = DYNSEC_TOPIC + "/response"

SEND = "publishClientSend"
RECEIVE = "publishClientReceive"
SUBSCRIBE = "subscribePattern"

#: Role of each service account (``api.<name>`` replicas share ``api``; observer and recorder share ``reader``).
SERVICE_ROLES: dict[str, str] = {
    "balancer": "balancer", "api": "api", "observer": "reader", "recorder": "reader",
    "healthcheck": "healthcheck", "loadtest": "loadtest", "provisioner": "provisioner",
}
EV_ROLE_PREFIX = "ev."


@dataclass(frozen=True, slots=True)
class Acl:
    acltype: str
    topic: str
    allow: bool = True
    #: checked highest first; the first that matches decides
    priority: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"acltype": self.acltype, "topic": self.topic, "allow": self.allow, "priority": self.priority}


def read(*topics: str) -> list[Acl]:
    return [acl for t in topics for acl in (Acl(SUBSCRIBE, t), Acl(RECEIVE, t))]


def write(*topics: str) -> list[Acl]:
    return [Acl(SEND, t) for t in topics]


def ev_role_name(ev_id: str) -> str:
    return EV_ROLE_PREFIX + ev_id


def role_of(username: str) -> str:
    """The role an account gets: its service's, or its own (``substation.<id>``, ``ev.<id>``, a region's
    balancer ``balancer.<region>``)."""
    if username in SERVICE_ROLES:
        return SERVICE_ROLES[username]
    if username.startswith(BALANCER_REGION_PREFIX):
        return username
    if is_api_replica(username):
        return SERVICE_ROLES["api"]
    if username.startswith(SUBSTATION_PREFIX):
        return username
    return ev_role_name(username)


def is_own_role(rolename: str) -> bool:
    """A role that belongs to one account (removed with it)."""
    return rolename.startswith((SUBSTATION_PREFIX, EV_ROLE_PREFIX, BALANCER_REGION_PREFIX))


def role_acls(prefix: str, rolename: str) -> list[Acl]:
    """The grants of ``rolename`` under topic prefix ``prefix``. :class:`ValueError` for an unknown role."""
    p = validate_prefix(prefix)
    if rolename == "balancer":  # the default region's balancer (today's topics)
        return _balancer_acls(p, p)
    if rolename.startswith(BALANCER_REGION_PREFIX):  # region R's balancer: only R's topics (and its replies)
        region = rolename.removeprefix(BALANCER_REGION_PREFIX)
        if not is_valid_id(region) or region == DEFAULT_REGION:
            raise ValueError(f"unknown role {rolename!r}")
        return _balancer_acls(p, Topics(p, region).root)
    if rolename == "api":
        # Sees everything under the prefix (its MQTT 5 replies too, every region), submits requests and releases
        # for EVs, sends operator control messages and limit schedules, in every region.
        return [*read(f"{p}/#"), *write(*_every_region(p, "ev/+/request", "ev/+/release", "balancer/control",
                                                      "substation/+/limits"))]
    if rolename == "reader":  # operators, dashboards, the recorder
        return read(f"{p}/#")
    if rolename == "healthcheck":  # may log in and nothing else
        return []
    if rolename == "loadtest":  # benchmarks and tests only: plays EV fleets and substation agents at once
        return [*read(*_every_region(p, "ev/#")), *write(*_every_region(p, "ev/#")),
                *write(*_every_region(p, "substation/+/telemetry", "substation/+/status", "substation/+/session")),
                *read(*_every_region(p, "substation/+/command", "balancer/status"))]
    if rolename == "provisioner":
        # Adds and removes accounts at runtime (the plugin's control topic: whoever may publish there administers
        # the broker), and clears the retained status a removed substation's agent left behind.
        return [*write(DYNSEC_TOPIC), *read(DYNSEC_RESPONSE_TOPIC), *write(*_every_region(p, "substation/+/status"))]
    if rolename.startswith(SUBSTATION_PREFIX):
        # Its own topics in any region: the account names no region (SUBSTATION_REGION is the agent's setting, so
        # moving a substation to another region changes no account); each region's balancer refuses a status that
        # names another region than its topic's (region_mismatch).
        sid = rolename.removeprefix(SUBSTATION_PREFIX)
        return [*write(*_every_region(p, f"substation/{sid}/telemetry", f"substation/{sid}/status",
                                      f"substation/{sid}/session")),
                *read(*_every_region(p, f"substation/{sid}/command", f"substation/{sid}/error", "balancer/status"))]
    if rolename.startswith(EV_ROLE_PREFIX):
        ev = rolename.removeprefix(EV_ROLE_PREFIX)
        # An EV drives between regions: its own request and release in any region, its own assignment in every
        # region. MQTT 5 response topics: replies only below its own reply root (one per grid).
        return [*write(*_every_region(p, f"ev/{ev}/request", f"ev/{ev}/release")),
                *read(*_every_region(p, f"ev/{ev}/assignment", "balancer/status"), f"{p}/reply/{ev}/#")]
    raise ValueError(f"unknown role {rolename!r}")


def _every_region(p: str, *tails: str) -> list[str]:
    """``tails`` in the default region (``<p>/<tail>``) and in every other (``<p>/region/+/<tail>``)."""
    return [f"{p}/{tail}" for tail in tails] + [f"{p}/{REGION_LEVEL}/+/{tail}" for tail in tails]


def _balancer_acls(p: str, root: str) -> list[Acl]:
    """A region's balancer, its region's topics living under ``root`` (``p`` itself for the default region).

    Consumes requests, releases and substation reports; sends assignments, commands, error reports, its retained
    view of each substation and MQTT 5 replies (below the grid's one reply root); owns its retained status, queue
    and control topics. Reads its own retained limit schedules back when it starts. Nothing of another region:
    the broker itself keeps a region's balancer from answering or commanding outside its region."""
    return [*read(f"{root}/ev/+/request", f"{root}/ev/+/release", f"{root}/substation/+/telemetry",
                  f"{root}/substation/+/status", f"{root}/substation/+/session", f"{root}/substation/+/limits",
                  f"{root}/substation/+/schedule"),
            *write(f"{root}/ev/+/assignment", f"{root}/substation/+/command", f"{root}/substation/+/error",
                   f"{root}/substation/+/state", f"{root}/substation/+/schedule", f"{p}/reply/#"),
            # only to clear a retained request, release or limit schedule (an empty retained message): those
            # would be replayed to every later balancer (the grant cannot tell an empty payload from another) ...
            *write(f"{root}/ev/+/request", f"{root}/ev/+/release", f"{root}/substation/+/limits"),
            # ... and never as an EV of its own name (checked before the grants)
            Acl(SEND, f"{root}/ev/balancer/#", allow=False, priority=1),
            *read(f"{root}/balancer/#"), *write(f"{root}/balancer/#")]


def fixed_roles() -> list[str]:
    """The shared roles (every deployment has them, whether or not an account uses them yet)."""
    return sorted(set(SERVICE_ROLES.values()))

