"""Broker accounts: usernames, passwords derived from a secret, and the CLI that writes a broker's accounts.

Roles (see ``broker/README.md`` and ``broker/roles.py``):

* service accounts :data:`SERVICE_ACCOUNTS` (``balancer``, ``api``, ``observer``, ``recorder``, ``healthcheck``,
  ``loadtest``, ``provisioner``);
* one account per substation agent, username ``substation.<id>`` (:func:`substation_username`);
* one account per EV, username == EV id.

The broker keeps them in its dynamic security plugin (``broker/dynsec.py``): written as its initial state file
here, changed at runtime over its control topic (``broker/provisioning.py``) without a restart.

CLI::

    python -m broker.accounts --out DIR [--prefix grid/v1] [--substations A,B,C]
        [--evs EV_0001,EV_0002 | --ev-count 200 --ev-prefix EV_] [--secret S]
        [--service balancer=pw --service api ...] [--show-passwords] [--merge]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from grid_protocol.ids import ID_PATTERN
from grid_protocol.topics import DEFAULT_PREFIX, Topics
from grid_runtime.credentials import derive_password

__all__ = [
    "EV_ROLE",
    "SERVICE_ACCOUNTS",
    "SERVICE_ROLE",
    "SUBSTATION_PREFIX",
    "SUBSTATION_ROLE",
    "Account",
    "Role",
    "build_accounts",
    "main",
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


#: Substation agent usernames are ``substation.<id>``. ``.`` is not allowed in ids (ID_PATTERN), so a
#: substation account can never be a valid EV id and an EV account never matches a substation block.
SUBSTATION_PREFIX = "substation."

Role = Literal["ev", "substation", "service"]
EV_ROLE: Role = "ev"
SUBSTATION_ROLE: Role = "substation"
SERVICE_ROLE: Role = "service"

MAX_USERNAME_LENGTH = 64

_ID_RE = re.compile(ID_PATTERN)
_FORBIDDEN_USERNAME_CHARS = frozenset("/+#\x00")


# --- usernames ------------------------------------------------------------------------------------


def substation_username(substation_id: str) -> str:
    """Broker username of the agent of ``substation_id``: ``substation.<id>``."""
    if _ID_RE.fullmatch(substation_id) is None:
        raise ValueError(f"invalid substation id {substation_id!r}: must match {ID_PATTERN}")
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
        if _ID_RE.fullmatch(name) is None:
            raise ValueError(f"EV username {name!r} must be a valid id ({ID_PATTERN})")
        if name in SERVICE_ACCOUNTS:
            raise ValueError(f"EV username {name!r} is reserved for a service account")
        return name
    if role == SUBSTATION_ROLE:
        sid = name.removeprefix(SUBSTATION_PREFIX)
        if not name.startswith(SUBSTATION_PREFIX) or _ID_RE.fullmatch(sid) is None:
            raise ValueError(f"substation username {name!r} must be '{SUBSTATION_PREFIX}<id>' ({ID_PATTERN})")
        return name
    if role == SERVICE_ROLE:
        if name not in SERVICE_ACCOUNTS and not is_api_replica(name):
            raise ValueError(f"unknown service account {name!r}; expected one of {SERVICE_ACCOUNTS} "
                             f"or an API replica '{API_REPLICA_PREFIX}<name>'")
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


# --- CLI ------------------------------------------------------------------------------------------


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m broker.accounts",
        description="Write the state file of Mosquitto's dynamic security plugin (DIR/dynsec.json): the grid's "
                    "accounts, their roles and grants.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default %(default)s)")
    parser.add_argument("--substations", default="", help="comma-separated substation ids, e.g. A,B,C")
    parser.add_argument("--evs", default=None, help="comma-separated EV ids (besides --ev-count's)")
    parser.add_argument("--ev-count", type=int, default=None, help="generate N EV ids (with --ev-prefix)")
    parser.add_argument("--ev-prefix", default="EV_", help="prefix of generated EV ids (default %(default)s)")
    parser.add_argument(
        "--secret",
        default=None,
        help="secret for derived passwords (default: $MQTT_ACCOUNT_SECRET)",
    )
    parser.add_argument(
        "--service",
        action="append",
        default=None,
        metavar="NAME[=PASSWORD]",
        help="service account to create; without '=PASSWORD' the password is derived from the secret. "
        f"Repeatable. Default: {', '.join(DEFAULT_SERVICES)} (derived).",
    )
    parser.add_argument("--ev-password", action="append", default=[], metavar="EV_ID=PASSWORD",
                        help="an EV account with its own password instead of a derived one (repeatable)")
    parser.add_argument("--show-passwords", action="store_true", help="print 'username password' lines")
    parser.add_argument("--merge", action="store_true",
                        help="DIR/dynsec.json exists (a broker has been changing it): keep the accounts added at "
                             "runtime, bring the shared roles up to date and set these accounts' passwords")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        substations = _split_list(args.substations)
        ev_ids = []
        if args.ev_count is not None:
            if args.ev_count < 0:
                raise ValueError("--ev-count must be >= 0")
            width = max(4, len(str(args.ev_count)))
            ev_ids = [f"{args.ev_prefix}{i:0{width}d}" for i in range(1, args.ev_count + 1)]
        if args.evs is not None:
            ev_ids += [ev for ev in _split_list(args.evs) if ev not in ev_ids]
        secret = args.secret or os.environ.get("MQTT_ACCOUNT_SECRET") or ""
        service_specs = args.service if args.service is not None else list(DEFAULT_SERVICES)
        service_passwords: dict[str, str] = {}
        for spec in service_specs:
            name, sep, password = spec.partition("=")
            if not sep:
                if not secret:
                    raise ValueError(f"service {name!r} has no password and no --secret was given")
                password = derive_password(secret, name)
            service_passwords[name] = password
        if (substations or ev_ids) and not secret:
            raise ValueError("substation and EV passwords are derived: give --secret or set MQTT_ACCOUNT_SECRET")
        accounts = build_accounts(secret or "unused", substations, ev_ids, service_passwords)
        for spec in args.ev_password:
            ev, sep, password = spec.partition("=")
            if not sep or not password:
                raise ValueError(f"--ev-password {ev!r}: give EV_ID=PASSWORD")
            account = Account(validate_username(ev, EV_ROLE), password)
            accounts = [a for a in accounts if a.username != ev] + [account]
        prefix = validate_prefix(args.prefix)
        from broker import dynsec  # (it imports this module)

        path = args.out / "dynsec.json"
        merged = args.merge and path.exists()
        if merged:
            config = dynsec.merge_config(json.loads(path.read_text(encoding="utf-8")), prefix, accounts)
        else:
            config = dynsec.render_config(prefix, accounts)
        dynsec.write_config(path, config)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kept = len(config["clients"]) - len(accounts)
    print(f"wrote {path} ({len(accounts)} accounts{f', {kept} more kept' if merged else ''}; prefix {prefix})")
    print(f"  services:    {', '.join(service_passwords) or '-'}")
    print(f"  substations: {len(substations)} ({', '.join(substation_username(s) for s in substations[:5])}"
          f"{', ...' if len(substations) > 5 else ''})")
    print(f"  evs:         {len(ev_ids)}{' (' + ev_ids[0] + ' .. ' + ev_ids[-1] + ')' if ev_ids else ''}")
    if args.show_passwords:
        for account in accounts:
            print(f"{account.username} {account.password}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
