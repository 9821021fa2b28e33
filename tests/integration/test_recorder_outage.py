"""The recorder survives a database outage: VictoriaMetrics is stopped mid-run while telemetry keeps coming,
then restarted (same data dir, same port).

With a small buffer the outage overflows it: the recorder keeps reading MQTT, counts the failed writes,
retries and dropped points, keeps the newest points, and writes them (and everything after the restart)
once the database is back. Every point is accounted for: queued = written + dropped, and what the
database holds is exactly what was written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from probe import Probe
from tsdb import VictoriaMetrics, metric, recorder_ready, samples, start_recorder, wait_metrics

from broker.local import LocalBroker

pytestmark = pytest.mark.integration
TOPIC = "grid/v1/substation/A/telemetry"
BUFFER, BATCH = 40, 10


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path / "vm").start()
    yield server
    server.stop()


def publish(fake: Probe, seqs: range) -> None:
    for seq in seqs:
        fake.publish(TOPIC, {"substation_id": "A", "ts": time.time(), "seq": seq, "capacity_kw": 100.0,
                             "load_kw": float(seq), "base_load_kw": float(seq), "ev_load_kw": 0.0,
                             "active_sessions": 0})


def test_database_outage_is_retried_counted_and_recovered(broker: LocalBroker, vm: VictoriaMetrics,
                                                          tmp_path: Path) -> None:
    recorder = start_recorder(broker, tmp_path, vm, RECORDER_BUFFER_MAX_POINTS=str(BUFFER),
                              # Only full batches are taken while messages flow: with a short flush interval a
                              # publisher slowed by a loaded machine let the writer take a partial batch (9 held
                              # instead of 10) and the exact counts below were off by one.
                              RECORDER_BATCH_SIZE=str(BATCH), RECORDER_FLUSH_INTERVAL_S="2",
                              RECORDER_BACKOFF_MIN_S="0.1", RECORDER_BACKOFF_MAX_S="0.4", INFLUX_TIMEOUT_S="1",
                              RECORDER_SHUTDOWN_TIMEOUT_S="1")
    fake = Probe(broker, "loadtest")
    try:
        url = recorder_ready(recorder)
        before, during, after = range(0, 20), range(20, 170), range(170, 190)

        publish(fake, before)
        wait_metrics(url, lambda m: metric(m, "gridlb_recorder_points_written_total") == 20, what="20 written")

        vm.stop()
        publish(fake, during)  # the MQTT side keeps reading while every write fails
        m = wait_metrics(url, lambda m: metric(m, "gridlb_recorder_messages_total") == 170
                         and metric(m, "gridlb_recorder_write_errors_total") >= 3, what="outage noticed")
        assert metric(m, "gridlb_recorder_points_written_total") == 20
        assert metric(m, "gridlb_recorder_buffer_points") == BUFFER  # full: the rest was dropped, oldest first
        assert metric(m, "gridlb_recorder_points_dropped_total", reason="buffer_full") == 150 - BUFFER - BATCH
        outage_errors = metric(m, "gridlb_recorder_write_errors_total")

        started = time.monotonic()
        vm.start()  # same data dir and port
        wait_metrics(url, lambda m: metric(m, "gridlb_recorder_points_written_total") == 20 + BATCH + BUFFER,
                     what="the held batch and the buffer written after the restart")
        publish(fake, after)
        m = wait_metrics(url, lambda m: metric(m, "gridlb_recorder_points_queued_total") == 190
                         and metric(m, "gridlb_recorder_buffer_points") == 0
                         and metric(m, "gridlb_recorder_points_written_total")
                         + metric(m, "gridlb_recorder_points_dropped_total") == 190, what="caught up")
        recovered_s = time.monotonic() - started
        written = metric(m, "gridlb_recorder_points_written_total")
        dropped = metric(m, "gridlb_recorder_points_dropped_total")
        assert dropped == metric(m, "gridlb_recorder_points_dropped_total", reason="buffer_full") == 100
        assert written == 90 and written + dropped == 190
        assert metric(m, "gridlb_recorder_points_retried_total") >= BATCH * outage_errors
        assert metric(m, "gridlb_recorder_write_latency_seconds_count") >= 1
        assert recovered_s < 5

        series = vm.wait_export('{__name__="substation_telemetry_seq",substation_id="A"}',
                                lambda s: len({v for _, v in samples(s)}) >= written)
        stored = {int(v) for _, v in samples(series)}
        assert len(stored) == written
        assert set(before) <= stored and set(after) <= stored  # before the outage (on disk) and after it
        lost = set(during) - stored
        assert len(lost) == dropped
        # What survived the outage: the batch being retried when it began, and the newest BUFFER points.
        assert set(during[:BATCH]) <= stored and set(during[-BUFFER:]) <= stored

        # Shut down while the database is away again: bounded, and what was left is counted and logged.
        vm.stop()
        publish(fake, range(190, 195))
        wait_metrics(url, lambda m: metric(m, "gridlb_recorder_points_queued_total") == 195, what="5 more queued")
    finally:
        fake.close()
        stopping = time.monotonic()
        code = recorder.stop()
        stop_s = time.monotonic() - stopping
    log = recorder.log()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert stop_s < 1 + 2, stop_s  # shutdown timeout, plus process start-up/exit slack
    assert "shutdown_points_not_written points=5" in log and "points_dropped={'buffer_full': 100, 'shutdown': 5}" in log
    assert "write_failed_retrying" in log and "write_recovered" in log and "buffer_full_dropping_oldest" in log
    print(f"\noutage: {written:.0f} written, {dropped:.0f} dropped (buffer {BUFFER}), "
          f"{outage_errors:.0f}+ failed writes, caught up {recovered_s:.2f} s after restart, stopped in {stop_s:.2f} s")
