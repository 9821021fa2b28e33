"""``python -m gridlb.preflight``: refuse to start docker compose with the example secrets.

``.env.example`` ships every secret as ``change-me-…``. Copied unchanged, the stack would run with passwords and
tokens anyone can read in the repository. docker compose runs this first (service ``preflight``) and starts
nothing else unless it passes: every variable named in ``GRIDLB_SECRETS`` must be set, must not start with
``change-me`` and must be at least 12 characters (InfluxDB wants 8 for its password; tokens should be longer).

    GRIDLB_SECRETS="API_TOKEN BALANCER_MQTT_PASSWORD" python -m gridlb.preflight

Exit 0: all good; 1: the bad ones are listed with how to make good ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

PLACEHOLDER = "change-me"
MIN_LENGTH = 12


def weak_secrets(names: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The names whose values are missing, a placeholder or too short, each with why."""
    problems = []
    for name in names:
        value = env.get(name, "")
        if not value:
            problems.append(f"{name} is not set")
        elif value.lower().startswith(PLACEHOLDER):
            problems.append(f"{name} still has the example value {value!r}")
        elif len(value) < MIN_LENGTH:
            problems.append(f"{name} is shorter than {MIN_LENGTH} characters")
    return problems


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    names = env.get("GRIDLB_SECRETS", "").split()
    if not names:
        print("preflight: GRIDLB_SECRETS names no variables to check", file=sys.stderr)
        return 1
    problems = weak_secrets(names, env)
    if problems:
        print("refusing to start: the secrets in .env must be your own\n  " + "\n  ".join(problems)
              + "\nmake one with: openssl rand -hex 24   (then edit .env and run docker compose up again)",
              file=sys.stderr)
        return 1
    print(f"preflight: {len(names)} secrets set")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
