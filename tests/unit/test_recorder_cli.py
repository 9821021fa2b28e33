"""``python -m monitoring.recorder``: help, bad settings exit 2, and the metrics it registers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitoring.recorder.cli import build, main
from monitoring.recorder.settings import RecorderSettings

ROOT = Path(__file__).resolve().parents[2]


def test_help_names_the_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "monitoring.recorder", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert "INFLUX_" in out and "RECORDER_" in out and "recorder" in out


def test_invalid_settings_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECORDER_BATCH_SIZE", "0")
    assert main([]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_build_registers_recorder_and_mqtt_metrics_on_the_given_registry() -> None:
    registry = CollectorRegistry()
    service = build(RecorderSettings(), registry)
    text = generate_latest(registry).decode()
    assert "gridlb_recorder_points_written_total 0.0" in text
    assert 'gridlb_mqtt_connected{client="recorder"} 0.0' in text
    assert "gridlb_recorder_write_latency_seconds_count 0.0" in text
    service.writer.sink.close()  # type: ignore[attr-defined]
