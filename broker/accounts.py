"""Broker accounts: usernames, Mosquitto password hashes, the password file and the ACL.

Roles (see ``broker/README.md``):

* service accounts :data:`SERVICE_ACCOUNTS` (``balancer``, ``api``, ``observer``, ``recorder``, ``healthcheck``,
  ``loadtest``);
* one account per substation agent, username ``substation.<id>`` (:func:`substation_username`);
* one account per EV, username == EV id.

Passwords are hashed here in Mosquitto 2.0's ``$7$`` format (PBKDF2-HMAC-SHA512, 101 iterations,
12-byte salt) so a file with hundreds of EV accounts is written in milliseconds instead of spawning
``mosquitto_passwd`` once per account.

CLI::

    python -m broker.accounts --out DIR [--prefix grid/v1] [--substations A,B,C]
        [--evs EV_0001,EV_0002 | --ev-count 200 --ev-prefix EV_] [--secret S]
        [--service balancer=pw --service api ...] [--show-passwords]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Literal

from grid_protocol.ids import ID_PATTERN
from grid_protocol.topics import DEFAULT_PREFIX, Topics

__all__ = [
    "EV_ROLE",
    "SERVICE_ACCOUNTS",
    "SERVICE_ROLE",
    "SUBSTATION_PREFIX",
    "SUBSTATION_ROLE",
    "Account",
    "Role",
    "build_accounts",
    "derive_password",
    "hash_password",
    "main",
    "render_acl",
    "substation_username",
    "validate_prefix",
    "validate_username",
    "verify_password",
    "write_acl",
    "write_password_file",
]

#: Accounts of the services. ``loadtest`` is for benchmarks and tests only: it exists only when it is
#: put in the password file (its ACL block is always rendered, harmless without a password line).
SERVICE_ACCOUNTS: tuple[str, ...] = ("balancer", "api", "observer", "recorder", "healthcheck", "loadtest")
#: Services a deployment gets by default (the CLI without ``--service``): everything but ``loadtest``.
DEFAULT_SERVICES: tuple[str, ...] = ("balancer", "api", "observer", "recorder")

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

# Mosquitto 2.0 ``$7$`` password hashes (src/password_mosq.c): PBKDF2-HMAC-SHA512, 101 iterations,
# 12-byte random salt, salt and 64-byte digest in standard base64 with padding.
PW_SHA512_PBKDF2 = 7
PBKDF2_ITERATIONS = 101
SALT_LENGTH = 12

_ID_RE = re.compile(ID_PATTERN)
_FORBIDDEN_USERNAME_CHARS = frozenset("/+#\x00")
_HASH_RE = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


# --- usernames ------------------------------------------------------------------------------------


def substation_username(substation_id: str) -> str:
    """Broker username of the agent of ``substation_id``: ``substation.<id>``."""
    if _ID_RE.fullmatch(substation_id) is None:
        raise ValueError(f"invalid substation id {substation_id!r}: must match {ID_PATTERN}")
    return SUBSTATION_PREFIX + substation_id


def validate_username(name: str, role: Role) -> str:
    """Return ``name`` if it is an acceptable username for ``role``, else raise :class:`ValueError`.

    Every role: not empty, at most 64 characters, no ``/`` (Mosquitto accepts it and the ``%u`` ACL
    patterns then reach one topic level deeper), no ``+``/``#``/NUL, no whitespace. Then:

    * ``"ev"``: the EV id itself; must match :data:`grid_protocol.ids.ID_PATTERN` and must not be a
      service account name (an EV called ``balancer`` would log in as the balancer);
    * ``"substation"``: ``substation.<id>`` with ``<id>`` matching ID_PATTERN;
    * ``"service"``: one of :data:`SERVICE_ACCOUNTS` (only those have ACL blocks), or an API replica
      ``api.<name>`` (it gets its own copy of the ``api`` block).
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
    """Normalise a topic prefix for the ACL (no wildcards, NUL, whitespace or ``%``)."""
    normalised = Topics(prefix).prefix  # strips '/', rejects + # NUL
    if any(ch.isspace() for ch in normalised) or "%" in normalised or not normalised.isprintable():
        # A space would split an ACL line; '%' could form a %u/%c substitution level.
        raise ValueError(f"invalid topic prefix {prefix!r} for the ACL")
    return normalised


# --- passwords ------------------------------------------------------------------------------------


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2.0 password hash: ``$7$101$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``.

    Same format and parameters as ``mosquitto_passwd`` (2.0): the broker verifies it directly.
    ``salt`` (12 random bytes by default) is only for reproducible tests.
    """
    if salt is None:
        salt = secrets.token_bytes(SALT_LENGTH)
    if not salt:
        raise ValueError("salt must not be empty")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"${PW_SHA512_PBKDF2}${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (as written by us or ``mosquitto_passwd``)."""
    match = _HASH_RE.fullmatch(hashed)
    if match is None:
        raise ValueError("not a Mosquitto $7$ password hash")
    iterations, salt_b64, digest_b64 = match.groups()
    expected = base64.b64decode(digest_b64)
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), base64.b64decode(salt_b64), int(iterations)
    )
    return hmac.compare_digest(digest, expected)


def derive_password(secret: str, username: str) -> str:
    """Per-account password derived from one secret: first 32 hex chars of HMAC-SHA256(secret, username).

    A simulator convenience: fleets of EVs and substations log in with distinct passwords while the
    operator keeps a single secret. Real deployments issue independent credentials.
    """
    if not secret:
        raise ValueError("secret must not be empty")
    return hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


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


def write_password_file(path: str | os.PathLike[str], accounts: Iterable[Account]) -> Path:
    """Write a Mosquitto password file (``user:$7$...`` lines), created with mode 0600."""
    lines = []
    for account in accounts:
        if ":" in account.username:  # the file's field separator
            raise ValueError(f"username {account.username!r} contains ':'")
        lines.append(f"{account.username}:{hash_password(account.password)}\n")
    return _write_private(Path(path), "".join(lines))


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is ignored when the file already existed
    os.replace(tmp, path)
    return path


# --- ACL ------------------------------------------------------------------------------------------


def _acl_template() -> Template:
    return Template(resources.files("broker").joinpath("acl.in").read_text(encoding="utf-8"))


def _api_block(prefix: str, user: str) -> str:
    return (
        f"user {user}\n"
        f"topic deny {prefix}/ev/{user}/#\n"
        f"topic read {prefix}/#\n"
        f"topic write {prefix}/ev/+/request\n"
        f"topic write {prefix}/ev/+/release\n"
        f"topic write {prefix}/balancer/control\n"
    )


def _substation_block(prefix: str, substation_id: str) -> str:
    user = substation_username(substation_id)
    base = f"{prefix}/substation/{substation_id}"
    return (
        f"user {user}\n"
        f"topic deny {prefix}/ev/{user}/#\n"
        f"topic write {base}/telemetry\n"
        f"topic write {base}/status\n"
        f"topic write {base}/session\n"
        f"topic read {base}/command\n"
        f"topic read {base}/error\n"
    )


def render_acl(prefix: str, substation_ids: Iterable[str], api_replicas: Iterable[str] = ()) -> str:
    """The ACL file for ``prefix``: service roles, EV patterns, one block per substation, and one API block
    for ``api`` and each replica account ``api.<name>`` in ``api_replicas``."""
    prefix = validate_prefix(prefix)
    ids = list(substation_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate substation ids")
    replicas = [validate_username(name, SERVICE_ROLE) for name in api_replicas if name != "api"]
    if any(not is_api_replica(name) for name in replicas):
        raise ValueError(f"API replica accounts are named '{API_REPLICA_PREFIX}<name>': {replicas}")
    blocks = "\n".join(_substation_block(prefix, sid) for sid in ids)
    return _acl_template().substitute(
        prefix=prefix,
        api_blocks="\n".join(_api_block(prefix, user) for user in ["api", *dict.fromkeys(replicas)]),
        substation_blocks=blocks if blocks else "# (no substation accounts)\n",
    )


def write_acl(path: str | os.PathLike[str], prefix: str, substation_ids: Iterable[str],
              api_replicas: Iterable[str] = ()) -> Path:
    """Write :func:`render_acl` to ``path`` (mode 0600: it lists every account)."""
    return _write_private(Path(path), render_acl(prefix, substation_ids, api_replicas))


# --- CLI ------------------------------------------------------------------------------------------


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m broker.accounts",
        description="Write a Mosquitto password file (DIR/passwd) and ACL (DIR/acl) for the grid accounts.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default %(default)s)")
    parser.add_argument("--substations", default="", help="comma-separated substation ids, e.g. A,B,C")
    evs = parser.add_mutually_exclusive_group()
    evs.add_argument("--evs", default=None, help="comma-separated EV ids")
    evs.add_argument("--ev-count", type=int, default=None, help="generate N EV ids (with --ev-prefix)")
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
    parser.add_argument("--show-passwords", action="store_true", help="print 'username password' lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        substations = _split_list(args.substations)
        if args.evs is not None:
            ev_ids = _split_list(args.evs)
        elif args.ev_count is not None:
            if args.ev_count < 0:
                raise ValueError("--ev-count must be >= 0")
            width = max(4, len(str(args.ev_count)))
            ev_ids = [f"{args.ev_prefix}{i:0{width}d}" for i in range(1, args.ev_count + 1)]
        else:
            ev_ids = []
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
        prefix = validate_prefix(args.prefix)
        passwd = write_password_file(args.out / "passwd", accounts)
        acl = write_acl(args.out / "acl", prefix, substations,
                        [name for name in service_passwords if is_api_replica(name)])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {passwd} ({len(accounts)} accounts) and {acl} (prefix {prefix})")
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
