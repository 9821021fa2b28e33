"""Recorder throughput end to end, and the series it leaves behind, at grid scale.

    python -m bench recorder [--substations 1000] [--evs 100000] [--ticks 30] [--chunk 100000]
                             [--scrape-substations 1000] [--profile FILE]

A private Mosquitto (project config, ``loadtest`` and ``recorder`` accounts), a private VictoriaMetrics and
``python -m monitoring.recorder`` as shipped (paho transport, defaults but a buffer as large as a chunk).
The traffic of ``bench/workload.py`` is sent in chunks: for each chunk the recorder is stopped (SIGSTOP),
the chunk is published (the broker queues it for the recorder's session), the recorder is resumed
(SIGCONT) and timed until every point of the chunk is written. So the load generator never competes with
the recorder for the two cores, and the figure is the recorder's own: points/s (wall clock, from resume to
written) and CPU µs per point (/proc, the figure that survives a loaded machine: 1e6 / (µs per point) is the
points/s one core sustains). Every point must be written: none dropped, none refused.

Then the series: VictoriaMetrics' series count per metric (``<measurement>_<field>``) after the run, and a real
balancer fed status and telemetry for ``--scrape-substations`` substations (``loadtest`` account), scraped by a
real Prometheus: samples per scrape per job. Figures are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_balancer import proc_cpu_s, proc_rss_mb
from bench.report import save_json
from bench.workload import Message, Workload, messages, status_messages, telemetry_messages
from broker.local import LocalBroker, find_free_port
from grid_protocol import Topics
from grid_runtime.mqtt import PahoTransport
from grid_runtime.settings import MqttSettings
from monitoring.local import PrometheusServer, VictoriaMetrics, metric, scrape, value

SECRET = "bench"


async def publish(broker: LocalBroker, batch: list[Message]) -> float:
    """Publish ``batch`` as ``loadtest`` and return once the broker has all of it (QoS 1 acknowledged last)."""
    settings = MqttSettings(host=broker.host, port=broker.port, username="loadtest",
                            password=broker.password_for("loadtest"))
    transport = PahoTransport(settings, client_id="loadtest", clean_start=True)
    task = asyncio.create_task(transport.run())
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(transport.connected.wait(), 10)
        for i, (topic, payload, qos) in enumerate(batch):
            transport.publish(topic, payload, qos)
            if i % 500 == 499:
                await asyncio.sleep(0)  # let paho write
        # QoS 0 and 1 share one ordered connection: once the last QoS 1 is acknowledged, the broker has it all.
        await transport.close(timeout=120)
    finally:
        task.cancel()
    return time.perf_counter() - t0


def start_recorder(broker: LocalBroker, vm: VictoriaMetrics, logs: Path, buffer: int,
                   profile: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    port = find_free_port()
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), MQTT_USERNAME="recorder",
               MQTT_PASSWORD=broker.password_for("recorder"), INFLUX_URL=vm.url, METRICS_PORT=str(port),
               RECORDER_BUFFER_MAX_POINTS=str(buffer), LOG_LEVEL="WARNING",
               # paused while a chunk is published: the broker must not take it for dead (1.5 x keepalive),
               # or it drops the QoS 0 telemetry meant for it. 300 s is the most the broker allows.
               MQTT_KEEPALIVE_S="300")
    cmd = [sys.executable, "-m", "monitoring.recorder"]
    if profile is not None:
        cmd = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "monitoring.recorder"]
    log = open(logs / "recorder.log", "wb")  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if metric(scrape(url), "gridlb_mqtt_connected", client="recorder") == 1:
                time.sleep(0.5)  # SUBACKs follow the CONNACK
                return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"recorder not connected in 20 s: {(logs / 'recorder.log').read_text()[-2000:]}")


def wait_written(url: str, target: int, timeout: float) -> tuple[float, dict[str, float]]:
    """Poll the recorder's /metrics until ``target`` points are written (or settled otherwise); seconds taken."""
    t0 = time.perf_counter()
    peak = 0.0
    while True:
        m = scrape(url)
        peak = max(peak, metric(m, "gridlb_recorder_buffer_points"))
        written = metric(m, "gridlb_recorder_points_written_total")
        settled = written + metric(m, "gridlb_recorder_points_dropped_total")
        if settled >= target or time.perf_counter() - t0 > timeout:
            elapsed = time.perf_counter() - t0
            return elapsed, {"written": written, "dropped": metric(m, "gridlb_recorder_points_dropped_total"),
                             "bad_payloads": metric(m, "gridlb_recorder_bad_payloads_total"),
                             "messages": metric(m, "gridlb_recorder_messages_total"), "peak_buffer": peak}
        time.sleep(0.25)  # each scrape costs the recorder ~1 ms of CPU


def recorder_phase(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    w = Workload(substations=args.substations, evs=args.evs, ticks=args.ticks)
    now = time.time() - args.ticks - 5  # every timestamp in the recent past, on today's VictoriaMetrics index
    traffic = messages(w, Topics(), now)
    chunks = [traffic[i:i + args.chunk] for i in range(0, len(traffic), args.chunk)]
    vm = VictoriaMetrics(tmp / "vm").start()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(vm.stop)
        broker = cleanup.enter_context(LocalBroker(tmp / "broker", secret=SECRET))
        proc, url = start_recorder(broker, vm, tmp, max(args.chunk, 100_000), args.profile)
        try:
            drain_s = cpu_s = publish_s = broker_cpu_s = vm_cpu_s = 0.0
            assert broker.pid is not None and vm.proc is not None
            done = 0
            peak = 0.0
            for n, chunk in enumerate(chunks, 1):
                os.kill(proc.pid, signal.SIGSTOP)
                publish_s += asyncio.run(publish(broker, chunk))
                cpu0, broker0, vm0 = proc_cpu_s(proc.pid), proc_cpu_s(broker.pid), proc_cpu_s(vm.proc.pid)
                spy = _py_spy(args.py_spy, proc.pid, n)
                os.kill(proc.pid, signal.SIGCONT)
                elapsed, seen = wait_written(url, done + len(chunk), timeout=300)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
                cpu_s += proc_cpu_s(proc.pid) - cpu0
                broker_cpu_s += proc_cpu_s(broker.pid) - broker0
                vm_cpu_s += proc_cpu_s(vm.proc.pid) - vm0
                drain_s += elapsed
                peak = max(peak, seen["peak_buffer"])
                done += len(chunk)
                print(f"  chunk {n}/{len(chunks)}: {len(chunk)} messages written in {elapsed:.2f} s "
                      f"({len(chunk) / elapsed:,.0f} points/s); written {seen['written']:.0f}/{done}", flush=True)
            rss = proc_rss_mb(proc.pid)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        by_metric = vm.series_by_metric()
        total_series = sum(by_metric.values())
        stored = {name: _count_samples(vm, name) for name in ("ev_assignment_granted_kw",
                                                              "substation_telemetry_load_kw")}
    points = len(traffic)
    return {
        "workload": {"substations": w.substations, "evs": w.evs, "ticks": w.ticks, "messages": points,
                     "chunk": args.chunk},
        "points": points, "written": seen["written"], "dropped": seen["dropped"],
        "bad_payloads": seen["bad_payloads"], "peak_buffer": peak,
        "drain_s": round(drain_s, 3), "points_per_s": round(points / drain_s, 1),
        "cpu_s": round(cpu_s, 3), "cpu_us_per_point": round(cpu_s / points * 1e6, 2),
        "points_per_cpu_s": round(points / cpu_s, 1),
        "broker_cpu_s": round(broker_cpu_s, 3), "victoriametrics_cpu_s": round(vm_cpu_s, 3),
        "publish_s": round(publish_s, 2), "rss_mb": round(rss, 1),
        "vm_series_total": total_series, "vm_series_by_metric": by_metric, "vm_samples": stored,
        "profile": str(args.profile) if args.profile else None,
    }


def _py_spy(out: Path | None, pid: int, chunk: int) -> subprocess.Popen[bytes] | None:
    """Sample the recorder (every thread, native frames off) with py-spy while it drains one chunk."""
    if out is None:
        return None
    target = out.with_suffix(f".{chunk}.txt")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads",
                            "--output", str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the recorder resumes
    return spy


def _count_samples(vm: VictoriaMetrics, name: str) -> int:
    """Samples of ``name`` stored in the last day (a PromQL query), to check that what was written is there."""
    import urllib.parse
    import urllib.request

    q = urllib.parse.urlencode({"query": f"sum(count_over_time({name}[1d]))"})
    with urllib.request.urlopen(f"{vm.url}/api/v1/query?{q}", timeout=60) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def scrape_phase(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A real balancer with ``--scrape-substations`` substations (status + telemetry as ``loadtest``), scraped."""
    w = Workload(substations=args.scrape_substations, evs=0, ticks=1)
    metrics_port = find_free_port()
    with LocalBroker(tmp / "broker-scrape", secret=SECRET) as broker:
        env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port), MQTT_USERNAME="balancer",
                   MQTT_PASSWORD=broker.password_for("balancer"), METRICS_PORT=str(metrics_port), LOG_LEVEL="WARNING")
        log = open(tmp / "balancer.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "balancer"], env=env, stdout=log, stderr=subprocess.STDOUT)
        prom = PrometheusServer(tmp / "prometheus", {"balancer": [f"127.0.0.1:{metrics_port}"]}, interval="2s")
        try:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            _wait_listening(url, proc, 30)
            asyncio.run(_feed_until_known(broker, w, url, 90))
            t0 = time.perf_counter()
            page = _get(url)
            scrape_ms = (time.perf_counter() - t0) * 1000
            own = sum(1 for line in page.splitlines() if line and not line.startswith("#"))
            per_substation = sum(1 for line in page.splitlines()
                                 if line.startswith("gridlb_") and "substation=" in line)
            prom.start()
            samples = prom.wait_for('scrape_samples_scraped{job="balancer"}', timeout=30)
            head = _prom_head_series(prom)
        finally:
            prom.stop()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"substations": w.substations, "balancer_samples_per_scrape": int(value(samples[0])),
            "balancer_lines": own, "per_substation_series": per_substation,
            "series_per_substation": round(per_substation / w.substations, 2), "scrape_ms": round(scrape_ms, 1),
            "scrape_bytes": len(page), "prometheus_head_series": head}


def _wait_listening(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the balancer exited with {proc.returncode}")
        try:
            scrape(url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the balancer's /metrics did not answer in {timeout} s")


async def _feed_until_known(broker: LocalBroker, w: Workload, url: str, timeout: float) -> None:
    """Retained status once, then telemetry for every substation each second (as agents do; a balancer that is
    still starting up or shedding a burst takes the next tick) until its /metrics shows them all."""
    settings = MqttSettings(host=broker.host, port=broker.port, username="loadtest",
                            password=broker.password_for("loadtest"))
    transport = PahoTransport(settings, client_id="loadtest", clean_start=True)
    task = asyncio.create_task(transport.run())
    topics = Topics()
    try:
        await asyncio.wait_for(transport.connected.wait(), 10)
        for topic, payload, qos in status_messages(w, topics, time.time()):
            transport.publish(topic, payload, qos, retain=True)
        deadline = time.monotonic() + timeout
        while True:
            for topic, payload, qos in telemetry_messages(w, topics, time.time()):
                transport.publish(topic, payload, qos)
            await asyncio.sleep(1.0)
            m = await asyncio.to_thread(scrape, url)
            if sum(1 for (n, _l) in m if n == "gridlb_substation_capacity_watts") >= w.substations:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the balancer did not report {w.substations} substations in {timeout} s")
    finally:
        await transport.close(timeout=10)
        task.cancel()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.read().decode())


def _prom_head_series(prom: PrometheusServer) -> int:
    """Series in Prometheus's head block (its own /metrics), i.e. what the scrape costs it in memory."""
    for line in _get(f"{prom.url}/metrics").splitlines():
        if line.startswith("prometheus_tsdb_head_series "):
            return int(float(line.split()[1]))
    return -1


def _print(rec: dict[str, Any] | None, scr: dict[str, Any] | None) -> None:
    if rec is not None:
        wl = rec["workload"]
        print(f"\nrecorder: {rec['points']:,} points ({wl['substations']:,} substations x {wl['ticks']} "
              "telemetry ticks, "
              f"{wl['evs']:,} EVs' answers and session events)")
        print(f"  written {rec['written']:,.0f}, dropped {rec['dropped']:.0f}, refused {rec['bad_payloads']:.0f}; "
              f"peak buffer {rec['peak_buffer']:,.0f}")
        print(f"  {rec['points_per_s']:,.0f} points/s wall clock (target >= 50,000), "
              f"{rec['cpu_us_per_point']:.2f} µs CPU per point = {rec['points_per_cpu_s']:,.0f} points per CPU-second; "
              f"RSS {rec['rss_mb']:.0f} MB")
        print(f"  while draining: broker {rec['broker_cpu_s']:.2f} s CPU, VictoriaMetrics "
              f"{rec['victoriametrics_cpu_s']:.2f} s CPU, recorder {rec['cpu_s']:.2f} s CPU in {rec['drain_s']:.2f} s")
        print(f"  VictoriaMetrics: {rec['vm_series_total']:,} series; samples stored {rec['vm_samples']}")
        for name, n in sorted(rec["vm_series_by_metric"].items()):
            print(f"    {name:<40}{n:>10,}")
    if scr is not None:
        print(f"\nPrometheus scrape of a balancer with {scr['substations']:,} substations: "
              f"{scr['balancer_samples_per_scrape']:,} samples per scrape ({scr['per_substation_series']:,} "
              f"per-substation = {scr['series_per_substation']} per substation), "
              f"page {scr['scrape_bytes'] / 1024:,.0f} KiB "
              f"in {scr['scrape_ms']:.0f} ms; Prometheus head series {scr['prometheus_head_series']:,}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench recorder", description=__doc__.split("\n\n")[0])
    p.add_argument("--substations", type=int, default=1_000)
    p.add_argument("--evs", type=int, default=100_000)
    p.add_argument("--ticks", type=int, default=30, help="telemetry messages per substation")
    p.add_argument("--chunk", type=int, default=100_000, help="messages published while the recorder is paused")
    p.add_argument("--scrape-substations", type=int, default=1_000, help="0: skip the Prometheus scrape phase")
    p.add_argument("--skip-recorder", action="store_true")
    p.add_argument("--profile", type=Path, default=None, help="run the recorder under cProfile (slows it down)")
    p.add_argument("--py-spy", type=Path, default=None,
                   help="sample the recorder with py-spy while it drains (collapsed stacks, FILE.<chunk>.txt)")
    p.add_argument("--json", type=Path, default=Path("bench/results/recorder.json"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (servers, paused recorder) on kill too
    with tempfile.TemporaryDirectory(prefix="gridlb-bench-recorder-") as tmp:
        rec = None if args.skip_recorder else recorder_phase(args, Path(tmp))
        scr = scrape_phase(args, Path(tmp)) if args.scrape_substations else None
    _print(rec, scr)
    save_json(args.json, args, recorder=rec, scrape=scr)
    return 1 if rec is not None and (rec["dropped"] or rec["written"] != rec["points"]) else 0
