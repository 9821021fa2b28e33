"""Test helper: a real Prometheus server (Debian package ``prometheus``) on a free loopback port.

:class:`PrometheusServer` writes a scrape config for the given jobs (``static_configs`` targets on
127.0.0.1), starts ``prometheus`` with its own TSDB directory, waits (bounded) until it is ready and
queries its HTTP API (``/api/v1/query``, ``/api/v1/targets``, ``/api/v1/rules``). Every wait is bounded.

Prometheus applies new targets at most every 5 s (its scrape manager's reload interval), so the first
samples are visible about 5.5 s after start whatever the scrape interval: poll with :meth:`wait_for`.
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

from broker.local import find_free_port
from grid_runtime.lifecycle import stop_process

_FALLBACK_BINARIES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")

#: One instant-vector sample as the HTTP API returns it: {"metric": {...}, "value": [ts, "1.5"]}.
Sample = dict[str, Any]


class PromQueryError(AssertionError):
    """The query was refused (bad PromQL) or the HTTP API failed; the message has Prometheus's error."""


def find_prometheus() -> str:
    """Path of the ``prometheus`` binary (``$PROMETHEUS_BIN``, ``PATH``, ``/usr/bin/prometheus``)."""
    for candidate in (os.environ.get("PROMETHEUS_BIN"), shutil.which("prometheus"), *_FALLBACK_BINARIES):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("prometheus binary not found ($PROMETHEUS_BIN, PATH, /usr/bin/prometheus); "
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
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

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
