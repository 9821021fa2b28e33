"""The live page at grid scale (issue 15): time to first render, the event stream's bytes per second and the
browser's CPU, measured in headless Chromium against a real stack.

    python -m bench live-page [--substations 1000] [--regions 8] [--seconds 20] [--churn 1.0] [--interval 1]

A private Mosquitto, ``python -m balancer`` and ``python -m api`` (public reads, as under ``./gridctl run``);
``--substations`` simulated substations (:class:`SimulatedGrid`: the ``loadtest`` account plays them: a retained
status with a region, telemetry every ``--interval`` seconds) with problems made on purpose: some offline, some
silent (stale), some overloaded, some drained and some decommissioned by an operator (set up on a quiet grid).
Then the loads start moving: ``--churn`` is the share of substations whose load moves on every tick (1.0: every
one, as real agents' measured base load does; 0: a quiet grid).

Then Chromium opens the page and the figures are taken over ``--seconds`` of steady state:

* time to first render: navigation start to the first picture of the grid (``performance.now()`` in the page);
* event-stream bytes per second: ``gridlb_api_sse_bytes_total`` of the API (one client), beside what the former
  feed (the whole /status per update) would have sent for as many updates;
* the browser's CPU: CPU seconds per second of every Chromium process (``/proc``), and the renderer's main-thread
  busy time (DevTools ``Performance.getMetrics`` TaskDuration, ScriptDuration, Layout/RecalcStyle);
* the API's and the balancer's CPU per second over the same window, and the telemetry the API applied;
* the update latency: a substation's load changed, published at once, until its cell on the page shows it.

The page test at 1,000 substations (tests/integration/test_live_page_at_scale.py) plays the same grid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench import browser
from bench.bench_balancer import proc_cpu_s
from broker.accounts import SERVICE_ACCOUNTS
from broker.local import LocalBroker, find_free_port, find_mosquitto
from grid_protocol import Topics
from grid_runtime.lifecycle import stop_process

ROOT = Path(__file__).resolve().parents[1]
CAPACITY_KW = 1000.0
_ENV_PREFIXES = ("MQTT_", "EV_", "SUBSTATION", "SIM_", "BALANCER_", "GRID_", "LOG_", "METRICS_", "API_", "INFLUX_",
                 "RECORDER_")


def substation_ids(n: int) -> list[str]:
    return [f"S{i:04d}" for i in range(1, n + 1)]


def region_of(index: int, n: int, regions: int) -> str:
    """Contiguous blocks of ids per region (S0001.. in R01, ...), as a grid operator would number them."""
    return f"R{1 + (index * regions) // n:02d}"


def region_names(regions: int) -> list[str]:
    """Every region :func:`region_of` hands out."""
    return [f"R{k:02d}" for k in range(1, regions + 1)]


def _client(broker: LocalBroker, username: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{username}-{os.getpid()}-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(username, broker.password_for(username))
    c.max_inflight_messages_set(0)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


@dataclass
class SimulatedGrid:
    """``n`` substations played by the ``loadtest`` account: a retained ``online`` status with its region, then
    telemetry every ``interval_s`` from a thread. Problems: ``offline`` (an offline status after one telemetry),
    ``silent`` (no telemetry: stale), ``overloaded`` (load 1.3 times capacity); drains and decommissioning go
    through the API's operator endpoints (:meth:`Stack.drain`, :meth:`Stack.decommission`). ``churn``: the share
    of substations whose load moves on every tick."""

    broker: LocalBroker
    n: int
    regions: int = 8
    churn: float = 0.0
    interval_s: float = 1.0
    offline: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    overloaded: set[str] = field(default_factory=set)
    #: loads that do not move (the latency probe's)
    pinned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.topics = Topics()
        self.ids = substation_ids(self.n)
        self.region = {sid: region_of(i, self.n, self.regions) for i, sid in enumerate(self.ids)}
        #: each substation's load as a share of capacity when nothing moves (spread over 20-80 %)
        self.share = {sid: 0.2 + 0.6 * ((i * 37) % 100) / 100 for i, sid in enumerate(self.ids)}
        self.seq = 0
        self.client = _client(self.broker, "loadtest")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="simulated-grid")
        self._lock = threading.Lock()

    def load_kw(self, sid: str) -> float:
        if sid in self.overloaded:
            return CAPACITY_KW * 1.3
        share = self.share[sid]
        index = int(sid[1:])
        if self.churn > 0 and sid not in self.pinned and (index * 7919 + self.seq) % 1000 < self.churn * 1000:
            share += 0.02 * (((index + self.seq) % 5) - 2)  # a few kW up or down
        return round(CAPACITY_KW * share, 1)

    def status(self, sid: str, state: str) -> None:
        body = {"state": state, "substation_id": sid, "ts": time.time(), "capacity_kw": CAPACITY_KW,
                "region": self.region[sid]}
        self.client.publish(self.topics.for_region(self.region[sid]).substation_status(sid), json.dumps(body), 1,
                            retain=True)

    def start(self) -> SimulatedGrid:
        for sid in self.ids:
            self.status(sid, "online")
        self.tick(first=True)
        for sid in self.offline:
            self.status(sid, "offline")
        self._thread.start()
        return self

    def tick(self, first: bool = False) -> None:
        """One telemetry message per substation (the offline ones only in the ``first``)."""
        with self._lock:
            self.seq += 1
            now = time.time()
            for sid in self.ids:
                if sid in self.silent or (sid in self.offline and not first):
                    continue
                load = self.load_kw(sid)
                body = {"substation_id": sid, "ts": now, "seq": self.seq, "capacity_kw": CAPACITY_KW,
                        "load_kw": load, "base_load_kw": load, "ev_load_kw": 0.0, "active_sessions": 0}
                self.client.publish(self.topics.for_region(self.region[sid]).telemetry(sid), json.dumps(body), 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


# ---------------------------------------------------------------------------------------------- the stack
class Process:
    """``python -m <module>`` with a private environment, its output in a log file."""

    def __init__(self, module: str, broker: LocalBroker, log_dir: Path, **env: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        full.update(MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), LOG_FORMAT="text", PYTHONUNBUFFERED="1",
                    METRICS_PORT="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        full.update(env)
        self.log_path = log_dir / f"{module}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", module], env=full, cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


#: The operator token of the stack's API.
OPERATOR_TOKEN = "live-page-operator"


@dataclass
class Stack:
    broker: LocalBroker
    balancer: Process
    api: Process
    url: str
    http: httpx.Client  # with the operator's token

    def wait_for_grid(self, n: int, timeout: float = 120.0) -> None:
        """Until the balancer has published a state for ``n`` substations (then it answers operator actions)."""
        def ready() -> bool:
            subs = self.http.get("/status").json()["substations"]
            return len(subs) == n and all(v["source"] == "balancer" for v in subs)
        wait_until(ready, timeout, f"the balancer's state of {n} substations", every_s=1.0)
        time.sleep(3.0)  # (the burst of a first state per substation is read)

    def drain(self, sid: str) -> None:
        r = self.http.post(f"/substations/{sid}/drain", timeout=90)
        if r.status_code != 200:
            raise RuntimeError(f"drain {sid}: {r.status_code} {r.text}")

    def decommission(self, sid: str) -> None:
        """DELETE /substations/{id}: drained, account revoked (none here), forgotten by the balancer."""
        r = self.http.delete(f"/substations/{sid}", timeout=90)
        if r.status_code != 200 or r.json()["balancer"] != "forgotten":
            raise RuntimeError(f"decommission {sid}: {r.status_code} {r.text}")

    def metric(self, name: str) -> float:
        """One sample of the API's /metrics (``name`` with its labels, as printed)."""
        text = self.http.get("/metrics").text
        found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        return float(found.group(1)) if found else float("nan")


@contextmanager
def stack(work: Path, *, sse_interval_s: float = 0.5, stale_after_s: float = 3.0,
          trend_step_s: float = 10.0, api_mqtt_client: str = "paho", regions: int = 8) -> Iterator[Stack]:
    """A private broker, balancer and API (public reads) on free ports; stopped on exit."""
    # One balancer process owns every region (a region is a topic namespace: its own account, same password).
    names = region_names(regions)
    balancer_pw = "live-page-balancer"
    broker = LocalBroker(work / "broker", substation_ids=(), ev_ids=(),
                         services=(*SERVICE_ACCOUNTS, *(f"balancer.{r}" for r in names)),
                         service_passwords={"balancer": balancer_pw, **{f"balancer.{r}": balancer_pw for r in names}},
                         secret="live-page", mosquitto_bin=find_mosquitto()).start()
    started: list[Process] = []
    http: httpx.Client | None = None
    log_level = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    try:
        balancer = Process("balancer", broker, work, MQTT_USERNAME="balancer",
                           MQTT_PASSWORD=balancer_pw, BALANCER_REGIONS=",".join(names),
                           BALANCER_STALE_AFTER_S=str(stale_after_s),
                           LOG_LEVEL=log_level)
        started.append(balancer)
        port = find_free_port()
        api = Process("api", broker, work, MQTT_USERNAME="api", MQTT_PASSWORD=broker.password_for("api"),
                      API_PORT=str(port), API_PUBLIC_READS="true", API_STALE_AFTER_S=str(stale_after_s),
                      API_TREND_STEP_S=str(trend_step_s), API_MQTT_CLIENT=api_mqtt_client,
                      API_SSE_INTERVAL_S=str(sse_interval_s), API_TOKEN=OPERATOR_TOKEN, API_REQUEST_TIMEOUT_S="60",
                      API_PROVISIONER_PASSWORD=broker.password_for("provisioner"), LOG_LEVEL=log_level)
        started.append(api)
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        deadline = time.monotonic() + 30
        while True:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{api.log()[-2000:]}")
            time.sleep(0.1)
        time.sleep(1.0)  # (the balancer subscribes)
        yield Stack(broker, balancer, api, url, http)
    finally:
        if http is not None:
            http.close()
        for p in reversed(started):
            p.stop()
        broker.stop()


def retire(s: Stack, grid: SimulatedGrid, sids: list[str]) -> None:
    """Decommission as it happens: the agents fall silent (no telemetry in flight any more), the operator removes
    them (DELETE /substations/{id}), their last wills (offline statuses) stay behind."""
    grid.silent |= set(sids)
    time.sleep(grid.interval_s + 0.5)
    for sid in sids:
        s.decommission(sid)
        grid.status(sid, "offline")


def wait_until(predicate: Any, timeout: float, what: str, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every_s)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


# ---------------------------------------------------------------------------------------------- the browser
@contextmanager
def chromium(profile_dir: Path, width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """Headless Chromium on loopback only (no background networking, a fresh profile), its console kept."""
    with browser.chromium(profile_dir, width, height, browser_log=True) as driver:
        yield driver


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Chromium's browser, renderers, GPU and utility processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu_s(pid: int) -> dict[int, float]:
    cpu: dict[int, float] = {}
    for p in descendants(pid):
        try:
            cpu[p] = proc_cpu_s(p)
        except (OSError, IndexError, ValueError):
            continue
    return cpu


def renderer_metrics(driver: Any) -> dict[str, float]:
    """The page's main thread (DevTools Performance domain): seconds busy in tasks, script, layout, style."""
    metrics = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
    return {m["name"]: float(m["value"]) for m in metrics}


# ---------------------------------------------------------------------------------------------- the figures
def problems(ids: list[str]) -> dict[str, list[str]]:
    """Which substations get which problem: a few of each, spread over the grid, no substation in two."""
    n = len(ids)
    kinds = (("offline", 5), ("silent", 5), ("overloaded", 5), ("drained", 4), ("forgotten", 3))
    out: dict[str, list[str]] = {kind: [] for kind, _ in kinds}
    index = 0
    for j in range(max(k for _, k in kinds)):
        for kind, k in kinds:
            if j < k:
                out[kind].append(ids[(7 + 37 * index) % n])
                index += 1
    return out


def measure(n: int, regions: int, seconds: float, churn: float, sse_interval_s: float,
            api_mqtt_client: str = "paho", interval_s: float = 1.0) -> dict[str, Any]:
    """The grid is set up quiet (churn 0: operator actions answered promptly), then loads start moving
    (``churn``) before the browser opens; the figures are taken under that load."""
    with tempfile.TemporaryDirectory(prefix="bench-live-page-") as tmp, \
            stack(Path(tmp), sse_interval_s=sse_interval_s, api_mqtt_client=api_mqtt_client, regions=regions) as s:
        ids = substation_ids(n)
        plan = problems(ids)
        grid = SimulatedGrid(s.broker, n, regions=regions, interval_s=interval_s, offline=set(plan["offline"]),
                             overloaded=set(plan["overloaded"])).start()
        try:
            s.wait_for_grid(n)
            actions = []
            for sid in plan["drained"]:
                t = time.monotonic()
                s.drain(sid)
                actions.append(time.monotonic() - t)
            grid.silent |= set(plan["silent"])
            retire(s, grid, plan["forgotten"])
            shown = n - len(plan["forgotten"])
            wait_until(lambda: s.http.get("/status", params={"limit": 1}).json()["totals"]["substations"] == shown,
                       30, "the forgotten ones gone")
            full_status = len(s.http.get("/status").content)
            compact_status = len(s.http.get("/status", params={"compact": "true"}).content)
            grid.churn = churn
            time.sleep(5.0)  # the silent ones turn stale, the loads move
            with chromium(Path(tmp) / "chromium") as driver:
                driver.execute_cdp_cmd("Performance.enable", {})
                driver.get(s.url + "/")
                wait_until(lambda: driver.execute_script("return document.body.dataset.firstRenderMs"), 60,
                           "the first render")
                first_render_ms = float(driver.execute_script("return document.body.dataset.firstRenderMs"))
                cells = int(driver.execute_script("return document.querySelectorAll('#heatmap .cell').length"))
                snapshot_bytes = float(driver.execute_script("return document.body.dataset.snapshotChars"))
                time.sleep(3.0)  # settled: the trends of the rows in detail fetched
                chrome_pid = driver.service.process.pid
                cpu0, page0 = tree_cpu_s(chrome_pid), renderer_metrics(driver)
                api0, bal0 = s.api.cpu_s(), s.balancer.cpu_s()
                bytes0, updates0 = s.metric("gridlb_api_sse_bytes_total"), _updates(driver)
                tele0 = s.metric(TELEMETRY_APPLIED)
                t0 = time.monotonic()
                time.sleep(seconds)
                elapsed = time.monotonic() - t0
                cpu1, page1 = tree_cpu_s(chrome_pid), renderer_metrics(driver)
                api1, bal1 = s.api.cpu_s(), s.balancer.cpu_s()
                bytes1, updates1 = s.metric("gridlb_api_sse_bytes_total"), _updates(driver)
                tele1 = s.metric(TELEMETRY_APPLIED)
                latencies = [_update_latency(driver, grid, sid) for sid in _quiet_ones(ids, plan)[:3]]
                severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        finally:
            grid.close()
    browser_cpu = sum(v - cpu0.get(p, 0.0) for p, v in cpu1.items())
    updates = updates1 - updates0
    return {
        "substations": n, "shown": shown, "cells": cells, "regions": regions, "churn": churn,
        "interval_s": interval_s,
        "sse_interval_s": sse_interval_s, "api_mqtt_client": api_mqtt_client, "seconds": round(elapsed, 1),
        "telemetry_per_s": round((tele1 - tele0) / elapsed),
        "first_render_ms": round(first_render_ms), "snapshot_kb": round(snapshot_bytes / 1024, 1),
        "status_kb": round(full_status / 1024, 1), "status_compact_kb": round(compact_status / 1024, 1),
        "stream_kb_per_s": round((bytes1 - bytes0) / elapsed / 1024, 2),
        "updates_per_s": round(updates / elapsed, 2),
        "former_feed_kb_per_s": round(full_status * updates / elapsed / 1024, 1),
        "browser_cpu_per_s": round(browser_cpu / elapsed, 3),
        "page_task_per_s": round((page1["TaskDuration"] - page0["TaskDuration"]) / elapsed, 3),
        "page_script_per_s": round((page1["ScriptDuration"] - page0["ScriptDuration"]) / elapsed, 3),
        "page_layout_style_per_s": round((page1["LayoutDuration"] + page1["RecalcStyleDuration"]
                                          - page0["LayoutDuration"] - page0["RecalcStyleDuration"]) / elapsed, 3),
        "api_cpu_per_s": round((api1 - api0) / elapsed, 3), "balancer_cpu_per_s": round((bal1 - bal0) / elapsed, 3),
        "browser_errors": len(severe),
        "load_average": round(os.getloadavg()[0], 1),
        "drain_s": [round(a, 2) for a in actions], "update_latency_s": [round(x, 2) for x in latencies],
    }


def _quiet_ones(ids: list[str], plan: dict[str, list[str]]) -> list[str]:
    taken = {sid for group in plan.values() for sid in group}
    return [sid for sid in ids[500:] if sid not in taken]


def _update_latency(driver: Any, grid: SimulatedGrid, sid: str, timeout: float = 90.0) -> float:
    """Seconds from a substation's load changing (the next telemetry carries it) to its cell showing it."""
    grid.pinned.add(sid)
    grid.share[sid] = 0.987
    t0 = time.monotonic()
    grid.tick()  # (at once, not at the next tick: the latency of the data path, not of the agent's interval)
    script = f"return document.querySelector('.cell[data-substation=\"{sid}\"]')?.dataset.util"
    while time.monotonic() - t0 < timeout:
        if driver.execute_script(script) == "0.987":
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("nan")


TELEMETRY_APPLIED = 'gridlb_api_messages_applied_total{kind="telemetry"}'


def _updates(driver: Any) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.events || 0)"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench live-page", description=__doc__.split("\n\n")[0])
    parser.add_argument("--substations", type=int, default=1000)
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="steady-state window measured")
    parser.add_argument("--churn", type=float, default=1.0, help="share of substations whose load moves each tick")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between telemetry ticks")
    parser.add_argument("--sse-interval", type=float, default=0.5, help="API_SSE_INTERVAL_S")
    parser.add_argument("--api-mqtt-client", choices=("paho", "aiomqtt"), default="paho", help="API_MQTT_CLIENT")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line as well")
    args = parser.parse_args(argv)
    r = measure(args.substations, args.regions, args.seconds, args.churn, args.sse_interval, args.api_mqtt_client,
                args.interval)
    print(f"live page at {r['substations']} substations ({r['shown']} shown after {r['substations'] - r['shown']} "
          f"decommissioned, {r['regions']} regions, telemetry every {r['interval_s']:g} s each, churn "
          f"{r['churn']:g}: share of loads moving each tick), API_SSE_INTERVAL_S {r['sse_interval_s']:g}, "
          f"API_MQTT_CLIENT {r['api_mqtt_client']}, window {r['seconds']} s")
    print(f"  telemetry applied   {r['telemetry_per_s']} messages/s by the API (what reached it: the load it ran "
          "under)")
    print(f"  first render        {r['first_render_ms']} ms from navigation start ({r['cells']} cells; "
          f"first snapshot {r['snapshot_kb']} KB)")
    print(f"  GET /status         {r['status_kb']} KB full, {r['status_compact_kb']} KB compact")
    print(f"  event stream        {r['stream_kb_per_s']} KB/s at {r['updates_per_s']} updates/s "
          f"(the former whole-/status feed: {r['former_feed_kb_per_s']} KB/s for as many updates)")
    print(f"  browser CPU         {r['browser_cpu_per_s']} s/s all Chromium processes; page main thread: tasks "
          f"{r['page_task_per_s']} s/s, script {r['page_script_per_s']}, layout+style {r['page_layout_style_per_s']}")
    print(f"  server CPU          API {r['api_cpu_per_s']} s/s, balancer {r['balancer_cpu_per_s']} s/s")
    print(f"  update latency      {r['update_latency_s']} s from a load change published to its cell on the page")
    print(f"  operator actions    drain answered in {r['drain_s']} s (POST /substations/{{id}}/drain, quiet grid)")
    print(f"  browser errors      {r['browser_errors']}; machine load average {r['load_average']} "
          f"({os.cpu_count()} cores)")
    if args.json:
        print(json.dumps(r))
    return 0 if r["browser_errors"] == 0 and r["cells"] == r["shown"] else 1
