"""Substation agent protocol behaviour against an in-memory transport (no broker, no real time)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import pytest

from grid_protocol.codec import decode, encode
from grid_protocol.messages import (
    ErrorReport,
    SessionCommand,
    SessionCommands,
    SessionEvent,
    SubstationStatus,
    Telemetry,
)
from grid_protocol.topics import Topics
from grid_runtime.mqtt import InMessage, TransportStats
from grid_runtime.settings import GridSettings, MqttSettings
from grid_sim.substation import SubstationSim
from substation_agents.agent import STATUS_WAIT_S, SimClock, SubstationAgent, agent_mqtt_settings, offline_will
from substation_agents.settings import AgentSettings, SubstationSpec, parse_substations

T = Topics()
WALL = 1_700_000_000.0


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class FakeTransport:
    stats: TransportStats = field(default_factory=TransportStats)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    handler: Callable[[InMessage], None] | None = None
    subs: dict[str, int] = field(default_factory=dict)
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    sent: list[Published] = field(default_factory=list)
    closed: bool = False

    def set_handler(self, handler: Callable[[InMessage], None]) -> None:
        self.handler = handler

    def subscribe(self, topic_filter: str, qos: int = 1, *, retain_as_published: bool = False) -> None:
        self.subs[topic_filter] = qos

    def on_connect(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> None:
        self.sent.append(Published(topic, payload, qos, retain))

    def connect(self) -> None:
        self.connected.set()
        for cb in self.callbacks:
            cb()

    def deliver(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.handler is not None
        self.handler(InMessage(topic, payload, 1, retain))

    _closed_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        self.connect()
        await self._closed_event.wait()

    async def close(self, timeout: float = 2.0) -> None:
        self.closed = True
        self.connected.clear()
        self._closed_event.set()

    def on(self, topic: str) -> list[Published]:
        return [p for p in self.sent if p.topic == topic]


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(base_kw: float = 50.0, speedup: float = 60.0) -> tuple[SubstationAgent, FakeTransport, FakeTime]:
    mono = FakeTime()
    clock = SimClock(17 * 3600.0, speedup, monotonic=mono)
    sim = SubstationSim("A", 100.0, lambda _t: base_kw, now_sim=clock.now())
    transport = FakeTransport()
    agent = SubstationAgent(sim, transport, T, clock, interval_s=1.0, wall=lambda: WALL)
    return agent, transport, mono


def command(kind: str = "start", session_id: str = "s1", **kw: object) -> SessionCommand:
    fields: dict[str, object] = {"granted_kw": 22.0 if kind == "start" else 0.0, **kw}
    return SessionCommand(command=kind, session_id=session_id, ev_id="EV_0001", ts=WALL, **fields)  # type: ignore[arg-type]


def batch(*commands: SessionCommand) -> bytes:
    """A command-topic payload as the balancer sends it."""
    return encode(SessionCommands(ts=WALL, commands=list(commands)))


def start(session_id: str = "s1", **kw: object) -> bytes:
    return batch(command("start", session_id, **kw))


def events(transport: FakeTransport) -> list[SessionEvent]:
    return [decode(p.payload, SessionEvent) for p in transport.on(T.session_events("A"))]


def test_subscribes_to_own_command_and_error_topics_and_the_balancer_status() -> None:
    _, tr, _ = make()
    assert tr.subs == {T.command("A"): 1, T.substation_error("A"): 1, T.balancer_status(): 1}


def test_online_status_retained_on_every_connect_after_the_inventory() -> None:
    """On every connect the online status waits for the balancer's retained status: with a balancer online it
    closes the inventory (announced_for), without one (offline, or none after STATUS_WAIT_S) it is plain."""
    agent, tr, _ = make()
    tr.connect()
    assert tr.on(T.substation_status("A")) == []  # not before the balancer has heard what runs here
    tr.deliver(T.balancer_status(), b'{"state": "online", "instance": "i1"}', retain=True)
    tr.connect()
    tr.deliver(T.balancer_status(), b'{"state": "offline"}', retain=True)
    tr.connect()
    agent._online_without_balancer()  # (the timer a running loop would fire after STATUS_WAIT_S)
    statuses = [decode(p.payload, SubstationStatus) for p in tr.on(T.substation_status("A"))]
    assert [(s.state, s.announced_for, s.sessions) for s in statuses] == [
        ("online", "i1", 0), ("online", None, 0), ("online", None, 0)]
    for p in tr.on(T.substation_status("A")):
        assert (p.qos, p.retain) == (1, True)
    for status in statuses:
        assert (status.substation_id, status.capacity_kw) == ("A", 100.0)
    agent._online_without_balancer()  # said already on this connection: not again
    assert len(tr.on(T.substation_status("A"))) == 3


def test_online_status_without_a_balancer_after_status_wait() -> None:
    async def scenario() -> FakeTransport:
        _agent, tr, _ = make()
        tr.connect()
        await asyncio.sleep(STATUS_WAIT_S + 0.2)
        return tr

    tr = asyncio.run(scenario())
    assert [decode(p.payload, SubstationStatus).state for p in tr.on(T.substation_status("A"))] == ["online"]


def test_will_is_retained_offline_status() -> None:
    will = offline_will(T, "A")
    assert (will.topic, will.qos, will.retain) == (T.substation_status("A"), 1, True)
    assert decode(will.payload, SubstationStatus) == SubstationStatus(state="offline", substation_id="A")


def test_region_is_in_every_status_and_the_will() -> None:
    """The agent's region (SUBSTATION_REGION) is in its online status and its last will; by default 'default'."""
    assert decode(offline_will(T, "A", "west").payload, SubstationStatus).region == "west"
    assert decode(offline_will(T, "A").payload, SubstationStatus).region == "default"
    mono = FakeTime()
    clock = SimClock(17 * 3600.0, 60.0, monotonic=mono)
    tr = FakeTransport()
    agent = SubstationAgent(SubstationSim("A", 100.0, lambda _t: 10.0, now_sim=clock.now()), tr, T, clock,
                            interval_s=1.0, wall=lambda: WALL, region="west")
    tr.connect()
    agent._online_without_balancer()
    assert [decode(p.payload, SubstationStatus).region for p in tr.on(T.substation_status("A"))] == ["west"]


def test_region_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBSTATION_REGION", raising=False)
    assert AgentSettings().substation_region == "default"
    monkeypatch.setenv("SUBSTATION_REGION", "north-east_2")
    assert AgentSettings().substation_region == "north-east_2"
    for bad in ("a/b", "", "x" * 65, "eu west"):
        monkeypatch.setenv("SUBSTATION_REGION", bad)
        with pytest.raises(ValueError, match="region"):
            AgentSettings()


def test_agent_account_and_clean_session() -> None:
    mqtt = agent_mqtt_settings(MqttSettings(username="ignored", account_secret="x"), "north")
    assert mqtt.username == "substation.north"
    assert mqtt.session_expiry_s == 0
    assert mqtt.account_secret == "x"


def test_telemetry_only_while_connected_with_increasing_seq() -> None:
    agent, tr, mono = make()
    agent.publish_telemetry()
    assert tr.on(T.telemetry("A")) == []
    tr.connect()
    for _ in range(3):
        mono.t += 1.0
        agent.publish_telemetry()
    sent = tr.on(T.telemetry("A"))
    assert [p.qos for p in sent] == [0, 0, 0]
    assert not any(p.retain for p in sent)
    assert [decode(p.payload, Telemetry).seq for p in sent] == [0, 1, 2]


def test_start_then_energy_delivered() -> None:
    agent, tr, mono = make(speedup=60.0)
    tr.connect()
    tr.deliver(T.command("A"), start(energy_kwh=11.0))
    assert [(e.event, e.session_id, e.ev_id, e.substation_id) for e in events(tr)] == [
        ("started", "s1", "EV_0001", "A")]
    mono.t = 10.0  # 10 real s x 60 = 10 sim minutes
    agent.publish_telemetry()
    t = decode(tr.on(T.telemetry("A"))[-1].payload, Telemetry)
    assert (t.ev_load_kw, t.active_sessions, t.load_kw) == (22.0, 1, 72.0)
    mono.t = 40.0
    agent.publish_telemetry()
    ended = events(tr)[-1]
    assert (ended.event, ended.reason, ended.energy_delivered_kwh) == ("ended", "energy_delivered", 11.0)
    t = decode(tr.on(T.telemetry("A"))[-1].payload, Telemetry)
    assert (t.ev_load_kw, t.active_sessions) == (0.0, 0)
    assert agent.stats.sessions_started == agent.stats.sessions_ended == 1


def test_stop_publishes_ended_with_command_reason_and_energy_up_to_the_command() -> None:
    _, tr, mono = make(speedup=60.0)
    tr.connect()
    tr.deliver(T.command("A"), start())
    mono.t = 30.0  # half a simulated hour, no tick in between
    tr.deliver(T.command("A"), batch(command("stop", reason="released")))
    ended = events(tr)[-1]
    assert (ended.event, ended.reason) == ("ended", "released")
    assert ended.energy_delivered_kwh == pytest.approx(11.0)


def test_duplicate_start_publishes_nothing_more() -> None:
    agent, tr, _ = make()
    tr.connect()
    tr.deliver(T.command("A"), start())
    tr.deliver(T.command("A"), start())
    assert [e.event for e in events(tr)] == ["started"]
    assert agent.stats.ignored_commands == 1


def test_unknown_stop_is_counted_not_answered() -> None:
    agent, tr, _ = make()
    tr.connect()
    tr.deliver(T.command("A"), batch(command("stop", "zz")))
    assert events(tr) == []
    assert agent.stats.ignored_commands == 1


def test_batch_is_applied_in_order() -> None:
    agent, tr, _ = make()
    tr.connect()
    tr.deliver(T.command("A"), start("s1"))
    tr.deliver(T.command("A"), batch(command("update", "s1", granted_kw=7.0), command("stop", "s1", reason="x"),
                                     command("start", "s2", granted_kw=11.0), command("start", "s3")))
    assert [(e.event, e.session_id) for e in events(tr)] == [
        ("started", "s1"), ("ended", "s1"), ("started", "s2"), ("started", "s3")]
    assert agent.sim.ev_load_kw == 33.0


def test_bare_command_is_accepted_too() -> None:
    agent, tr, _ = make()
    tr.connect()
    tr.deliver(T.command("A"), encode(command("start")))
    assert [e.event for e in events(tr)] == ["started"]
    assert agent.stats.bad_commands == 0


def test_batch_with_one_invalid_command_is_refused_as_a_whole() -> None:
    agent, tr, _ = make()
    tr.connect()
    good = msgspec.json.encode(command("start", "s1"))
    bad = b'{"command":"start","session_id":"s2","ev_id":"EV/1","ts":1}'
    tr.deliver(T.command("A"), b'{"ts":1,"commands":[' + good + b"," + bad + b"]}")
    assert agent.stats.bad_commands == 1
    assert not agent.sim.sessions
    assert events(tr) == []


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"{}", b'{"command":"start"}', b"[1,2]", b"\xff\xfe",
    b'{"ts":1,"commands":{}}', b'{"commands":[{"command":"start"}]}',
    b'{"command":"explode","session_id":"s","ev_id":"E","ts":1}',
    b'{"command":"start","session_id":"s","ev_id":"E/x","ts":1}',
    b'{"command":"start","session_id":"s","ev_id":"E","ts":1,"granted_kw":NaN}',
    b'{"command":"start","session_id":"s","session_id":"t","ev_id":"E","ts":1}',
    b"[" * 100_000,
])
def test_bad_command_is_counted_and_harmless(payload: bytes) -> None:
    agent, tr, mono = make()
    tr.connect()
    tr.deliver(T.command("A"), payload)
    assert agent.stats.bad_commands == 1
    assert events(tr) == []
    mono.t += 1
    agent.publish_telemetry()
    assert tr.on(T.telemetry("A"))


def test_retained_command_is_refused() -> None:
    agent, tr, _ = make()
    tr.connect()
    tr.deliver(T.command("A"), start(), retain=True)
    assert agent.stats.bad_commands == 1
    assert not agent.sim.sessions


def test_error_report_is_logged_not_fatal() -> None:
    agent, tr, _ = make()
    report = ErrorReport(reason="invalid_field", detail="x", topic=T.telemetry("A"), ts=WALL)
    tr.deliver(T.substation_error("A"), encode(report))
    tr.deliver(T.substation_error("A"), b"junk")
    assert agent.stats.error_reports == 2


def test_reconnect_keeps_sessions_and_announces_them_before_the_online_status() -> None:
    """A broker restart or a network blip ends nothing (D1): the sessions stay, the lease decides whether they
    draw power, and the balancer hears the whole inventory before the online status that closes it."""
    agent, tr, _ = make()
    tr.connect()
    tr.deliver(T.command("A"), start("s1"))
    tr.connected.clear()
    tr.connect()
    assert set(agent.sim.sessions) == {"s1"}
    tr.deliver(T.balancer_status(), b'{"state": "online", "instance": "b2"}', retain=True)
    assert [(e.event, e.session_id) for e in events(tr)] == [("started", "s1"), ("running", "s1")]
    assert [p.topic for p in tr.sent[-2:]] == [T.session_events("A"), T.substation_status("A")]
    status = decode(tr.sent[-1].payload, SubstationStatus)
    assert (status.state, status.announced_for, status.sessions) == ("online", "b2", 1)


def test_clean_stop_ends_the_sessions_before_the_offline_status() -> None:
    """Without this agent its sessions cannot go on: they end (the balancer re-queues their EVs), then offline."""
    async def scenario() -> FakeTransport:
        agent, tr, _ = make()
        agent.interval_s = 0.01
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(0.02)
        tr.deliver(T.command("A"), start("s1"))
        stop.set()
        await asyncio.wait_for(task, 2)
        return tr

    tr = asyncio.run(scenario())
    assert [(e.event, e.reason) for e in events(tr)] == [("started", None), ("ended", "substation_offline")]
    last = [p.topic for p in tr.sent if p.topic != T.telemetry("A")][-2:]
    assert last == [T.session_events("A"), T.substation_status("A")]


def test_run_publishes_offline_on_stop() -> None:
    async def scenario() -> FakeTransport:
        agent, tr, _ = make()
        agent.interval_s = 0.01
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(0.02)
        tr.deliver(T.balancer_status(), b'{"state": "online", "instance": "i1"}', retain=True)
        await asyncio.sleep(0.03)
        stop.set()
        await asyncio.wait_for(task, 2)
        return tr

    tr = asyncio.run(scenario())
    status = tr.on(T.substation_status("A"))
    assert [decode(p.payload, SubstationStatus).state for p in status] == ["online", "offline"]
    assert status[-1].retain
    assert tr.closed
    assert tr.on(T.telemetry("A"))


# ---------------------------------------------------------------------------- settings


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SUBSTATIONS", "SUBSTATION_INTERVAL_S", "SIM_SPEEDUP", "SIM_START_HOUR",
                 "SUBSTATION_BASE_LOAD_PCT", "SUBSTATION_SEED"):
        monkeypatch.delenv(name, raising=False)
    s = AgentSettings()
    assert s.substations == (SubstationSpec("north", 400.0), SubstationSpec("central", 300.0),
                             SubstationSpec("south", 250.0))
    assert (s.substation_interval_s, s.sim_speedup, s.sim_start_hour) == (1.0, 1.0, 17.0)
    assert (s.substation_base_load_pct, s.substation_seed) == (55.0, 1)
    assert isinstance(s.mqtt, MqttSettings)
    assert isinstance(s.grid, GridSettings)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBSTATIONS", " A:100 , B:50.5,")
    monkeypatch.setenv("SIM_SPEEDUP", "600")
    monkeypatch.setenv("MQTT_PORT", "1999")
    monkeypatch.setenv("MQTT_ACCOUNT_SECRET", "s3")
    s = AgentSettings()
    assert s.substations == (SubstationSpec("A", 100.0), SubstationSpec("B", 50.5))
    assert s.sim_speedup == 600.0
    assert (s.mqtt.port, s.mqtt.account_secret) == (1999, "s3")


@pytest.mark.parametrize("value", ["", "A", "A:0", "A:-5", "A:x", "A:nan", "A/B:10", "A:10,A:20", "A:2000000"])
def test_bad_substations_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_substations(value)


def test_bad_substations_env_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBSTATIONS", "north:lots")
    with pytest.raises(ValueError, match="not a number"):
        AgentSettings()



def test_running_sessions_are_announced_when_the_balancer_comes_online() -> None:
    """A restarted balancer learns the sessions still charging here (and their request ids) to adopt them."""
    _agent, tr, mono = make(speedup=60.0)
    tr.connect()
    tr.deliver(T.command("A"), start("s1", request_id="trip-9", min_kw=7.0, priority=3, energy_kwh=22.0))
    tr.deliver(T.command("A"), start("s2", duration_minutes=60.0))
    mono.t = 30.0  # 30 min simulated at 60x: s1 delivered 11 kWh, s2 has 30 min left
    tr.deliver(T.balancer_status(), b'{"state": "offline"}')
    assert [e.event for e in events(tr)] == ["started", "started"]
    tr.deliver(T.balancer_status(), b'{"state": "online", "ts": 1}')
    running = {e.session_id: e for e in events(tr) if e.event == "running"}
    assert set(running) == {"s1", "s2"}
    s1, s2 = running["s1"], running["s2"]
    assert (s1.request_id, s1.granted_kw, s1.min_kw, s1.priority) == ("trip-9", 22.0, 7.0, 3)
    assert s1.energy_kwh == pytest.approx(11.0) and s1.energy_delivered_kwh == pytest.approx(11.0)
    assert s2.duration_minutes == pytest.approx(30.0) and s2.energy_kwh is None
    tr.deliver(T.balancer_status(), b"")  # a cleared retained status changes nothing
    tr.deliver(T.balancer_status(), b"{garbage")  # nor does an unreadable one
    assert len([e for e in events(tr) if e.event == "running"]) == 2


def test_lease_lapse_pauses_every_session_until_the_next_batch_renews_it() -> None:
    """A dead balancer must not leave the grid committed: no renewal by valid_until, no power."""
    wall = [WALL]
    mono = FakeTime()
    clock = SimClock(17 * 3600.0, 60.0, monotonic=mono)
    sim = SubstationSim("A", 100.0, lambda _t: 50.0, now_sim=clock.now())
    tr = FakeTransport()
    agent = SubstationAgent(sim, tr, T, clock, interval_s=1.0, wall=lambda: wall[0])
    tr.connect()
    tr.deliver(T.command("A"), encode(SessionCommands(ts=WALL, valid_until=WALL + 10, commands=[
        command("start", "s1", energy_kwh=50.0)])))
    agent.publish_telemetry()
    assert decode(tr.on(T.telemetry("A"))[-1].payload, Telemetry).ev_load_kw == 22.0
    wall[0] = WALL + 11  # no renewal arrived in time
    agent.publish_telemetry()
    t = decode(tr.on(T.telemetry("A"))[-1].payload, Telemetry)
    assert (t.ev_load_kw, t.active_sessions, agent.stats.lease_lapses) == (0.0, 1, 1)
    delivered = sim.sessions["s1"].delivered_kwh
    mono.t += 10.0  # 10 simulated minutes paused: nothing delivered
    agent.publish_telemetry()
    assert sim.sessions["s1"].delivered_kwh == delivered
    # An empty batch is a pure renewal: power is back.
    tr.deliver(T.command("A"), encode(SessionCommands(ts=WALL + 11, valid_until=WALL + 21, commands=[])))
    agent.publish_telemetry()
    assert decode(tr.on(T.telemetry("A"))[-1].payload, Telemetry).ev_load_kw == 22.0
