"""What each substation reports about itself: telemetry (load, capacity, freshness), its online/offline
status with the re-announced inventory, and silence. Stale ones get nothing new; offline past the grace or
silent past ``lost_after_s``, their sessions are revoked and their requests re-queued."""

from __future__ import annotations

from balancer.core.effects import Effect, ToSubstation
from balancer.core.limits import plan_with
from balancer.core.model import Substation, kw_to_w_down, kw_to_w_up
from balancer.core.queue_service import QueueService
from balancer.core.rebalancing import Rebalancer
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState
from grid_protocol.messages import Telemetry
from grid_protocol.reasons import Reason


class Liveness:
    def __init__(self, state: CoreState, book: SessionBook, rebalancer: Rebalancer,
                 queue_service: QueueService) -> None:
        self.state = state
        self.book = book
        self.rebalancer = rebalancer
        self.queue_service = queue_service

    def on_telemetry(self, msg: Telemetry, now: float) -> list[Effect]:
        st = self.state
        sub = st.substation(msg.substation_id, now)
        if msg.seq <= sub.last_seq and sub.last_seq - msg.seq < 100:
            st.counters["telemetry_out_of_order"] += 1
            return []
        sub.last_seq = msg.seq
        if (sub.last_telemetry_at is not None and sub.reported_capacity_w > 0
                and sub.load_w > sub.reported_capacity_w):  # overloaded since the previous sample
            sub.overload_s += max(0.0, min(now - sub.last_telemetry_at, st.config.stale_after_s))
        sub.reported_capacity_w = kw_to_w_down(msg.capacity_kw)
        sub.apply_capacity()
        schedule = st.schedules.get(sub.id)
        if schedule is not None or sub.schedule_limit_w is not None or sub.schedule_source is not None:
            plan_with(sub, schedule, now, st.config.limit_lead_s)  # a scheduled limit may have started (or gone)
        sub.stale = False
        sub.base_load_w = kw_to_w_up(msg.base_load_kw)
        sub.load_w = kw_to_w_up(msg.load_kw)
        sub.ev_load_w = kw_to_w_up(msg.ev_load_kw)
        sub.reported_sessions = msg.active_sessions
        sub.last_telemetry_at = now
        sub.granted_at_telemetry_w = sub.granted_w
        sub.observe_noise(now, max(st.config.min_hold_s, 1.0), st.config.noise_decay_s)
        sub.lost = False
        st.touch(sub)
        effects = self.rebalancer.reduce(sub, now)
        effects += self.queue_service.serve(now)
        effects += self.rebalancer.raise_(sub, now)
        return effects + self.book.requeue_notices(now) if st.requeued else effects  # (revoked: told their place)

    def on_status(self, substation_id: str, state: str, now: float, *, inventory: bool = False,
                  region: str | None = None, taken_at: float | None = None,
                  announced: int | None = None) -> list[Effect]:
        """``inventory``: this ``online`` status closes the agent's re-announcement to this balancer (every
        session it runs was announced just before): sessions it did not announce are gone there. ``region``: the
        region the status names (kept as the substation's; ``None`` leaves it as it was). ``taken_at``: when the
        agent took that inventory (the status's ts, its clock); ``announced``: how many sessions it says it
        announced just before (fewer arrived: the inventory is incomplete and drops nothing)."""
        st = self.state
        if state != "online" and substation_id not in st.substations:
            return []  # the retained last will of an agent we do not know (one removed long ago): nothing to do
        sub = st.substation(substation_id, now)
        st.touch(sub)
        if region is not None:
            sub.region = region
        effects: list[Effect] = []
        if inventory and state == "online":
            if announced is not None and len(sub.announced) < announced:
                # Its running events have not all arrived (a clustered broker keeps no order between the retained
                # status and them): judging now would drop sessions that run. The next inventory will tell.
                st.counters["inventory_incomplete"] += 1
            else:
                effects = self._reconcile(sub, now, taken_at)
        sub.announced.clear()  # a status closes (or, offline, breaks off) the agent's announcement
        if state == "online":
            sub.status = state
            sub.offline_since = None
            sub.last_seq = -1  # the agent may have restarted and counts from 0 again
            # back: it has headroom again
            return effects + self.queue_service.serve(now) + self.book.requeue_notices(now)
        if sub.status != "offline":
            st.counters["substation_offline"] += 1
            sub.offline_since = now
        sub.status = state
        st.touch(sub)
        return self.offline_grace_over(sub, now)

    def offline_grace_over(self, sub: Substation, now: float) -> list[Effect]:
        """Offline past the grace: its sessions are revoked and their requests re-queued (re-placed elsewhere)."""
        since = sub.offline_since
        grace = self.state.config.offline_grace_s
        if since is None or not sub.sessions or now - since < grace:
            return []
        return self.revoke_all(sub, now, Reason.SUBSTATION_OFFLINE,
                               f"substation {sub.id} went offline and did not come back within {grace:g} s",
                               stop_agent=False)

    def _reconcile(self, sub: Substation, now: float, taken_at: float | None = None) -> list[Effect]:
        """The agent announced its whole inventory: a session it had confirmed and no longer announces is gone
        (the agent restarted): revoke it and re-queue its request. One the agent started after it took the
        inventory (``taken_at``) cannot be in it. An unconfirmed one it does not run may be starting right now, or
        its start was lost (seen on the NATS cluster: a node killed while it delivered the start to the agent): its
        start goes again, as it was (the agent ignores a start it runs or ran)."""
        effects: list[Effect] = []
        for s in sub.sessions.values():
            if not s.confirmed and s.session_id not in sub.announced:
                self.state.counters["start_resent"] += 1
                effects.append(ToSubstation(sub.id, self.book.start_command(s, s.started_at)))
        gone = [s for s in sub.sessions.values() if s.confirmed and s.session_id not in sub.announced
                and not (taken_at is not None and s.confirmed_ts is not None and s.confirmed_ts >= taken_at)]
        for session in gone:
            self.state.counters["session_lost"] += 1
            effects += self.book.revoke(session, now, Reason.SESSION_LOST,
                                        f"substation {sub.id} no longer runs this session", stop_agent=True)
        return effects

    def revoke_all(self, sub: Substation, now: float, reason: Reason, detail: str, *,
                   stop_agent: bool) -> list[Effect]:
        effects: list[Effect] = []
        for session in sorted(sub.sessions.values(), key=lambda s: s.request.queue_key):
            effects += self.book.revoke(session, now, reason, detail, stop_agent=stop_agent)
        effects += self.queue_service.serve(now)
        return effects + self.book.requeue_notices(now)

    def tick(self, now: float) -> list[Effect]:
        """Telemetry gone stale; substations silent past ``lost_after_s`` lose their sessions; offline ones past
        the grace too."""
        effects: list[Effect] = []
        st = self.state
        cfg = st.config
        for sub in st.substations.values():
            if not sub.stale and sub.last_telemetry_at is not None and not sub.is_fresh(now, cfg.stale_after_s):
                sub.stale = True
                sub.stale_transitions += 1
                st.counters["stale_telemetry"] += 1
            # Never heard from: silence counts from when we first learned of it (say, from a session
            # announced to a restarted balancer before the substation's first telemetry).
            heard = sub.last_telemetry_at if sub.last_telemetry_at is not None else sub.known_since
            silent = now - heard > cfg.lost_after_s
            if silent and not sub.lost and sub.sessions:
                sub.lost = True
                st.touch(sub)
                st.counters["substation_lost"] += 1
                effects += self.revoke_all(sub, now, Reason.SUBSTATION_LOST,
                                           f"no telemetry from substation {sub.id} for {cfg.lost_after_s:g} s",
                                           stop_agent=True)
            effects += self.offline_grace_over(sub, now)
        return effects
