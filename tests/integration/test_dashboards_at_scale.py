"""The dashboards at 1,000 substations: a real balancer fed by 1,000 simulated substations, scraped by a real
Prometheus; every dashboard query runs against it as Grafana would run it.

The ``loadtest`` account plays the substations (retained status, telemetry every second: it may publish both
for any substation), with problems made on purpose: some offline (status), some silent (stale), some drained
by an operator (control, as ``api``), some overloaded (load above capacity). Then:

* the balancer's scrape carries ~15 series per substation (the figure docs/observability.md quotes);
* every PromQL query of the dashboards runs, as a range query over the last minute like a Grafana panel;
* every query over per-substation metrics returns data, the lists of problems included (they are empty in
  the small healthy scenario of test_prometheus_scrape.py);
* no panel returns more than ``$topk`` series per query, over the whole range (the ``@ end()`` top-k keeps
  the set stable), except the problem lists, which return exactly the substations that have the problem.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from probe import Probe, Service, start_balancer
from prom import PrometheusServer, value
from test_prometheus_scrape import dashboard_queries

from broker.accounts import SERVICE_ACCOUNTS
from broker.local import LocalBroker, find_free_port, find_mosquitto
from grid_protocol.topics import Topics
from monitoring.grafana_dashboards import PROBLEM_LISTS

pytestmark = pytest.mark.integration

N = 1_000
TOPK = 10
SIDS = [f"S{i:04d}" for i in range(1, N + 1)]
OFFLINE, STALE, DRAINED, OVERLOADED = SIDS[:4], SIDS[4:8], SIDS[8:10], SIDS[10:13]
CAPACITY_KW = 1000.0
VARIABLES = {"$__rate_interval": "20s", "$__interval": "5s", "$__range_s": "60", "$__range": "1m",
             "$substation": ".*", "$topk": str(TOPK)}


class Substations:
    """1,000 substations as ``loadtest``: retained status, then telemetry every second from a thread."""

    def __init__(self, broker: LocalBroker) -> None:
        self.topics = Topics()
        self.probe = Probe(broker, "loadtest")
        self.silent = set(OFFLINE)
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        for sid in SIDS:
            self.probe.publish(self.topics.substation_status(sid), {"state": "online", "substation_id": sid,
                                                                    "ts": time.time(), "capacity_kw": CAPACITY_KW},
                               retain=True)
        self.tick()
        for sid in OFFLINE:  # offline after one telemetry: known to the balancer, then gone
            self.probe.publish(self.topics.substation_status(sid), {"state": "offline", "substation_id": sid,
                                                                    "ts": time.time()}, retain=True)
        self._thread.start()

    def tick(self) -> None:
        self.seq += 1
        for n, sid in enumerate(SIDS):
            if sid in self.silent:
                continue
            base = CAPACITY_KW * (1.3 if sid in OVERLOADED else 0.2 + 0.6 * ((n * 37) % 100) / 100)
            body = {"substation_id": sid, "ts": time.time(), "seq": self.seq, "capacity_kw": CAPACITY_KW,
                    "load_kw": base, "base_load_kw": base, "ev_load_kw": 0.0, "active_sessions": 0}
            self.probe.client.publish(self.topics.telemetry(sid), json.dumps(body), 0)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.probe.close()


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrometheusServer, Service]]:
    work = tmp_path_factory.mktemp("dashboards-at-scale")
    broker = LocalBroker(work / "broker", substation_ids=(), ev_ids=(), services=SERVICE_ACCOUNTS,
                         secret="scale", mosquitto_bin=find_mosquitto()).start()
    subs: Substations | None = None
    balancer: Service | None = None
    prometheus: PrometheusServer | None = None
    try:
        port = find_free_port()
        balancer = start_balancer(broker, work, METRICS_PORT=str(port), BALANCER_STALE_AFTER_S="3",
                                  LOG_LEVEL="WARNING")
        # 5 s as in the compose config: the balancer's 15,000-series page takes 0.3-1.6 s on a loaded machine.
        prometheus = PrometheusServer(work / "prometheus", {"balancer": [f"127.0.0.1:{port}"]}, interval="5s").start()
        subs = Substations(broker)
        time.sleep(1.0)  # the balancer subscribes
        subs.start()
        prometheus.wait_for('count(gridlb_substation_online{job="balancer"})', lambda r: bool(r) and value(r[0]) == N,
                            timeout=90, what=f"{N} substations scraped")
        with Probe(broker, "api", subs.topics.balancer_control_result()) as api:  # known now: drains are accepted
            for sid in DRAINED:
                api.publish(subs.topics.balancer_control(), {"action": "drain", "substation_id": sid,
                                                             "request_id": f"drain-{sid}"})
            results = api.wait_for(lambda m: True, count=len(DRAINED), timeout=15, what="control results")
            assert all(r.json()["ok"] for r in results), [r.payload for r in results]
        subs.silent |= set(STALE)  # silent from now on: stale after BALANCER_STALE_AFTER_S
        prometheus.wait_for('count(gridlb_substation_stale{job="balancer"} == 1)',
                            lambda r: bool(r) and value(r[0]) >= len(OFFLINE) + len(STALE), timeout=30,
                            what="stale substations")
        prometheus.wait_for('count(gridlb_substation_draining{job="balancer"} == 1)',
                            lambda r: bool(r) and value(r[0]) == len(DRAINED), timeout=30, what="drained substations")
        time.sleep(10.0)  # two more scrapes: rates and ranges have samples
        yield prometheus, balancer
    finally:
        if subs is not None:
            subs.close()
        if prometheus is not None:
            prometheus.stop()
        if balancer is not None:
            balancer.stop()
        broker.stop()


def test_the_balancer_scrape_has_15_series_per_substation(grid: tuple[PrometheusServer, Service]) -> None:
    prom, _ = grid
    samples = value(prom.wait_for('scrape_samples_scraped{job="balancer"}', timeout=15)[0])
    per_substation = value(prom.query('count({job="balancer", substation=~".+"})')[0])
    duration = value(prom.query('scrape_duration_seconds{job="balancer"}')[0])
    print(f"\nbalancer scrape at {N} substations: {samples:.0f} samples ({per_substation:.0f} per-substation), "
          f"{duration * 1000:.0f} ms")
    assert per_substation == 15 * N
    assert samples < 15 * N + 200  # the rest is bounded by outcomes, reasons and the process


def _series(result: list[dict[str, Any]]) -> set[str]:
    return {json.dumps(r["metric"], sort_keys=True) for r in result}


def test_every_dashboard_query_runs_bounded_at_1000_substations(grid: tuple[PrometheusServer, Service]) -> None:
    prom, balancer = grid
    problems: dict[str, str] = {}
    slowest: list[tuple[float, str]] = []
    for where, title, expr, instant in dashboard_queries(VARIABLES):
        started = time.perf_counter()
        result = prom.query(expr) if instant else prom.query_range(expr, 60, "5s")
        slowest.append((time.perf_counter() - started, where))
        per_substation = "gridlb_substation_" in expr or "gridlb_stale_telemetry" in expr
        if title.startswith("$"):  # a variable's values: every substation, by design
            if "substation" in expr and len(result) != N:
                problems[where] = f"{len(result)} values"
        elif title in PROBLEM_LISTS:
            if "stale" in expr:
                expected = set(STALE)  # online but silent: the offline ones are not listed again
            elif "draining" in expr:
                expected = set(DRAINED)
            elif "online" in expr:
                expected = set(OFFLINE)
            else:
                continue  # disconnected MQTT clients: none here
            if {r["metric"].get("substation") for r in result} != expected:
                problems[where] = f"{sorted(r['metric'].get('substation', '') for r in result)} != {sorted(expected)}"
        elif per_substation and not result:
            problems[where] = "no data"
        elif len(_series(result)) > TOPK:
            problems[where] = f"{len(_series(result))} series over the range (at most {TOPK})"
    slowest.sort(reverse=True)
    print(f"\nslowest queries at {N} substations: " + "; ".join(f"{s * 1000:.0f} ms {w}" for s, w in slowest[:3]))
    assert problems == {}, f"{json.dumps(problems, indent=1)}\n{balancer.log()[-2000:]}"
