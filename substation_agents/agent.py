"""The MQTT edge of a simulated substation: one agent, one broker connection, per substation.

Each agent logs in with its own account (``substation.<id>``) because the broker's ACL confines a
substation account to its own topics; sharing one connection would need an account allowed to speak
for every substation. Many agents share one process and one event loop.

Protocol duties (the contract in ``grid_protocol.topics.CHANNELS``):

* last will: retained ``offline`` status, so the balancer learns of a crash or a lost link;
* on every connect: retained ``online`` status with the capacity;
* commands (QoS 1, a batch applied in order) are decoded strictly; a bad message is logged and
  counted, never fatal;
* telemetry (QoS 0) every ``interval_s`` real seconds, only while connected: a stale measurement
  queued during an outage is worse than none (the balancer detects the gap as staleness);
* session events (QoS 1): ``started`` when a start is applied, ``ended`` with the reason and the
  energy delivered when a session finishes or is stopped;
* graceful shutdown: retained ``offline`` status, then disconnect.

A lost connection does not end the sessions: a broker restart or a network blip is routine, and the EVs keep
charging through it as long as the balancer's lease (``valid_until`` of its command batches) holds; past the
lease the agent pauses them at 0 kW (``check_lease``) until a new batch renews it. On every connect the agent
learns whether a balancer is online (its retained status) and, if so, re-announces every session it runs
(``running`` events) and then publishes its ``online`` status with ``announced_for`` = that balancer's
``instance``: the balancer keeps what was announced, stops what it had revoked meanwhile, and drops what the agent
no longer has. The status is published only after that announcement, so the balancer never places new sessions
here before it knows the agent's inventory (no balancer online: the plain status after
:data:`STATUS_WAIT_S`). The connection uses a clean start and no session expiry: commands queued by the broker
while we were away are stale by construction. A clean shutdown ends the sessions (``substation_offline``: the
balancer re-queues their EVs) before the ``offline`` status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from broker.accounts import substation_username
from grid_protocol.codec import PayloadError, decode, encode
from grid_protocol.messages import (
    DEFAULT_REGION,
    MAX_COMMAND_PAYLOAD_BYTES,
    BalancerStatus,
    ErrorReport,
    SessionCommand,
    SessionCommands,
    SessionEvent,
    SubstationStatus,
)
from grid_protocol.reasons import Reason
from grid_protocol.topics import CHANNELS, TopicKind, Topics
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import AiomqttTransport, InMessage, Transport, Will
from grid_runtime.settings import MqttSettings
from grid_sim.load_curve import make_base_load
from grid_sim.substation import SessionEnd, SubstationSim
from substation_agents.settings import AgentSettings, SubstationSpec

__all__ = [
    "AgentStats",
    "SimClock",
    "SubstationAgent",
    "agent_mqtt_settings",
    "build_agent",
    "decode_batch",
    "offline_will",
    "run_agents",
]

log = get_logger("substation_agents")

_QOS_TELEMETRY = CHANNELS[TopicKind.SUBSTATION_TELEMETRY].qos
_QOS_STATUS = CHANNELS[TopicKind.SUBSTATION_STATUS].qos
_QOS_SESSION = CHANNELS[TopicKind.SUBSTATION_SESSION].qos
_QOS_COMMAND = CHANNELS[TopicKind.SUBSTATION_COMMAND].qos
_QOS_ERROR = CHANNELS[TopicKind.SUBSTATION_ERROR].qos
#: Bad commands are logged individually up to this many, then every 100th (a flood must not flood the log).
_BAD_LOG_FIRST = 10
#: After a connect, how long to wait for the balancer's retained status before announcing ``online`` without an
#: inventory (no balancer has ever been online on this broker).
STATUS_WAIT_S = 1.0


class SimClock:
    """Simulated time in seconds since midnight of day 0, running ``speedup`` times real time.

    Driven by the monotonic clock (not by counting ticks), so a late tick never loses simulated time
    and all agents of a process agree on the time of day.
    """

    def __init__(self, start_sim_s: float, speedup: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.start_sim_s = start_sim_s
        self.speedup = speedup
        self._monotonic = monotonic
        self._t0 = monotonic()

    def now(self) -> float:
        return self.start_sim_s + (self._monotonic() - self._t0) * self.speedup


@dataclass(slots=True)
class AgentStats:
    """What an agent did since it started (read by ``substation_agents.metrics`` at scrape time)."""

    connects: int = 0
    telemetry_sent: int = 0
    commands: int = 0  # command-topic messages (batches) received
    bad_commands: int = 0
    ignored_commands: int = 0
    sessions_started: int = 0
    sessions_ended: int = 0
    error_reports: int = 0
    lease_lapses: int = 0
    #: Batches refused for an older balancer epoch (fencing: grid_protocol.lease.LeaseHolder.admits).
    fenced_batches: int = 0
    #: Commands that changed the substation, by command (``start``/``update``/``stop``).
    applied: Counter[str] = field(default_factory=Counter)
    #: Commands that changed nothing, by outcome (``duplicate_start``, ``unknown_session``, ...).
    ignored: Counter[str] = field(default_factory=Counter)
    #: Messages refused (``bad_commands``), by reason (a :class:`~grid_protocol.reasons.Reason`,
    #: ``retained_command``, or ``handler_error`` when handling raised).
    refused: Counter[str] = field(default_factory=Counter)


def decode_batch(payload: bytes) -> SessionCommands:
    """A command-topic payload as a batch (commands in the order to apply them, and the lease).

    The contract's payload is a :class:`SessionCommands` batch; a bare :class:`SessionCommand` is
    accepted too (hand testing, older balancers) and carries no lease. Raises :class:`PayloadError`.
    """
    if b'"commands"' in payload:
        return decode(payload, SessionCommands, max_bytes=MAX_COMMAND_PAYLOAD_BYTES)
    command = decode(payload, SessionCommand)
    return SessionCommands(ts=command.ts, commands=[command])



def agent_mqtt_settings(mqtt: MqttSettings, substation_id: str) -> MqttSettings:
    """The MQTT settings of one agent: its own account, and no broker session to resume (see module doc)."""
    return mqtt.model_copy(update={"username": substation_username(substation_id), "session_expiry_s": 0})


def offline_will(topics: Topics, substation_id: str, region: str = DEFAULT_REGION) -> Will:
    payload = encode(SubstationStatus(state="offline", substation_id=substation_id, region=region))
    return Will(topics.substation_status(substation_id), payload, qos=_QOS_STATUS, retain=True)


class SubstationAgent:
    """Connects a :class:`SubstationSim` to the broker through a :class:`Transport`."""

    def __init__(self, sim: SubstationSim, transport: Transport, topics: Topics, clock: SimClock, *,
                 interval_s: float, tick_offset_s: float = 0.0, wall: Callable[[], float] = time.time,
                 region: str = DEFAULT_REGION) -> None:
        self.sim = sim
        self.region = region
        self.transport = transport
        self.topics = topics
        self.clock = clock
        self.interval_s = interval_s
        self.tick_offset_s = tick_offset_s
        self._wall = wall
        self.id = sim.substation_id
        self.stats = AgentStats()
        self.seq = 0
        self._online_sent = False  # the online status of the current connection has been published
        self._last_sim = sim.now_sim
        self._command_topic = topics.command(self.id)
        self._error_topic = topics.substation_error(self.id)
        self._status_topic = topics.substation_status(self.id)
        self._telemetry_topic = topics.telemetry(self.id)
        self._session_topic = topics.session_events(self.id)
        self._balancer_topic = topics.balancer_status()
        transport.set_handler(self.handle)
        transport.subscribe(self._command_topic, _QOS_COMMAND)
        transport.subscribe(self._error_topic, _QOS_ERROR)
        transport.subscribe(self._balancer_topic, _QOS_STATUS)
        transport.on_connect(self._on_connected)

    # ------------------------------------------------------------------ publishing
    def _publish_status(self, state: str, announced_for: str | None = None) -> None:
        status = SubstationStatus(state="online" if state == "online" else "offline", substation_id=self.id,
                                  ts=self._wall(), capacity_kw=self.sim.capacity_kw, announced_for=announced_for,
                                  sessions=len(self.sim.sessions) if state == "online" else None,
                                  region=self.region)
        self.transport.publish(self._status_topic, encode(status), qos=_QOS_STATUS, retain=True)
        if state == "online":
            self._online_sent = True

    def _publish_ended(self, end: SessionEnd) -> None:
        self.stats.sessions_ended += 1
        log.info("session_ended", substation_id=self.id, session_id=end.session_id, ev_id=end.ev_id,
                 reason=end.reason, energy_delivered_kwh=round(end.energy_delivered_kwh, 3))
        event = SessionEvent(event="ended", session_id=end.session_id, ev_id=end.ev_id, ts=self._wall(),
                             substation_id=self.id, reason=end.reason,
                             energy_delivered_kwh=round(end.energy_delivered_kwh, 6))
        self.transport.publish(self._session_topic, encode(event), qos=_QOS_SESSION)

    def publish_telemetry(self) -> None:
        """Advance the simulation to now and, when connected, publish one measurement."""
        self.check_lease()
        self.advance()
        if not self.transport.connected.is_set():
            return
        msg = self.sim.telemetry(self.seq, self._wall())
        self.transport.publish(self._telemetry_topic, encode(msg), qos=_QOS_TELEMETRY)
        self.seq += 1
        self.stats.telemetry_sent += 1

    # ------------------------------------------------------------------ simulation
    def check_lease(self) -> None:
        """The balancer's lease lapsed without renewal (it died, or we lost it): draw nothing. A dead balancer
        must not leave the grid committed to power nobody is watching. The next batch resumes the sessions."""
        lease = self.sim.lease
        if lease.must_pause(self._wall(), has_sessions=bool(self.sim.sessions)):
            self.advance()  # energy up to the lapse
            lease.pause()
            self.stats.lease_lapses += 1
            log.warning("lease_lapsed_pausing", substation_id=self.id, sessions=len(self.sim.sessions),
                        lease_until=lease.until)

    def advance(self) -> None:
        """Step the simulation up to the clock's now and announce the sessions that finished."""
        now = self.clock.now()
        dt = now - self._last_sim
        if dt <= 0:
            return
        self._last_sim = now
        for end in self.sim.step(dt, now):
            self._publish_ended(end)

    def _on_connected(self) -> None:
        """(Re)connected: keep the sessions (the lease decides whether they draw power), and say ``online`` once the
        balancer has heard what runs here (see the module doc), or after STATUS_WAIT_S without a balancer."""
        self.stats.connects += 1
        self._online_sent = False
        if self.stats.connects > 1:
            log.info("reconnected_keeping_sessions", substation_id=self.id, sessions=len(self.sim.sessions),
                     paused=self.sim.paused, lease_until=self.sim.lease.until)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # driven by hand (unit tests): the balancer's status, or _online_without_balancer(), says it
        loop.call_later(STATUS_WAIT_S, self._online_without_balancer)

    def _online_without_balancer(self) -> None:
        if not self._online_sent and self.transport.connected.is_set():
            self._publish_status("online")

    # ------------------------------------------------------------------ incoming
    def handle(self, msg: InMessage) -> None:
        """Transport handler: must never raise (a bad message must not cost the connection)."""
        try:
            if msg.topic == self._command_topic:
                self._on_command(msg)
            elif msg.topic == self._error_topic:
                self._on_error_report(msg)
            elif msg.topic == self._balancer_topic:
                self._on_balancer_status(msg)
        except Exception:
            self.stats.bad_commands += 1
            self.stats.refused["handler_error"] += 1
            log.exception("message_handling_failed", substation_id=self.id, topic=msg.topic)

    def _bad_command(self, reason: str, detail: str) -> None:
        self.stats.bad_commands += 1
        self.stats.refused[str(reason)] += 1
        n = self.stats.bad_commands
        if n <= _BAD_LOG_FIRST or n % 100 == 0:
            log.warning("command_refused", substation_id=self.id, reason=reason, detail=detail[:200],
                        bad_commands=n)

    def _on_command(self, msg: InMessage) -> None:
        self.stats.commands += 1
        if msg.retain:
            # A retained command would be replayed on every reconnect.
            self._bad_command("retained_command", "commands must not be retained")
            return
        try:
            batch = decode_batch(msg.payload)
        except PayloadError as exc:
            self._bad_command(exc.reason, exc.detail)
            return
        lease = self.sim.lease
        if not lease.admits(batch):
            # An older balancer epoch (an owner that lost its region lease and woke up): no effect at all.
            self.stats.fenced_batches += 1
            if self.stats.fenced_batches <= _BAD_LOG_FIRST or self.stats.fenced_batches % 100 == 0:
                log.warning("command_batch_fenced", substation_id=self.id, epoch=batch.epoch, highest_epoch=lease.epoch,
                            commands=len(batch.commands), fenced_batches=self.stats.fenced_batches)
            return
        self.advance()  # account energy up to the commands before they change anything
        if lease.on_batch(batch):
            log.warning("lease_renewed_resuming", substation_id=self.id, sessions=len(self.sim.sessions))
        for command in batch.commands:
            self._apply(command)

    def _apply(self, command: SessionCommand) -> None:
        result = self.sim.apply(command, self._last_sim)
        log.debug("command", substation_id=self.id, command=command.command, session_id=command.session_id,
                  ev_id=command.ev_id, granted_kw=command.granted_kw, outcome=result.outcome)
        if result.changed:
            self.stats.applied[command.command] += 1
        else:
            self.stats.ignored[result.outcome] += 1
        if result.outcome == "started":
            self.stats.sessions_started += 1
            event = SessionEvent(event="started", session_id=command.session_id, ev_id=command.ev_id,
                                 ts=self._wall(), substation_id=self.id, request_id=command.request_id,
                                 granted_kw=command.granted_kw)
            self.transport.publish(self._session_topic, encode(event), qos=_QOS_SESSION)
        elif result.ended is not None:
            self._publish_ended(result.ended)
        elif not result.changed:
            self.stats.ignored_commands += 1
            if result.outcome in ("unknown_session", "conflicting_start"):
                log.warning("command_ignored", substation_id=self.id, command=command.command,
                            session_id=command.session_id, ev_id=command.ev_id, outcome=result.outcome)

    def _on_balancer_status(self, msg: InMessage) -> None:
        """A balancer is (still, or newly) online: tell it every session that runs here, then close the inventory
        with the online status (``announced_for``), so it adopts what it does not know and drops what is gone."""
        if not msg.payload:
            return
        try:
            status = decode(msg.payload, BalancerStatus)
        except PayloadError as exc:
            log.warning("balancer_status_unreadable", substation_id=self.id, reason=exc.reason)
            return
        if status.state != "online":
            if not self._online_sent:
                self._publish_status("online")
            return
        self.advance()
        now = self._wall()
        for session in list(self.sim.sessions.values()):
            event = SessionEvent(
                event="running", session_id=session.session_id, ev_id=session.ev_id, ts=now,
                substation_id=self.id, request_id=session.request_id, granted_kw=session.granted_kw,
                min_kw=session.min_kw, priority=session.priority, energy_kwh=session.energy_left_kwh,
                duration_minutes=session.minutes_left, energy_delivered_kwh=round(session.delivered_kwh, 6))
            self.transport.publish(self._session_topic, encode(event), qos=_QOS_SESSION)
        self._publish_status("online", announced_for=status.instance)
        log.info("sessions_announced", substation_id=self.id, sessions=len(self.sim.sessions),
                 balancer_instance=status.instance)

    def _on_error_report(self, msg: InMessage) -> None:
        self.stats.error_reports += 1
        try:
            report = decode(msg.payload, ErrorReport)
        except PayloadError as exc:
            log.warning("error_report_unreadable", substation_id=self.id, reason=exc.reason)
            return
        log.warning("payload_refused_by_balancer", substation_id=self.id, reason=report.reason,
                    detail=report.detail, topic=report.topic)

    # ------------------------------------------------------------------ lifecycle
    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.tick_offset_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                self.publish_telemetry()
            except Exception:
                log.exception("telemetry_failed", substation_id=self.id)
            next_at += self.interval_s
            if next_at < loop.time():  # fell behind (busy loop, suspended process): skip, don't burst
                next_at = loop.time() + self.interval_s

    async def run(self, stop: asyncio.Event, close_timeout: float = 2.0) -> None:
        """Connect, simulate and report until ``stop`` is set, then announce ``offline`` and disconnect."""
        conn = asyncio.create_task(self.transport.run(), name=f"mqtt-{self.id}")
        ticks = asyncio.create_task(self._tick_loop(), name=f"ticks-{self.id}")
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({conn, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticks.cancel()
            stopping.cancel()
            if not conn.done():
                await self._shutdown(conn, close_timeout)
        if not stop.is_set():
            conn.result()  # the transport gave up: surface its error
            raise RuntimeError(f"MQTT transport of substation {self.id} stopped unexpectedly")

    async def _shutdown(self, conn: asyncio.Task[None], timeout: float) -> None:
        """A clean stop ends the sessions (they cannot go on without this agent; the balancer re-queues their EVs),
        then says ``offline`` and disconnects."""
        was_connected = self.transport.connected.is_set()
        if was_connected:
            self.advance()
            for end in self.sim.stop_all(Reason.SUBSTATION_OFFLINE, self._last_sim):
                self._publish_ended(end)
            self._publish_status("offline")
        await self.transport.close(timeout)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            async with asyncio.timeout(timeout):
                await conn
        log.info("agent_stopped", substation_id=self.id, clean=was_connected, active_sessions=len(self.sim.sessions),
                 telemetry_sent=self.stats.telemetry_sent, bad_commands=self.stats.bad_commands)


def build_agent(spec: SubstationSpec, settings: AgentSettings, clock: SimClock, *,
                tick_offset_s: float = 0.0) -> SubstationAgent:
    """An agent for ``spec`` with its own aiomqtt connection, last will and seeded base load."""
    topics = Topics(settings.grid.grid_topic_prefix, settings.substation_region)  # its region's topics
    mqtt = agent_mqtt_settings(settings.mqtt, spec.substation_id)
    transport = AiomqttTransport(mqtt, client_id=mqtt.username, will=offline_will(topics, spec.substation_id,
                                                                                      settings.substation_region),
                                 clean_start=True)
    now = clock.now()
    base = make_base_load(spec.substation_id, spec.capacity_kw, settings.substation_base_load_pct,
                          settings.substation_seed)
    sim = SubstationSim(spec.substation_id, spec.capacity_kw, base, now_sim=now)
    return SubstationAgent(sim, transport, topics, clock, interval_s=settings.substation_interval_s,
                           tick_offset_s=tick_offset_s, region=settings.substation_region)


async def run_agents(settings: AgentSettings, stop: asyncio.Event, *,
                     on_built: Callable[[Mapping[str, SubstationAgent]], None] | None = None) -> None:
    """Run one agent per configured substation until ``stop`` is set.

    ``on_built`` receives the agents by substation id once they exist (the metrics collectors read them).
    """
    clock = SimClock(settings.sim_start_hour * 3600.0, settings.sim_speedup)
    n = len(settings.substations)
    # Spread the agents' ticks over the interval so many agents do not publish in one burst.
    agents = [build_agent(spec, settings, clock, tick_offset_s=settings.substation_interval_s * i / n)
              for i, spec in enumerate(settings.substations)]
    mqtt = settings.mqtt
    if mqtt.password is None and not mqtt.account_secret:
        log.warning("no_mqtt_credentials", hint="set MQTT_ACCOUNT_SECRET or MQTT_PASSWORD")
    log.info("agents_starting", substations=n, host=mqtt.host, port=mqtt.port,
             interval_s=settings.substation_interval_s, sim_speedup=settings.sim_speedup,
             sim_start_hour=settings.sim_start_hour, base_load_pct=settings.substation_base_load_pct,
             seed=settings.substation_seed)
    for agent in agents:
        log.info("agent_starting", substation_id=agent.id, capacity_kw=agent.sim.capacity_kw,
                 username=substation_username(agent.id), base_load_kw=round(agent.sim.base_load_kw, 1))
    if on_built is not None:
        on_built({agent.id: agent for agent in agents})
    await asyncio.gather(*(agent.run(stop) for agent in agents))
