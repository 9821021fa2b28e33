"""Agent commands decided in several read passes leave as one batch per substation, after the EVs' answers
(balancer/service.py ``_COMMAND_DELAY_S``). Over an in-memory transport, with the delay set so that nothing depends on
how fast the machine is."""

from __future__ import annotations

import asyncio
import json

import pytest

from balancer import service as service_module
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from tests.unit.test_balancer_edge import P, request, telemetry
from tests.unit.test_substation_agent_unit import FakeTransport


def _service() -> tuple[BalancerService, FakeTransport]:
    transport = FakeTransport()
    svc = BalancerService(BalancerSettings(startup_wait_s=0, state_file=""), transport)
    transport.connect()
    telemetry(transport)
    return svc, transport


def _commands(transport: FakeTransport) -> list[list[str]]:
    """Each command batch sent to substation A, as its commands' EV ids."""
    return [[c["ev_id"] for c in json.loads(p.payload)["commands"]] for p in transport.on(f"{P}/substation/A/command")]


def test_read_passes_within_the_delay_share_one_batch_after_the_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "_COMMAND_DELAY_S", 3600.0)  # (flushed by hand below)
    svc, transport = _service()

    async def passes() -> None:
        request(transport, "EV_1", "r1")
        await asyncio.sleep(0)  # the loop runs between two read passes
        request(transport, "EV_2", "r2")
        await asyncio.sleep(0)

    asyncio.run(passes())
    assert [json.loads(p.payload)["status"] for p in transport.sent if "/ev/" in p.topic] == ["assigned"] * 2
    assert _commands(transport) == []  # not yet
    svc._flush_commands()
    assert _commands(transport) == [["EV_1", "EV_2"]]  # one batch, in decision order
    assert transport.sent[-1].topic == f"{P}/substation/A/command"


def test_the_loop_publishes_the_batch_once_the_delay_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "_COMMAND_DELAY_S", 0.0)
    _svc, transport = _service()

    async def passes() -> None:
        request(transport, "EV_1", "r1")
        request(transport, "EV_2", "r2")
        assert _commands(transport) == []  # not within the read pass
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(passes())
    assert _commands(transport) == [["EV_1", "EV_2"]]
    request(transport, "EV_3", "r3")  # no loop running: published at once
    assert _commands(transport) == [["EV_1", "EV_2"], ["EV_3"]]
