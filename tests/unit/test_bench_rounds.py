"""``./gridctl bench``'s interleaved rounds (bench/bench_balancer.py): the order, the combined figures, the ratio."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.bench_balancer import combine, echo_ratios, round_order, round_ratios, run_rounds


def _result(kind: str, client: str, rate: float, cpu: float, lat_ms: list[float], rss: float = 50.0) -> dict[str, Any]:
    """A single round's result as ``_phase`` returns it (figures made up)."""
    def part(mode: str, n: int) -> dict[str, Any]:
        return {"mode": mode, "requests": n, "answered": n, "lost": 0, "elapsed_s": n / rate,
                "answers_per_s": rate, "p50_ms": lat_ms[0], "p95_ms": lat_ms[1], "p99_ms": lat_ms[2],
                "max_ms": lat_ms[2], "statuses": {"assigned": n}}
    return {"responder": kind, "client": client, "pipelined": {**part("pipelined", 100), "window": 40},
            "paced": {**part("paced", 10), "rate": 1000.0}, "cpu_us_per_request": cpu,
            "cpu_share": {kind: 0.5, "load generator": 0.4}, "rss_mb": rss}


def test_rounds_alternate_the_order() -> None:
    responders = [("echo", "paho"), ("balancer", "paho"), ("balancer", "aiomqtt")]
    assert round_order(responders, 1) == responders
    assert round_order(responders, 2) == responders[::-1]
    assert round_order(responders, 3) == responders


def test_run_rounds_interleaves_and_keeps_each_round() -> None:
    calls: list[tuple[str, str, int]] = []
    rates = {"echo": [10_000.0, 8_000.0, 12_000.0], "balancer": [8_500.0, 6_000.0, 9_000.0]}

    async def phase(kind: str, client: str, samples: list[float], round_no: int) -> dict[str, Any]:
        calls.append((kind, client, round_no))
        samples.extend([0.001 * round_no] * 10)
        return _result(kind, client, rates[kind][round_no - 1], 30.0 if kind == "echo" else 70.0,
                       [1.0, 2.0, 3.0])

    results = asyncio.run(run_rounds(phase, ["paho"], 3))
    assert calls == [("echo", "paho", 1), ("balancer", "paho", 1), ("balancer", "paho", 2), ("echo", "paho", 2),
                     ("echo", "paho", 3), ("balancer", "paho", 3)]
    echo, balancer = results
    assert echo["responder"] == "echo" and balancer["responder"] == "balancer"
    assert [r["round"] for r in echo["rounds"]] == [1, 2, 3]
    assert [r["order"] for r in balancer["rounds"]] == [1, 0, 1]
    assert echo["pipelined"]["answers_per_s"] == 10_000.0  # the median
    assert echo["paced"]["requests"] == 30
    assert round_ratios(echo, balancer) == pytest.approx([0.85, 0.75, 0.75])
    # the median of the rounds' ratios, not the ratio of the medians (8,500 / 10,000)
    assert echo_ratios(results) == [(balancer, pytest.approx(0.75))]


def test_combine_pools_the_paced_samples_and_takes_medians() -> None:
    rounds = [_result("balancer", "paho", 9_000.0, 80.0, [1.0, 2.0, 5.0], rss=70.0),
              _result("balancer", "paho", 7_000.0, 60.0, [1.0, 2.0, 9.0], rss=75.0),
              _result("balancer", "paho", 8_000.0, 70.0, [1.0, 2.0, 4.0], rss=72.0)]
    rounds[1]["paced"]["lost"] = 1
    samples = [0.001] * 296 + [0.009, 0.009, 0.010, 0.020]  # more than 1 % of the pooled samples at 9 ms or more
    combined = combine(rounds, samples)
    assert combined["pipelined"]["answers_per_s"] == 8_000.0
    assert combined["pipelined"]["p99_ms"] == 5.0  # the pipelined run's latencies: median of the rounds
    assert combined["pipelined"]["window"] == 40 and combined["paced"]["rate"] == 1000.0
    assert combined["cpu_us_per_request"] == 70.0
    assert combined["cpu_share"] == {"balancer": 0.5, "load generator": 0.4}
    assert combined["rss_mb"] == 75.0
    assert combined["paced"]["p50_ms"] == 1.0
    assert combined["paced"]["p99_ms"] == 9.0  # nearest rank of the 300 pooled samples
    assert combined["paced"]["max_ms"] == 20.0
    assert combined["paced"]["lost"] == 1 and combined["paced"]["requests"] == 30
    assert combined["paced"]["statuses"] == {"assigned": 30}
    assert combined["rounds"] == rounds


def test_one_round_is_the_round_itself() -> None:
    """``--rounds 1`` gives what a single phase gave (bench cluster's default), with the round beside it."""
    single = _result("echo", "paho", 10_000.0, 30.0, [0.5, 1.0, 2.0])
    single["paced"].update(p50_ms=2.0, p95_ms=3.0, p99_ms=3.0, max_ms=3.0)
    combined = combine([single], [0.001, 0.002, 0.003])
    assert {k: v for k, v in combined.items() if k != "rounds"} == single
