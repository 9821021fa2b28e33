"""One way every bench saves its figures: the machine's facts, the arguments it ran with, and its results."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """What a figure depends on besides the code: cores, Python, OS, and the load average at save time (the
    cores are shared, so a throughput or latency figure without it says little)."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average": os.getloadavg()}


def save_json(path: Path, args: argparse.Namespace, **sections: Any) -> None:
    """Write ``{"machine", "args", **sections}`` to ``path`` (parents created) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **sections}
    path.write_text(json.dumps(doc, indent=2))
    print(f"saved {path}")
