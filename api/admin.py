"""``python -m api.admin``: add and remove substations and EVs while the grid runs, through the HTTP API.

The same operator endpoints as ``curl`` (``POST``/``DELETE /substations``, ``/evs``), so every step an operator
relies on happens: the account is created in the broker (its password printed once), or the substation is
drained, its account revoked, its sessions moved and the balancer made to forget it.

    source .run/credentials.env                      # API_URL and API_TOKEN (the operator's)
    python -m api.admin substation add east --capacity 300
    python -m api.admin substation remove east
    python -m api.admin ev add EV_9000
    python -m api.admin ev remove EV_9000

Exit codes: 0 done, 1 refused by the API (the problem's detail is printed), 2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m api.admin", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("API_URL", "http://127.0.0.1:8000"),
                        help="the API (default: $API_URL)")
    parser.add_argument("--token", default=None, help="an operator token (default: $API_TOKEN)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the API")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind, id_help in (("substation", "substation id, e.g. east"), ("ev", "EV id, e.g. EV_9000")):
        actions = kinds.add_parser(kind, help=f"{kind} accounts").add_subparsers(dest="action", required=True)
        add = actions.add_parser("add", help=f"create the {kind}'s broker account (password printed once)")
        add.add_argument("id", help=id_help)
        if kind == "substation":
            add.add_argument("--capacity", type=float, default=None,
                             help="kW, for the agent command printed (the agent reports it)")
        remove = actions.add_parser("remove", help=f"take the {kind} out of service and revoke its account")
        remove.add_argument("id", help=id_help)
        for leaf in (add, remove):  # (also after the subcommand)
            leaf.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                              help="print the API's JSON answer")
    return parser.parse_args(argv)


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
    token = args.token or os.environ.get("API_TOKEN")
    if not token:
        raise SystemExit("no operator token: pass --token or set API_TOKEN (source .run/credentials.env)")
    with httpx.Client(base_url=args.url, timeout=args.timeout,
                      headers={"Authorization": f"Bearer {token}"}) as http:
        return http.request(method, path, json=body)


def _python() -> str:
    """This interpreter, as the user would type it here (``.venv/bin/python`` from the project root)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    collection = "substations" if args.kind == "substation" else "evs"
    if args.action == "add":
        body: dict[str, Any] = {"substation_id" if args.kind == "substation" else "ev_id": args.id}
        if args.kind == "substation" and args.capacity is not None:
            body["capacity_kw"] = args.capacity
        method, path = "POST", f"/{collection}"
    else:
        body, method, path = {}, "DELETE", f"/{collection}/{args.id}"
    try:
        resp = _request(args, method, path, body or None)
    except httpx.HTTPError as exc:
        print(f"error: {args.url} did not answer: {exc}", file=sys.stderr)
        return 2
    data: dict[str, Any] = (resp.json() if resp.headers.get("content-type", "").endswith("json")
                            else {"detail": resp.text})
    if resp.status_code >= 400:
        print(f"refused ({resp.status_code}): {data.get('detail', data)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.action == "add":
        print(f"{args.kind} {args.id}: account {data['username']} created on {data['mqtt_url']}")
        print(f"password (shown once): {data['password']}")
        command = str(data["command"]).replace("python -m ", f"{_python()} -m ")
        print(f"{'start its agent' if args.kind == 'substation' else 'it'}: {command}")
    elif args.kind == "substation":
        print(f"substation {args.id} removed: account {'revoked' if data['account_removed'] else 'did not exist'}, "
              f"balancer {data['balancer']}, {data['sessions_moved']} session(s) moved"
              + (f" ({data['detail']})" if data.get("detail") else ""))
    else:
        released: dict[str, Any] | None = data.get("released")
        print(f"EV {args.id} removed: account {'revoked' if data['account_removed'] else 'did not exist'}"
              + (f", its request/session ended ({released['status']})" if released else ", nothing open"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
