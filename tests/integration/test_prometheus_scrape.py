"""A real Prometheus scrapes the real services, and every dashboard query runs against it.

One scenario for the whole module (starting it costs ~10 s, mostly Prometheus's first target reload):
a private Mosquitto, ``python -m balancer``, ``python -m substation_agents`` (A, B, C),
``python -m ev_clients fleet``, ``python -m monitoring.recorder`` and ``python -m api``, each serving
``/metrics`` on a free loopback port (``METRICS_PORT``; the API on its own port), two refused EV
requests (so the refusal metrics exist), and ``prometheus`` (Debian package) scraping them every
second with the project's alert rules loaded, job names as in monitoring/prometheus/prometheus.yml.
There is no InfluxDB on this machine: the recorder writes to a closed port, so its points are retried
(its metrics exist, ``points_written`` stays 0) and the Flux queries are checked against the
recorder's schema table instead of being run.

The tests query Prometheus's HTTP API and assert real values; the dashboard test extracts every PromQL
expression of ``monitoring/grafana/dashboards/*.json`` (Grafana variables substituted), runs it and
requires data. Flux queries (InfluxDB datasource) are checked against the recorder's schema table.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from probe import Probe, Service, start_balancer
from prom import PrometheusServer, PromQueryError, Sample, value

from broker.accounts import SERVICE_ACCOUNTS
from broker.local import LocalBroker, find_free_port, find_mosquitto
from grid_protocol.topics import Topics
from monitoring.grafana_dashboards import PROBLEM_LISTS
from monitoring.recorder.schema import SCHEMA

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yml"
SECRET = "test-secret"
#: kW, as the agents are configured; the balancer and the agents report watts.
CAPACITY_KW = {"A": 60, "B": 45, "C": 30}
SUBSTATIONS = ",".join(f"{sid}:{kw}" for sid, kw in CAPACITY_KW.items())
EVS = 40
#: Jobs (names as in monitoring/prometheus/prometheus.yml): every service of the stack runs here.
JOBS = ("balancer", "substation_agents", "ev_clients", "recorder", "api")
#: Grafana's variables as the dashboards use them, and what a 1 s scrape interval needs instead.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "5s", "$__range_s": "60", "$__range": "1m",
                     "$substation": ".*", "$topk": "10"}


@dataclass
class Scenario:
    broker: LocalBroker
    prometheus: PrometheusServer
    services: dict[str, Service]

    def logs(self) -> str:
        parts = [f"--- {name} ---\n{svc.log()[-3000:]}" for name, svc in self.services.items()]
        return "\n".join([*parts, f"--- prometheus ---\n{self.prometheus.log_tail()}"])


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    work = tmp_path_factory.mktemp("prometheus-scrape")
    ev_ids = [f"EV_{i:04d}" for i in range(1, EVS + 1)] + ["EV_1234"]
    broker = LocalBroker(work / "broker", substation_ids=tuple(CAPACITY_KW), ev_ids=ev_ids,
                         services=SERVICE_ACCOUNTS, secret=SECRET, mosquitto_bin=find_mosquitto())
    services: dict[str, Service] = {}
    prometheus: PrometheusServer | None = None
    try:
        broker.start()
        ports = {job: find_free_port() for job in JOBS}
        services["balancer"] = start_balancer(broker, work, METRICS_PORT=str(ports["balancer"]))
        services["substation_agents"] = Service(
            "substation_agents", broker, work, SUBSTATIONS=SUBSTATIONS, MQTT_ACCOUNT_SECRET=SECRET,
            SUBSTATION_INTERVAL_S="0.2", SIM_SPEEDUP="600", METRICS_PORT=str(ports["substation_agents"]))
        # Fast simulated time: sessions end within seconds, so completions and queue waits are observed.
        services["ev_clients"] = Service(
            "ev_clients", broker, work, "fleet", "--evs", str(EVS), "--rate", "8", "--speedup", "600",
            "--report-every", "0", MQTT_ACCOUNT_SECRET=SECRET, LOG_LEVEL="WARNING",
            METRICS_PORT=str(ports["ev_clients"]))
        # No InfluxDB here: the recorder's writes go to a port nobody listens on (retried, never written).
        services["recorder"] = Service(
            "monitoring.recorder", broker, work,
            MQTT_USERNAME="observer", MQTT_PASSWORD=broker.password_for("observer"),
            INFLUX_URL=f"http://127.0.0.1:{find_free_port()}", INFLUX_TIMEOUT_S="1", RECORDER_BACKOFF_MAX_S="1",
            RECORDER_SHUTDOWN_TIMEOUT_S="0", METRICS_PORT=str(ports["recorder"]))
        services["api"] = Service("api", broker, work, MQTT_USERNAME="api", MQTT_PASSWORD=broker.password_for("api"),
                                  API_HOST="127.0.0.1", API_PORT=str(ports["api"]))
        prometheus = PrometheusServer(work / "prometheus", {job: [f"127.0.0.1:{port}"] for job, port in ports.items()},
                                      interval="1s", rule_files=[ALERTS]).start()
        _send_refused_requests(broker, f"http://127.0.0.1:{ports['balancer']}/metrics")
        _get(f"http://127.0.0.1:{ports['api']}/health", timeout=15.0)  # an API request for its request metrics
        yield Scenario(broker, prometheus, services)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for svc in reversed(list(services.values())):
            svc.stop()
        broker.stop()


def _send_refused_requests(broker: LocalBroker, balancer_metrics: str) -> None:
    """One request no substation could ever give and one malformed payload, as EV_1234: the balancer
    answers both ``rejected`` (so ``rejected`` decisions and refused payloads have series)."""
    # The balancer has subscribed and knows every capacity once its /metrics shows each substation
    # online. (Not watched over MQTT as observer: the recorder uses that account, one connection each.)
    wanted = [f'gridlb_substation_online{{region="default",substation="{sid}"}} 1.0' for sid in CAPACITY_KW]
    deadline = time.monotonic() + 20.0
    while not all(line in _get(balancer_metrics, timeout=10.0).decode() for line in wanted):
        assert time.monotonic() < deadline, "the balancer did not see every substation online in 20 s"
        time.sleep(0.2)
    topics = Topics()
    with Probe(broker, "EV_1234", topics.assignment("EV_1234")) as ev:
        ev.publish(topics.request("EV_1234"), {"ev_id": "EV_1234", "requested_kw": 500, "min_kw": 500,
                                                  "duration_minutes": 60})
        ev.publish(topics.request("EV_1234"), b'{"ev_id": "EV_1234", "requested_kw": NaN}')
        answers = ev.wait_for(lambda m: True, count=2, timeout=15.0, what="answers")
        assert [a.json()["status"] for a in answers] == ["rejected", "rejected"], [a.payload for a in answers]


def _get(url: str, timeout: float) -> bytes:
    """GET ``url``, retrying (bounded) while the server is not listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5.0) as response:
                body: bytes = response.read()
                return body
        except (urllib.error.URLError, OSError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _by(samples: list[Sample], label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): value(s) for s in samples}


def _check(scenario: Scenario, condition: bool, message: str) -> None:
    assert condition, f"{message}\n{scenario.logs()}"


# --- scraping ---------------------------------------------------------------------------------------


def test_every_service_is_scraped(scenario: Scenario) -> None:
    prom = scenario.prometheus
    try:
        up = prom.wait_for("up", lambda r: _by(r, "job") == dict.fromkeys(JOBS, 1.0), timeout=30.0,
                           what="every service up")
    except AssertionError as exc:
        _check(scenario, False, f"{exc}\ntargets: {prom.targets()}")
    assert len(up) == len(JOBS)
    healthy = {t["labels"]["job"]: t["health"] for t in prom.targets()}
    assert healthy == dict.fromkeys(JOBS, "up")


def test_capacity_the_balancer_reports_is_what_the_agents_announce(scenario: Scenario) -> None:
    prom = scenario.prometheus
    expected = {sid: kw * 1000.0 for sid, kw in CAPACITY_KW.items()}
    agents = prom.wait_for('gridlb_agent_capacity_watts{job="substation_agents"}',
                           lambda r: _by(r, "substation") == expected, timeout=30.0, what="agent capacities")
    balancer = prom.wait_for('gridlb_substation_capacity_watts{job="balancer"}',
                             lambda r: _by(r, "substation") == expected, timeout=30.0, what="balancer capacities")
    assert _by(balancer, "substation") == _by(agents, "substation") == expected
    online = prom.wait_for('gridlb_substation_online{job="balancer"}',
                           lambda r: _by(r, "substation") == dict.fromkeys(CAPACITY_KW, 1.0), timeout=15.0)
    assert len(online) == len(CAPACITY_KW)


def test_decisions_grow_while_the_fleet_charges(scenario: Scenario) -> None:
    prom = scenario.prometheus
    assigned = 'sum(gridlb_decisions_total{job="balancer", outcome="assigned"})'
    first = value(prom.wait_for(assigned, lambda r: bool(r) and value(r[0]) > 0, timeout=30.0)[0])
    later = value(prom.wait_for(assigned, lambda r: value(r[0]) > first, timeout=30.0,
                                what="assigned decisions to grow")[0])
    assert later > first
    # the EVs saw the answers the balancer counted
    answers = _by(prom.wait_for('gridlb_ev_answers_total{job="ev_clients", status="assigned"}',
                                lambda r: bool(r) and value(r[0]) > 0, timeout=15.0), "status")
    assert answers["assigned"] > 0
    rejected = _by(prom.wait_for('gridlb_decisions_total{job="balancer", outcome="rejected"}', timeout=15.0),
                   "reason")
    assert rejected.get("exceeds_capacity", 0) >= 1, rejected
    refused = prom.wait_for('gridlb_rejected_payloads_total{job="balancer", kind="ev_request"}', timeout=15.0)
    assert sum(value(s) for s in refused) >= 1
    latency = prom.wait_for("gridlb_decision_latency_seconds_count", lambda r: bool(r) and value(r[0]) > 0,
                            timeout=15.0)
    assert value(latency[0]) >= first


def test_every_service_reports_its_mqtt_connections(scenario: Scenario) -> None:
    prom = scenario.prometheus
    wanted = {("balancer", "balancer"), ("recorder", "recorder"), ("api", "api"),
              *(("substation_agents", sid) for sid in CAPACITY_KW)}
    connected = prom.wait_for("gridlb_mqtt_connected == 1", lambda r: wanted <= {
        (s["metric"]["job"], s["metric"]["client"]) for s in r}, timeout=20.0, what="MQTT connections")
    assert wanted <= {(s["metric"]["job"], s["metric"]["client"]) for s in connected}


def test_alert_rules_load_and_evaluate_against_real_metrics(scenario: Scenario) -> None:
    prom = scenario.prometheus

    def evaluated(rules: list[dict[str, Any]]) -> bool:
        return bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)

    deadline = time.monotonic() + 15.0
    rules = prom.rules()
    while not evaluated(rules) and time.monotonic() < deadline:
        time.sleep(0.25)
        rules = prom.rules()
    assert evaluated(rules), rules
    assert {r["name"] for r in rules} >= {"SubstationOverloaded", "BalancerDown", "MqttDisconnected"}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    firing = {r["name"] for r in rules for a in r.get("alerts", []) if a["state"] == "firing"}
    assert firing & {"BalancerDown", "SubstationOffline", "SubstationOverloaded", "MqttDisconnected"} == set()


# --- dashboards --------------------------------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows keep their panels inside


def _targets(datasource_type: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(dashboard file, panel title, target) of every target of that datasource type."""
    found = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(doc["panels"]):
            for target in panel.get("targets", []):
                ds = target.get("datasource") or panel.get("datasource") or {}
                if ds.get("type") == datasource_type:
                    found.append((path.name, panel["title"], target))
    return found


def _substitute(expr: str, variables: dict[str, str] = GRAFANA_VARIABLES) -> str:
    for variable, replacement in variables.items():  # $__range_s before $__range
        expr = expr.replace(variable, replacement)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_queries(variables: dict[str, str] = GRAFANA_VARIABLES) -> list[tuple[str, str, str, bool]]:
    """(where, panel title, PromQL, instant) of every Prometheus target and query variable (``$name`` as the
    title, instant), Grafana variables substituted."""
    queries = [(f"{name}: {title}", title, _substitute(t["expr"], variables), bool(t.get("instant")))
               for name, title, t in _targets("prometheus")]
    for path in DASHBOARDS:
        for var in json.loads(path.read_text(encoding="utf-8")).get("templating", {}).get("list", []):
            if var.get("type") == "query":
                definition = var.get("definition") or var["query"]
                match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition)
                assert match, f"{path.name}: variable {var['name']}: unsupported query {definition!r}"
                queries.append((f"{path.name}: ${var['name']}", f"${var['name']}",
                                f"count by ({match[2]}) ({match[1]})", True))
    return queries


def test_dashboards_have_promql_and_flux_targets() -> None:
    assert [p.name for p in DASHBOARDS] == ["balancer.json", "ev-sessions.json", "grid-overview.json",
                                            "pipeline-health.json"]
    assert len(_targets("prometheus")) >= 40
    assert len(_targets("influxdb")) >= 4


def test_every_dashboard_promql_query_parses_and_returns_data(scenario: Scenario) -> None:
    """Every query runs; every one returns data except the lists of problems (offline, stale, draining
    substations, disconnected clients), empty in this healthy scenario: test_dashboards_at_scale.py makes
    those problems happen at 1,000 substations and requires their data there."""
    prom = scenario.prometheus
    queries = dashboard_queries()
    assert len(queries) >= 50, "fewer queries than the dashboards have: extraction broken?"
    errors: dict[str, str] = {}
    deadline = time.monotonic() + 30.0  # histograms need observations in the window, rates two samples
    pending = [(where, expr) for where, _title, expr, _instant in queries]
    may_be_empty = {where for where, title, _expr, _instant in queries if title in PROBLEM_LISTS}
    while pending:
        still = []
        for where, expr in pending:
            try:
                result = prom.query(expr)
            except PromQueryError as exc:
                errors[f"{where}: {expr}"] = str(exc)
                continue
            if not result and where not in may_be_empty:
                still.append((where, expr))
        pending = still
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    missing = {f"{where}: {expr}": "no data" for where, expr in pending}
    assert errors == {}, "queries Prometheus refused"
    _check(scenario, missing == {}, f"queries without data: {json.dumps(missing, indent=1)}")


# Flux: names used in filters and group columns must exist in the recorder's schema.
_MEASUREMENT = re.compile(r'r(?:\._measurement|\["_measurement"\])\s*==\s*"([^"]+)"')
_FIELD = re.compile(r'r(?:\._field|\["_field"\])\s*==\s*"([^"]+)"')
_TAG = re.compile(r'r(?:\.(\w+)|\["(\w+)"\])\s*==\s*"')
_COLUMNS = re.compile(r"columns:\s*\[([^\]]*)\]")
_FLUX_BUILTIN_COLUMNS = {"_measurement", "_field", "_value", "_time", "_start", "_stop"}


def test_flux_queries_use_only_measurements_fields_and_tags_of_the_recorder_schema() -> None:
    targets = _targets("influxdb")
    assert targets
    problems = []
    for name, title, target in targets:
        query: str = target["query"]
        where = f"{name}: {title}"
        if "from(bucket: v.defaultBucket)" not in query or "range(start: v.timeRangeStart" not in query:
            problems.append(f"{where}: must read v.defaultBucket over the dashboard's time range")
        measurements = set(_MEASUREMENT.findall(query))
        if len(measurements) != 1 or not measurements <= set(SCHEMA):
            problems.append(f"{where}: measurement {sorted(measurements)} not one of {sorted(SCHEMA)}")
            continue
        spec = SCHEMA[measurements.pop()]
        for field in _FIELD.findall(query):
            if field not in spec.fields:
                problems.append(f"{where}: {spec.name} has no field {field!r} ({sorted(spec.fields)})")
        tags = {a or b for a, b in _TAG.findall(query)} - _FLUX_BUILTIN_COLUMNS
        # After a pivot on _field the fields are columns too (an EV's answers: ev_id is a field, not a tag).
        known = set(spec.tags) | (set(spec.fields) if "pivot(" in query else set())
        for tag in sorted(tags - known):
            problems.append(f"{where}: {spec.name} has no tag {tag!r} ({list(spec.tags)})")
        for columns in _COLUMNS.findall(query):
            for column in re.findall(r'"([^"]+)"', columns):
                if column not in known | _FLUX_BUILTIN_COLUMNS:
                    problems.append(f"{where}: {spec.name} has no column {column!r}")
    assert problems == []
