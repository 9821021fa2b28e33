"""Fixtures shared by the integration modules (a module's own fixture of the same name overrides one here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from probe import AGENT_ENV, Service

from broker.local import LocalBroker


@pytest.fixture
def agents(broker: LocalBroker, tmp_path: Path) -> Iterator[Service]:
    """``python -m substation_agents`` for A and B (300 kW each) on ``broker``; at teardown it must stop
    cleanly (exit 0, no traceback in its log)."""
    proc = Service("substation_agents", broker, tmp_path, SUBSTATIONS="A:300,B:300", **AGENT_ENV)
    yield proc
    log = proc.log()
    assert proc.stop() == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
