"""``python -m broker.accounts``: write the state file of Mosquitto's dynamic security plugin (``DIR/dynsec.json``),
the grid's accounts, their roles and grants.

::

    python -m broker.accounts --out DIR [--prefix grid/v1] [--substations A,B,C]
        [--evs EV_0001,EV_0002 | --ev-count 200 --ev-prefix EV_] [--secret S]
        [--service balancer=pw --service api ...] [--show-passwords] [--merge]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from broker import dynsec
from broker.accounts import (
    DEFAULT_SERVICES,
    EV_ROLE,
    Account,
    build_accounts,
    substation_username,
    validate_prefix,
    validate_username,
)
from grid_protocol.topics import DEFAULT_PREFIX
from grid_runtime.credentials import derive_password

__all__ = ["AccountSet", "accounts_from_args", "add_account_arguments", "main", "print_summary"]


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def add_account_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which accounts a broker gets (shared with ``python -m broker.nats``)."""
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


@dataclass(slots=True)
class AccountSet:
    accounts: list[Account]
    substations: list[str]
    ev_ids: list[str]
    services: list[str]


def accounts_from_args(args: argparse.Namespace) -> AccountSet:
    """The accounts the options of :func:`add_account_arguments` ask for; :class:`ValueError` when invalid."""
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
    return AccountSet(accounts, substations, ev_ids, list(service_passwords))


def print_summary(found: AccountSet, show_passwords: bool) -> None:
    print(f"  services:    {', '.join(found.services) or '-'}")
    subs = found.substations
    print(f"  substations: {len(subs)} ({', '.join(substation_username(s) for s in subs[:5])}"
          f"{', ...' if len(subs) > 5 else ''})")
    evs = found.ev_ids
    print(f"  evs:         {len(evs)}{' (' + evs[0] + ' .. ' + evs[-1] + ')' if evs else ''}")
    if show_passwords:
        for account in found.accounts:
            print(f"{account.username} {account.password}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m broker.accounts",
        description="Write the state file of Mosquitto's dynamic security plugin (DIR/dynsec.json): the grid's "
                    "accounts, their roles and grants.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    add_account_arguments(parser)
    parser.add_argument("--merge", action="store_true",
                        help="DIR/dynsec.json exists (a broker has been changing it): keep the accounts added at "
                             "runtime, bring the shared roles up to date and set these accounts' passwords")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        found = accounts_from_args(args)
        accounts = found.accounts
        prefix = validate_prefix(args.prefix)
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
    print_summary(found, args.show_passwords)
    return 0
