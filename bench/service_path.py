"""The balancer's per-request CPU in-process, on ``./gridctl bench``'s requests, without MQTT.

    python -m bench service-path [--requests 20000] [--repeat 9]

``BalancerService`` over an in-memory transport (bench/scale.py's), its decision-latency metric hooked as in the
shipped balancer, fed what the bench sends: telemetry of four substations with room for every request, then one
request each from distinct EVs (22 kW, 60 min), 50 per read pass with the loop run in between (the agent commands
are flushed there). Printed, CPU µs per request (process time, which holds up on a loaded machine better than
wall-clock figures):
  service+core   the whole path as shipped (GC on, as after the balancer's start-up ``gc.freeze()``);
  service alone  the same requests with the core's ``on_request`` replaced by the effects it returned on the first
                 pass, GC off: decode, admission, dispatch, encoding and publishing, the latency metric.
Best and median of ``--repeat`` passes, each on a fresh service. With the compiled core (``NATIVE.status``) only the
whole path is measured: a compiled class's methods cannot be replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from typing import Any

from prometheus_client import CollectorRegistry

from balancer import NATIVE, metrics
from balancer.core import Effect
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from bench.bench_balancer import CAPACITY_KW, SUBSTATIONS
from bench.report import builds_line
from bench.scale import _MemoryTransport
from grid_protocol import ChargeRequest, Telemetry, Topics, encode
from grid_runtime.mqtt import InMessage

_READ_PASS = 50


def _service() -> BalancerService:
    transport = _MemoryTransport()
    settings = BalancerSettings(startup_wait_s=0, queue_max=1_000_000)
    service = BalancerService(settings, transport)
    metrics.register(service, CollectorRegistry())
    transport.connect()
    for sid in SUBSTATIONS:
        telemetry = Telemetry(substation_id=sid, ts=time.time(), seq=1, capacity_kw=CAPACITY_KW, load_kw=0.0,
                              base_load_kw=0.0, ev_load_kw=0.0, active_sessions=0)
        service.handle(InMessage(service.topics.telemetry(sid), encode(telemetry), 0, False))
    return service


def _requests(n: int, tag: str) -> list[InMessage]:
    topics = Topics()
    return [InMessage(topics.request(f"{tag}_{i}"), encode(ChargeRequest(
        request_id=f"r{i}", ev_id=f"{tag}_{i}", requested_kw=22.0, duration_minutes=60.0)), 1, False)
        for i in range(n)]


async def _feed(service: BalancerService, requests: list[InMessage]) -> float:
    """CPU µs per request, read passes of ``_READ_PASS`` with the loop run after each (the command flush)."""
    start = time.process_time()
    for i in range(0, len(requests), _READ_PASS):
        for msg in requests[i:i + _READ_PASS]:
            service.handle(msg)
        await asyncio.sleep(0)
    return (time.process_time() - start) / len(requests) * 1e6


async def _measure(n: int, repeat: int) -> dict[str, list[float]]:
    requests = _requests(n, "B")
    warm = _requests(1000, "W")
    whole: list[float] = []
    for _ in range(repeat):
        service = _service()
        await _feed(service, warm)
        gc.collect()
        gc.freeze()
        whole.append(await _feed(service, requests))
        gc.unfreeze()
    if NATIVE.status == "compiled":
        # (a compiled Balancer's methods cannot be swapped: the split needs the interpreted modules)
        print("service alone: not measured on the compiled core (it swaps the core's on_request); "
              "GRID_NATIVE=off measures it interpreted")
        return {"service+core": whole}
    first = _service()
    effects: dict[str, list[Effect]] = {}
    on_request = first.core.on_request

    def recording(ev_id: str, request: Any, now: float) -> list[Effect]:
        effects[ev_id] = out = on_request(ev_id, request, now)
        return out

    first.core.on_request = recording  # type: ignore[method-assign,assignment]
    await _feed(first, requests)
    alone: list[float] = []
    for _ in range(repeat):
        service = _service()
        service.core.on_request = lambda ev_id, request, now: effects[ev_id]  # type: ignore[method-assign,assignment]
        gc.collect()
        gc.disable()
        try:
            alone.append(await _feed(service, requests))
        finally:
            gc.enable()
    return {"service+core": whole, "service alone": alone}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench service-path", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args(argv)
    results = asyncio.run(_measure(args.requests, args.repeat))
    print(builds_line())
    for name, values in results.items():
        print(f"{name:14s} CPU µs per request: best {min(values):.2f}  median {statistics.median(values):.2f}  "
              f"({len(values)} passes of {args.requests:,})")
    return 0
