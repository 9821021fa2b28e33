"""Operator actions on one substation (balancer/control): drain, undrain, capacity limit, forget."""

from __future__ import annotations

from balancer.core.effects import Effect
from balancer.core.liveness import Liveness
from balancer.core.model import OperatorSettings, kw_to_w_down
from balancer.core.policies import Policy
from balancer.core.queue_service import QueueService
from balancer.core.rebalancing import Rebalancer
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState
from grid_protocol.messages import ControlCommand
from grid_protocol.reasons import Reason


class OperatorControl:
    def __init__(self, state: CoreState, book: SessionBook, rebalancer: Rebalancer, queue_service: QueueService,
                 liveness: Liveness, policy: Policy) -> None:
        self.state = state
        self.book = book
        self.rebalancer = rebalancer
        self.queue_service = queue_service
        self.liveness = liveness
        self.policy = policy

    def on_control(self, msg: ControlCommand, now: float) -> tuple[Reason | None, str, list[Effect]]:
        """Returns (None if done else the reason it was refused, a detail, effects). Lowering the capacity below
        what runs reduces or moves sessions at once; ``forget`` (a decommissioned substation) revokes its
        sessions, which are placed elsewhere or queued, and drops it."""
        st = self.state
        sub = st.substations.get(msg.substation_id)
        if sub is None:
            return Reason.UNKNOWN_SUBSTATION, f"substation {msg.substation_id!r} has never been heard of", []
        st.counters[f"control:{msg.action}"] += 1
        st.touch(sub)  # (drained, undrained, forgotten or its capacity limit changed)
        effects: list[Effect] = []
        if msg.action == "drain":
            sub.draining = True
            detail = "no new sessions; running sessions finish"
        elif msg.action == "undrain":
            sub.draining = False
            effects = self.queue_service.serve(now)
            detail = "takes new sessions again"
        elif msg.action == "forget":
            moved = len(sub.sessions)
            sub.draining = True  # nothing new lands there while its sessions are moved
            effects = self.liveness.revoke_all(sub, now, Reason.DECOMMISSIONED,
                                               f"substation {sub.id} was decommissioned", stop_agent=True)
            del st.substations[sub.id]
            st.operator_pending.pop(sub.id, None)
            self.policy.forget(sub.id)
            self.rebalancer.forget(sub.id)
            st.schedules.pop(sub.id, None)  # its limit schedule goes with it
            st.schedule_dirty.discard(sub.id)
            detail = f"forgotten; {moved} session(s) moved elsewhere or back in the queue"
        else:
            sub.capacity_limit_w = None if msg.capacity_kw is None else kw_to_w_down(msg.capacity_kw)
            sub.apply_capacity()
            st.touch(sub)
            effects = self.rebalancer.reduce(sub, now)
            effects += self.queue_service.serve(now)
            effects += self.rebalancer.raise_(sub, now)
            effects += self.book.requeue_notices(now)
            detail = ("operator limit removed" if msg.capacity_kw is None
                      else f"planning with at most {msg.capacity_kw:g} kW")
        return None, detail, effects

    def settings(self) -> dict[str, OperatorSettings]:
        """Every substation's operator settings that differ from the defaults (known substations, and those
        restored but not heard of yet): what the operator settings store keeps."""
        out = {sid: s for sid, s in self.state.operator_pending.items() if not s.is_default}
        for sub in self.state.substations.values():
            current = OperatorSettings(draining=sub.draining, capacity_limit_w=sub.capacity_limit_w)
            if current.is_default:
                out.pop(sub.id, None)
            else:
                out[sub.id] = current
        return out

    def restore(self, settings: dict[str, OperatorSettings], now: float) -> list[Effect]:
        """Settings read back from the store at start: applied to a known substation at once (as the control
        commands would), kept for the others until they are heard of (``CoreState.substation``)."""
        effects: list[Effect] = []
        for sid, wanted in settings.items():
            sub = self.state.substations.get(sid)
            if sub is None:
                self.state.operator_pending[sid] = wanted
                continue
            sub.draining = wanted.draining
            sub.capacity_limit_w = wanted.capacity_limit_w
            sub.apply_capacity()
            self.state.touch(sub)
            effects += self.rebalancer.reduce(sub, now)
        return effects
