"""``python -m monitoring.influx_tokens``: least-privilege InfluxDB 2 tokens for the recorder and for Grafana.

docker compose's InfluxDB is set up with an admin token (``INFLUXDB_ADMIN_TOKEN``); nothing else should hold it.
This one-shot (compose service ``influxdb-tokens``, after InfluxDB is healthy) uses it once to create:

* ``recorder.token``: write to the grid's bucket, nothing else (the recorder only writes points);
* ``grafana.token``: read the grid's bucket, nothing else (the dashboards only query).

Each is written to ``--out`` (a volume the recorder and Grafana mount read-only; the recorder reads
``INFLUX_TOKEN_FILE``, Grafana's datasource ``$__file{…}``). A token file that exists is kept (run it again and
nothing changes); a missing one is made again, its old authorization (same description) deleted first.
InfluxDB 2 chooses token values itself, which is why they travel as files and not through ``.env``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.accounts import write_private

#: What each token is for: file name, description in InfluxDB (finds it again), the one action it may do.
TOKENS: tuple[tuple[str, str, str], ...] = (
    ("recorder.token", "gridlb recorder: write the grid bucket", "write"),
    ("grafana.token", "gridlb grafana: read the grid bucket", "read"),
)


def bucket_permissions(action: str, org_id: str, bucket_id: str) -> list[Any]:
    """One permission: ``action`` (``read`` or ``write``) on one bucket of one organisation."""
    from influxdb_client.domain.permission import Permission
    from influxdb_client.domain.permission_resource import PermissionResource

    if action not in ("read", "write"):
        raise ValueError(f"action must be read or write, not {action!r}")
    return [Permission(action=action, resource=PermissionResource(type="buckets", id=bucket_id, org_id=org_id))]


def ensure_tokens(url: str, admin_token: str, org: str, bucket: str, out: Path) -> list[str]:
    """Create the missing token files; returns the names of those made now."""
    from influxdb_client import InfluxDBClient
    from influxdb_client.domain.authorization import Authorization

    made = []
    with InfluxDBClient(url=url, token=admin_token, org=org, timeout=10_000) as client:
        orgs = client.organizations_api().find_organizations(org=org)
        if not orgs:
            raise RuntimeError(f"no organisation {org!r} in {url}")
        found = client.buckets_api().find_bucket_by_name(bucket)
        if found is None:
            raise RuntimeError(f"no bucket {bucket!r} in {url}")
        auths = client.authorizations_api()
        for name, description, action in TOKENS:
            path = out / name
            if path.exists() and path.read_text().strip():
                continue
            for old in auths.find_authorizations(org_id=orgs[0].id):
                if old.description == description:
                    auths.delete_authorization(old)
            created = auths.create_authorization(authorization=Authorization(
                org_id=orgs[0].id, description=description,
                permissions=bucket_permissions(action, orgs[0].id, found.id)))
            write_private(path, created.token + "\n")
            path.chmod(0o644)  # (read by the recorder's and Grafana's users, in volumes only they mount)
            made.append(name)
    return made


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.influx_tokens", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("INFLUX_URL", "http://influxdb:8086"))
    parser.add_argument("--org", default=os.environ.get("INFLUX_ORG", "gridlb"))
    parser.add_argument("--bucket", default=os.environ.get("INFLUX_BUCKET", "gridlb"))
    parser.add_argument("--out", type=Path, default=Path("/influx-tokens"))
    args = parser.parse_args(argv)
    admin = os.environ.get("INFLUXDB_ADMIN_TOKEN", "")
    if not admin:
        print("error: INFLUXDB_ADMIN_TOKEN is not set", file=sys.stderr)
        return 2
    try:
        made = ensure_tokens(args.url, admin, args.org, args.bucket, args.out)
    except Exception as exc:  # a one-shot: say what failed and exit non-zero (compose then starts nothing after it)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"influx tokens in {args.out}: " + (", ".join(made) + " made" if made else "all present"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
