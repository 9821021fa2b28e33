"""Coalescing (balancer/core/coalescing.py): a later reduction in the same call is folded into the session's first
command and the EV hears its final grant once; an increase is never folded; and the effects passed in are never
edited (issue 10: ``_coalesce`` builds new messages, it does not change the ones it already built)."""

from __future__ import annotations

import itertools

from balancer.core import CoreConfig, Effect, ToEv, ToSubstation
from balancer.core.coalescing import coalesce
from balancer.core.ledger import EvState, Ledger
from balancer.core.model import PendingRequest
from balancer.core.state import CoreState
from grid_protocol import encode
from grid_protocol.messages import Assignment, SessionCommand
from grid_protocol.reasons import Reason

NOW = 1_767_225_600.0


def _ledger() -> Ledger:
    ids = itertools.count(1)
    return Ledger(CoreState(CoreConfig(), lambda: f"s{next(ids)}", lambda: f"auto-{next(ids)}"))


def _command(command: str, kw: float, reason: str | None = None) -> ToSubstation:
    return ToSubstation("north", SessionCommand(command=command, session_id="s1", ev_id="EV_1", ts=NOW,  # type: ignore[arg-type]
                                                granted_kw=kw, reason=reason))


def _answer(status: str, kw: float, reason: str | None = None, *, in_reply: bool = False) -> ToEv:
    return ToEv("EV_1", Assignment(request_id="r1", ev_id="EV_1", status=status, ts=NOW,  # type: ignore[arg-type]
                                   substation_id="north", granted_kw=kw, session_id="s1", reason=reason),
                in_reply=in_reply)


def _wire(effects: list[Effect]) -> list[bytes]:
    return [encode(e.message) for e in effects]


def test_a_later_reduction_is_folded_and_nothing_passed_in_is_edited() -> None:
    ledger = _ledger()
    assigned = _answer("assigned", 22.0, in_reply=True)
    request = PendingRequest(ev_id="EV_1", request_id="r1", requested_w=22_000, min_w=1_400, priority=0, arrival=1,
                             received_at=NOW, duration_minutes=60, energy_kwh=None)
    ledger.evs["EV_1"] = EvState(request, assigned.message, "s1")
    effects: list[Effect] = [
        _command("start", 22.0), assigned,
        _command("update", 11.0, Reason.CAPACITY_REDUCED), _answer("updated", 11.0, Reason.CAPACITY_REDUCED),
        _command("update", 16.0, Reason.POWER_AVAILABLE),
    ]
    before, objects = _wire(effects), [(e, e.message) for e in effects]

    out = coalesce(effects, ledger)

    assert _wire(effects) == before  # the effects and their messages as they were
    assert [(e, e.message) for e in effects] == objects
    start, told, raised = out
    assert isinstance(start, ToSubstation) and isinstance(told, ToEv) and isinstance(raised, ToSubstation)
    assert (start.message.command, start.message.granted_kw) == ("start", 11.0)  # the reduction, folded into the start
    assert (told.message.status, told.message.granted_kw, told.in_reply) == ("assigned", 11.0, True)  # heard once
    assert raised is effects[4]  # an increase is never folded: it stays after the reductions that make room
    assert start.message is not effects[0].message and told.message is not assigned.message  # new messages
    assert ledger.evs["EV_1"].answer == told.message  # the EV's latest answer is what it was told


def test_a_call_without_updates_is_returned_as_it_is() -> None:
    effects: list[Effect] = [_command("start", 22.0), _answer("assigned", 22.0, in_reply=True)]
    assert coalesce(effects, _ledger()) is effects


def test_a_reduction_to_the_grant_already_folded_is_folded_too() -> None:
    """Two reductions to the same value in one call: one command and one answer, at that value."""
    effects: list[Effect] = [
        _command("start", 22.0), _answer("assigned", 22.0, in_reply=True),
        _command("update", 11.0, Reason.CAPACITY_REDUCED), _answer("updated", 11.0, Reason.CAPACITY_REDUCED),
        _command("update", 11.0, Reason.CAPACITY_REDUCED), _answer("updated", 11.0, Reason.CAPACITY_REDUCED),
    ]
    out = coalesce(effects, _ledger())
    assert [(type(e).__name__, e.message.granted_kw) for e in out] == [("ToSubstation", 11.0), ("ToEv", 11.0)]
    assert out[0].message.command == "start"  # type: ignore[union-attr]


def test_a_reduction_after_an_increase_is_not_folded_before_it() -> None:
    """start 22, cut to 16, raised to 20, cut to 14 in one call: whatever is folded, the agent's last command for the
    session is the final grant (14 kW), and an increase never comes before a reduction made after it."""
    effects: list[Effect] = [
        _command("start", 22.0), _answer("assigned", 22.0, in_reply=True),
        _command("update", 16.0, Reason.CAPACITY_REDUCED),
        _command("update", 20.0, Reason.POWER_AVAILABLE),
        _command("update", 14.0, Reason.CAPACITY_REDUCED),
    ]
    out = coalesce(effects, _ledger())
    commands = [e.message for e in out if isinstance(e, ToSubstation)]
    assert commands[-1].granted_kw == 14.0, [(c.command, c.granted_kw) for c in commands]
