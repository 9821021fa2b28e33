"""Table-driven tests of the pure allocation core (``balancer.core``).

Every table row is one scenario with a readable id. The harness drives the engine with plain
messages and an explicit clock; assertions look at the returned effects (what would be published,
in order) and at the engine's state.

Defaults used throughout: safety margin 10 % (a 100 kW substation has a 90 kW limit), telemetry
stale after 5 s, lost after 30 s, queue of 3, default minimum 1.4 kW.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from balancer.core import Balancer, CoreConfig, Effect, ToEv, ToSubstation
from grid_protocol import Assignment, ChargeRequest, Reason, Release, SessionCommand, SessionEvent, Telemetry
from grid_sim.substation import SubstationSim

T0 = 1_700_000_000.0


def cfg(**overrides: Any) -> CoreConfig:
    base: dict[str, Any] = {"safety_margin_pct": 10.0, "stale_after_s": 5.0, "lost_after_s": 30.0,
                            "queue_max": 3, "default_min_kw": 1.4}
    base.update(overrides)
    return CoreConfig(**base)


@dataclass
class Harness:
    """Drives a :class:`Balancer` with a hand-held clock and remembers per-substation telemetry."""

    config: CoreConfig = field(default_factory=cfg)
    now: float = T0

    def __post_init__(self) -> None:
        self.b = Balancer(self.config)
        self.seq: dict[str, int] = {}
        self.last: dict[str, tuple[float, float]] = {}  # sid -> (capacity_kw, base_kw)
        self._rids = 0

    # --- inputs ---------------------------------------------------------------------------
    def advance(self, dt: float) -> None:
        self.now += dt

    def tel(self, sid: str, capacity_kw: float | None = None, base_kw: float | None = None, *,
            seq: int | None = None, load_kw: float | None = None) -> list[Effect]:
        cap, base = self.last.get(sid, (100.0, 0.0))
        cap = cap if capacity_kw is None else capacity_kw
        base = base if base_kw is None else base_kw
        self.last[sid] = (cap, base)
        if seq is None:
            seq = self.seq.get(sid, -1) + 1
        self.seq[sid] = max(seq, self.seq.get(sid, -1))
        msg = Telemetry(substation_id=sid, ts=self.now, seq=seq, capacity_kw=cap,
                        load_kw=base if load_kw is None else load_kw, base_load_kw=base, ev_load_kw=0.0,
                        active_sessions=0)
        return self.b.on_telemetry(msg, self.now)

    def refresh(self, *sids: str) -> list[Effect]:
        """Same numbers again, just fresh."""
        effects: list[Effect] = []
        for sid in sids or tuple(self.last):
            effects += self.tel(sid)
        return effects

    def req(self, ev: str, kw: float, *, rid: str | None = None, min_kw: float | None = None, priority: int = 0,
            body_ev: str | None = None, energy_kwh: float | None = None) -> list[Effect]:
        if rid is None:
            self._rids += 1
            rid = f"r{self._rids}"
        msg = ChargeRequest(requested_kw=kw, request_id=rid, ev_id=body_ev, min_kw=min_kw, priority=priority,
                            duration_minutes=None if energy_kwh else 60.0, energy_kwh=energy_kwh)
        return self.b.on_request(ev, msg, self.now)

    def release(self, ev: str, *, rid: str | None = None, session_id: str | None = None) -> list[Effect]:
        return self.b.on_release(ev, Release(request_id=rid, session_id=session_id, ev_id=ev), self.now)

    def event(self, sid: str, event: str, session_id: str, ev: str, reason: str | None = None) -> list[Effect]:
        msg = SessionEvent(event=event, session_id=session_id, ev_id=ev, ts=self.now,  # type: ignore[arg-type]
                           substation_id=sid, reason=reason)
        return self.b.on_session_event(sid, msg, self.now)

    def end(self, ev: str, reason: str = Reason.ENERGY_DELIVERED) -> list[Effect]:
        s = self.session(ev)
        return self.event(s.substation_id, "ended", s.session_id, ev, reason)

    def status(self, sid: str, state: str) -> list[Effect]:
        return self.b.on_status(sid, state, self.now)

    def tick(self) -> list[Effect]:
        return self.b.tick(self.now)

    # --- queries --------------------------------------------------------------------------
    def session(self, ev: str) -> Any:
        found = [s for s in self.b._sessions.values() if s.request.ev_id == ev]
        assert len(found) == 1, f"{ev} has {len(found)} sessions"
        return found[0]

    def sessions_on(self, sid: str) -> dict[str, int]:
        """ev -> granted W on ``sid``."""
        return {s.request.ev_id: s.granted_w for s in self.b.substations[sid].sessions.values()}

    def queue(self) -> list[str]:
        return [r.ev_id for r in self.b.queue.items()]


def answers(effects: list[Effect], ev: str | None = None) -> list[Assignment]:
    return [e.message for e in effects if isinstance(e, ToEv) and (ev is None or e.ev_id == ev)]


def answer(effects: list[Effect], ev: str) -> Assignment:
    found = answers(effects, ev)
    assert found, f"no answer for {ev} in {effects}"
    return found[-1]


def commands(effects: list[Effect], kind: str | None = None) -> list[tuple[str, SessionCommand]]:
    return [(e.substation_id, e.message) for e in effects
            if isinstance(e, ToSubstation) and (kind is None or e.message.command == kind)]


def assert_reductions_first(effects: list[Effect]) -> None:
    """Every stop/update precedes every start in the list."""
    kinds = [e.message.command for e in effects if isinstance(e, ToSubstation)]
    if "start" in kinds:
        first_start = kinds.index("start")
        assert all(k == "start" for k in kinds[first_start:]), f"a stop/update follows a start: {kinds}"


def assert_healthy(h: Harness) -> None:
    assert h.b.violations() == []
    evs = Counter(s.request.ev_id for s in h.b._sessions.values())
    assert all(n == 1 for n in evs.values()), evs


# ============================================================================ placement

PLACEMENT = [
    # id, substations {sid: (capacity_kw, base_kw)}, (requested_kw, min_kw), expected (status, sid, granted_kw, reason)
    pytest.param({"A": (100, 50), "B": (100, 10), "C": (100, 30)}, (10, None), ("assigned", "B", 10.0, None),
                 id="least-utilised-of-three"),
    pytest.param({"A": (100, 10), "B": (100, 50)}, (10, None), ("assigned", "A", 10.0, None),
                 id="first-in-list-only-when-least-utilised"),
    pytest.param({"A": (100, 40), "B": (100, 10)}, (10, None), ("assigned", "B", 10.0, None),
                 id="not-first-in-list"),
    # A has far more headroom (400 kW) but would be 52 % utilised; B only 32 %.
    pytest.param({"A": (1000, 500), "B": (100, 10)}, (22, None), ("assigned", "B", 22.0, None),
                 id="relative-utilisation-not-absolute-headroom"),
    pytest.param({"A": (100, 20), "B": (100, 20)}, (10, None), ("assigned", "A", 10.0, None),
                 id="tie-broken-by-id"),
    # A is emptier now but can give only 18 of 22 kW; B (60 % used) can give all of it.
    pytest.param({"A": (20, 0), "B": (100, 60)}, (22, 5), ("assigned", "B", 22.0, None),
                 id="full-grant-before-partial"),
    pytest.param({"A": (100, 80)}, (22, 6), ("assigned", "A", 10.0, Reason.PARTIAL_GRANT),
                 id="partial-grant-what-is-left"),
    pytest.param({"A": (100, 84)}, (22, 6), ("assigned", "A", 6.0, Reason.PARTIAL_GRANT),
                 id="partial-grant-exactly-min"),
    pytest.param({"A": (100, 80), "B": (100, 85)}, (22, 6), ("assigned", "A", 10.0, Reason.PARTIAL_GRANT),
                 id="partial-largest-available"),
    pytest.param({"A": (100, 85), "B": (100, 86)}, (22, 6), ("queued", None, None, Reason.NO_HEADROOM),
                 id="min-not-available-anywhere-queued"),
    pytest.param({"A": (100, 88.6)}, (22, None), ("assigned", "A", 1.4, Reason.PARTIAL_GRANT),
                 id="default-min-exactly-available"),
    pytest.param({"A": (100, 88.601)}, (22, None), ("queued", None, None, Reason.NO_HEADROOM),
                 id="default-min-not-available"),
    pytest.param({"A": (100, 89)}, (1.0, None), ("assigned", "A", 1.0, None),
                 id="default-min-capped-at-requested"),
    pytest.param({"A": (100, 80)}, (22, 0), ("assigned", "A", 10.0, Reason.PARTIAL_GRANT),
                 id="min-zero-takes-anything"),
    pytest.param({"A": (100, 90)}, (22, 0), ("queued", None, None, Reason.NO_HEADROOM),
                 id="min-zero-but-nothing-left"),
    pytest.param({"A": (100, 0)}, (90, 90), ("assigned", "A", 90.0, None),
                 id="exactly-the-limit-fits"),
    pytest.param({"A": (100, 1)}, (90, 90), ("queued", None, None, Reason.NO_HEADROOM),
                 id="min-within-limit-but-not-headroom-queued"),
    pytest.param({"A": (100, 0)}, (90.001, 90.001), ("rejected", None, None, Reason.EXCEEDS_CAPACITY),
                 id="min-over-every-limit-rejected"),
    pytest.param({"A": (100, 0), "B": (200, 150)}, (120, 120), ("queued", None, None, Reason.NO_HEADROOM),
                 id="min-within-largest-limit-queued"),
]


@pytest.mark.parametrize(("subs", "request_", "expected"), PLACEMENT)
def test_placement(subs: dict[str, tuple[float, float]], request_: tuple[float, float | None],
                   expected: tuple[str, str | None, float | None, str | None]) -> None:
    h = Harness()
    for name, (cap, base) in subs.items():
        h.tel(name, cap, base)
    kw, min_kw = request_
    effects = h.req("EV1", kw, min_kw=min_kw)
    a = answer(effects, "EV1")
    status, sid, granted, reason = expected
    assert (a.status, a.substation_id, a.granted_kw, a.reason) == (status, sid, granted, reason)
    starts = commands(effects, "start")
    if status == "assigned":
        assert [(s, c.granted_kw, c.session_id) for s, c in starts] == [(sid, granted, a.session_id)]
        assert effects.index(next(e for e in effects if isinstance(e, ToSubstation))) < effects.index(
            next(e for e in effects if isinstance(e, ToEv))), "the agent hears before the EV"
    else:
        assert starts == []
        assert a.position == (1 if status == "queued" else None)
    assert_healthy(h)


def test_request_energy_only_is_passed_to_the_agent() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    (_, start), = commands(h.req("EV1", 11, energy_kwh=30.0), "start")
    assert (start.energy_kwh, start.duration_minutes, start.granted_kw) == (30.0, None, 11.0)


# ============================================================================ queue order

QUEUE_ORDER = [
    # id, requests [(ev, priority)], expected positions answered, expected final queue order
    pytest.param([("E1", 0), ("E2", 0), ("E3", 0)], [1, 2, 3], ["E1", "E2", "E3"], id="fifo-same-priority"),
    pytest.param([("E1", 0), ("E2", 5), ("E3", 9)], [1, 1, 1], ["E3", "E2", "E1"], id="higher-priority-first"),
    pytest.param([("E1", 5), ("E2", 0), ("E3", 5)], [1, 2, 2], ["E1", "E3", "E2"],
                 id="priority-then-arrival"),
    pytest.param([("E1", 0), ("E2", 9), ("E3", 0)], [1, 1, 3], ["E2", "E1", "E3"], id="urgent-jumps-ahead"),
]


@pytest.mark.parametrize(("reqs", "positions", "order"), QUEUE_ORDER)
def test_queue_order_and_positions(reqs: list[tuple[str, int]], positions: list[int], order: list[str]) -> None:
    h = Harness()
    h.tel("A", 100, 90)  # no headroom at all
    got = []
    for ev, prio in reqs:
        a = answer(h.req(ev, 11, priority=prio), ev)
        assert (a.status, a.reason) == ("queued", Reason.NO_HEADROOM)
        got.append(a.position)
    assert got == positions
    assert h.queue() == order
    assert [h.b.queue.position(ev) for ev in order] == [1, 2, 3]
    # Capacity frees one request at a time: they are assigned in queue order.
    assigned = []
    for base in (79, 68, 57):
        assigned += [a.ev_id for a in answers(h.tel("A", base_kw=base)) if a.status == "assigned"]
    assert assigned == order
    assert_healthy(h)


QUEUE_FULL = [
    pytest.param(0, id="same-priority"),
    pytest.param(9, id="even-top-priority"),
]


@pytest.mark.parametrize("priority", QUEUE_FULL)
def test_queue_full_rejected_with_reason(priority: int) -> None:
    h = Harness()
    h.tel("A", 100, 90)
    for ev in ("E1", "E2", "E3"):
        assert answer(h.req(ev, 11), ev).status == "queued"
    effects = h.req("E4", 11, rid="x4", priority=priority)
    a = answer(effects, "E4")
    assert (a.status, a.reason, a.request_id) == ("rejected", Reason.QUEUE_FULL, "x4")
    assert len(effects) == 1 and effects[0].in_reply  # type: ignore[union-attr]
    assert h.queue() == ["E1", "E2", "E3"]
    assert h.b.open_requests() == 3
    # A redelivery of the rejected request gets the same answer.
    assert h.req("E4", 11, rid="x4", priority=priority) == [ToEv("E4", a, in_reply=True)]


OVERTAKE = [
    # id, seconds the big head has waited when the small request arrives, expected answer to the small one
    pytest.param(0.0, ("assigned", None), id="fresh-head-is-overtaken-by-what-fits"),
    pytest.param(29.0, ("assigned", None), id="overtaken-until-the-guard"),
    pytest.param(30.0, ("queued", 2), id="head-past-guard-holds-capacity"),
]


@pytest.mark.parametrize(("waited", "expected"), OVERTAKE)
def test_overtaking_until_the_head_has_waited_long_enough(waited: float, expected: tuple[str, int | None]) -> None:
    h = Harness()
    h.tel("A", 100, 80)  # 10 kW free
    assert answer(h.req("BIG", 30, min_kw=20), "BIG").status == "queued"
    h.advance(waited)
    h.refresh()
    a = answer(h.req("SMALL", 5, min_kw=5), "SMALL")
    assert (a.status, a.position) == expected
    assert h.queue()[0] == "BIG"
    # Capacity that frees goes to the reserved head first.
    h.advance(1)
    effects = h.tel("A", base_kw=60)
    assert answer(effects, "BIG").status == "assigned"
    assert_healthy(h)


# ============================================================================ automatic assignment

def _blocked() -> Harness:
    """A: 22 kW free, taken by EV1 (22 kW, min 22); EV2 (22 kW, min 22) waits."""
    h = Harness()
    h.tel("A", 100, 68)
    assert answer(h.req("EV1", 22, min_kw=22), "EV1").status == "assigned"
    assert answer(h.req("EV2", 22, min_kw=22), "EV2").status == "queued"
    return h


AUTO_ASSIGN = [
    pytest.param(lambda h: h.end("EV1"), id="session-ended"),
    pytest.param(lambda h: h.end("EV1", Reason.DURATION_ELAPSED), id="session-ended-duration"),
    pytest.param(lambda h: h.release("EV1"), id="ev-released-session"),
    pytest.param(lambda h: h.tel("A", base_kw=40), id="base-load-dropped"),
    pytest.param(lambda h: h.tel("A", capacity_kw=200), id="capacity-raised"),
    pytest.param(lambda h: h.tel("B", 100, 0), id="new-substation-appeared"),
]


@pytest.mark.parametrize("trigger", AUTO_ASSIGN)
def test_queued_request_assigned_when_capacity_frees(trigger: Any) -> None:
    h = _blocked()
    effects = trigger(h)
    a = answer(effects, "EV2")
    assert (a.status, a.granted_kw) == ("assigned", 22.0)
    assert a.request_id is not None and a.session_id is not None
    starts = commands(effects, "start")
    assert [(c.ev_id, c.session_id) for _, c in starts] == [("EV2", a.session_id)]
    assert_reductions_first(effects)
    assert h.queue() == []
    assert_healthy(h)


URGENT_AHEAD_OF_HOLD = [
    # id, urgent request (kW, min_kw), expected (urgent status, small status or None when not answered)
    pytest.param((5, 5), ("assigned", None), id="urgent-that-fits-is-placed-at-once"),
    pytest.param((40, 40), ("queued", "assigned"), id="urgent-that-does-not-fit-lifts-the-hold"),
]


@pytest.mark.parametrize(("urgent", "expected"), URGENT_AHEAD_OF_HOLD)
def test_higher_priority_arrival_ahead_of_a_head_holding_capacity(
        urgent: tuple[float, float], expected: tuple[str, str | None]) -> None:
    h = Harness()
    h.tel("A", 100, 80)  # 10 kW free
    h.req("BIG", 30, min_kw=20)
    h.advance(31)  # BIG holds capacity now
    h.refresh()
    assert answer(h.req("SMALL", 5, min_kw=5), "SMALL").status == "queued"
    kw, min_kw = urgent
    effects = h.req("URGENT", kw, min_kw=min_kw, priority=5)
    assert answer(effects, "URGENT").status == expected[0]
    small = answers(effects, "SMALL")
    assert (small[-1].status if small else None) == expected[1]
    assert_healthy(h)


def test_head_that_fits_nowhere_after_a_capacity_cut_does_not_block_the_queue() -> None:
    h = Harness()
    h.tel("A", 100, 20)
    assert answer(h.req("BIG", 80, min_kw=80), "BIG").status == "queued"
    h.advance(31)  # BIG would hold capacity now ...
    h.tel("A", capacity_kw=50)  # ... but A's limit drops to 45 kW: BIG cannot fit even on an empty A
    a = answer(h.req("SMALL", 5, min_kw=5), "SMALL")
    assert (a.status, a.substation_id) == ("assigned", "A")
    assert h.queue() == ["BIG"]  # accepted, so kept (not dropped), waiting for capacity to come back
    effects = h.tel("A", capacity_kw=200)
    assert answer(effects, "BIG").status == "assigned"
    assert_healthy(h)


def test_queued_head_released_lets_the_next_one_in() -> None:
    h = Harness()
    h.tel("A", 100, 80)  # 10 kW free
    h.req("BIG", 30, min_kw=20)
    h.advance(31)  # BIG now holds capacity: SMALL waits behind it
    h.refresh()
    assert answer(h.req("SMALL", 5, min_kw=5), "SMALL").status == "queued"
    effects = h.release("BIG")
    assert answer(effects, "BIG").status == "cancelled"
    a = answer(effects, "SMALL")
    assert (a.status, a.granted_kw) == ("assigned", 5.0)
    assert_healthy(h)


def test_substation_back_online_serves_the_queue() -> None:
    h = Harness(cfg(offline_grace_s=0))  # revoked at once
    h.tel("A", 100, 68)
    h.req("EV1", 22, min_kw=22)
    effects = h.status("A", "offline")
    assert [(a.status, a.reason) for a in answers(effects, "EV1")] == [
        ("revoked", Reason.SUBSTATION_OFFLINE), ("queued", Reason.SUBSTATION_OFFLINE)]
    assert h.queue() == ["EV1"]
    h.advance(1)
    effects = h.status("A", "online")  # telemetry is still fresh: A has headroom again
    assert answer(effects, "EV1").status == "assigned"
    assert_healthy(h)


# ============================================================================ releases

RELEASES = [
    # id, setup ("queued" / "assigned" / "none"), release kwargs builder, expected (status, reason), stop sent
    pytest.param("queued", {}, ("cancelled", Reason.RELEASED), False, id="release-while-queued-cancels"),
    pytest.param("queued", {"rid": "mine"}, ("cancelled", Reason.RELEASED), False, id="release-queued-by-id"),
    pytest.param("assigned", {}, ("completed", Reason.RELEASED), True, id="release-running-session"),
    pytest.param("assigned", {"rid": "mine"}, ("completed", Reason.RELEASED), True, id="release-session-by-rid"),
    pytest.param("assigned", {"session": True}, ("completed", Reason.RELEASED), True,
                 id="release-session-by-session-id"),
    pytest.param("none", {}, ("rejected", Reason.NOTHING_TO_RELEASE), False, id="release-with-nothing-open"),
    pytest.param("queued", {"rid": "other"}, ("rejected", Reason.NOTHING_TO_RELEASE), False,
                 id="release-other-request-id"),
    pytest.param("assigned", {"session_id": "nope"}, ("rejected", Reason.NOTHING_TO_RELEASE), False,
                 id="release-other-session-id"),
    pytest.param("queued", {"session_id": "nope"}, ("rejected", Reason.NOTHING_TO_RELEASE), False,
                 id="release-session-id-while-queued"),
    pytest.param("completed", {"rid": "mine"}, ("rejected", Reason.NOTHING_TO_RELEASE), False,
                 id="release-after-completion"),
]


@pytest.mark.parametrize(("setup", "kwargs", "expected", "stop"), RELEASES)
def test_release(setup: str, kwargs: dict[str, Any], expected: tuple[str, str], stop: bool) -> None:
    h = Harness()
    h.tel("A", 100, 80 if setup == "queued" else 0)
    if setup != "none":
        h.req("EV1", 22, rid="mine", min_kw=22)
    session_id = h.session("EV1").session_id if setup in ("assigned", "completed") else None
    if setup == "completed":
        h.end("EV1")
    if kwargs.pop("session", False):
        kwargs["session_id"] = session_id
    effects = h.release("EV1", **kwargs)
    a = answer(effects, "EV1")
    assert (a.status, a.reason) == expected
    stops = commands(effects, "stop")
    if stop:
        assert [(sid, c.session_id, c.reason) for sid, c in stops] == [("A", session_id, Reason.RELEASED)]
        assert h.b.substations["A"].granted_w == 0
        assert effects.index(next(e for e in effects if isinstance(e, ToSubstation))) == 0
    else:
        assert stops == []
    if expected[0] != "rejected":
        assert h.b.open_requests() == 0 and h.queue() == []
    assert_healthy(h)


# ============================================================================ idempotency

def _state(h: Harness, state: str) -> list[Effect]:
    """Bring EV1's request 'mine' into ``state`` and return the effects that carried its answer."""
    if state == "queued":
        h.tel("A", 100, 90)
        return h.req("EV1", 22, rid="mine")
    h.tel("A", 100, 0)
    effects = h.req("EV1", 22, rid="mine")
    if state == "assigned":
        return effects
    if state == "updated":
        return h.tel("A", base_kw=80)
    if state == "completed":
        return h.end("EV1")
    if state == "released":
        return h.release("EV1")
    raise AssertionError(state)


IDEMPOTENT = [
    pytest.param("queued", "queued", id="while-queued"),
    pytest.param("assigned", "assigned", id="while-assigned"),
    pytest.param("updated", "updated", id="after-reduction-latest-answer"),
    pytest.param("completed", "completed", id="after-completion"),
    pytest.param("released", "completed", id="after-release"),
]


@pytest.mark.parametrize(("state", "status"), IDEMPOTENT)
def test_redelivery_gets_the_identical_answer(state: str, status: str) -> None:
    h = Harness()
    first = answer(_state(h, state), "EV1")
    assert first.status == status
    sessions_before = dict(h.b._sessions)
    for _ in range(3):
        h.advance(0.5)
        again = h.req("EV1", 22, rid="mine")
        assert again == [ToEv("EV1", first, in_reply=True)]
    assert h.b._sessions == sessions_before
    assert_healthy(h)


def test_redelivery_while_queued_after_revocation_gets_latest_answer() -> None:
    h = Harness(cfg(offline_grace_s=0))
    h.tel("A", 100, 0)
    h.req("EV1", 22, rid="mine")
    h.status("A", "offline")
    (again,) = h.req("EV1", 22, rid="mine")
    assert isinstance(again, ToEv)
    assert (again.message.status, again.message.reason, again.message.position) == (
        "queued", Reason.SUBSTATION_OFFLINE, 1)


BUSY = [
    pytest.param("queued", id="new-request-id-while-queued"),
    pytest.param("assigned", id="new-request-id-while-assigned"),
    pytest.param("updated", id="new-request-id-while-reduced"),
]


@pytest.mark.parametrize("state", BUSY)
def test_new_request_while_open_is_ev_busy(state: str) -> None:
    h = Harness()
    _state(h, state)
    sessions_before = len(h.b._sessions)
    effects = h.req("EV1", 11, rid="second")
    a = answer(effects, "EV1")
    assert (a.status, a.reason, a.request_id) == ("rejected", Reason.EV_BUSY, "second")
    assert commands(effects) == []
    assert len(h.b._sessions) == sessions_before
    # The open request is untouched.
    assert h.b.ev_state("EV1") is not None and h.b.ev_state("EV1").request_id == "mine"  # type: ignore[union-attr]
    assert_healthy(h)


@pytest.mark.parametrize("state", ["completed", "released"])
def test_new_request_after_completion_works(state: str) -> None:
    h = Harness()
    _state(h, state)
    a = answer(h.req("EV1", 11, rid="second"), "EV1")
    assert (a.status, a.request_id, a.granted_kw) == ("assigned", "second", 11.0)
    # ... and the old one still answers with its final answer.
    assert answer(h.req("EV1", 22, rid="mine"), "EV1").status == "completed"
    assert answer(h.req("EV1", 11, rid="second"), "EV1") == a
    assert_healthy(h)


def test_cancelled_request_redelivered_stays_cancelled() -> None:
    h = Harness()
    h.tel("A", 100, 90)
    h.req("EV1", 22, rid="mine")
    cancelled = answer(h.release("EV1"), "EV1")
    h.tel("A", base_kw=0)  # capacity frees: the withdrawn request must not come back
    assert h.req("EV1", 22, rid="mine") == [ToEv("EV1", cancelled, in_reply=True)]
    assert h.b._sessions == {}


def test_request_without_id_gets_one_made_up() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    msg = ChargeRequest(requested_kw=11, duration_minutes=30)
    a = answer(h.b.on_request("EV1", msg, h.now), "EV1")
    assert a.status == "assigned" and a.request_id


ID_MISMATCH = [
    pytest.param("EV2", "rejected", id="body-id-differs"),
    pytest.param("ev1", "rejected", id="body-id-differs-in-case"),
    pytest.param("EV1", "assigned", id="body-id-agrees"),
    pytest.param(None, "assigned", id="body-id-absent"),
]


@pytest.mark.parametrize(("body_ev", "status"), ID_MISMATCH)
def test_body_ev_id_must_match_topic(body_ev: str | None, status: str) -> None:
    h = Harness()
    h.tel("A", 100, 0)
    effects = h.req("EV1", 11, rid="q", body_ev=body_ev)
    a = answer(effects, "EV1")
    assert a.status == status
    if status == "rejected":
        assert (a.reason, a.request_id) == (Reason.ID_MISMATCH, "q")
        assert commands(effects) == [] and h.b.open_requests() == 0


# ============================================================================ staleness, offline, lost

STALE = [
    pytest.param(4.9, "assigned", id="fresh"),
    pytest.param(5.0, "assigned", id="exactly-stale-after-is-still-fresh"),
    pytest.param(5.001, "queued", id="just-stale"),
    pytest.param(60.0, "queued", id="long-silent"),
]


@pytest.mark.parametrize(("silent_s", "status"), STALE)
def test_stale_substation_gets_no_new_sessions(silent_s: float, status: str) -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.advance(silent_s)
    a = answer(h.req("EV1", 11), "EV1")
    assert a.status == status
    if status == "queued":
        # A fresh telemetry message brings it back.
        assert answer(h.tel("A"), "EV1").status == "assigned"


def test_stale_substation_skipped_for_a_fresh_one() -> None:
    h = Harness()
    h.tel("A", 1000, 0)  # much emptier, but about to go stale
    h.advance(4)
    h.tel("B", 100, 50)
    h.advance(2)
    a = answer(h.req("EV1", 11), "EV1")
    assert (a.status, a.substation_id) == ("assigned", "B")


def test_offline_substation_keeps_its_sessions_for_the_grace_then_revokes_and_replaces_them() -> None:
    h = Harness(cfg(offline_grace_s=10.0))
    h.tel("A", 100, 0)
    h.tel("B", 100, 68)  # room for one 22 kW session
    h.req("LOW", 22, min_kw=22, priority=0)
    h.req("HIGH", 22, min_kw=22, priority=5)
    assert set(h.sessions_on("A")) == {"LOW", "HIGH"}
    # Offline (a last will): nothing new goes to A, but its sessions stay, counted, for the grace, since an agent
    # that reconnects within its lease keeps charging them (a broker restart, a network blip).
    assert h.status("A", "offline") == []
    assert set(h.sessions_on("A")) == {"LOW", "HIGH"}
    assert answers(h.req("MID", 30, min_kw=30)) and h.queue() == ["MID"]  # B cannot, A takes nothing
    h.advance(9.9)
    h.refresh("B")
    assert answers(h.tick()) == []
    h.advance(0.1)
    h.refresh("B")
    h.b.on_release("MID", Release(), h.now)
    effects = h.tick()
    revoked = [a for a in answers(effects) if a.status == "revoked"]
    assert [(a.ev_id, a.reason, a.substation_id) for a in revoked] == [
        ("HIGH", Reason.SUBSTATION_OFFLINE, "A"), ("LOW", Reason.SUBSTATION_OFFLINE, "A")]
    assert commands(effects, "stop") == []  # nobody is listening on A's command topic
    # The higher priority request is re-placed on B; the other waits.
    assert [(sid, c.ev_id) for sid, c in commands(effects, "start")] == [("B", "HIGH")]
    assert answer(effects, "HIGH").status == "assigned"
    assert [(a.status, a.position) for a in answers(effects, "LOW")] == [("revoked", None), ("queued", 1)]
    assert h.queue() == ["LOW"]
    assert h.b.substations["A"].sessions == {} and h.b.substations["A"].granted_w == 0
    # A gets nothing new while offline, even with fresh telemetry.
    assert answers(h.tel("A")) == []
    assert h.queue() == ["LOW"]
    assert_healthy(h)


def test_substation_lost_after_silence() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.tel("B", 100, 0)
    h.req("E1", 11)
    h.req("E2", 11)
    assert (h.session("E1").substation_id, h.session("E2").substation_id) == ("A", "B")
    h.advance(20)
    h.tel("B")
    assert h.tick() == []  # A silent 20 s: stale, not lost
    h.advance(10.5)
    h.tel("B")
    effects = h.tick()  # A silent 30.5 s > lost_after_s
    (sid, stop), = commands(effects, "stop")
    assert (sid, stop.ev_id, stop.reason) == ("A", "E1", Reason.SUBSTATION_LOST)
    revoked = next(a for a in answers(effects, "E1") if a.status == "revoked")
    assert revoked.reason == Reason.SUBSTATION_LOST
    assert [(sid, c.ev_id) for sid, c in commands(effects, "start")] == [("B", "E1")]
    assert_reductions_first(effects)
    assert h.b.substations["A"].lost
    assert h.tick() == []  # told once
    # Telemetry brings it back.
    h.tel("A")
    assert not h.b.substations["A"].lost
    assert answer(h.req("E3", 11), "E3").substation_id == "A"
    assert_healthy(h)


def test_lost_with_nowhere_to_go_requeues() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.req("E1", 11, rid="keep")
    h.advance(31)
    effects = h.tick()
    assert [(a.status, a.position) for a in answers(effects, "E1")] == [("revoked", None), ("queued", 1)]
    assert h.queue() == ["E1"]
    assert h.b.ev_state("E1") is not None and h.b.ev_state("E1").status == "queued"  # type: ignore[union-attr]


# ============================================================================ shedding

SHED = [
    # id, telemetry change, expected grants after (ev -> kW on A), revoked evs
    pytest.param({"base_kw": 24}, {"E1": 22.0, "E2": 22.0, "E3": 22.0}, [], id="still-within-limit"),
    # Over the limit (90 kW here: 10 % margin), every session comes down to an equal share at once, of the
    # limit less a band that keeps base-load noise from moving grants again: one hysteresis step (1 kW) until the
    # noise has been measured over a hold time.
    pytest.param({"base_kw": 30}, {"E1": 19.666, "E2": 19.666, "E3": 19.666}, [], id="equal-share-reduction"),
    pytest.param({"base_kw": 50}, {"E1": 13.0, "E2": 13.0, "E3": 13.0}, [], id="reduced-to-equal-shares"),
    pytest.param({"base_kw": 60}, {"E1": 10.0, "E2": 10.0, "E3": 10.0}, [], id="all-at-min"),
    pytest.param({"base_kw": 70}, {"E1": 10.0, "E2": 10.0}, ["E3"], id="newest-revoked"),
    pytest.param({"base_kw": 85}, {}, ["E3", "E2", "E1"], id="all-revoked"),
    pytest.param({"capacity_kw": 50}, {"E1": 14.666, "E2": 14.666, "E3": 14.666}, [], id="capacity-cut"),
    # Even the minimums do not fit: the newest go (and are re-queued); the survivor gets what the limit allows.
    pytest.param({"capacity_kw": 20}, {"E1": 17.0}, ["E3", "E2"], id="capacity-cut-deep"),
]


@pytest.mark.parametrize(("change", "grants", "revoked"), SHED)
def test_load_rise_reduces_then_revokes(change: dict[str, float], grants: dict[str, float],
                                        revoked: list[str]) -> None:
    h = Harness()
    h.tel("A", 100, 0)
    for ev in ("E1", "E2", "E3"):
        h.advance(1)
        h.req(ev, 22, min_kw=10)
    h.tel("B", 100, 78)  # 12 kW free elsewhere: room for one revoked request at its minimum
    h.advance(1)
    h.refresh("B")
    effects = h.tel("A", change.get("capacity_kw"), change.get("base_kw"))
    assert {ev: w / 1000 for ev, w in h.sessions_on("A").items()} == grants
    assert_reductions_first(effects)
    for sid, c in commands(effects, "update"):
        assert (sid, c.reason) == ("A", Reason.CAPACITY_REDUCED)
        a = next(a for a in answers(effects, c.ev_id) if a.status == "updated")
        assert (a.granted_kw, a.reason) == (c.granted_kw, Reason.CAPACITY_REDUCED)
    assert [c.ev_id for _, c in commands(effects, "stop")] == revoked
    assert [a.ev_id for a in answers(effects) if a.status == "revoked"] == revoked
    # The first revoked (oldest arrival wins the queue) lands on B at what B has; the rest wait.
    placed = [c.ev_id for sid, c in commands(effects, "start")]
    assert all(sid == "B" for sid, _ in commands(effects, "start"))
    assert set(placed) | set(h.queue()) == set(revoked)
    assert h.b.open_requests() == 3
    assert_healthy(h)


def test_shed_with_ties_revokes_latest_placed() -> None:
    """Sessions placed in the same instant: the one placed last is newest."""
    h = Harness()
    h.tel("A", 100, 0)
    for ev in ("E1", "E2", "E3"):
        h.req(ev, 22, min_kw=22)  # same clock reading
    effects = h.tel("A", base_kw=40)  # 66 + 40 > 90: one must go
    assert [c.ev_id for _, c in commands(effects, "stop")] == ["E3"]


def test_shed_before_grant_in_one_telemetry_message() -> None:
    """Updates and stops on A come before starts (on A itself) in the same effects list."""
    h = Harness()
    h.tel("A", 100, 0)
    h.req("E1", 40, min_kw=10)
    h.tel("A", base_kw=80)  # grant reduced to 10
    h.req("Q", 22, min_kw=22)  # queued
    # A new reading: base drops to 40 but capacity shrinks too; E1 stays at 10 and Q can start.
    effects = h.tel("A", capacity_kw=80, base_kw=20)
    assert_reductions_first(effects)
    assert answer(effects, "Q").status == "assigned"
    assert_healthy(h)


# ============================================================================ telemetry bookkeeping

def test_out_of_order_telemetry_ignored() -> None:
    h = Harness()
    h.tel("A", 100, 0, seq=5)
    assert h.tel("A", 100, 80, seq=4) == []
    assert h.b.substations["A"].base_load_w == 0
    assert h.tel("A", 100, 80, seq=5) == []  # a duplicate too
    assert h.b.substations["A"].base_load_w == 0
    h.tel("A", 100, 80, seq=6)
    assert h.b.substations["A"].base_load_w == 80_000


def test_status_online_resets_seq() -> None:
    h = Harness()
    h.tel("A", 100, 0, seq=50)
    h.status("A", "online")  # the agent restarted and counts from 0
    h.tel("A", 100, 70, seq=0)
    assert h.b.substations["A"].base_load_w == 70_000


def test_large_seq_step_back_is_a_restart() -> None:
    h = Harness()
    h.tel("A", 100, 0, seq=1000)
    h.tel("A", 100, 70, seq=0)
    assert h.b.substations["A"].base_load_w == 70_000


def test_measured_load_above_model_counts() -> None:
    """Unknown load (say sessions from before a restart) still blocks new grants."""
    h = Harness()
    h.tel("A", 100, 0, load_kw=85)
    a = answer(h.req("E1", 22), "E1")
    assert (a.status, a.granted_kw) == ("assigned", 5.0)


# ============================================================================ session events

def test_unknown_session_started_is_stopped() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    effects = h.event("A", "started", "ghost-1", "EV9")
    assert [(sid, c.command, c.session_id, c.ev_id, c.reason) for sid, c in commands(effects)] == [
        ("A", "stop", "ghost-1", "EV9", Reason.UNKNOWN_SESSION)]


def test_session_started_on_wrong_substation_is_stopped_there() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.tel("B", 100, 50)
    h.req("E1", 11)
    s = h.session("E1")
    effects = h.event("B", "started", s.session_id, "E1")
    assert [(sid, c.command) for sid, c in commands(effects)] == [("B", "stop")]
    assert h.session("E1").substation_id == "A"  # the real one is untouched


def test_started_event_confirms_and_changes_nothing_else() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.req("E1", 11)
    s = h.session("E1")
    assert h.event("A", "started", s.session_id, "E1") == []
    assert h.session("E1").confirmed


def test_ended_event_completes_with_agent_reason() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.req("E1", 11, rid="mine")
    s = h.session("E1")
    effects = h.event("A", "ended", s.session_id, "E1", Reason.ENERGY_DELIVERED)
    a = answer(effects, "E1")
    assert (a.status, a.reason, a.request_id, a.session_id) == (
        "completed", Reason.ENERGY_DELIVERED, "mine", s.session_id)
    assert h.b.open_requests() == 0 and h.b.substations["A"].granted_w == 0
    # The same event again (QoS 1 redelivery) changes nothing for the open state.
    assert commands(h.event("A", "ended", s.session_id, "E1")) == []
    assert h.b.open_requests() == 0


def test_ended_on_wrong_substation_is_ignored() -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.tel("B", 100, 50)
    h.req("E1", 11)
    s = h.session("E1")
    assert h.event("B", "ended", s.session_id, "E1") == []
    assert h.session("E1") is s


# ============================================================================ burst

BURST = [
    # id, capacities, expected share of the placed sessions (by capacity)
    pytest.param({"A": 1000.0, "B": 1000.0, "C": 1000.0}, id="equal-substations"),
    pytest.param({"A": 500.0, "B": 1000.0, "C": 2000.0}, id="unequal-substations"),
]


@pytest.mark.parametrize("capacities", BURST)
def test_burst_of_500_never_exceeds_and_spreads_evenly(capacities: dict[str, float]) -> None:
    h = Harness(cfg(queue_max=10_000))
    for sid, cap in capacities.items():
        h.tel(sid, cap, cap * 0.1)
    # 500 simultaneous requests, no telemetry in between: the balancer must count its own grants.
    placed: Counter[str] = Counter()
    queued = 0
    for i in range(500):
        a = answer(h.req(f"EV{i:04d}", 11, min_kw=11), f"EV{i:04d}")
        if a.status == "assigned":
            assert a.substation_id is not None
            placed[a.substation_id] += 1
        else:
            assert (a.status, a.position) == ("queued", queued + 1)
            queued += 1
        assert h.b.violations() == [], f"after request {i}: {h.b.violations()}"
    limits = {sid: h.b.substations[sid].limit_w(10.0) for sid in capacities}
    committed = {sid: h.b.substations[sid].committed_w() for sid in capacities}
    counts = dict(sorted(placed.items()))
    msg = f"per-substation sessions {counts}, committed W {committed}, limits W {limits}, queued {queued}"
    assert all(committed[sid] <= limits[sid] for sid in capacities), msg
    assert sum(placed.values()) + queued == 500, msg
    # Each substation is filled to within one session of its limit before anything queues...
    assert all(limits[sid] - committed[sid] < 11_000 for sid in capacities), msg
    # ... and utilisation is even: at most one 11 kW session apart, relative to capacity.
    util = {sid: committed[sid] / h.b.substations[sid].capacity_w for sid in capacities}
    step = max(11_000 / h.b.substations[sid].capacity_w for sid in capacities)
    assert max(util.values()) - min(util.values()) <= step + 1e-9, msg
    assert_healthy(h)


def test_burst_spreads_before_filling() -> None:
    """The first 300 of a burst land 100/100/100 on three equal substations (the old design: 107/55/38)."""
    h = Harness(cfg(queue_max=10_000))
    for sid in "ABC":
        h.tel(sid, 10_000, 0)
    placed: Counter[str] = Counter()
    for i in range(300):
        a = answer(h.req(f"EV{i:04d}", 7.4), f"EV{i:04d}")
        assert a.substation_id is not None
        placed[a.substation_id] += 1
    assert dict(placed) == {"A": 100, "B": 100, "C": 100}, f"per-substation counts {dict(placed)}"


def test_offline_substation_that_comes_back_within_the_grace_keeps_its_sessions() -> None:
    h = Harness(cfg(offline_grace_s=10.0))
    h.tel("A", 100, 0)
    h.req("EV1", 22)
    before = h.session("EV1").session_id
    assert h.status("A", "offline") == []
    h.advance(5)
    h.refresh("A")
    assert answers(h.status("A", "online")) == []
    h.advance(20)
    h.refresh("A")
    assert answers(h.tick()) == []
    assert h.session("EV1").session_id == before
    assert_healthy(h)


@pytest.mark.parametrize("reason", [Reason.SUBSTATION_OFFLINE, Reason.STOPPED_BY_AGENT, None])
def test_session_the_agent_could_not_continue_is_requeued_never_completed(reason: str | None) -> None:
    h = Harness()
    h.tel("A", 100, 0)
    h.req("EV1", 22, min_kw=22, rid="trip")
    before = h.session("EV1").session_id
    effects = h.end("EV1", reason)  # type: ignore[arg-type]
    got = [(a.status, a.reason) for a in answers(effects, "EV1")]
    # Revoked and back in line, then placed again at once in the room it left (a new session, same request).
    assert got == [("revoked", reason or Reason.STOPPED_BY_AGENT), ("assigned", None)], got
    assert h.b.ev_state("EV1").request_id == "trip"  # type: ignore[union-attr]
    assert h.session("EV1").session_id != before
    assert_healthy(h)


def test_inventory_drops_confirmed_sessions_the_agent_no_longer_runs() -> None:
    """A restarted agent announces what it still runs, then closes its inventory (a status with announced_for):
    confirmed sessions it left out are revoked and re-queued; a session whose start may still be on its way is not."""
    h = Harness()
    h.tel("A", 200, 0)
    for ev in ("KEPT", "LOST", "NEW"):
        h.req(ev, 22, min_kw=22)
    kept, lost = h.session("KEPT"), h.session("LOST")
    h.event("A", "started", kept.session_id, "KEPT")
    h.event("A", "started", lost.session_id, "LOST")
    msg = SessionEvent(event="running", session_id=kept.session_id, ev_id="KEPT", ts=h.now, granted_kw=22.0)
    assert h.b.on_session_event("A", msg, h.now) == []
    effects = h.b.on_status("A", "online", h.now, inventory=True)
    assert [(sid, c.command, c.ev_id) for sid, c in commands(effects, "stop")] == [("A", "stop", "LOST")]
    assert answers(effects, "LOST")[0].status == "revoked" and answers(effects, "LOST")[0].reason == "session_lost"
    assert answer(effects, "LOST").status == "assigned"  # re-placed at once (a new session)
    assert {ev for ev in h.sessions_on("A")} == {"KEPT", "LOST", "NEW"}
    assert h.session("KEPT").session_id == kept.session_id and h.session("LOST").session_id != lost.session_id
    assert_healthy(h)


def test_inventory_without_an_unconfirmed_session_sends_its_start_again_as_it_was() -> None:
    """A start lost on its way to the agent (a NATS node killed while delivering it) leaves a session the agent never
    runs: its inventory does not list it, and the identical start goes again (same ts: an agent that has it, or
    had it, ignores it). A start the agent confirmed is not repeated."""
    h = Harness()
    h.tel("A", 200, 0)
    first = commands(h.req("LOST", 22, min_kw=22), "start")
    h.req("RUNS", 22, min_kw=22)
    runs = h.session("RUNS").session_id
    h.event("A", "started", runs, "RUNS")
    h.event("A", "running", runs, "RUNS")
    h.advance(3)
    effects = h.b.on_status("A", "online", h.now, inventory=True, announced=1)
    assert commands(effects, "start") == first and answers(effects) == []
    assert h.b.counters["start_resent"] == 1 and commands(effects, "stop") == []
    sim = SubstationSim("A", 200, lambda _t: 0.0, now_sim=0.0)
    [(_, start)], [(_, again)] = first, commands(effects, "start")
    assert [sim.apply(c, 0.0).outcome for c in (start, again)] == ["started", "duplicate_start"]
    assert_healthy(h)


def test_a_session_started_after_the_agent_took_its_inventory_is_not_dropped_by_it() -> None:
    """On a clustered broker an agent's (retained) inventory status can arrive after ``started`` events it published
    later: a session started at or after the inventory's ``ts`` cannot be in it and is kept; one started before it
    and left out is gone."""
    h = Harness()
    h.tel("A", 200, 0)
    for ev in ("BEFORE", "AFTER"):
        h.req(ev, 22, min_kw=22)
    before, after = h.session("BEFORE"), h.session("AFTER")
    taken_at = h.now
    h.b.on_session_event("A", SessionEvent(event="started", session_id=before.session_id, ev_id="BEFORE",
                                           ts=taken_at - 1.0), h.now)
    h.b.on_session_event("A", SessionEvent(event="started", session_id=after.session_id, ev_id="AFTER",
                                           ts=taken_at + 0.2), h.now)
    effects = h.b.on_status("A", "online", h.now, inventory=True, taken_at=taken_at)
    assert [c.ev_id for _, c in commands(effects, "stop")] == ["BEFORE"]
    assert h.session("AFTER").session_id == after.session_id
    assert_healthy(h)


def test_an_inventory_whose_running_events_have_not_all_arrived_drops_nothing() -> None:
    """The status says how many sessions the agent announced; fewer arrived (out of order on a clustered broker):
    nothing is judged gone on it."""
    h = Harness()
    h.tel("A", 200, 0)
    for ev in ("ONE", "TWO"):
        h.req(ev, 22, min_kw=22)
    one, two = h.session("ONE"), h.session("TWO")
    for s, ev in ((one, "ONE"), (two, "TWO")):
        h.event("A", "started", s.session_id, ev)
    h.event("A", "running", one.session_id, "ONE")  # TWO's running event is still on its way
    effects = h.b.on_status("A", "online", h.now, inventory=True, announced=2)
    assert commands(effects, "stop") == [] and h.session("TWO").session_id == two.session_id
    assert h.b.counters["inventory_incomplete"] == 1
    h.event("A", "running", one.session_id, "ONE")  # a restarted agent that runs only ONE says so
    effects = h.b.on_status("A", "online", h.now, inventory=True, announced=1)
    assert [c.ev_id for _, c in commands(effects, "stop")] == ["TWO"]


def test_adopted_sessions_already_in_the_measured_load_do_not_count_twice() -> None:
    """After a restart the first telemetry shows the load of sessions the balancer has not re-learnt yet; adopting
    them moves that load from uncontrolled to granted. Counted twice, the substation looked over its limit and the
    newest adopted sessions were revoked and placed again (second sessions)."""
    h = Harness()
    h.tel("A", 100, 10, load_kw=10 + 10 * 7.4)  # base 10 kW + ten running 7.4 kW sessions the balancer forgot
    for i in range(10):
        msg = SessionEvent(event="running", session_id=f"old-{i}", ev_id=f"EV{i}", ts=h.now, granted_kw=7.4)
        assert h.b.on_session_event("A", msg, h.now) == []
    assert len(h.sessions_on("A")) == 10 and h.b.counters["adopted"] == 10
    assert h.b.substations["A"].used_w() == 10_000 + 74_000
    assert_healthy(h)


def test_a_substation_keeps_the_region_of_its_latest_status_and_its_state_carries_it() -> None:
    """The region the agent reports (issue 15): kept from the latest status that names one, in the retained state;
    an offline will of an unknown substation creates nothing."""
    from balancer.core.views import substation_state

    h = Harness()
    h.tel("A", 100, 10)
    assert substation_state(h.b, h.b.substations["A"], h.now).region == "default"
    h.b.on_status("A", "online", h.now, region="west")
    assert substation_state(h.b, h.b.substations["A"], h.now).region == "west"
    h.b.on_status("A", "offline", h.now)  # (a status that names none leaves it)
    assert h.b.substations["A"].region == "west"
    h.b.on_status("A", "offline", h.now, region="east")
    assert substation_state(h.b, h.b.substations["A"], h.now).region == "east"
    h.b.on_status("Z", "offline", h.now, region="east")
    assert "Z" not in h.b.substations
