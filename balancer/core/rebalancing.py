"""Keeping each substation within its limit and its sessions at the policy's shares: shed sessions whose
minimums no longer fit, lower grants (at once when over the limit), raise them as room frees, with a
hysteresis and a hold time so telemetry noise does not make power flap."""

from __future__ import annotations

from balancer.core import limit_effects
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
        self._last_targets: dict[str, tuple[tuple[int, int, float], list[tuple[Session, int]]]] = {}

    def targets(self, sub: Substation, now: float) -> list[tuple[Session, int]]:
        """The policy's share of the substation's available power for each of its sessions.

        The last answer per substation is kept while its inputs (sessions and grants, power, time) are the same:
        an event lowers grants, serves the queue, then raises them, and each step asked for the same shares."""
        cfg = self.state.config
        # A band of one hysteresis step below the limit: base-load noise inside it changes no grant, where
        # shares computed right at the limit would follow every watt of noise (measured: flapping).
        band = kw_to_w_up(cfg.hysteresis_kw)
        available = max(sub.floors_w, sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w() - band)
        key = (sub.shares_version, available, now)
        last = self._last_targets.get(sub.id)
        if last is not None and last[0] == key:
            return last[1]
        sessions = list(sub.sessions.values())
        floors = [s.request.min_w for s in sessions]
        caps = [s.request.requested_w for s in sessions]
        targets = self.policy.targets(sessions, available, floors, caps, now)
        shares = list(zip(sessions, targets, strict=True))
        self._last_targets[sub.id] = (key, shares)
        return shares

    def forget(self, substation_id: str) -> None:
        self._last_targets.pop(substation_id, None)

    def _settled(self, sub: Substation, now: float) -> bool:
        """A sharing pass here would change no grant: no session came, went or changed since the last full pass,
        no held change has come due, and the power available moved less than the pass's tolerance (see
        :meth:`_memo`). The pass (O(sessions) there) is then skipped: with every substation reporting each second,
        re-sharing on every watt of base-load noise was the core's largest cost at scale."""
        memo = sub.share_memo
        if memo is None or memo[0] != sub.shares_version or now >= memo[2]:
            return False
        moved = sub.limit_w(self.state.config.safety_margin_pct) - sub.uncontrolled_w() - memo[1]
        return abs(moved) < memo[3]

    def _memo(self, sub: Substation, shares: list[tuple[Session, int]],
              now: float) -> tuple[int, int, float, float] | None:
        """After a full pass: how far the available power may move before some grant would change.

        A pass changes a grant only where |target - grant| reaches the hysteresis (and the session is not held):
        ``slack`` is the least distance to that, less the shares' integer rounding. Water-filling sets
        ``target_i = clamp(w_i * L, floor_i, cap_i)`` for a level ``L``, so a level move of ``slack / max w`` moves
        no target by ``slack``; the power that move takes, up and down from the present level, is the tolerance
        (at least ``slack`` itself: no target moves more than the total). Held sessions are left to their hold's
        end (``hold_until``: a full pass then). Shares that move with time alone (deadline) get no memo."""
        if self.policy.time_dependent:
            return None
        cfg = self.state.config
        hysteresis = kw_to_w_up(cfg.hysteresis_kw)
        hold_until = float("inf")
        slack = float(hysteresis)
        level: float | None = None
        rows: list[tuple[float, int, int]] = []
        max_weight = 0.0
        for session, target in shares:
            if now - session.last_change_at < cfg.min_hold_s:
                hold_until = min(hold_until, session.last_change_at + cfg.min_hold_s)
            else:
                slack = min(slack, hysteresis - abs(target - session.granted_w))
            floor, cap = session.request.min_w, session.request.requested_w
            weight = self.policy.weight(session)
            rows.append((weight, floor, cap))
            max_weight = max(max_weight, weight)
            if level is None and floor < target < cap:
                level = target / weight
        slack -= 2 * (len(shares) + 1)  # integer rounding of the shares (water_fill gives back a few watts)
        tolerance = slack
        if level is not None and slack > 0:
            step = slack / max_weight

            def total(at: float) -> float:
                return sum(min(cap, max(floor, weight * at)) for weight, floor, cap in rows)

            now_total = total(level)
            tolerance = max(slack, min(total(level + step) - now_total, now_total - total(level - step)))
        available = sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w()
        return sub.shares_version, available, hold_until, tolerance

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
        if not mandatory and self._settled(sub, now):
            return []
        hysteresis = kw_to_w_up(cfg.hysteresis_kw)
        effects: list[Effect] = []
        for session, target in self.targets(sub, now):
            if session is skip:
                continue
            cut = session.granted_w - target
            settled = cut >= hysteresis and now - session.last_change_at >= cfg.min_hold_s
            if cut > 0 and (mandatory or settled):
                reason, detail = ((Reason.CAPACITY_REDUCED, "substation limit") if mandatory
                                  else (Reason.REBALANCED, "fair share changed"))
                if mandatory:  # a scheduled limit that binds says so (limit_scheduled, and whose it is)
                    reason, detail = limit_effects.cut_reason(self.state, sub, now) or (reason, detail)
                effects += self.book.set_grant(session, target, now, reason, detail)
        return effects

    def raise_(self, sub: Substation, now: float) -> list[Effect]:
        """Raise grants toward the policy's targets, smallest first, each only as far as the room actually
        free allows, past the hysteresis and the hold time. Baselines never change a grant."""
        cfg = self.state.config
        if (not self.policy.rebalances or not sub.sessions or sub.granted_w >= sub.requested_w
                or not sub.is_available(now, cfg.stale_after_s)):
            return []  # (everyone already has all it asked for: nothing to raise)
        if self._settled(sub, now):
            return []
        hysteresis = kw_to_w_up(cfg.hysteresis_kw)
        room = sub.limit_w(cfg.safety_margin_pct) - sub.used_w()
        effects: list[Effect] = []
        shares = sorted(self.targets(sub, now), key=lambda st: st[0].granted_w)
        for session, target in shares:
            rise = min(target - session.granted_w, room)
            if rise >= hysteresis and now - session.last_change_at >= cfg.min_hold_s:
                effects += self.book.set_grant(session, session.granted_w + rise, now, Reason.POWER_AVAILABLE,
                                               "more power is available")
                room -= rise
        sub.share_memo = self._memo(sub, shares, now)
        return effects

    def reduce(self, sub: Substation, now: float) -> list[Effect]:
        """Keep the substation within its limit: revoke the newest sessions while even their minimums do not
        fit, then bring grants down to their shares (at once when over the limit). Baselines never do."""
        cfg = self.state.config
        if not self.policy.rebalances or not sub.sessions or sub.rated_w() <= 0:  # (capacity never reported)
            return []
        sub.rebalanced_at = now
        effects: list[Effect] = []
        available = sub.limit_w(cfg.safety_margin_pct) - sub.uncontrolled_w()
        floors = sub.floors_w
        if floors > available:
            reason, detail = (limit_effects.cut_reason(self.state, sub, now)
                              or (Reason.CAPACITY_REDUCED, "substation load rose above its limit"))
            # reversed(): among sessions placed at the same instant, the one placed last is the newest.
            for session in sorted(reversed(sub.sessions.values()), key=lambda s: s.started_at, reverse=True):
                if floors <= available:
                    break
                floors -= session.request.min_w
                effects += self.book.revoke(session, now, reason, detail, stop_agent=True)
        over = sub.used_w() > sub.limit_w(cfg.safety_margin_pct)
        return effects + self.decrease(sub, now, mandatory=over)
