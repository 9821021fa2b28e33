"""One way every bench saves its figures: the machine's facts, the arguments it ran with, and its results."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from balancer import NATIVE
from grid_protocol import NATIVE as PROTOCOL_NATIVE


def machine() -> dict[str, Any]:
    """What a figure depends on besides the code: cores, Python, OS, and the load average at save time (the
    cores are shared, so a throughput or latency figure without it says little)."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average": os.getloadavg()}


def builds() -> dict[str, str]:
    """Which modules ran compiled (``grid_runtime.native``): a figure of the compiled code is not one of the
    interpreted."""
    return {"core": NATIVE.status, "contract": PROTOCOL_NATIVE.status}


def builds_line() -> str:
    """:func:`builds` as the benches print it (``balancer core: ...`` first: tests read that prefix)."""
    built = builds()
    return f"balancer core: {built['core']}; the contract's codec and topics: {built['contract']}"


def save_json(path: Path, args: argparse.Namespace, **sections: Any) -> None:
    """Write ``{"machine", "args", **sections}`` to ``path`` (parents created) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **sections}
    path.write_text(json.dumps(doc, indent=2))
    print(f"saved {path}")
