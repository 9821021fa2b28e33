"""Broker accounts: usernames and their rules, passwords derived from a secret (``cli``: the file writer).

Roles (see ``broker/README.md`` and ``broker/roles.py``):

* service accounts :data:`SERVICE_ACCOUNTS` (``balancer``, ``api``, ``observer``, ``recorder``, ``healthcheck``,
  ``loadtest``, ``provisioner``);
* one account per region a balancer owns besides ``default``: ``balancer.<region>`` (:func:`balancer_username`;
  the default region's balancer keeps ``balancer``), with only that region's topics;
* one account per substation agent, username ``substation.<id>`` (:func:`substation_username`);
* one account per EV, username == EV id.

The broker keeps them in its dynamic security plugin (``broker/dynsec.py``): written as its initial state file
here, changed at runtime over its control topic (``broker/provisioning.py``) without a restart.

``python -m broker.accounts`` (``broker/accounts/cli.py``) writes a broker's accounts, roles and grants.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from grid_protocol.ids import ID_PATTERN, checked_id, is_valid_id
from grid_protocol.topics import Topics
from grid_runtime.credentials import derive_password

__all__ = [
    "BALANCER_REGION_PREFIX",
    "EV_ROLE",
    "SERVICE_ACCOUNTS",
    "SERVICE_ROLE",
    "SUBSTATION_PREFIX",
    "SUBSTATION_ROLE",
    "Account",
    "AccountBook",
    "Role",
    "balancer_username",
    "build_accounts",
    "service_account_passwords",
    "substation_username",
    "validate_prefix",
    "validate_username",
    "write_private",
]

#: Accounts of the services. ``loadtest`` is for benchmarks and tests only: it exists only when it is
#: created (its role always exists, harmless without an account). ``provisioner`` administers the broker's
#: accounts at runtime (the API's operator endpoints use it).
SERVICE_ACCOUNTS: tuple[str, ...] = ("balancer", "api", "observer", "recorder", "healthcheck", "loadtest",
                                     "provisioner")
#: Services a deployment gets by default (the CLI without ``--service``): everything but ``loadtest``.
DEFAULT_SERVICES: tuple[str, ...] = ("balancer", "api", "observer", "recorder", "provisioner")

#: Further API replicas log in as ``api.<name>`` (the broker allows one connection per account), with the
#: ``api`` account's rights. ``.`` is not allowed in ids, so these never collide with EV accounts.
API_REPLICA_PREFIX = "api."
_API_REPLICA_RE = re.compile(r"api\.[A-Za-z0-9_-]{1,32}")


def is_api_replica(name: str) -> bool:
    return _API_REPLICA_RE.fullmatch(name) is not None


#: A region's balancer (issue 12) logs in as ``balancer.<region>`` (the default region's as ``balancer``): the
#: broker takes the username as client id, so each region has its own session, and its role grants only its
#: region's topics. ``.`` is not allowed in ids, so these never collide with EV accounts.
BALANCER_REGION_PREFIX = "balancer."


def balancer_username(region: str) -> str:
    """Broker username of ``region``'s balancer: ``balancer`` for ``default``, else ``balancer.<region>``."""
    checked_id(region, "region")
    return "balancer" if region == "default" else BALANCER_REGION_PREFIX + region


def is_regional_balancer(name: str) -> bool:
    region = name.removeprefix(BALANCER_REGION_PREFIX)
    return name.startswith(BALANCER_REGION_PREFIX) and region != "default" and is_valid_id(region)


#: Substation agent usernames are ``substation.<id>``. ``.`` is not allowed in ids (ID_PATTERN), so a
#: substation account can never be a valid EV id and an EV account never matches a substation block.
SUBSTATION_PREFIX = "substation."

Role = Literal["ev", "substation", "service"]
EV_ROLE: Role = "ev"
SUBSTATION_ROLE: Role = "substation"
SERVICE_ROLE: Role = "service"

MAX_USERNAME_LENGTH = 64

_FORBIDDEN_USERNAME_CHARS = frozenset("/+#\x00")


# --- usernames ------------------------------------------------------------------------------------


def substation_username(substation_id: str) -> str:
    """Broker username of the agent of ``substation_id``: ``substation.<id>``."""
    checked_id(substation_id, "substation id")
    return SUBSTATION_PREFIX + substation_id


def validate_username(name: str, role: Role) -> str:
    """Return ``name`` if it is an acceptable username for ``role``, else raise :class:`ValueError`.

    Every role: not empty, at most 64 characters, no ``/`` (Mosquitto accepts it, and the account's own grants,
    which name its id in topics, would then reach one topic level deeper), no ``+``/``#``/NUL, no whitespace.
    Then:

    * ``"ev"``: the EV id itself; must match :data:`grid_protocol.ids.ID_PATTERN` and must not be a
      service account name (an EV called ``balancer`` would log in as the balancer);
    * ``"substation"``: ``substation.<id>`` with ``<id>`` matching ID_PATTERN;
    * ``"service"``: one of :data:`SERVICE_ACCOUNTS` (only those have roles), or an API replica
      ``api.<name>`` (it shares the ``api`` role).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("username must be a non-empty string")
    if len(name) > MAX_USERNAME_LENGTH:
        raise ValueError(f"username {name[:20]!r}... longer than {MAX_USERNAME_LENGTH} characters")
    bad = _FORBIDDEN_USERNAME_CHARS.intersection(name)
    if bad:
        raise ValueError(f"username {name!r} contains forbidden characters {sorted(bad)!r}")
    if any(ch.isspace() for ch in name) or not name.isprintable():
        raise ValueError(f"username {name!r} contains whitespace or control characters")
    if role == EV_ROLE:
        if not is_valid_id(name):
            raise ValueError(f"EV username {name!r} must be a valid id ({ID_PATTERN})")
        if name in SERVICE_ACCOUNTS:
            raise ValueError(f"EV username {name!r} is reserved for a service account")
        return name
    if role == SUBSTATION_ROLE:
        sid = name.removeprefix(SUBSTATION_PREFIX)
        if not name.startswith(SUBSTATION_PREFIX) or not is_valid_id(sid):
            raise ValueError(f"substation username {name!r} must be '{SUBSTATION_PREFIX}<id>' ({ID_PATTERN})")
        return name
    if role == SERVICE_ROLE:
        if name not in SERVICE_ACCOUNTS and not is_api_replica(name) and not is_regional_balancer(name):
            raise ValueError(f"unknown service account {name!r}; expected one of {SERVICE_ACCOUNTS}, "
                             f"an API replica '{API_REPLICA_PREFIX}<name>' or a region's balancer "
                             f"'{BALANCER_REGION_PREFIX}<region>'")
        return name
    raise ValueError(f"unknown role {role!r}")


def validate_prefix(prefix: str) -> str:
    """Normalise a topic prefix for the grants (no wildcards, NUL, whitespace or ``%``)."""
    normalised = Topics(prefix).prefix  # strips '/', rejects + # NUL
    if any(ch.isspace() for ch in normalised) or "%" in normalised or not normalised.isprintable():
        # A space would split a config line; '%' could form a %u/%c substitution level in an ACL.
        raise ValueError(f"invalid topic prefix {prefix!r} for the ACL")
    return normalised


# --- accounts -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Account:
    username: str
    password: str

    def __repr__(self) -> str:  # keep passwords out of logs and test output
        return f"Account(username={self.username!r}, password='***')"


def build_accounts(
    secret: str,
    substation_ids: Iterable[str],
    ev_ids: Iterable[str],
    service_passwords: Mapping[str, str],
) -> list[Account]:
    """Accounts for the given services, substations and EVs.

    Services: exactly the keys of ``service_passwords`` (so ``loadtest`` exists only if listed);
    substations (``substation.<id>``) and EVs get :func:`derive_password` passwords from ``secret``.
    Raises :class:`ValueError` for invalid or duplicate usernames and empty passwords.
    """
    accounts: list[Account] = []
    for name, password in service_passwords.items():
        accounts.append(Account(validate_username(name, SERVICE_ROLE), password))
    for sid in substation_ids:
        user = validate_username(substation_username(sid), SUBSTATION_ROLE)
        accounts.append(Account(user, derive_password(secret, user)))
    for ev in ev_ids:
        user = validate_username(ev, EV_ROLE)
        accounts.append(Account(user, derive_password(secret, user)))
    seen: set[str] = set()
    for account in accounts:
        if account.username in seen:
            raise ValueError(f"duplicate account {account.username!r}")
        if not account.password:
            raise ValueError(f"empty password for {account.username!r}")
        seen.add(account.username)
    return accounts


def service_account_passwords(secret: str, services: Iterable[str],
                              given: Mapping[str, str] | None = None) -> dict[str, str]:
    """Passwords of the service accounts: ``given`` where it names one, else derived from ``secret``; a service
    only in ``given`` is added too (what a local broker or cluster creates)."""
    given = dict(given or {})
    passwords = {name: given.get(name) or derive_password(secret, name) for name in services}
    passwords.update({name: pw for name, pw in given.items() if name not in passwords})
    return passwords


class AccountBook:
    """``password_for`` / ``substation_credentials`` of a local broker or cluster (tests and benches log in
    with them); the owner fills ``_passwords`` from its accounts."""

    _passwords: dict[str, str]

    def password_for(self, username: str) -> str:
        """Password of an account (KeyError for unknown usernames)."""
        try:
            return self._passwords[username]
        except KeyError:
            raise KeyError(f"no account {username!r} on this {type(self).__name__}") from None

    def substation_credentials(self, substation_id: str) -> tuple[str, str]:
        """``(username, password)`` of the agent of ``substation_id``."""
        user = substation_username(substation_id)
        return user, self.password_for(user)


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, created mode 0600 (it holds password hashes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is ignored when the file already existed
    os.replace(tmp, path)
    return path
