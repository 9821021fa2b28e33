"""One command and one answer per session per call (see :func:`coalesce`)."""

from __future__ import annotations

import msgspec

from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.ledger import Ledger
from grid_protocol.reasons import Reason


def coalesce(effects: list[Effect], ledger: Ledger) -> list[Effect]:
    """Admitting several requests in one call can squeeze a session started or reduced moments earlier in the
    same call: each later reduction is folded into that session's latest command so far (a lower value, earlier:
    never less safe), and the EV hears only the final grant. An increase is never folded (it must stay after the
    reductions that make room); a reduction after it folds into it, never into a command before it (the agent would
    be left at the increase). A shortfall notice is never lost: folded into an update it is the update's reason, and
    it is not folded into an EV's first answer. Folding builds new messages: the ones passed in are never edited."""
    for e in effects:
        if e.message.command == "update" if isinstance(e, ToSubstation) else e.message.status == "updated":
            break
    else:
        return effects  # no update to fold (most calls: a request placed or queued, a release): as they are
    last_cmd: dict[str, int] = {}
    last_answer: dict[str, int] = {}
    out: list[Effect] = []
    for e in effects:
        if isinstance(e, ToSubstation):
            cmd = e.message
            at = last_cmd.get(cmd.session_id)
            if at is not None and cmd.command == "update" and cmd.reason != Reason.POWER_AVAILABLE:
                into = out[at]
                assert isinstance(into, ToSubstation)
                if cmd.granted_kw <= into.message.granted_kw:
                    folded = msgspec.structs.replace(into.message, granted_kw=cmd.granted_kw)
                    if into.message.reason == Reason.POWER_AVAILABLE:  # an increase cut back: say why
                        folded = msgspec.structs.replace(folded, reason=cmd.reason)
                    out[at] = ToSubstation(into.substation_id, folded)
                    continue
            if cmd.command in ("start", "update"):
                last_cmd[cmd.session_id] = len(out)
            out.append(e)
            continue
        answer = e.message
        at = last_answer.get(answer.ev_id)
        prev = out[at] if at is not None else None
        if (isinstance(prev, ToEv) and answer.status == "updated" and answer.reason != Reason.POWER_AVAILABLE
                and prev.message.session_id == answer.session_id
                and (prev.message.status == "updated"
                     or (prev.message.status == "assigned" and answer.reason != Reason.LIMIT_SHORTFALL))):
            assert at is not None
            merged = msgspec.structs.replace(prev.message, granted_kw=answer.granted_kw)
            if prev.message.status == "updated":  # the later reason is the EV's latest word (a shortfall included)
                merged = msgspec.structs.replace(merged, reason=answer.reason)
            out[at] = ToEv(prev.ev_id, merged, prev.in_reply)  # the EV hears its final grant once
            state = ledger.evs.get(answer.ev_id)
            if state is not None and (state.answer is answer or state.answer is prev.message):
                state.answer = merged
            continue
        last_answer[answer.ev_id] = len(out)
        out.append(e)
    return out
