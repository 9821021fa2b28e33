"""The balancer process's GC policy (balancer/gc_policy.py): what it freezes and when, that frozen cyclic garbage
is reclaimed by the full pass, and that the service applies it at start-up and on its periodic step (and
``python -m balancer`` hands its services the process's policy). Observed through the interpreter's own
accounting (``gc.get_objects``, ``gc.get_freeze_count``, weak references), never through timing."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from balancer import cli
from balancer.gc_policy import PROCESS_GC, GcPolicy
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from grid_protocol import ChargeRequest, Release, Telemetry, encode
from grid_runtime.mqtt import InMessage
from tests.unit.test_substation_agent_unit import FakeTransport


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Each test starts and ends with nothing frozen and the interpreter's thresholds (the test process is not a
    balancer)."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    gc.collect()


class Node:
    """A tracked object that can be part of a reference cycle."""

    def __init__(self) -> None:
        self.other: Any = None


def young(obj: object) -> bool:
    """``obj`` is in one of the collected generations (not frozen)."""
    return any(o is obj for o in gc.get_objects())


def test_start_freezes_everything_alive_once_per_process() -> None:
    policy = GcPolicy(freeze_every_s=1.0, full_every_s=60.0)
    alive = Node()
    policy.start(100.0)
    assert policy.started and policy.freezes == 1
    assert gc.get_freeze_count() > 0 and not young(alive)
    frozen = gc.get_freeze_count()
    policy.start(100.5)  # a second region's service starting: done already
    assert policy.freezes == 1 and gc.get_freeze_count() >= frozen


def test_start_sets_the_young_threshold_and_keeps_the_older_ones() -> None:
    older = gc.get_threshold()[1:]
    GcPolicy(young_threshold=20_000).start(0.0)
    assert gc.get_threshold() == (20_000, *older)


def test_no_young_threshold_leaves_the_thresholds_alone() -> None:
    gc.set_threshold(700, 10, 10)
    GcPolicy(young_threshold=None).start(0.0)
    assert gc.get_threshold() == (700, 10, 10)


def test_the_periodic_step_freezes_what_survived_when_due() -> None:
    policy = GcPolicy(freeze_every_s=1.0, full_every_s=60.0)
    policy.step(0.0)  # not started: nothing happens
    assert policy.freezes == 0 and gc.get_freeze_count() == 0
    policy.start(0.0)
    later = Node()
    policy.step(0.5)  # not due
    assert young(later) and policy.freezes == 1
    policy.step(1.0)
    assert not young(later) and policy.freezes == 2
    newer = Node()
    policy.step(1.9)
    assert young(newer)
    policy.step(2.0)
    assert not young(newer) and policy.freezes == 3 and policy.full_passes == 0


def test_the_full_pass_reclaims_cycles_that_were_frozen_alive() -> None:
    policy = GcPolicy(freeze_every_s=1.0, full_every_s=10.0)
    policy.start(0.0)
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic GC can free it
    gone = weakref.ref(a)
    policy.step(1.0)  # frozen while alive
    del a, b
    gc.collect()  # an ordinary collection does not look at frozen objects
    assert gone() is not None
    for t in range(2, 10):
        policy.step(float(t))
    assert gone() is not None and policy.full_passes == 0
    policy.step(10.0)
    assert gone() is None
    assert policy.full_passes == 1 and policy.last_full_collected >= 2
    assert gc.get_freeze_count() > 0  # and what lives on is frozen again


def test_a_clock_that_steps_back_restarts_the_intervals() -> None:
    policy = GcPolicy(freeze_every_s=1.0, full_every_s=10.0)
    policy.start(1000.0)
    policy.step(5.0)  # the wall clock jumped back 995 s: the intervals restart from it (a freeze now), not wait
    first = policy.freezes
    policy.step(5.5)
    assert policy.freezes == first
    policy.step(6.0)
    assert policy.freezes == first + 1
    policy.step(15.0)
    assert policy.full_passes == 1


def _run_until(svc: BalancerService, done: Callable[[], bool]) -> None:
    """Run the service until ``done`` holds (at most 5 s)."""
    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(svc.run(stop))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if done():
                break
        stop.set()
        await asyncio.wait_for(running, 2.0)

    asyncio.run(scenario())


def test_the_service_applies_its_policy_at_start_and_on_every_periodic_step() -> None:
    policy = GcPolicy(freeze_every_s=0.0, full_every_s=3600.0)  # every step freezes
    svc = BalancerService(BalancerSettings(startup_wait_s=0, tick_interval_s=0.01, state_file=""), FakeTransport(),
                          gc_policy=policy)
    assert not policy.started and gc.get_freeze_count() == 0  # building a service does not touch the GC
    _run_until(svc, lambda: policy.freezes >= 3)
    assert policy.started
    assert policy.freezes >= 3  # start-up, then periodic steps
    assert gc.get_freeze_count() > 0 and not young(svc.core)


@pytest.mark.instruments_compiled
def test_a_service_without_a_policy_leaves_the_gc_alone() -> None:
    transport = FakeTransport()
    svc = BalancerService(BalancerSettings(startup_wait_s=0, tick_interval_s=0.01, state_file=""), transport)
    steps = 0
    step = svc.gc_step

    def counted() -> None:
        nonlocal steps
        steps += 1
        step()

    svc.gc_step = counted  # type: ignore[method-assign]
    _run_until(svc, lambda: steps >= 3)
    assert steps >= 3 and gc.get_freeze_count() == 0


def test_the_balancer_process_hands_its_services_the_process_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[GcPolicy | None] = []

    def build_all(settings: BalancerSettings, gc_policy: GcPolicy | None = None) -> list[BalancerService]:
        built.append(gc_policy)
        return []

    monkeypatch.setattr(cli, "load_settings", lambda cls: BalancerSettings(state_file=""))
    monkeypatch.setattr(cli, "build_all", build_all)
    monkeypatch.setattr(cli, "serve_metrics", lambda *a: None)
    monkeypatch.setattr(cli, "stop_metrics", lambda *a: None)
    monkeypatch.setattr(cli.metrics, "register", lambda *a: None)
    monkeypatch.setattr(cli, "run_until_signalled", lambda run: None)
    assert cli.main([]) == 0
    assert built == [PROCESS_GC]


def test_the_request_path_makes_no_garbage_cycles() -> None:
    """Why the policy may leave cycles to the hourly full pass: deciding requests (placed and queued), releases and
    telemetry, and the periodic step, leave no reference cycle behind. (A cycle made per message would be kept, frozen,
    for up to ``full_every_s``.)"""
    svc = BalancerService(BalancerSettings(startup_wait_s=0, state_file=""), FakeTransport())
    topics = svc.topics

    def telemetry(sid: str, seq: int) -> InMessage:
        return InMessage(topics.telemetry(sid), encode(Telemetry(
            substation_id=sid, ts=time.time(), seq=seq, capacity_kw=400.0, load_kw=0.0, base_load_kw=0.0,
            ev_load_kw=0.0, active_sessions=0)), 0, False)

    def request(i: int) -> InMessage:
        return InMessage(topics.request(f"EV_{i:05d}"), encode(ChargeRequest(
            request_id=f"r{i}", ev_id=f"EV_{i:05d}", requested_kw=22.0, duration_minutes=60.0)), 1, False)

    def release(i: int) -> InMessage:
        return InMessage(topics.release(f"EV_{i:05d}"), encode(Release(request_id=f"r{i}")), 1, False)

    for sid in ("S1", "S2"):
        svc.handle(telemetry(sid, 1))
    svc.handle(request(0))  # (first use: msgspec builds its decoders, one cycle each, once per process)
    svc.handle(release(0))
    svc.periodic(time.monotonic())
    gc.collect()
    gc.disable()
    try:
        for i in range(1, 3001):  # 2 x 400 kW hold ~36 sessions of 22 kW: most of these are queued, then served
            svc.handle(request(i))
            if i % 2 == 0:
                svc.handle(release(i // 2))  # (the running ones first, then queued ones)
            if i % 500 == 0:
                svc.handle(telemetry("S1", i))
                svc.periodic(time.monotonic())
        decided = svc.core.counters
        found = gc.collect()
    finally:
        gc.enable()
    assert decided["assigned"] > 500 and decided["queued"] > 500 and decided["completed:released"] > 500
    assert found == 0
