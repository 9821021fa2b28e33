"""Keeping each substation within its limit and its sessions at the policy's shares: shed sessions whose
minimums no longer fit, lower grants (at once when over the limit), raise them as room frees, with a
hysteresis, a hold time and a band sized from the measured base-load noise, so that power that is free
reaches EVs and power does not flap."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from sortedcontainers import SortedList

from balancer.core import limit_effects
from balancer.core.allocation import class_events, water_fill_classes
from balancer.core.effects import Effect
from balancer.core.model import Session, Substation, kw_to_w_up
from balancer.core.policies import Policy
from balancer.core.sessions import SessionBook
from balancer.core.shares import ShareClass, ShareTable, ShareTables
from balancer.core.state import CoreState
from grid_protocol.reasons import Reason

#: a substation's share table (ready up to now), its classes and each class's target
ByClass = tuple[ShareTable, list[ShareClass], list[int]]


class Rebalancer:
    def __init__(self, state: CoreState, book: SessionBook, policy: Policy) -> None:
        self.state = state
        self.book = book
        self.policy = policy
        self._last_targets: dict[str, tuple[tuple[int, int, float], list[tuple[Session, int]]]] = {}
        #: sessions by share class (water-filling policies): a pass finds the few sessions it changes by bisection
        self.shares = ShareTables(lambda s: (s.request.min_w, s.request.requested_w, policy.weight(s)))
        if policy.water_filled:
            book.shares = self.shares
        #: passes use the share classes where they can (False: every pass looks at every session; tests' reference)
        self.incremental = policy.water_filled
        self._hysteresis_w = kw_to_w_up(state.config.hysteresis_kw)

    def band_w(self, sub: Substation) -> int:
        """Power kept free below the limit: base-load noise inside the band changes no grant, where shares computed
        right at the limit would follow every watt of noise (measured: flapping). Sized from the substation's own
        measured noise (how far its uncontrolled load ranged within one hold time, lately): a quiet substation
        (base load constant, as on the ACN benchmark) keeps nothing idle, a noisy one as much as its noise."""
        if sub.noise_w is None:
            return self._hysteresis_w
        return sub.noise_band_w()

    def step_w(self, sub: Substation) -> int:
        """The smallest change worth making without need: one hysteresis step, or the noise band when larger."""
        return self._step(self.band_w(sub))

    def _step(self, band: int) -> int:
        """:meth:`step_w` from the band already read."""
        return max(self._hysteresis_w, band)

    def _free_w(self, sub: Substation) -> int:
        """Power for the sessions' shares: the limit less the uncontrolled load less the noise band."""
        return sub.limit_w(self.state.config.safety_margin_pct) - sub.uncontrolled_w() - self.band_w(sub)

    def targets(self, sub: Substation, now: float) -> list[tuple[Session, int]]:
        """The policy's share of the substation's available power for each of its sessions.

        The last answer per substation is kept while its inputs (sessions and grants, power, time) are the same:
        an event lowers grants, serves the queue, then raises them, and each step asked for the same shares."""
        available = max(sub.floors_w, self._free_w(sub))
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
        self.shares.forget(substation_id)

    def _by_class(self, sub: Substation, now: float) -> ByClass | None:
        """Each share class's target, the very share :meth:`targets` gives each of its sessions, in O(classes).
        ``None`` (then the pass looks at every session, as before): not a water-filling policy, no hold time
        (a new session's grant is written after its first pass), the clock stepped back, or the float rounding
        of the shares leaves sessions of one class with different targets."""
        table = self._ready_table(sub, now)
        if table is None:
            return None
        available = max(sub.floors_w, self._free_w(sub))
        last = table.shares
        if last is not None and last[0] == table.version and last[1] == available:
            classes, targets = last[2], last[3]  # (a pass lowers, the queue is served, a pass raises: one answer)
        else:
            classes = list(table.classes.values())
            kept = table.events
            if kept is None or kept[0] != table.version:
                rows = [(c.floor, c.cap, c.weight, c.count) for c in classes]
                whole = all(c.weight.is_integer() for c in classes)
                kept = table.events = (table.version, rows, class_events(rows) if whole else None)
            targets = water_fill_classes(available, kept[1], kept[2]) if kept[2] is not None else None
            table.shares = (table.version, available, classes, targets)
        return None if targets is None else (table, classes, targets)

    def _ready_table(self, sub: Substation, now: float) -> ShareTable | None:
        """The substation's share table with the holds ended by ``now`` moved on, when passes may use it."""
        if not self.incremental or self.state.config.min_hold_s <= 0:
            return None
        table = self.shares.table(sub.id)
        if table is None or len(table) != len(sub.sessions) or not table.ready_at(now, self.state.config.min_hold_s):
            return None
        return table

    def _no_cuts(self, table: ShareTable, available: int, least: int) -> bool:
        """Lowering toward the shares (nothing to shed) would cut nobody: proved by an earlier pass.

        A pass without shedding cuts a ready session (past its hold) once its grant is ``least`` above its class's
        share. After such a pass no ready grant is; water-filling shares rise with the power available and fall by
        no more than it does (a class's share moves by the level's move times its weight, and the level by the
        power's move over the sum of the free classes' weights). So until a session comes or goes (``version``; a
        change only takes a grant out of the ready ones, and one whose hold ends is folded into the proof with its
        room below its class's line, as the pass would have counted it: ``ShareTable.ready_at``), no pass cuts anyone
        while the power stays above the proof's floor: the pass's power less the least room any ready grant has
        below its cut line, less a margin for the shares' integer rounding (the pass over every session may give a
        few watts back). Telemetry's noise moves the power a little each second: most passes on a settled
        substation are skipped (issue 10: they were about half the rebalancing CPU at 1,000 x 100k).

        The room below the cut line is kept without ``least`` (the step: the hysteresis or the measured noise band,
        which decays a little with every telemetry window) and the line drawn with the step of now: every ready
        grant's room moves by the step's move, so the proof holds at any step (session E: one proof in nine was
        dropped for a noise band a few watts narrower, and the pass redone to prove it again)."""
        proof = table.no_cuts
        if proof is None or proof[0] != table.version:
            return False
        at, room = proof[1], proof[2]
        slack = min(at, room + least)  # (no ready session: room is ``at`` itself, no cut at any power ``at`` or less)
        return slack > 0 and available >= at - slack

    def _prove_no_cuts(self, sub: Substation, by_class: ByClass, available: int) -> None:
        """After a pass without shedding: the power it shared and the least room a ready grant has below its share
        less the rounding margin (see :meth:`_no_cuts`, which adds the step of the day), and each class's share
        less that margin, for the sessions whose hold ends later (``ShareTable.ready_at`` folds each in)."""
        table, classes, targets = by_class
        margin = 2 * (len(sub.sessions) + 2)
        room = available  # (no ready session: no cut at any power the classes stay the same)
        lines: dict[tuple[int, int, float], int] = {}
        for cls, target in zip(classes, targets, strict=True):
            line = lines[(cls.floor, cls.cap, cls.weight)] = target - margin
            if cls.ready:
                room = min(room, line - cls.ready[-1][0])
        table.no_cuts = (table.version, available, room, lines)

    def due(self, now: float) -> list[Substation]:
        """Substations not re-evaluated for ``rebalance_interval_s``."""
        interval = self.state.config.rebalance_interval_s
        return [sub for sub in self.state.substations.values() if now - sub.rebalanced_at >= interval]

    def decrease(self, sub: Substation, now: float, *, shed: int = 0, skip: Session | None = None) -> list[Effect]:
        """Lower grants toward the policy's targets. While ``shed`` watts are still to be freed (over the limit, or
        making room for a new session): at once, the sessions furthest above their share first, each by at least
        a step (or all that is left to shed) and at least down to its share: a base-load step or a newcomer moves
        a few grants, not all. Otherwise only cuts to the share of a step or more, past the hold time."""
        unused = sub.limit_w(self.state.config.safety_margin_pct) - sub.uncontrolled_w()
        return self._decrease(sub, now, shed, skip, unused, self.band_w(sub))

    def _decrease(self, sub: Substation, now: float, shed: int, skip: Session | None, unused: int,
                  band: int) -> list[Effect]:
        """:meth:`decrease` with the substation's numbers read once by the caller (a telemetry pass reads them
        for the shedding too): ``unused`` the limit less the uncontrolled load, ``band`` the noise band."""
        cfg = self.state.config
        step = self._step(band)
        if shed <= 0:
            if sub.granted_w == sub.requested_w and sub.requested_w <= unused:
                return []  # everyone has all they asked for and it fits: no share to lower (the common case)
            table = self._ready_table(sub, now) if skip is None else None
            if table is not None and self._no_cuts(table, max(sub.floors_w, unused - band), max(1, step)):
                return []
        effects: list[Effect] = []
        by_class = self._by_class(sub, now)
        if by_class is not None:
            effects = self._decrease_by_class(sub, by_class, now, shed, skip, step)
            if shed <= 0 and skip is None:
                self._prove_no_cuts(sub, by_class, max(sub.floors_w, unused - band))
            return effects
        for session, target in sorted(self.targets(sub, now), key=lambda st: st[1] - st[0].granted_w):
            if session is skip:
                continue
            above = session.granted_w - target
            if shed > 0:
                cut = min(session.granted_w - session.request.min_w, max(above, min(step, shed)))
                if cut > 0:
                    # a scheduled limit that binds says so (limit_scheduled, and whose it is)
                    reason, detail = (limit_effects.cut_reason(self.state, sub, now)
                                      or (Reason.CAPACITY_REDUCED, "substation limit"))
                    effects += self.book.set_grant(session, session.granted_w - cut, now, reason, detail)
                    shed -= cut
                continue
            if above <= 0:
                break  # (sorted: nobody after this one is above its share)
            if above >= step and now - session.last_change_at >= cfg.min_hold_s:
                effects += self.book.set_grant(session, target, now, Reason.REBALANCED, "fair share changed")
        return effects

    def _decrease_by_class(self, sub: Substation, by_class: ByClass, now: float, shed: int,
                           skip: Session | None, step: int) -> list[Effect]:
        """:meth:`decrease` from the share classes, the same cuts in the same order, looking only at the sessions
        it cuts. The full pass goes through every session furthest above its share first (then as they came):
        while shedding, that order is read lazily (each class's ready sessions in grant order, the held ones
        sorted) and only until enough is shed; after that only sessions past their hold a step or more above
        their share change, and those are found by bisection in each class. ``step``: :meth:`step_w`, read by the
        caller."""
        table, classes, targets = by_class
        cuts: list[tuple[Session, int, bool]] = []  # (session, new grant, shed)
        last: tuple[int, int] | None = None  # the order key of the last session the shedding looked at
        if shed > 0:
            share = {id(cls): target for cls, target in zip(classes, targets, strict=True)}
            key = self.shares.key
            held = sorted((share[id(table.classes[key(s)])] - s.granted_w, table.filed[sid][1], sid)
                          for sid, s in table.held.items())
            streams = [_above(cls.ready, target) for cls, target in zip(classes, targets, strict=True)]
            for target_less_grant, order, sid in heapq.merge(iter(held), *streams):
                last = (target_less_grant, order)
                session = sub.sessions[sid]
                if session is skip:
                    continue
                cut = min(session.granted_w - session.request.min_w, max(-target_less_grant, min(step, shed)))
                if cut > 0:
                    cuts.append((session, session.granted_w - cut, True))
                    shed -= cut
                    if shed <= 0:
                        break
            else:
                last = (1 << 62, 0)  # (everyone was looked at and more is still to shed: nothing else to lower)
        least = max(1, step)  # (the full pass stops at the first session not above its share)
        picks = [(target - grant, order, sid, target) for cls, target in zip(classes, targets, strict=True)
                 if cls.ready and cls.ready[-1][0] >= target + least  # (the most granted is not: none is)
                 for grant, order, sid in cls.ready.islice(cls.ready.bisect_left((target + least,)))]
        picks.sort()
        for target_less_grant, order, sid, target in picks:
            if last is not None and (target_less_grant, order) <= last:
                continue  # (cut while shedding, or passed over)
            session = sub.sessions[sid]
            if session is not skip:
                cuts.append((session, target, False))
        effects: list[Effect] = []
        reason: tuple[Reason, str] | None = None
        for session, grant, shedding in cuts:
            if shedding:
                if reason is None:  # a scheduled limit that binds says so (limit_scheduled, and whose it is)
                    reason = (limit_effects.cut_reason(self.state, sub, now)
                              or (Reason.CAPACITY_REDUCED, "substation limit"))
                effects += self.book.set_grant(session, grant, now, *reason)
            else:
                effects += self.book.set_grant(session, grant, now, Reason.REBALANCED, "fair share changed")
        return effects

    def raise_(self, sub: Substation, now: float) -> list[Effect]:
        """Hand free power (beyond the noise band) to the sessions furthest below their share, past the hold time.
        Each raise is at least one step (or all the room left), even past the session's share (by less than a
        step, so no later cut follows): power freed in small slices (one of 40 sessions ends: 0.06 kW each)
        still reaches EVs, in a few changes instead of one per session. No raise is smaller than the noise
        band: free power that noise would take back at once is left alone. Baselines never change a grant."""
        cfg = self.state.config
        if (not self.policy.rebalances or not sub.sessions or sub.granted_w >= sub.requested_w
                or not sub.is_available(now, cfg.stale_after_s)):
            return []  # (everyone already has all it asked for: nothing to raise)
        band = self.band_w(sub)
        smallest = max(1, band)
        room = sub.limit_w(cfg.safety_margin_pct) - sub.used_w() - band
        effects: list[Effect] = []
        if room < smallest and self.incremental:
            return effects  # no raise fits (every pass, by class or over every session, stops before the first)
        step = self._step(band)
        by_class = self._by_class(sub, now)
        if by_class is not None:
            # Past their hold and below their class's share, furthest below first (then as they came): each class's
            # ready sessions below its share are a prefix of its grant order; merged, and read only while room lasts.
            _, classes, targets = by_class
            rises: list[tuple[Session, int]] = []
            streams = [_below(cls.ready, target) for cls, target in zip(classes, targets, strict=True)
                       if room >= smallest and cls.ready and cls.ready[0][0] < target]
            for _, _, sid, target in heapq.merge(*streams):
                if room < smallest:
                    break
                session = sub.sessions[sid]
                rise = min(max(target - session.granted_w, min(step, room)),
                           session.request.requested_w - session.granted_w, room)
                if rise >= smallest:
                    rises.append((session, session.granted_w + rise))
                    room -= rise
            for session, grant in rises:
                effects += self.book.set_grant(session, grant, now, Reason.POWER_AVAILABLE, "more power is available")
            return effects
        shares = self.targets(sub, now)
        for session, target in sorted(shares, key=lambda st: st[0].granted_w - st[1]):
            if room < smallest:
                break
            below = target - session.granted_w
            if below <= 0 or now - session.last_change_at < cfg.min_hold_s:
                continue
            rise = min(max(below, min(step, room)), session.request.requested_w - session.granted_w, room)
            if rise >= smallest:
                effects += self.book.set_grant(session, session.granted_w + rise, now, Reason.POWER_AVAILABLE,
                                               "more power is available")
                room -= rise
        return effects

    def reduce(self, sub: Substation, now: float) -> list[Effect]:
        """Keep the substation within its limit: revoke the newest sessions while even their minimums do not
        fit, then bring grants down to their shares (at once when over the limit). Baselines never do."""
        cfg = self.state.config
        # A limit of 0 W (reported, an operator's, or one that rounds to it) is a limit like any other: only a
        # substation never heard from (no capacity known yet) skips the pass.
        if not self.policy.rebalances or not sub.sessions or sub.last_telemetry_at is None:
            return []
        sub.rebalanced_at = now
        effects: list[Effect] = []
        limit = sub.limit_w(cfg.safety_margin_pct)
        uncontrolled = sub.uncontrolled_w()
        available = limit - uncontrolled
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
        band = self.band_w(sub)
        # Over the limit: back under it, and under the noise band too, so the next wobble does not cut again.
        used = uncontrolled + sub.granted_w
        shed = used - (limit - band) if used > limit else 0
        return effects + self._decrease(sub, now, shed, None, available, band)


def _above(ready: SortedList, target: int) -> Iterator[tuple[int, int, str]]:
    """A class's ready sessions, furthest above its share first, then as they came: (share - grant, order, id)."""
    run: list[tuple[int, int, str]] = []  # sessions of one grant: reversed, they would come last first
    for grant, order, sid in reversed(ready):
        if run and run[0][0] != target - grant:
            yield from reversed(run)
            run.clear()
        run.append((target - grant, order, sid))
    yield from reversed(run)


def _below(ready: SortedList, target: int) -> Iterator[tuple[int, int, str, int]]:
    """A class's ready sessions below its share, furthest below first: (grant - share, order, id, share)."""
    for grant, order, sid in ready.islice(0, ready.bisect_left((target,))):
        yield grant - target, order, sid, target
