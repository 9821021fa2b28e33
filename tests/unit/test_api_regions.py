"""The api's MQTT bridge over regions (issue 12), with an in-memory transport: it subscribes to every region, keeps
each region's balancer status and queue, and sends an operator's control or limits to the balancer of the region
the substation's retained status names (a region whose balancer is offline is refused at once)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from api.mqtt_bridge import BalancerOffline, Bridge
from api.settings import ApiSettings
from api.state import StateStore
from grid_protocol import ControlCommand, LimitSchedule, TopicKind, Topics
from grid_runtime.mqtt import InMessage
from tests.unit.test_substation_agent_unit import FakeTransport

T = Topics()
EAST = T.for_region("east")


class Transport(FakeTransport):
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,  # type: ignore[override]
                correlation_data: bytes | None = None, **_: Any) -> None:
        super().publish(topic, payload, qos, retain, correlation_data)


def _bridge() -> tuple[Bridge, Transport]:
    transport = Transport()
    bridge = Bridge(ApiSettings(), StateStore(), transport)  # type: ignore[arg-type]
    transport.connected.set()
    return bridge, transport


def _deliver(bridge: Bridge, topic: str, body: dict[str, Any], retain: bool = True) -> None:
    bridge.handle(InMessage(topic, json.dumps(body).encode(), 1, retain))


def test_the_bridge_reads_every_region() -> None:
    bridge, transport = _bridge()
    for kind in (TopicKind.SUBSTATION_STATE, TopicKind.BALANCER_STATUS, TopicKind.BALANCER_QUEUE):
        assert set(T.filters_all_regions(kind)) <= set(transport.subs), kind
    _deliver(bridge, EAST.balancer_status(), {"state": "online", "ts": 1.0, "version": "x", "instance": "e1"})
    _deliver(bridge, EAST.balancer_queue(), {"ts": 1.0, "length": 3, "entries": []})
    _deliver(bridge, T.balancer_status(), {"state": "online", "ts": 1.0, "version": "x", "instance": "d1"})
    store = bridge.store
    assert store.balancers["east"].instance == "e1" and store.balancer is not None and store.balancer.instance == "d1"
    assert store.queues["east"].length == 3 and store.queue_state is None


def test_control_and_limits_go_to_the_substations_region() -> None:
    bridge, transport = _bridge()
    _deliver(bridge, EAST.substation_status("E1"), {"state": "online", "substation_id": "E1", "region": "east"})
    _deliver(bridge, T.substation_status("A"), {"state": "online", "substation_id": "A"})

    async def send() -> None:
        await bridge.control(ControlCommand(action="drain", substation_id="E1"), 0.05)
        await bridge.control(ControlCommand(action="drain", substation_id="A"), 0.05)
        await bridge.limits("E1", LimitSchedule(source="dso", entries=[]), 0.05)

    asyncio.run(send())
    assert [p.topic for p in transport.sent] == [EAST.balancer_control(), T.balancer_control(),
                                                 EAST.substation_limits("E1")]
    # The east balancer offline (its retained status): refused at once, nothing sent; the default region unaffected.
    _deliver(bridge, EAST.balancer_status(), {"state": "offline"})
    transport.sent.clear()
    with pytest.raises(BalancerOffline, match="region east"):
        asyncio.run(bridge.control(ControlCommand(action="drain", substation_id="E1"), 0.05))
    asyncio.run(bridge.control(ControlCommand(action="undrain", substation_id="A"), 0.05))
    assert [p.topic for p in transport.sent] == [T.balancer_control()]
