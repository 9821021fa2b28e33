"""Private VictoriaMetrics and Prometheus servers on free loopback ports, for tests and benchmarks.

Like :class:`broker.local.LocalBroker` for Mosquitto: each writes its own config and data into a work
directory, listens on 127.0.0.1 only, and every wait is bounded.

:class:`VictoriaMetrics` (Debian ``victoria-metrics``) accepts influxdb-client v2 writes at ``/api/v2/write``
(token, org and bucket are ignored) and stores each field as the metric ``<measurement>_<field>`` with the
tags as labels (string fields as 0). Reads go through ``/api/v1/export`` (raw samples). New data becomes
searchable only after an in-memory flush (several seconds); the query helpers call ``/internal/force_flush``
first and still poll with a bound.

:class:`PrometheusServer` (Debian ``prometheus``) writes a scrape config for the given jobs, starts
``prometheus`` with its own TSDB directory and queries its HTTP API. Prometheus applies new targets at most
every 5 s (its scrape manager's reload interval), so the first samples are visible about 5.5 s after start
whatever the scrape interval: poll with :meth:`PrometheusServer.wait_for`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker.local import find_free_port
from grid_runtime.lifecycle import file_tail, find_executable, stop_process

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
             "-search.latencyOffset=1s", "-retentionPeriod=100y", "-loggerLevel=WARN",
             # the benchmark counts every series (half a million with ids as tags) and their samples
             "-search.maxSeries=10000000", "-search.maxUniqueTimeseries=10000000"],
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

    def series_by_metric(self, match: str = '{__name__=~".+"}') -> dict[str, int]:
        """Distinct series per metric name (``<measurement>_<field>``) matching ``match``, all time, counted
        from the series themselves (``/api/v1/series``, one metric name at a time): exact, unlike
        ``/api/v1/series/count`` and the per-day ``/api/v1/status/tsdb``, which VictoriaMetrics documents as
        possibly higher than the truth."""
        self.flush()
        query = urllib.parse.urlencode({"match[]": match, "start": "0"})
        names = json.loads(self._get(f"/api/v1/label/__name__/values?{query}", timeout=120))["data"]
        counts: dict[str, int] = {}
        for name in names:
            query = urllib.parse.urlencode({"match[]": f'{{__name__="{name}"}}', "start": "0"})
            try:
                series = json.loads(self._get(f"/api/v1/series?{query}", timeout=300))["data"]
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"{name}: {exc.code} {exc.read()[:500]!r}") from exc
            counts[name] = len({json.dumps(labels, sort_keys=True) for labels in series})
        return counts

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


# ----------------------------------------------------------------------------------------------- /metrics pages
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



# ----------------------------------------------------------------------------------------------- Prometheus
_FALLBACK_BINARIES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")

#: One instant-vector sample as the HTTP API returns it: {"metric": {...}, "value": [ts, "1.5"]}.
Sample = dict[str, Any]


class PromQueryError(AssertionError):
    """The query was refused (bad PromQL) or the HTTP API failed; the message has Prometheus's error."""


def find_prometheus() -> str:
    """Path of the ``prometheus`` binary (``$PROMETHEUS_BIN``, ``PATH``, ``/usr/bin/prometheus``)."""
    return find_executable("prometheus", "PROMETHEUS_BIN", _FALLBACK_BINARIES,
                           "install it (Debian: apt-get install prometheus)")


def value(sample: Sample) -> float:
    return float(sample["value"][1])


class PrometheusServer:
    """A private Prometheus scraping ``jobs`` (job name -> ``host:port`` targets) every ``interval``."""

    def __init__(self, work_dir: Path, jobs: Mapping[str, Sequence[str]], *, interval: str = "1s",
                 rule_files: Sequence[Path] = (), binary: str | None = None, start_timeout: float = 20.0) -> None:
        self.work_dir = work_dir
        self.jobs = {name: list(targets) for name, targets in jobs.items()}
        self.interval = interval
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.binary = binary or find_prometheus()
        self.start_timeout = start_timeout
        self.port = 0
        self.config_file = work_dir / "prometheus.yml"
        self.log_file = work_dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": name, "static_configs": [{"targets": targets}]}
                               for name, targets in self.jobs.items()],
        }

    def start(self) -> PrometheusServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        for attempt in range(3):  # a free port can be taken between find_free_port() and the bind
            self.port = find_free_port()
            with open(self.log_file, "ab") as log:
                self._proc = subprocess.Popen(
                    [self.binary, f"--config.file={self.config_file}",
                     f"--storage.tsdb.path={self.work_dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"],
                    cwd=self.work_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return self
            code = self._proc.poll()
            self.stop()
            if attempt == 2 or code is None or "address already in use" not in self.log_tail():
                raise RuntimeError(f"prometheus not ready on {self.url} after {self.start_timeout} s "
                                   f"(exit code {code})\n--- log ---\n{self.log_tail()}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 10.0)
            self._proc = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return file_tail(self.log_file, lines)

    # --- HTTP API ------------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; :class:`PromQueryError` if it is not a success."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10.0) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400 bad_data, 422 execution error: the body says why
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PromQueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Instant query: the samples of an instant vector (a scalar result is returned as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[Sample] = data["result"]
        return result

    def query_range(self, expr: str, seconds: float, step: str = "2s") -> list[Sample]:
        """Range query over the last ``seconds`` (what a Grafana time-series panel runs): one series per
        result row, ``values`` holding its samples."""
        end = time.time()
        data = self.api("query_range", query=expr, start=f"{end - seconds:.3f}", end=f"{end:.3f}", step=step)
        result: list[Sample] = data["result"]
        return result

    def wait_for(self, expr: str, predicate: Callable[[list[Sample]], bool] = bool,
                 timeout: float = 20.0, what: str = "") -> list[Sample]:
        """Poll ``expr`` (every 0.25 s, at most ``timeout`` s) until ``predicate(result)`` holds."""
        deadline = time.monotonic() + timeout
        result: list[Sample] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what or expr}: not satisfied after {timeout} s; last result {result}")
            time.sleep(0.25)

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]
