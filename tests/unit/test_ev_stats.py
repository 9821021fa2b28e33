"""Pure parts of the EV fleet: percentiles, records, summary shape, request generation, id pool."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from ev_clients.cli import _settings, build_parser, main, parse_url
from ev_clients.fleet import FleetRunner, RunConfig
from ev_clients.settings import EvSettings
from ev_clients.stats import FleetStats, LatencyRecorder, RequestRecord
from ev_clients.workload import (
    EvIdPool,
    RequestMix,
    arrival_gaps,
    ev_ids,
    expected_charge_s,
    parse_kw_mix,
    parse_range,
    ramp_offsets,
    split_evenly,
)
from grid_protocol.codec import decode, encode
from grid_protocol.messages import ChargeRequest
from grid_runtime.percentiles import percentile


def test_recorder_unsorted_input_and_summary_in_ms() -> None:
    rec = LatencyRecorder([0.005, 0.001, 0.004, 0.002, 0.003])
    assert rec.percentile(50) == 0.003
    assert rec.percentile(99) == 0.005
    rec.add(0.0005)  # out of order after sorting
    assert rec.percentile(1) == 0.0005
    s = rec.summary()
    assert s == {"count": 6, "min_ms": 0.5, "mean_ms": 2.583, "p50_ms": 2.0, "p95_ms": 5.0, "p99_ms": 5.0,
                 "max_ms": 5.0}
    with pytest.raises(ValueError):
        rec.add(float("nan"))
    with pytest.raises(ValueError):
        rec.add(-1.0)


def test_empty_recorder_summary() -> None:
    assert LatencyRecorder().summary() == {"count": 0, "min_ms": None, "mean_ms": None, "p50_ms": None,
                                           "p95_ms": None, "p99_ms": None, "max_ms": None}


# --- records and fleet stats -----------------------------------------------------------------


def _record(stats: FleetStats, ev: str, rid: str, sent: float) -> RequestRecord:
    r = stats.new_record(RequestRecord(ev_id=ev, request_id=rid, requested_kw=11.0, energy_kwh=20.0))
    r.sent_at = sent
    r.attempts = 1
    return r


def test_record_latencies_statuses_and_duplicates() -> None:
    stats = FleetStats(mode="fleet", started_at=100.0)
    r = _record(stats, "EV_0001", "r1", 100.0)
    assert stats.on_answer(r, 100.010, "queued", reason="no_headroom", position=2)
    assert not stats.on_answer(r, 100.020, "queued", reason="no_headroom", position=2)  # a retry's answer
    assert stats.queued_now == 1
    assert stats.on_answer(r, 100.500, "assigned", substation_id="A", granted_kw=11.0, session_id="s1")
    assert stats.active_sessions == 1 and stats.queued_now == 0
    assert stats.on_answer(r, 101.0, "updated", substation_id="A", granted_kw=7.0, session_id="s1")
    assert stats.active_sessions == 1
    assert stats.on_answer(r, 102.0, "completed", reason="energy_delivered", substation_id="A", granted_kw=7.0)
    assert stats.active_sessions == 0
    assert r.statuses == ["queued", "assigned", "updated", "completed"]
    assert r.first_answer_s == pytest.approx(0.010)
    assert r.assigned_s == pytest.approx(0.5)
    assert (r.substation_id, r.granted_kw, r.session_id) == ("A", 11.0, "s1")
    assert r.duplicates == 1 and r.finished and r.final_status == "completed"
    d = r.to_dict()
    assert d["first_answer_ms"] == pytest.approx(10.0) and d["assigned_ms"] == pytest.approx(500.0)
    assert d["events"][0] == {"status": "queued", "at_ms": pytest.approx(10.0), "reason": "no_headroom",
                              "substation_id": None, "granted_kw": None, "position": 2}


def test_revoked_then_reassigned_counts_one_active_session() -> None:
    stats = FleetStats(mode="fleet", started_at=0.0)
    r = _record(stats, "EV_0001", "r1", 0.0)
    stats.on_answer(r, 0.1, "assigned", substation_id="A", granted_kw=11.0)
    stats.on_answer(r, 0.2, "revoked", reason="substation_offline", substation_id="A", granted_kw=11.0)
    assert stats.active_sessions == 0
    stats.on_answer(r, 0.21, "queued", reason="substation_offline", position=1)
    stats.on_answer(r, 0.3, "assigned", substation_id="B", granted_kw=11.0)
    assert stats.active_sessions == 1 and stats.queued_now == 0
    assert r.assigned_s == pytest.approx(0.1) and r.substation_id == "A"  # the first assignment counts
    assert len(stats.to_assigned) == 1


def test_a_session_first_seen_updated_counts_as_placed_on_its_substation() -> None:
    """An HTTP client polls snapshots: the ``assigned`` may have been replaced by an ``updated`` before it looked."""
    stats = FleetStats(mode="loadtest", started_at=0.0)
    r = _record(stats, "EV_0001", "r1", 0.0)
    stats.on_answer(r, 0.1, "queued", position=1)
    stats.on_answer(r, 0.5, "updated", substation_id="B", granted_kw=7.0)
    stats.on_answer(r, 1.5, "completed", reason="released", substation_id="B")
    assert r.assigned_s == pytest.approx(0.5) and r.substation_id == "B"
    assert stats.summary(2.0)["sessions_by_substation"] == {"B": 1} and len(stats.to_assigned) == 1


def test_summary_counts_unanswered_and_json_shape() -> None:
    stats = FleetStats(mode="loadtest", total=4, started_at=10.0)
    latencies = [0.001, 0.002, 0.003]
    for i, lat in enumerate(latencies):
        r = _record(stats, f"EV_000{i + 1}", f"r{i}", 10.0)
        stats.on_answer(r, 10.0 + lat, "assigned", substation_id="A", granted_kw=22.0)
        stats.on_answer(r, 10.0 + lat + 0.001, "completed", reason="released", substation_id="A", granted_kw=22.0)
    lost = _record(stats, "EV_0004", "lost", 10.0)
    lost.attempts = 6
    stats.new_record(RequestRecord(ev_id="EV_0005", request_id="never-sent", requested_kw=7.4))
    stats.ended_at = 12.0
    s = stats.summary(now=99.0)
    assert json.loads(json.dumps(s)) == s
    assert s["requests_sent"] == 4 and s["requests_answered"] == 3 and s["requests_unanswered"] == 1
    assert s["unanswered_request_ids"] == ["EV_0004/lost"]
    assert s["elapsed_s"] == 2.0 and s["throughput_rps"] == 1.5
    assert s["latency_first_answer"]["p50_ms"] == 2.0
    assert s["latency_first_answer"]["p99_ms"] == 3.0
    assert s["latency_to_assigned"]["count"] == 3
    assert s["status_events"] == {"assigned": 3, "completed": 3}
    assert s["final_status"] == {"completed": 3, "unanswered": 1}
    assert s["reasons"] == {"completed:released": 3}
    assert s["retried_requests"] == 1 and s["total_attempts"] == 9
    report = stats.report(now=99.0, config={"mode": "loadtest"})
    assert set(report) == {"summary", "config", "requests"}
    assert len(report["requests"]) == 4  # the never-sent record is not reported
    assert {"ev_id", "request_id", "statuses", "first_answer_ms", "assigned_ms", "substation_id",
            "granted_kw", "attempts", "final_status"} <= set(report["requests"][0])
    json.dumps(report)
    assert "answered 3/4" in stats.live_line(11.0)
    table = stats.table(12.0)
    assert "never answered: EV_0004/lost" in table and "p99=3.00" in table


# --- bounded memory for open-ended fleets, exact finite runs -----------------------------------


def _simulate(stats: FleetStats, n: int, *, start: int = 0) -> None:
    """``n`` requests driven the way ``SimulatedEv`` drives them. Request ``i``: first answer after
    ``(i % 997 + 1)`` ms; every 10th is re-sent once; every 50th is never answered; every 7th is queued
    before it is assigned; every 20th is released early by the EV (``completed`` after the Release)."""
    for i in range(start, start + n):
        r = stats.new_record(RequestRecord(ev_id=f"EV_{i % 20 + 1:04d}", request_id=f"r{i}", requested_kw=11.0))
        t = float(i)
        r.sent_at = t
        r.attempts += 1
        if i % 10 == 0:
            r.attempts += 1
        if i % 50 == 0:
            r.outcome = "unanswered"
            r.released = True
            continue
        first = t + (i % 997 + 1) / 1000
        if i % 7 == 0:
            stats.on_answer(r, first, "queued", reason="no_headroom", position=1)
            stats.on_answer(r, first, "queued", reason="no_headroom", position=1)  # a retry's duplicate
            stats.on_answer(r, first + 0.5, "assigned", substation_id="A", granted_kw=11.0)
        else:
            stats.on_answer(r, first, "assigned", substation_id="A", granted_kw=11.0)
        if i % 20 == 0:
            r.released = True
            stats.on_answer(r, t + 2.0, "completed", reason="released", substation_id="A", granted_kw=11.0)
            r.outcome = "released_early"
        else:
            stats.on_answer(r, t + 3.0, "completed", reason="energy_delivered", substation_id="A", granted_kw=11.0)
            r.outcome = r.final_status


def _expected(n: int) -> dict[str, object]:
    lost = sum(1 for i in range(n) if i % 50 == 0)
    queued = sum(1 for i in range(n) if i % 50 and i % 7 == 0)
    early = sum(1 for i in range(n) if i % 50 and i % 20 == 0)
    answered = n - lost
    return {
        "requests_sent": n, "requests_answered": answered, "requests_unanswered": lost,
        "retried_requests": (n + 9) // 10, "total_attempts": n + (n + 9) // 10, "duplicate_answers": queued,
        "released_by_ev": lost + early,
        "status_events": {"assigned": answered, "completed": answered, "queued": queued},
        "final_status": {"completed": answered, "unanswered": lost},
        "outcomes": {"completed": answered - early, "released_early": early, "unanswered": lost},
        "reasons": {"completed:energy_delivered": answered - early, "completed:released": early,
                    "queued:no_headroom": queued},
    }


def test_open_ended_fleet_keeps_a_bounded_window_and_exact_counts() -> None:
    runner = FleetRunner(EvSettings(keep_records=800), RunConfig(mode="fleet"))  # no --requests: open-ended
    stats = runner.stats
    assert stats.keep_records == 800
    n = 50_000
    _simulate(stats, n)
    # memory: the window, not the run
    assert len(stats.records) == 800
    assert stats.first_answer.kept == 800 and stats.to_assigned.kept == 800
    assert [r.request_id for r in stats.records] == [f"r{i}" for i in range(n - 800, n)]
    # counts: exact over the whole run
    stats.ended_at = float(n)
    s = stats.summary(now=float(n))
    for key, value in _expected(n).items():
        assert s[key] == value, key
    assert stats.sent_and_retries() == (n, (n + 9) // 10)
    assert s["records_limit"] == 800 and s["records_kept"] == 800 and s["records_dropped"] == n - 800
    # the ids of unanswered requests: the most recent ones, at most the window (the count is exact)
    lost_ids = [f"EV_{i % 20 + 1:04d}/r{i}" for i in range(0, n, 50)]
    assert len(lost_ids) == s["requests_unanswered"] == 1000
    assert s["unanswered_request_ids"] == lost_ids[-800:]
    assert "(and 200 older)" in stats.table(float(n))
    # latencies: count/min/mean/max over every answer, percentiles over the last 800 first answers
    lat = s["latency_first_answer"]
    firsts = [(i % 997 + 1) / 800 for i in range(n) if i % 50]
    assert lat["count"] == len(firsts) and lat["window"] == 800
    assert lat["min_ms"] == 1.0 and lat["max_ms"] == 997.0
    assert lat["mean_ms"] == pytest.approx(round(sum(firsts) / len(firsts) * 800, 3), abs=0.002)
    recent = sorted(firsts[-800:])
    for p in (50, 95, 99):
        assert lat[f"p{p}_ms"] == round(percentile(recent, p) * 800, 3)  # type: ignore[operator]
    # what --save writes: the kept records, said so in the summary
    report = stats.report(now=float(n))
    assert len(report["requests"]) == 800 and report["requests"][-1]["request_id"] == f"r{n - 1}"
    table = stats.table(float(n))
    assert f"n={len(firsts)}" in table and "(p of last 800)" in table and f"older {n - 800} counted" in table


def test_open_ended_fleet_memory_does_not_grow_with_the_run() -> None:
    stats = FleetStats(mode="fleet", keep_records=500)
    _simulate(stats, 2_000)  # the window is full from here on
    tracemalloc.start()
    try:
        _simulate(stats, 20_000, start=2_000)
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(stats.records) == 500 and stats.first_answer.kept == 500 and stats.to_assigned.kept == 500
    assert stats.sent == 22_000 and stats.status_events["completed"] == 22_000 - 440
    # keeping every record would add about 13 MB here (about 600 bytes each); what is left is the window, the
    # never-answered requests kept for their ids (440 here, at most 2 x 500) and allocator noise
    assert grown < 1_500_000, grown


def test_a_record_changed_after_it_left_the_window_is_still_counted() -> None:
    stats = FleetStats(mode="fleet", keep_records=2)
    long = stats.new_record(RequestRecord(ev_id="EV_0001", request_id="long", requested_kw=11.0))
    long.sent_at = 0.0
    long.attempts = 1
    stats.on_answer(long, 0.01, "assigned", substation_id="A", granted_kw=11.0)
    _simulate(stats, 5, start=1)  # pushes "long" out of the window
    assert long not in stats.records
    stats.on_answer(long, 9.0, "completed", reason="energy_delivered", substation_id="A", granted_kw=11.0)
    long.outcome = "completed"
    assert stats.final_counts() == {"completed": 6}
    assert stats.outcomes == {"completed": 6} and stats.active_sessions == 0


def test_record_counted_from_new_record_on_and_belongs_to_one_stats() -> None:
    a, b = FleetStats(mode="fleet"), FleetStats(mode="fleet")
    r = RequestRecord(ev_id="EV_0001", request_id="r", requested_kw=7.4)
    r.attempts = 3  # before it is added: counted when it is
    assert a.new_record(r) is r and a.new_record(r) is r  # twice: counted once
    assert (a.sent, a.retries, a.retried_requests, a.total_attempts, a.unanswered_count) == (1, 2, 1, 3, 1)
    assert len(a.records) == 1 and a.unanswered() == [r]
    with pytest.raises(ValueError):
        b.new_record(r)
    with pytest.raises(ValueError):
        FleetStats(mode="fleet", keep_records=0)


def test_finite_runs_keep_every_record_and_exact_percentiles() -> None:
    settings = EvSettings(keep_records=100)  # ignored: the run is finite
    for config in (RunConfig(mode="loadtest", requests=3000), RunConfig(mode="fleet", requests=3000)):
        stats = FleetRunner(settings, config).stats
        assert stats.keep_records is None
        n = 3000
        _simulate(stats, n)
        assert len(stats.records) == n and stats.first_answer.kept == stats.first_answer.count
        s = stats.summary(now=float(n))
        for key, value in _expected(n).items():
            assert s[key] == value, key
        firsts = sorted((i % 997 + 1) / 1000 for i in range(n) if i % 50)
        lat = s["latency_first_answer"]
        assert "window" not in lat and lat["count"] == len(firsts)
        for p in (50, 95, 99):
            assert lat[f"p{p}_ms"] == round(percentile(firsts, p) * 1000, 3)  # type: ignore[operator]
        assert s["records_limit"] is None and s["records_dropped"] == 0
        assert s["unanswered_request_ids"] == [f"EV_{i % 20 + 1:04d}/r{i}" for i in range(0, n, 50)]
        report = stats.report(now=float(n))
        assert [r["request_id"] for r in report["requests"]] == [f"r{i}" for i in range(n)]
        assert "p of last" not in stats.table(float(n))


def test_latency_window_keeps_the_most_recent_samples() -> None:
    rec = LatencyRecorder(window=3)
    for ms in (5, 1, 4, 2, 3):
        rec.add(ms / 1000)
        assert rec.kept <= 3
    assert len(rec) == rec.count == 5 and rec.kept == 3
    assert rec.percentile(50) == 0.003 and rec.percentile(100) == 0.004  # of 4, 2, 3
    rec.add(0.0005)  # window 2, 3, 0.5: the cached order is refreshed
    assert rec.percentile(1) == 0.0005 and rec.percentile(100) == 0.003
    assert rec.summary() == {"count": 6, "min_ms": 0.5, "mean_ms": 2.583, "p50_ms": 2.0, "p95_ms": 3.0,
                             "p99_ms": 3.0, "max_ms": 5.0, "window": 3}
    assert LatencyRecorder(window=2).summary()["window"] == 0
    with pytest.raises(ValueError):
        LatencyRecorder(window=0)


def test_keep_records_setting_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EvSettings().keep_records == 10_000
    monkeypatch.setenv("EV_KEEP_RECORDS", "250")
    assert EvSettings().keep_records == 250
    args = build_parser().parse_args(["fleet", "--keep-records", "42"])
    assert _settings(args).keep_records == 42
    assert FleetRunner(_settings(args), RunConfig(mode="fleet")).stats.keep_records == 42


# --- request generation ----------------------------------------------------------------------


def test_request_mix_is_deterministic_and_valid() -> None:
    mix = RequestMix()
    a = [mix.make(random.Random(7), "EV_0001", f"r{i}") for i in range(1)]
    b = [mix.make(random.Random(7), "EV_0001", f"r{i}") for i in range(1)]
    assert a == b
    rng = random.Random(42)
    reqs = [mix.make(rng, "EV_0001", f"req-{i}") for i in range(2000)]
    kws = {r.requested_kw for r in reqs}
    assert kws == {7.4, 11.0, 22.0, 50.0}
    for r in reqs:
        # every generated request passes the contract's own validation
        assert decode(encode(r), ChargeRequest) == r
        assert (r.energy_kwh is None) != (r.duration_minutes is None)
        if r.energy_kwh is not None:
            assert 10 <= r.energy_kwh <= 60
        if r.duration_minutes is not None:
            assert 30 <= r.duration_minutes <= 240
        assert r.min_kw is None or 0 < r.min_kw <= r.requested_kw
        assert r.priority in (0, 1, 2, 3, 5, 9)
    by_duration = sum(r.duration_minutes is not None for r in reqs) / len(reqs)
    prioritised = sum(r.priority > 0 for r in reqs) / len(reqs)
    assert 0.15 < by_duration < 0.25 and 0.10 < prioritised < 0.20
    eleven = sum(r.requested_kw == 11.0 for r in reqs) / len(reqs)
    assert 0.35 < eleven < 0.45  # weight 4 of 10


def test_request_mix_validates_percentages() -> None:
    with pytest.raises(ValueError):
        RequestMix(duration_pct=101)


def test_parse_kw_mix_and_range() -> None:
    assert parse_kw_mix("7.4:3, 11:4,22") == ((7.4, 3.0), (11.0, 4.0), (22.0, 1.0))
    assert parse_range("10-60") == (10.0, 60.0)
    assert parse_range("0.5") == (0.5, 0.5)
    for bad in ("", "0:1", "11:0", "x", "2000"):
        with pytest.raises(ValueError):
            parse_kw_mix(bad)
    for bad in ("60-10", "0-5", "a-b", "nan"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_expected_charge_time() -> None:
    req = ChargeRequest(requested_kw=11, energy_kwh=22, request_id="r")
    assert expected_charge_s(req, 11.0, 1.0) == 7200.0
    assert expected_charge_s(req, 22.0, 100.0) == 36.0
    both = ChargeRequest(requested_kw=11, energy_kwh=22, duration_minutes=30, request_id="r")
    assert expected_charge_s(both, 11.0, 1.0) == 1800.0


def test_arrival_gaps() -> None:
    fixed = arrival_gaps(4.0, "fixed", random.Random(1))
    assert [next(fixed) for _ in range(3)] == [0.25, 0.25, 0.25]
    g1 = arrival_gaps(10.0, "poisson", random.Random(3))
    g2 = arrival_gaps(10.0, "poisson", random.Random(3))
    sample = [next(g1) for _ in range(5000)]
    assert sample[:5] == [next(g2) for _ in range(5)]
    assert 0.09 < sum(sample) / len(sample) < 0.11
    with pytest.raises(ValueError):
        next(arrival_gaps(0, "fixed", random.Random()))


def test_split_evenly() -> None:
    assert split_evenly(60, 6) == [10] * 6
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    assert split_evenly(2, 5) == [1, 1, 0, 0, 0]
    assert split_evenly(5, 0) == []


def test_ramp_offsets() -> None:
    assert ramp_offsets(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert ramp_offsets(3, 0) == [0.0, 0.0, 0.0]
    assert ramp_offsets(0, 5) == []


def test_ev_ids_and_pool_reuse_only_after_leaving() -> None:
    assert ev_ids("EV_", 3) == ["EV_0001", "EV_0002", "EV_0003"]
    assert ev_ids("EV_", 10000)[-1] == "EV_10000"
    with pytest.raises(ValueError):
        ev_ids("EV/", 1)
    pool = EvIdPool(ev_ids("EV_", 3))
    got = [pool.acquire() for _ in range(3)]
    assert got == ["EV_0001", "EV_0002", "EV_0003"]
    assert pool.acquire() is None
    pool.release("EV_0002")
    assert pool.acquire() == "EV_0002"
    pool.release("EV_0003")
    pool.release("EV_0001")
    assert pool.acquire() == "EV_0001"  # lowest free first
    with pytest.raises(KeyError):
        pool.release("EV_0003")
    assert (pool.free, pool.busy) == (1, 2)


# --- settings and CLI parsing (no network) -------------------------------------------------


def test_settings_env_and_flag_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EV_COUNT", "7")
    monkeypatch.setenv("EV_RETRY_AFTER_S", "2.5")
    monkeypatch.setenv("EV_ID_PREFIX", "CAR-")
    monkeypatch.setenv("MQTT_PORT", "1999")
    s = EvSettings()
    assert (s.count, s.retry_after_s, s.id_prefix, s.mqtt.port) == (7, 2.5, "CAR-", 1999)
    s2 = EvSettings(count=3)
    assert s2.count == 3 and s2.retry_after_s == 2.5


def test_parse_url() -> None:
    assert parse_url("mqtt://127.0.0.1:1884") == ("127.0.0.1", 1884)
    assert parse_url("localhost") == ("localhost", 1883)
    with pytest.raises(ValueError):
        parse_url("http://x:1")


def test_default_command_is_fleet_and_bad_args_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["loadtest", "--requests", "5", "--concurrent", "2"])
    assert (args.command, args.requests, args.concurrent, args.ramp_up) == ("loadtest", 5, 2, 5.0)
    assert main(["--kw-mix", "0:1"]) == 2
    assert main(["--url", "http://nowhere:1"]) == 2
    assert "error" in capsys.readouterr().err
