"""One command and one answer per session per call (see :func:`coalesce`)."""

from __future__ import annotations

import msgspec

from balancer.core.effects import Effect, ToEv, ToSubstation
from balancer.core.ledger import Ledger
from grid_protocol.reasons import Reason


def coalesce(effects: list[Effect], ledger: Ledger) -> list[Effect]:
    """Admitting several requests in one call can squeeze a session started or reduced moments earlier in the
    same call: each later reduction is folded into that session's first command (a lower value, earlier: never
    less safe), and the EV hears only the final grant. An increase is never folded (it must stay after the
    reductions that make room). Folding builds new messages: the ones passed in are never edited."""
    for e in effects:
        if e.message.command == "update" if isinstance(e, ToSubstation) else e.message.status == "updated":
            break
    else:
        return effects  # no update to fold (most calls: a request placed or queued, a release): as they are
    first_cmd: dict[str, int] = {}
    last_answer: dict[str, int] = {}
    out: list[Effect] = []
    for e in effects:
        if isinstance(e, ToSubstation):
            cmd = e.message
            at = first_cmd.get(cmd.session_id)
            if at is not None and cmd.command == "update" and cmd.reason != Reason.POWER_AVAILABLE:
                first = out[at]
                assert isinstance(first, ToSubstation)
                if cmd.granted_kw <= first.message.granted_kw:
                    out[at] = ToSubstation(first.substation_id,
                                           msgspec.structs.replace(first.message, granted_kw=cmd.granted_kw))
                    continue
            if cmd.command in ("start", "update"):
                first_cmd.setdefault(cmd.session_id, len(out))
            out.append(e)
            continue
        answer = e.message
        at = last_answer.get(answer.ev_id)
        prev = out[at] if at is not None else None
        if (isinstance(prev, ToEv) and answer.status == "updated" and answer.reason != Reason.POWER_AVAILABLE
                and prev.message.session_id == answer.session_id
                and prev.message.status in ("assigned", "updated")):
            assert at is not None
            merged = msgspec.structs.replace(prev.message, granted_kw=answer.granted_kw)
            out[at] = ToEv(prev.ev_id, merged, prev.in_reply)  # the EV hears its final grant once
            state = ledger.evs.get(answer.ev_id)
            if state is not None and (state.answer is answer or state.answer is prev.message):
                state.answer = merged
            continue
        last_answer[answer.ev_id] = len(out)
        out.append(e)
    return out
