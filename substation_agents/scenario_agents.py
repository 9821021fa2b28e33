"""Substation agents that play a replay scenario: ``SUBSTATION_SCENARIO=path.yaml python -m substation_agents``.

One agent per substation of the scenario (its id, capacity and base load: the scenario's daily curve or
points, from the scenario's seed), on a simulated clock that starts at the scenario's ``start_hour`` and runs
``SIM_SPEEDUP`` times real time. Scenario time 0 is ``SUBSTATION_SCENARIO_START`` (epoch seconds; default:
when the process starts), so the EV fleet and the live replay's recorder agree on when things happen.

The scenario's events are applied when their sped-up time comes, as ``replay.sim`` applies them:

* ``offline``: the substation drops off the network. Its sessions stop at once and its broker connection
  dies without a DISCONNECT, so the broker publishes its last will (retained ``offline``), never a clean
  offline status; it stays silent until ``online``. The ``ended`` events of the stopped sessions wait in its
  outbox and reach the balancer after the reconnect, as a real agent's would.
* ``online``: it connects again and announces itself ``online`` (retained).
* ``capacity``: the physical capacity changes at ``at``; telemetry reports a cut from ``at - notice_s``
  (an operator's curtailment notice), a raise only when it happens.

Telemetry is measured every ``telemetry.interval_s / speedup`` wall seconds (``SUBSTATION_INTERVAL_S``
overrides it) and published ``telemetry.lag_s / speedup`` seconds after it was measured (the scenario's lag).

The balancer's clock is the wall clock, so when it re-places a session it estimates the energy still
missing from wall time, far too high at a speed-up. A car stops charging when its battery has what it came
for, so the agents cap a ``start``'s ``energy_kwh`` to what the EV still needs (the scenario says how much
each EV wants; the agents share what each got): the same physical rule as ``replay.sim``.

Everything else (commands, leases, session events, re-announcing sessions) is :class:`SubstationAgent`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from broker.accounts import substation_username
from grid_protocol.codec import encode
from grid_protocol.messages import SessionCommand, Telemetry
from grid_protocol.reasons import Reason
from grid_protocol.topics import CHANNELS, TopicKind, Topics
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import AiomqttTransport, Transport
from grid_sim.scenario import Scenario, SubstationSpec, generate_evs
from grid_sim.substation import SessionEnd, SubstationSim
from grid_sim.timeline import GridAction, Timebase, grid_actions, scenario_base_load
from substation_agents.agent import SimClock, SubstationAgent, agent_mqtt_settings, offline_will
from substation_agents.settings import AgentSettings

__all__ = ["EvBatteries", "ScenarioAgent", "cut_connection", "run_scenario_agents", "telemetry_interval_s"]

log = get_logger("substation_agents")

_QOS_TELEMETRY = CHANNELS[TopicKind.SUBSTATION_TELEMETRY].qos

#: Shortest telemetry interval derived from a scenario (wall seconds): faster only floods the balancer.
MIN_DERIVED_INTERVAL_S = 0.01


class EvBatteries:
    """What each EV of the scenario still needs (kWh), shared by the agents of one process (pure)."""

    def __init__(self, needs: Mapping[str, float]) -> None:
        self._needs = dict(needs)
        self._got: dict[str, float] = {}

    def add(self, ev_id: str, kwh: float) -> None:
        if ev_id in self._needs:
            self._got[ev_id] = self._got.get(ev_id, 0.0) + kwh

    def left(self, ev_id: str) -> float | None:
        need = self._needs.get(ev_id)
        return None if need is None else max(1e-6, need - self._got.get(ev_id, 0.0))

    def cap(self, command: SessionCommand) -> SessionCommand:
        """A ``start`` asking for more energy than the EV still needs, capped to the need; anything else as is."""
        if command.command != "start" or command.energy_kwh is None:
            return command
        left = self.left(command.ev_id)
        if left is None or command.energy_kwh <= left:
            return command
        return msgspec.structs.replace(command, energy_kwh=round(left, 6))


def telemetry_interval_s(settings: AgentSettings, scenario: Scenario) -> float:
    """``SUBSTATION_INTERVAL_S`` when it is set, else the scenario's interval sped up (at least 10 ms)."""
    if "substation_interval_s" in settings.model_fields_set:
        return settings.substation_interval_s
    return max(MIN_DERIVED_INTERVAL_S, scenario.telemetry.interval_s / settings.sim_speedup)


def _socket_of(transport: Transport) -> Any:
    """The TCP socket under a transport of ``grid_runtime.mqtt`` (paho's or aiomqtt's), or None."""
    sock = getattr(transport, "_sock", None)  # PahoTransport
    if sock is not None:
        return sock
    client = getattr(transport, "_client", None)  # AiomqttTransport: aiomqtt.Client wrapping a paho client
    paho_client = getattr(client, "_client", None)
    return paho_client.socket() if paho_client is not None else None


def cut_connection(transport: Transport) -> None:
    """Let the connection die as if the link broke: the socket is shut down without an MQTT DISCONNECT (the
    broker publishes the last will at once) and the transport stops reconnecting (its ``run()`` returns).
    Publishes made afterwards wait in its outbox; ``run()`` again connects anew and sends them."""
    transport._closing = True  # type: ignore[attr-defined]  # both transports: no reconnect after this loss
    sock = _socket_of(transport)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    transport.connected.clear()


class ScenarioAgent(SubstationAgent):
    """A :class:`SubstationAgent` that can lose its link, change capacity, and delays its telemetry."""

    def __init__(self, sim: SubstationSim, transport: Transport, topics: Topics, clock: SimClock, *,
                 interval_s: float, tick_offset_s: float = 0.0, lag_s: float = 0.0,
                 batteries: EvBatteries | None = None) -> None:
        super().__init__(sim, transport, topics, clock, interval_s=interval_s, tick_offset_s=tick_offset_s)
        self.lag_s = lag_s
        self.batteries = batteries
        self.physical_kw = sim.capacity_kw
        self.announced_kw = sim.capacity_kw
        self.offline = False
        self.capped_starts = 0
        self._conn: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ scenario events
    def apply_action(self, action: GridAction) -> None:
        if action.kind == "offline":
            self.go_offline()
        elif action.kind == "online":
            self.go_online()
        elif action.capacity_kw is not None:
            if action.kind == "capacity":
                self.physical_kw = action.capacity_kw
            self.announced_kw = action.capacity_kw
            self.sim.capacity_kw = min(self.physical_kw, self.announced_kw)
        log.info("scenario_event", substation_id=self.id, kind=action.kind, at_s=action.at,
                 capacity_kw=action.capacity_kw, reported_capacity_kw=self.sim.capacity_kw)

    def go_offline(self) -> None:
        """Sessions stop at once; the link dies (the broker publishes our will); silent until :meth:`go_online`."""
        if self.offline:
            return
        self.offline = True
        self.advance()
        ends = self.sim.stop_all(Reason.SUBSTATION_OFFLINE, self._last_sim)
        self.sim.lease.drop()
        cut_connection(self.transport)
        for end in ends:
            self._publish_ended(end)  # queued: reaches the balancer after the reconnect
        log.warning("link_cut", substation_id=self.id, sessions_stopped=len(ends))

    def go_online(self) -> None:
        if not self.offline:
            return
        self.offline = False
        old = self._conn
        if old is not None and not old.done():  # its run() returns right after the cut; never two at once
            old.cancel()
        self.transport._closing = False  # type: ignore[attr-defined]
        self._conn = asyncio.create_task(self.transport.run(), name=f"mqtt-{self.id}")

    # ------------------------------------------------------------------ overrides
    def _apply(self, command: SessionCommand) -> None:
        if self.batteries is not None:
            capped = self.batteries.cap(command)
            if capped is not command:
                self.capped_starts += 1
                log.debug("start_energy_capped", substation_id=self.id, ev_id=command.ev_id,
                          asked_kwh=command.energy_kwh, capped_kwh=capped.energy_kwh)
                command = capped
        super()._apply(command)

    def _publish_ended(self, end: SessionEnd) -> None:
        if self.batteries is not None:
            self.batteries.add(end.ev_id, end.energy_delivered_kwh)
        super()._publish_ended(end)

    def publish_telemetry(self) -> None:
        """Measure now; publish ``lag_s`` later (dropped if the link is down by then)."""
        if self.lag_s <= 0:
            super().publish_telemetry()
            return
        self.check_lease()
        self.advance()
        if not self.transport.connected.is_set():
            return
        msg = self.sim.telemetry(self.seq, self._wall())
        self.seq += 1
        asyncio.get_running_loop().call_later(self.lag_s, self._send_telemetry, msg)

    def _send_telemetry(self, msg: Telemetry) -> None:
        if self.offline or not self.transport.connected.is_set():
            return
        self.transport.publish(self._telemetry_topic, encode(msg), qos=_QOS_TELEMETRY)
        self.stats.telemetry_sent += 1

    async def run(self, stop: asyncio.Event, close_timeout: float = 2.0) -> None:
        """Connect, simulate and report until ``stop`` (the link may be cut and restored meanwhile)."""
        self._conn = asyncio.create_task(self.transport.run(), name=f"mqtt-{self.id}")
        ticks = asyncio.create_task(self._tick_loop(), name=f"ticks-{self.id}")
        try:
            await stop.wait()
        finally:
            ticks.cancel()
            await self._shutdown(self._conn, close_timeout)


def build_scenario_agent(scenario: Scenario, spec: SubstationSpec, settings: AgentSettings, clock: SimClock, *,
                         interval_s: float, lag_s: float, tick_offset_s: float,
                         batteries: EvBatteries | None) -> ScenarioAgent:
    topics = Topics(settings.grid.grid_topic_prefix)
    mqtt = agent_mqtt_settings(settings.mqtt, spec.id)
    transport = AiomqttTransport(mqtt, client_id=mqtt.username, will=offline_will(topics, spec.id), clean_start=True)
    sim = SubstationSim(spec.id, spec.capacity_kw, scenario_base_load(scenario, spec), now_sim=clock.now())
    return ScenarioAgent(sim, transport, topics, clock, interval_s=interval_s, tick_offset_s=tick_offset_s,
                         lag_s=lag_s, batteries=batteries)


async def _play(actions: list[GridAction], agents: Mapping[str, ScenarioAgent], timebase: Timebase,
                stop: asyncio.Event) -> None:
    for action in actions:
        delay = timebase.wall(action.at) - time.time()
        if delay > 0:
            await wait_event(stop, delay)
        if stop.is_set():
            return
        agents[action.substation].apply_action(action)


async def run_scenario_agents(settings: AgentSettings, scenario: Scenario, stop: asyncio.Event, *,
                              on_built: Callable[[Mapping[str, SubstationAgent]], None] | None = None) -> None:
    """Run one agent per substation of ``scenario`` and play its events until ``stop`` is set.

    ``on_built`` receives the agents by substation id once they exist (the metrics collectors read them).
    """
    speedup = settings.sim_speedup
    timebase = Timebase(settings.substation_scenario_start or time.time(), speedup)
    clock = SimClock(scenario.start_hour * 3600.0 + timebase.scenario(time.time()), speedup)
    interval = telemetry_interval_s(settings, scenario)
    lag = scenario.telemetry.lag_s / speedup
    batteries = EvBatteries({ev.ev_id: ev.energy_kwh for ev in generate_evs(scenario)})
    n = len(scenario.substations)
    agents = {spec.id: build_scenario_agent(scenario, spec, settings, clock, interval_s=interval, lag_s=lag,
                                            tick_offset_s=interval * i / n, batteries=batteries)
              for i, spec in enumerate(scenario.substations)}
    log.info("scenario_agents_starting", scenario=scenario.name, substations=n, host=settings.mqtt.host,
             port=settings.mqtt.port, speedup=speedup, start_epoch=timebase.t0, start_hour=scenario.start_hour,
             interval_s=interval, lag_s=lag, seed=scenario.seed)
    for agent in agents.values():
        log.info("agent_starting", substation_id=agent.id, capacity_kw=agent.sim.capacity_kw,
                 username=substation_username(agent.id), base_load_kw=round(agent.sim.base_load_kw, 1))
    if on_built is not None:
        on_built(agents)
    player = asyncio.create_task(_play(grid_actions(scenario), agents, timebase, stop), name="scenario-events")
    try:
        await asyncio.gather(*(agent.run(stop) for agent in agents.values()))
    finally:
        player.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await player
    log.info("scenario_agents_stopped", capped_starts=sum(a.capped_starts for a in agents.values()))
