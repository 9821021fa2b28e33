"""Mosquitto's dynamic security plugin: its state file and its control commands.

The plugin (``mosquitto_dynamic_security.so``, in Debian's ``mosquitto`` package and the eclipse-mosquitto
image) authenticates every client and authorises every publish, delivery and subscription from one JSON file
it loads at start and rewrites after each change. Changes arrive at runtime as JSON commands on
``$CONTROL/dynamic-security/v1`` (``mosquitto_ctrl dynsec …`` sends the same), so accounts come and go without a
restart or a signal.

Here:

* :func:`render_config` writes the file a broker starts from: every account of :func:`broker.accounts.build_accounts`
  with the role ``broker/roles.py`` gives it, the shared roles, and the default access (deny everything but
  unsubscribing). Passwords are hashed as the plugin does (PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt;
  checked by logging in), so a file with hundreds of accounts is written in milliseconds.
* :func:`merge_config` brings an existing file (with accounts added at runtime) up to date: the shared roles get
  their current grants, the listed accounts their passwords; everything else is kept.
* :func:`add_account_commands` / :func:`remove_account_commands` build the runtime commands.

Measured (Mosquitto 2.0.11, this machine): the plugin rewrites the whole file after each command, so a runtime
change costs time in proportion to the accounts it holds (``bench/provisioning.py``); accounts in bulk belong in
the start file, runtime commands are for the few that change.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from broker.accounts import Account, validate_prefix, write_private
from broker.roles import fixed_roles, is_own_role, role_acls, role_of

__all__ = [
    "DEFAULT_ACL_ACCESS",
    "add_account_commands",
    "hash_fields",
    "merge_config",
    "remove_account_commands",
    "render_config",
    "verify_fields",
    "write_config",
]

#: What a client may do that no role grants: nothing but unsubscribe. (The plugin's own default lets every
#: client receive any message its subscriptions match; subscriptions are gated, but receipt is denied too here,
#: so a grant always names both.)
DEFAULT_ACL_ACCESS: dict[str, bool] = {"publishClientSend": False, "publishClientReceive": False,
                                       "subscribe": False, "unsubscribe": True}
PBKDF2_ITERATIONS = 101
SALT_LENGTH = 12


def hash_fields(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The plugin's stored form of a password: base64 PBKDF2-HMAC-SHA512 digest, base64 salt, iterations."""
    salt = secrets.token_bytes(SALT_LENGTH) if salt is None else salt
    if not salt:
        raise ValueError("salt must not be empty")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": PBKDF2_ITERATIONS}


def verify_fields(password: str, fields: Mapping[str, Any]) -> bool:
    """True when ``password`` matches a client entry's stored hash (as written here or by the plugin)."""
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), base64.b64decode(fields["salt"]),
                                 int(fields["iterations"]))
    return hmac.compare_digest(digest, base64.b64decode(fields["password"]))


def _role(prefix: str, rolename: str) -> dict[str, Any]:
    return {"rolename": rolename, "acls": [acl.to_json() for acl in role_acls(prefix, rolename)]}


def _client(account: Account) -> dict[str, Any]:
    return {"username": account.username, **hash_fields(account.password),
            "roles": [{"rolename": role_of(account.username)}]}


def render_config(prefix: str, accounts: Iterable[Account]) -> dict[str, Any]:
    """The plugin's state file for ``accounts`` under topic prefix ``prefix``."""
    prefix = validate_prefix(prefix)
    accounts = list(accounts)
    rolenames = dict.fromkeys([*fixed_roles(), *(role_of(a.username) for a in accounts)])
    return {"defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
            "clients": [_client(a) for a in accounts],
            "groups": [],
            "roles": [_role(prefix, name) for name in rolenames]}


def write_config(path: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """Write a state file (mode 0600: it holds password hashes)."""
    return write_private(Path(path), json.dumps(config, indent=1) + "\n")


def merge_config(existing: Mapping[str, Any], prefix: str, accounts: Iterable[Account]) -> dict[str, Any]:
    """``existing`` (a state file the broker has been changing) brought up to date: the default access and the
    shared roles as this version defines them, the roles of ``accounts`` recreated, and each of ``accounts``
    present with its password; every other client, role and group (accounts added at runtime) is kept."""
    fresh = render_config(prefix, accounts)
    fresh_roles = {r["rolename"]: r for r in fresh["roles"]}
    fresh_clients = {c["username"]: c for c in fresh["clients"]}
    roles = [fresh_roles.pop(r["rolename"], r) for r in existing.get("roles", [])]
    clients = []
    for client in existing.get("clients", []):
        updated = fresh_clients.pop(client.get("username"), None)
        clients.append({**client, **updated} if updated is not None else client)
    return {**existing, "defaultACLAccess": fresh["defaultACLAccess"], "groups": existing.get("groups", []),
            "roles": roles + list(fresh_roles.values()), "clients": clients + list(fresh_clients.values())}


def add_account_commands(prefix: str, username: str, password: str) -> list[dict[str, Any]]:
    """Commands that create ``username`` with its role. An account with a role of its own gets the role first
    (a leftover of an interrupted removal is replaced; the caller checks that the account itself is new)."""
    rolename = role_of(username)
    commands: list[dict[str, Any]] = []
    if is_own_role(rolename):
        commands += [{"command": "deleteRole", "rolename": rolename},  # "Role not found" is the usual answer
                     {"command": "createRole", **_role(prefix, rolename)}]
    commands.append({"command": "createClient", "username": username, "password": password,
                     "roles": [{"rolename": rolename}]})
    return commands


def remove_account_commands(username: str) -> list[dict[str, Any]]:
    """Commands that delete ``username`` (the plugin disconnects it at once, so its last will fires) and its own
    role."""
    commands: list[dict[str, Any]] = [{"command": "deleteClient", "username": username}]
    rolename = role_of(username)
    if is_own_role(rolename):
        commands.append({"command": "deleteRole", "rolename": rolename})
    return commands
