"""``substation_agents.metrics``: the agents' Prometheus metrics read from real agents over an in-memory
transport (no broker), checked on a fresh registry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from grid_protocol.codec import encode
from grid_protocol.messages import SessionCommand, SessionCommands
from grid_protocol.topics import Topics
from grid_runtime.mqtt import InMessage, TransportStats
from grid_sim.substation import SubstationSim
from substation_agents.agent import SimClock, SubstationAgent
from substation_agents.metrics import register_agent_metrics

T = Topics()
WALL = 1_700_000_000.0


@dataclass
class FakeTransport:
    stats: TransportStats = field(default_factory=TransportStats)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    handler: Callable[[InMessage], None] | None = None
    callbacks: list[Callable[[], None]] = field(default_factory=list)

    def set_handler(self, handler: Callable[[InMessage], None]) -> None:
        self.handler = handler

    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        pass

    def on_connect(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> None:
        self.stats.published += 1

    def connect(self) -> None:
        self.stats.connects += 1
        self.connected.set()
        for cb in self.callbacks:
            cb()

    def deliver(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.handler is not None
        self.stats.received += 1
        self.handler(InMessage(topic, payload, 1, retain))

    async def run(self) -> None:  # pragma: no cover - not run here
        pass

    async def close(self, timeout: float = 2.0) -> None:  # pragma: no cover - not run here
        pass


class Wall:
    def __init__(self) -> None:
        self.t = WALL

    def __call__(self) -> float:
        return self.t


def make(sid: str, capacity_kw: float, base_kw: float, wall: Wall) -> tuple[SubstationAgent, FakeTransport]:
    clock = SimClock(17 * 3600.0, 60.0, monotonic=lambda: 0.0)
    sim = SubstationSim(sid, capacity_kw, lambda _t: base_kw, now_sim=clock.now())
    transport = FakeTransport()
    return SubstationAgent(sim, transport, T, clock, interval_s=1.0, wall=wall), transport


def cmd(kind: str, session_id: str, kw: float = 0.0) -> SessionCommand:
    return SessionCommand(command=kind, session_id=session_id, ev_id="EV_0001", ts=WALL,  # type: ignore[arg-type]
                          granted_kw=kw)


def batch(*commands: SessionCommand, valid_until: float | None = None, epoch: int | None = None) -> bytes:
    return encode(SessionCommands(ts=WALL, commands=list(commands), valid_until=valid_until, epoch=epoch))


Setup = tuple[CollectorRegistry, dict[str, SubstationAgent], dict[str, FakeTransport], Wall]


@pytest.fixture
def setup() -> Setup:
    wall = Wall()
    a, ta = make("A", 100.0, 50.0, wall)
    b, tb = make("B", 40.0, 10.0, wall)
    registry = CollectorRegistry()
    agents = {"A": a, "B": b}
    register_agent_metrics(lambda: agents, registry)
    ta.connect()  # B stays disconnected
    ta.deliver(T.balancer_status(), b'{"state": "online", "instance": "i1"}')  # A answers with its online status
    return registry, agents, {"A": ta, "B": tb}, wall


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_loads_capacity_and_sessions_in_watts(setup: Setup) -> None:
    registry, _agents, tr, _wall = setup
    tr["A"].deliver(T.command("A"), batch(cmd("start", "s1", 22.0), cmd("start", "s2", 11.0)))
    tr["A"].deliver(T.command("A"), batch(cmd("update", "s2", 5.0)))
    assert value(registry, "gridlb_agent_capacity_watts", substation="A") == 100_000.0
    assert value(registry, "gridlb_agent_capacity_watts", substation="B") == 40_000.0
    assert value(registry, "gridlb_agent_base_load_watts", substation="A") == 50_000.0
    assert value(registry, "gridlb_agent_ev_load_watts", substation="A") == 27_000.0
    assert value(registry, "gridlb_agent_load_watts", substation="A") == 77_000.0
    assert value(registry, "gridlb_agent_sessions", substation="A") == 2.0
    assert value(registry, "gridlb_agent_sessions", substation="B") == 0.0
    assert value(registry, "gridlb_agent_load_watts", substation="B") == 10_000.0
    assert value(registry, "gridlb_agent_sessions_started_total", substation="A") == 2.0
    assert value(registry, "gridlb_agent_paused", substation="A") == 0.0


def test_commands_by_kind_ignored_by_outcome_and_refused_by_reason(setup: Setup) -> None:
    registry, _agents, tr, _wall = setup
    a = tr["A"]
    a.deliver(T.command("A"), batch(cmd("start", "s1", 22.0)))
    a.deliver(T.command("A"), batch(cmd("start", "s1", 22.0)))  # redelivered
    a.deliver(T.command("A"), batch(cmd("update", "s1", 11.0), cmd("stop", "s1"), cmd("stop", "s9")))
    a.deliver(T.command("A"), b"{")
    a.deliver(T.command("A"), b"{")
    a.deliver(T.command("A"), batch(cmd("start", "s3", 7.0)), retain=True)
    for command, n in (("start", 1), ("update", 1), ("stop", 1)):
        assert value(registry, "gridlb_agent_commands_total", substation="A", command=command) == n
    assert value(registry, "gridlb_agent_commands_total", substation="B", command="start") == 0.0
    assert value(registry, "gridlb_agent_ignored_commands_total", substation="A", outcome="duplicate_start") == 1
    assert value(registry, "gridlb_agent_ignored_commands_total", substation="A", outcome="unknown_session") == 1
    assert value(registry, "gridlb_agent_bad_commands_total", substation="A", reason="malformed_json") == 2
    assert value(registry, "gridlb_agent_bad_commands_total", substation="A", reason="retained_command") == 1
    assert value(registry, "gridlb_agent_sessions_ended_total", substation="A") == 1
    assert value(registry, "gridlb_agent_sessions", substation="A") == 0


def test_lease_expiry_pauses_and_is_counted(setup: Setup) -> None:
    registry, agents, tr, wall = setup
    tr["A"].deliver(T.command("A"), batch(cmd("start", "s1", 22.0), valid_until=WALL + 10))
    wall.t = WALL + 11
    agents["A"].publish_telemetry()
    assert value(registry, "gridlb_agent_lease_expiries_total", substation="A") == 1
    assert value(registry, "gridlb_agent_paused", substation="A") == 1
    assert value(registry, "gridlb_agent_ev_load_watts", substation="A") == 0
    assert value(registry, "gridlb_agent_sessions", substation="A") == 1  # paused, not ended
    assert value(registry, "gridlb_agent_telemetry_sent_total", substation="A") == 1
    tr["A"].deliver(T.command("A"), batch(valid_until=WALL + 20))  # renewal resumes
    assert value(registry, "gridlb_agent_paused", substation="A") == 0
    assert value(registry, "gridlb_agent_ev_load_watts", substation="A") == 22_000
    assert value(registry, "gridlb_agent_lease_expiries_total", substation="A") == 1


def test_a_batch_of_an_older_epoch_has_no_effect_and_is_counted(setup: Setup) -> None:
    """Fencing: after epoch 5 was seen, epoch 4 (an old region owner that woke up) changes nothing."""
    registry, agents, tr, _wall = setup
    tr["A"].deliver(T.command("A"), batch(cmd("start", "s1", 22.0), valid_until=WALL + 10, epoch=5))
    tr["A"].deliver(T.command("A"), batch(cmd("stop", "s1"), cmd("start", "s2", 11.0), valid_until=WALL + 99,
                                          epoch=4))
    tr["A"].deliver(T.command("A"), batch(cmd("stop", "s1"), valid_until=WALL + 99))  # no epoch: refused too
    assert set(agents["A"].sim.sessions) == {"s1"}
    assert agents["A"].sim.lease.until == WALL + 10  # not renewed
    assert value(registry, "gridlb_agent_fenced_batches_total", substation="A") == 2
    assert value(registry, "gridlb_agent_fenced_batches_total", substation="B") == 0
    assert value(registry, "gridlb_agent_commands_total", substation="A", command="stop") == 0
    tr["A"].deliver(T.command("A"), batch(cmd("update", "s1", 11.0), epoch=6))  # a newer owner acts
    assert agents["A"].sim.sessions["s1"].granted_kw == 11.0


def test_mqtt_connection_per_substation(setup: Setup) -> None:
    registry, _agents, tr, _wall = setup
    assert value(registry, "gridlb_mqtt_connected", client="A") == 1
    assert value(registry, "gridlb_mqtt_connected", client="B") == 0
    assert value(registry, "gridlb_mqtt_connects_total", client="A") == 1
    assert value(registry, "gridlb_mqtt_messages_published_total", client="A") == tr["A"].stats.published >= 1


def test_exposition_is_valid_text() -> None:
    registry = CollectorRegistry()
    register_agent_metrics(lambda: {}, registry)  # before the agents exist: no samples, no error
    text = generate_latest(registry).decode()
    assert "# TYPE gridlb_agent_load_watts gauge" in text
    assert "# TYPE gridlb_agent_commands_total counter" in text
