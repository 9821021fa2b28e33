"""``python -m broker.nats`` (``gridlb nats``): the NATS cluster's files, or a local cluster in the foreground.

::

    # a deployment's files: DIR/nats-1.conf .. nats-N.conf and DIR/accounts.conf (docker compose: profile cluster)
    python -m broker.nats config --out DIR [--nodes 3] [--hosts nats-1,nats-2,nats-3] [--bind 0.0.0.0]
        [--store-dir /data/jetstream] [--tls-dir /certs] [--http-port 8222] <accounts>
    # only the accounts file (after a change; then `nats-server --signal reload=<pid>` or SIGHUP on every node)
    python -m broker.nats accounts --out DIR <accounts>
    # a local N-node cluster on loopback until Ctrl-C (ports printed)
    python -m broker.nats run --work-dir .run/nats [--nodes 3] <accounts>

``<accounts>`` are ``python -m broker.accounts``'s options (``--substations``, ``--ev-count``, ``--secret``,
``--service NAME[=PASSWORD]`` ...): the same accounts, with permissions derived from the same role table.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from broker.accounts import Account, validate_prefix, write_private
from broker.accounts.cli import accounts_from_args, add_account_arguments, print_summary
from broker.nats.config import ClusterLayout, NodeAddress, render_accounts, render_node

__all__ = ["main"]

ACCOUNTS_FILE = "accounts.conf"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m broker.nats", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="write every node's config and the accounts file")
    config.add_argument("--out", required=True, type=Path)
    config.add_argument("--nodes", type=int, default=3)
    config.add_argument("--name", default="grid", help="cluster name (default %(default)s)")
    config.add_argument("--hosts", default=None,
                        help="comma-separated host names of the nodes, as the others reach them "
                             "(default nats-1,nats-2,...: the compose service names)")
    config.add_argument("--bind", default="0.0.0.0")
    config.add_argument("--client-port", type=int, default=4222)
    config.add_argument("--cluster-port", type=int, default=6222)
    config.add_argument("--mqtt-port", type=int, default=1883)
    config.add_argument("--http-port", type=int, default=8222, help="monitoring port (0 = none)")
    config.add_argument("--store-dir", default="/data/jetstream", help="JetStream store dir inside each node")
    config.add_argument("--tls-dir", default=None, help="dir with ca.crt, server.crt, server.key "
                                                        "(broker/tls/make-certs.sh): TLS on the MQTT and client ports")
    add_account_arguments(config)
    accounts = sub.add_parser("accounts", help="write the accounts file only")
    accounts.add_argument("--out", required=True, type=Path)
    add_account_arguments(accounts)
    run = sub.add_parser("run", help="run a local cluster on loopback until Ctrl-C")
    run.add_argument("--work-dir", type=Path, default=Path(".run/nats"))
    run.add_argument("--nodes", type=int, default=3)
    run.add_argument("--tls-dir", type=Path, default=None)
    add_account_arguments(run)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        found = accounts_from_args(args)
        prefix = validate_prefix(args.prefix)
        if args.command == "run":
            return _run(args, found.accounts)
        args.out.mkdir(parents=True, exist_ok=True)
        write_private(args.out / ACCOUNTS_FILE, render_accounts(prefix, found.accounts))
        print(f"wrote {args.out / ACCOUNTS_FILE} ({len(found.accounts)} accounts; prefix {prefix})")
        if args.command == "config":
            hosts = args.hosts.split(",") if args.hosts else [f"nats-{i}" for i in range(1, args.nodes + 1)]
            if len(hosts) != args.nodes:
                raise ValueError(f"--hosts names {len(hosts)} nodes, --nodes says {args.nodes}")
            nodes = [NodeAddress(h, h, args.client_port, args.cluster_port, args.mqtt_port, args.http_port or None)
                     for h in hosts]
            layout = ClusterLayout(nodes, name=args.name, bind_address=args.bind, tls_dir=args.tls_dir,
                                   accounts_file=ACCOUNTS_FILE)
            for i, node in enumerate(nodes):
                path = args.out / f"{node.name}.conf"
                path.write_text(render_node(layout, i, args.store_dir), encoding="utf-8")
                print(f"wrote {path}")
        print_summary(found, args.show_passwords)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace, accounts: list[Account]) -> int:
    from broker.nats.cluster import LocalCluster

    cluster = LocalCluster(args.work_dir, nodes=args.nodes, prefix=args.prefix, tls_dir=args.tls_dir,
                           accounts=accounts)

    def _terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    with cluster:
        print(f"NATS cluster of {len(cluster.nodes)} nodes ready; MQTT_HOSTS={cluster.mqtt_hosts}")
        print(f"NATS URLs: {cluster.nats_urls}; work dir {cluster.work_dir}")
        with contextlib.suppress(KeyboardInterrupt):
            while cluster.running:
                time.sleep(0.5)
    return 0
