"""``python -m balancer`` as a user calls it, without a broker: --help and bad settings end at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from broker.local import find_free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # A free port where nothing listens: were the balancer to start, it would retry there until the timeout.
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "BALANCER_", "GRID_", "LOG_"))}
    full.update(PYTHONPATH=str(ROOT), MQTT_HOST="127.0.0.1", MQTT_PORT=str(find_free_port()), **env)
    return subprocess.run([sys.executable, "-m", "balancer", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=10, check=False)


def test_help_prints_usage_and_does_not_start() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: python -m balancer" in result.stdout and "BALANCER_" in result.stdout


def test_unknown_argument_is_refused() -> None:
    result = _run("--port", "1884")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_invalid_setting_is_reported_without_a_traceback() -> None:
    result = _run(BALANCER_QUEUE_MAX="-1")
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and "queue_max" in result.stderr
    assert "Traceback" not in result.stderr
