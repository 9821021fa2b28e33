"""Prometheus metrics of the substation agents process (``/metrics``, default port 9102).

Everything is read from the agents at scrape time by :class:`AgentCollector` (the agents pay nothing on their
hot path), labelled by ``substation`` (one agent per substation: a bounded set) and, for counters by kind,
by ``command``/``outcome``/``reason`` (small fixed sets). Loads are the simulation's values as of the agent's
last telemetry tick, in watts.

=====================================================  =======  ===================================================
Metric                                                 Type     Meaning
=====================================================  =======  ===================================================
``gridlb_agent_capacity_watts{substation}``            gauge    capacity the agent announces
``gridlb_agent_load_watts{substation}``                gauge    total load: base load + EV load
``gridlb_agent_base_load_watts{substation}``           gauge    load other than EV charging
``gridlb_agent_ev_load_watts{substation}``             gauge    power drawn by the EV sessions (0 while paused)
``gridlb_agent_sessions{substation}``                  gauge    EV sessions running (paused ones included)
``gridlb_agent_paused{substation}``                    gauge    1 while the balancer's lease has lapsed
``gridlb_agent_lease_expiries_total{substation}``      counter  times the lease lapsed and the agent paused its
                                                                sessions
``gridlb_agent_fenced_batches_total{substation}``      counter  command batches refused for an older balancer epoch
                                                                (an old region owner after a failover)
``gridlb_agent_commands_total{substation,command}``    counter  ``start``/``update``/``stop`` commands applied
``gridlb_agent_ignored_commands_total{substation,      counter  commands that changed nothing (redelivered start,
outcome}``                                                      unknown session, ...)
``gridlb_agent_bad_commands_total{substation,reason}`` counter  messages refused (undecodable, retained, ...)
``gridlb_agent_sessions_started_total{substation}``    counter  sessions started
``gridlb_agent_sessions_ended_total{substation}``      counter  sessions ended (finished, stopped or dropped)
``gridlb_agent_telemetry_sent_total{substation}``      counter  telemetry messages published
``gridlb_mqtt_*{client}``                              mixed    :class:`grid_runtime.metrics.MqttCollector`,
                                                                ``client`` = the substation id
=====================================================  =======  ===================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from grid_runtime.metrics import MqttCollector
from substation_agents.agent import SubstationAgent

__all__ = ["AgentCollector", "register_agent_metrics"]

#: Label values every agent reports, 0 included, so dashboards see the series before the first event.
COMMANDS = ("start", "update", "stop")


class AgentCollector(Collector):
    """``gridlb_agent_*``: state and counters of every agent of the process, read at scrape time.

    Scrapes run in the HTTP server's thread while the event loop changes the agents: containers are copied
    (one C-level call, atomic under the GIL) before they are iterated, and nothing is written.
    """

    def __init__(self, agents: Callable[[], Mapping[str, SubstationAgent]]) -> None:
        self._agents = agents

    def collect(self) -> Iterable[Any]:
        sub = ["substation"]
        capacity = GaugeMetricFamily("gridlb_agent_capacity_watts", "Capacity the substation announces, in watts",
                                     labels=sub)
        load = GaugeMetricFamily("gridlb_agent_load_watts",
                                 "Total load (base load + EV load) at the last telemetry tick, in watts", labels=sub)
        base = GaugeMetricFamily("gridlb_agent_base_load_watts",
                                 "Load other than EV charging at the last telemetry tick, in watts", labels=sub)
        ev = GaugeMetricFamily("gridlb_agent_ev_load_watts",
                               "Power drawn by the EV sessions (0 while paused), in watts", labels=sub)
        sessions = GaugeMetricFamily("gridlb_agent_sessions", "EV sessions running on the substation (paused too)",
                                     labels=sub)
        paused = GaugeMetricFamily("gridlb_agent_paused",
                                   "1 while the balancer's lease has lapsed and the sessions draw nothing", labels=sub)
        lease = CounterMetricFamily("gridlb_agent_lease_expiries",
                                    "Times the balancer's lease lapsed and the agent paused its sessions", labels=sub)
        fenced = CounterMetricFamily("gridlb_agent_fenced_batches",
                                     "Command batches refused for an older balancer epoch (fencing after a failover)",
                                     labels=sub)
        commands = CounterMetricFamily("gridlb_agent_commands", "Session commands applied (start, update, stop)",
                                       labels=[*sub, "command"])
        ignored = CounterMetricFamily("gridlb_agent_ignored_commands",
                                      "Session commands that changed nothing (redelivered start, unknown session...)",
                                      labels=[*sub, "outcome"])
        bad = CounterMetricFamily("gridlb_agent_bad_commands",
                                  "Messages refused: undecodable or invalid commands, retained ones, handler errors",
                                  labels=[*sub, "reason"])
        started = CounterMetricFamily("gridlb_agent_sessions_started", "EV sessions started", labels=sub)
        ended = CounterMetricFamily("gridlb_agent_sessions_ended",
                                    "EV sessions ended (target reached, stopped, or dropped after a lost link)",
                                    labels=sub)
        telemetry = CounterMetricFamily("gridlb_agent_telemetry_sent", "Telemetry messages published", labels=sub)
        for sid, agent in sorted(list(self._agents().items()), key=lambda item: item[0]):
            sim, stats = agent.sim, agent.stats
            running = list(sim.sessions.values())
            ev_kw = 0.0 if sim.paused else sum(s.granted_kw for s in running)
            base_kw = sim.base_load_kw
            capacity.add_metric([sid], sim.capacity_kw * 1000.0)
            load.add_metric([sid], (base_kw + ev_kw) * 1000.0)
            base.add_metric([sid], base_kw * 1000.0)
            ev.add_metric([sid], ev_kw * 1000.0)
            sessions.add_metric([sid], float(len(running)))
            paused.add_metric([sid], 1.0 if sim.paused else 0.0)
            lease.add_metric([sid], float(stats.lease_lapses))
            fenced.add_metric([sid], float(stats.fenced_batches))
            applied = dict(stats.applied)
            for command in sorted(set(COMMANDS) | applied.keys()):
                commands.add_metric([sid, command], float(applied.get(command, 0)))
            for outcome, n in sorted(dict(stats.ignored).items()):
                ignored.add_metric([sid, outcome], float(n))
            for reason, n in sorted(dict(stats.refused).items()):
                bad.add_metric([sid, reason], float(n))
            started.add_metric([sid], float(stats.sessions_started))
            ended.add_metric([sid], float(stats.sessions_ended))
            telemetry.add_metric([sid], float(stats.telemetry_sent))
        yield from (capacity, load, base, ev, sessions, paused, lease, fenced, commands, ignored, bad, started, ended,
                    telemetry)


def register_agent_metrics(agents: Callable[[], Mapping[str, SubstationAgent]],
                           registry: CollectorRegistry = REGISTRY) -> None:
    """Register :class:`AgentCollector` and the agents' MQTT connections (``client`` = substation id)."""
    registry.register(AgentCollector(agents))
    registry.register(MqttCollector(lambda: {sid: agent.transport for sid, agent in list(agents().items())}))
