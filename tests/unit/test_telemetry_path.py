"""What one telemetry message costs the core (issue 10, session G): the scheduled limit planned only when there is
a schedule (or one to lift), queued notices only after a revocation, and a hold that ends under a no-cuts proof
folded into the proof, not dropping it. Each against what the step done every time gives."""

from __future__ import annotations

import dataclasses

import pytest

from balancer.core import Balancer, CoreConfig, ToEv, liveness
from balancer.core.shares import ShareTable
from grid_protocol import ChargeRequest, Release, Telemetry

T0 = 1_700_000_000.0


def report(b: Balancer, sid: str, seq: int, now: float, base_kw: float, capacity_kw: float = 50.0) -> list[object]:
    granted = b.substations[sid].granted_w / 1000 if sid in b.substations else 0.0
    return list(b.on_telemetry(Telemetry(substation_id=sid, ts=now, seq=seq, capacity_kw=capacity_kw,
                                         load_kw=base_kw + granted, base_load_kw=base_kw, ev_load_kw=granted,
                                         active_sessions=0), now))


@pytest.mark.instruments_compiled
def test_telemetry_plans_with_a_schedule_only_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """No schedule: ``plan_with`` is not called (it would change nothing); a scheduled limit whose schedule has
    gone (emptied and dropped) is still lifted by the next report, as ``plan_with`` with no schedule does."""
    calls = []
    real = liveness.plan_with

    def counting(*args: object) -> bool:
        calls.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(liveness, "plan_with", counting)
    b = Balancer(CoreConfig())
    b.on_status("A", "online", T0)
    for seq in range(1, 4):
        report(b, "A", seq, T0 + seq, 10.0)
    assert calls == [] and b.substations["A"].capacity_w == 50_000
    sub = b.substations["A"]
    sub.schedule_limit_w, sub.schedule_source = 20_000, "dso"  # (its schedule since emptied: none in state)
    sub.apply_capacity()
    assert sub.capacity_w == 20_000
    report(b, "A", 4, T0 + 4, 10.0)
    assert len(calls) == 1 and (sub.schedule_limit_w, sub.schedule_source, sub.capacity_w) == (None, None, 50_000)
    report(b, "A", 5, T0 + 5, 10.0)
    assert len(calls) == 1


def test_a_revocation_on_telemetry_still_tells_the_ev_its_place() -> None:
    """Base load jumps past what the sessions' minimums need: the newest sessions are revoked and re-queued, and
    the report's effects end with each one's ``queued`` notice (the notices are skipped only when nothing was
    revoked)."""
    b = Balancer(CoreConfig())
    b.on_status("A", "online", T0)
    report(b, "A", 1, T0, 10.0)
    for i in range(4):
        b.on_request(f"E{i}", ChargeRequest(request_id="r", requested_kw=11.0, min_kw=5.0, duration_minutes=120), T0)
    quiet = report(b, "A", 2, T0 + 1, 10.0)
    assert not any(isinstance(e, ToEv) and e.message.status == "queued" for e in quiet)
    effects = report(b, "A", 3, T0 + 2, 38.0)  # (47.5 kW within the margin, less 38: room for one minimum)
    queued = [e.message.ev_id for e in effects if isinstance(e, ToEv) and e.message.status == "queued"]
    revoked = [e.message.ev_id for e in effects if isinstance(e, ToEv) and e.message.status == "revoked"]
    assert revoked and sorted(queued) == sorted(revoked)
    assert b.state.requeued == []


@pytest.mark.instruments_compiled
@pytest.mark.parametrize("policy", ["least-utilised", "weighted-fair"])
def test_a_hold_ending_under_a_proof_is_folded_in_as_the_pass_would_count_it(
        policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full substation, base load wandering, an EV leaving now and then: whenever holds end under a standing
    proof, the proof stays and its room becomes the least of its room and each newly ready grant's room below its
    class's cut line (what a pass proving afresh at the proof's power counts for it); the proof never claims more
    room than the ready grants have; and holds were folded in while passes were skipped."""
    folds = [0]
    real = ShareTable.ready_at

    def checking(table: ShareTable, now: float, hold_s: float) -> bool:
        before = table.no_cuts
        was = {sid for sid, (_, _, grant) in table.filed.items() if grant is not None}
        out = real(table, now, hold_s)
        proof = table.no_cuts
        if before is None or before[0] != table.version:
            return out
        assert proof is not None and proof[:2] == before[:2] and proof[3] is before[3]
        lines, room = proof[3], before[2]
        new = [(key, grant) for sid, (key, _, grant) in table.filed.items() if grant is not None and sid not in was]
        for key, grant in new:
            room = min(room, lines[key] - grant)
        assert proof[2] == room
        every = min([proof[1]] + [lines[key] - g for key, cls in table.classes.items() for g, _, _ in cls.ready])
        assert proof[2] <= every
        folds[0] += bool(new)
        return out

    monkeypatch.setattr(ShareTable, "ready_at", checking)
    b = Balancer(dataclasses.replace(CoreConfig(), policy=policy, min_hold_s=5.0))
    b.on_status("A", "online", T0)
    report(b, "A", 1, T0, 10.0)
    for i in range(8):
        b.on_request(f"E{i}", ChargeRequest(request_id="r", requested_kw=22.0, min_kw=1.4, duration_minutes=600,
                                            priority=i % 2), T0)
    for seq in range(2, 300):
        now = T0 + seq
        report(b, "A", seq, now, 10.0 + (0.3, -0.2, 0.5, 0.0, -0.4)[seq % 5])
        if seq % 23 == 0:  # grants move, holds start
            b.on_release(sorted(b._evs)[0], Release(), now)
            b.on_request(f"N{seq}", ChargeRequest(request_id="r", requested_kw=22.0, min_kw=1.4,
                                                  duration_minutes=600, priority=seq % 2), now)
    assert folds[0] > 0
    assert not b.violations()
