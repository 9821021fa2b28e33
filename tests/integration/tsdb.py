"""Test helper: a private VictoriaMetrics (InfluxDB-compatible writes) on a free loopback port.

VictoriaMetrics accepts influxdb-client v2 writes at ``/api/v2/write`` (token, org and bucket are ignored)
and stores each field as the metric ``<measurement>_<field>`` with the tags as labels (string fields as 0).
Reads go through ``/api/v1/export`` (raw samples). New data becomes searchable only after an in-memory
flush (several seconds); the query helpers call ``/internal/force_flush`` first and still poll with a bound.
Every wait is bounded; the server listens on 127.0.0.1 only and keeps its data in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from probe import Service
from prometheus_client.parser import text_string_to_metric_families

from broker.local import LocalBroker, find_free_port
from grid_runtime.lifecycle import stop_process

VM_BIN = os.environ.get("VICTORIA_METRICS_BIN") or shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
Series = dict[str, Any]  # {"metric": {"__name__": ..., labels...}, "values": [...], "timestamps": [...]}


class VictoriaMetrics:
    """``VictoriaMetrics(tmp_path).start()``; :meth:`stop` and :meth:`start` again keep data dir and port."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "vm-data"
        self.port = port or find_free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "victoria-metrics.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> VictoriaMetrics:
        if not Path(VM_BIN).exists():
            raise FileNotFoundError(f"{VM_BIN} not found: install the Debian package victoria-metrics")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the child; closed by the OS when it exits)
        self.proc = subprocess.Popen(
            [VM_BIN, f"-storageDataPath={self.data_dir}", f"-httpListenAddr=127.0.0.1:{self.port}",
             "-search.latencyOffset=1s", "-retentionPeriod=100y", "-loggerLevel=WARN"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self._get("/health", timeout=1).strip() == b"OK":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"victoria-metrics not healthy within {timeout} s: {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: VictoriaMetrics flushes to disk), SIGKILL after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, timeout)
            self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def _get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body

    def flush(self) -> None:
        """Make everything ingested so far searchable now."""
        self._get("/internal/force_flush")

    def export(self, selector: str) -> list[Series]:
        """Raw samples of every series matching the PromQL ``selector`` (e.g. ``{__name__=~"ev_.*"}``)."""
        self.flush()
        query = urllib.parse.urlencode({"match[]": selector, "start": "0"})
        body = self._get(f"/api/v1/export?{query}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def wait_export(self, selector: str, done: Callable[[list[Series]], bool], timeout: float = 15.0) -> list[Series]:
        """Poll :meth:`export` until ``done(series)``; ``AssertionError`` with what was there after ``timeout``."""
        deadline = time.monotonic() + timeout
        series: list[Series] = []
        while True:
            series = self.export(selector)
            if done(series) or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if not done(series):
            raise AssertionError(f"{selector}: condition not met within {timeout} s; have "
                                 f"{[(s['metric'], s['values'][:10]) for s in series][:20]}")
        return series


def samples(series: list[Series], **labels: str) -> list[tuple[int, float]]:
    """(timestamp ms, value) of every sample of the series whose labels include ``labels``, time-ordered."""
    out = [(ts, v) for s in series if all(s["metric"].get(k) == v for k, v in labels.items())
           for ts, v in zip(s["timestamps"], s["values"], strict=True)]
    return sorted(out)


# --------------------------------------------------------------------------- the recorder under test
_METRICS_URL = re.compile(r"metrics_listening service=recorder url=(\S+)")


def start_recorder(broker: LocalBroker, log_dir: Path, vm: VictoriaMetrics, **env: str) -> Service:
    """``python -m monitoring.recorder`` as the read-only ``recorder``, writing to ``vm``, /metrics on a free port."""
    settings = {"MQTT_USERNAME": "recorder", "MQTT_PASSWORD": broker.password_for("recorder"),
                "INFLUX_URL": vm.url, "INFLUX_TOKEN": "test", "INFLUX_ORG": "test", "INFLUX_BUCKET": "test",
                "METRICS_PORT": "0", "RECORDER_FLUSH_INTERVAL_S": "0.2", "RECORDER_BACKOFF_MIN_S": "0.1",
                "RECORDER_BACKOFF_MAX_S": "1", "INFLUX_TIMEOUT_S": "2", "RECORDER_LOG_INTERVAL_S": "1"}
    settings.update(env)
    return Service("monitoring.recorder", broker, log_dir, **settings)


def recorder_ready(service: Service, timeout: float = 15.0) -> str:
    """Wait until the recorder is subscribed (logged ``mqtt_connected``) and return its /metrics URL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = service.log()
        match = _METRICS_URL.search(text)
        if match and "mqtt_connected" in text:
            time.sleep(0.3)  # the SUBACKs follow the CONNACK
            return match.group(1)
        if service.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"recorder not ready within {timeout} s:\n{service.log()[-3000:]}")


Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Metrics:
    """Every sample of a /metrics page, keyed by (sample name, labels)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in metrics.items() if n == name and want <= lbls)


def wait_metrics(url: str, done: Callable[[Metrics], bool], timeout: float = 15.0, what: str = "") -> Metrics:
    """Poll ``url`` until ``done(metrics)``; ``AssertionError`` with the recorder's counters after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if done(m):
            return m
        if time.monotonic() >= deadline:
            mine = {f"{n}{dict(lbl)}": v for (n, lbl), v in m.items() if n.startswith("gridlb_recorder")}
            raise AssertionError(f"recorder metrics: {what} not reached within {timeout} s: {mine}")
        time.sleep(0.1)
