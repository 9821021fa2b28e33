"""Keeping each substation within its limit and its sessions at the policy's shares: shed sessions whose
minimums no longer fit, lower grants (at once when over the limit), raise them as room frees, with a
hysteresis and a hold time so telemetry noise does not make power flap."""

from __future__ import annotations

from balancer.core.effects import Effect
from balancer.core.model import Session, Substation, kw_to_w_up
from balancer.core.policies import Policy
from balancer.core.sessions import SessionBook
from balancer.core.state import CoreState
from grid_protocol.reasons import Reason


class Rebalancer:
    def __init__(self, state: CoreState, book: SessionBook, policy: Policy) -> None:
        self.state = state
        self.book = book
        self.policy = policy

    def targets(self, sub: Substation, now: float) -> list[tuple[Session, int]]:
        """The policy's share of the substation's available power for each of its sessions."""
        cfg = self.state.config
        sessions = list(sub.sessions.values())
        # A band of one hysteresis step below the limit: base-load noise inside it changes no grant, where
        # shares computed right at the limit would follow every watt of noise (measured: flapping).
        band = kw_to_w_up(cfg.hysteresis_kw)
        available = max(sum(s.request.min_w for s in sessions),
                        sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w() - band)
        floors = [s.request.min_w for s in sessions]
        caps = [s.request.requested_w for s in sessions]
        targets = self.policy.targets(sessions, available, floors, caps, now)
        return list(zip(sessions, targets, strict=True))

    def due(self, now: float) -> list[Substation]:
        """Substations not re-evaluated for ``rebalance_interval_s``."""
        interval = self.state.config.rebalance_interval_s
        return [sub for sub in self.state.substations.values() if now - sub.rebalanced_at >= interval]

    def decrease(self, sub: Substation, now: float, *, mandatory: bool,
                 skip: Session | None = None) -> list[Effect]:
        """Lower grants to the policy's targets: all of them when ``mandatory`` (over the limit, or making
        room for a new session), otherwise only changes past the hysteresis and the hold time."""
        cfg = self.state.config
        if (not mandatory and sub.granted_w == sub.requested_w
                and sub.requested_w <= sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w()):
            return []  # everyone has all they asked for and it fits: no share to lower (the common case)
        hysteresis = kw_to_w_up(cfg.hysteresis_kw)
        effects: list[Effect] = []
        for session, target in self.targets(sub, now):
            if session is skip:
                continue
            cut = session.granted_w - target
            settled = cut >= hysteresis and now - session.last_change_at >= cfg.min_hold_s
            if cut > 0 and (mandatory or settled):
                reason = Reason.CAPACITY_REDUCED if mandatory else Reason.REBALANCED
                effects += self.book.set_grant(session, target, now, reason,
                                               "substation limit" if mandatory else "fair share changed")
        return effects

    def raise_(self, sub: Substation, now: float) -> list[Effect]:
        """Raise grants toward the policy's targets, smallest first, each only as far as the room actually
        free allows, past the hysteresis and the hold time. Baselines never change a grant."""
        cfg = self.state.config
        if (not self.policy.rebalances or not sub.sessions or sub.granted_w >= sub.requested_w
                or not sub.is_available(now, cfg.stale_after_s)):
            return []  # (everyone already has all it asked for: nothing to raise)
        hysteresis = kw_to_w_up(cfg.hysteresis_kw)
        room = sub.limit_w(cfg.safety_margin_pct) - sub.used_w()
        effects: list[Effect] = []
        for session, target in sorted(self.targets(sub, now), key=lambda st: st[0].granted_w):
            rise = min(target - session.granted_w, room)
            if rise >= hysteresis and now - session.last_change_at >= cfg.min_hold_s:
                effects += self.book.set_grant(session, session.granted_w + rise, now, Reason.POWER_AVAILABLE,
                                               "more power is available")
                room -= rise
        return effects

    def reduce(self, sub: Substation, now: float) -> list[Effect]:
        """Keep the substation within its limit: revoke the newest sessions while even their minimums do not
        fit, then bring grants down to their shares (at once when over the limit). Baselines never do."""
        cfg = self.state.config
        if not self.policy.rebalances or not sub.sessions or sub.capacity_w <= 0:
            return []
        sub.rebalanced_at = now
        effects: list[Effect] = []
        available = sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w()
        floors = sub.floors_w
        if floors > available:
            # reversed(): among sessions placed at the same instant, the one placed last is the newest.
            for session in sorted(reversed(sub.sessions.values()), key=lambda s: s.started_at, reverse=True):
                if floors <= available:
                    break
                floors -= session.request.min_w
                effects += self.book.revoke(session, now, Reason.CAPACITY_REDUCED,
                                            "substation load rose above its limit", stop_agent=True)
        over = sub.used_w() > sub.limit_w(cfg.safety_margin_pct)
        return effects + self.decrease(sub, now, mandatory=over)
