"""grid_protocol.lease: both ends of the lease on a substation's sessions, with time passed in."""

from __future__ import annotations

import pytest

from grid_protocol.lease import LeaseHolder, LeaseIssuer
from grid_protocol.messages import MAX_COMMANDS_PER_MESSAGE, SessionCommand, SessionCommands

NOW = 1_767_225_600.0


def _commands(n: int) -> list[SessionCommand]:
    return [SessionCommand(command="start", session_id=f"s-{i}", ev_id=f"EV_{i}", ts=NOW, granted_kw=11.0)
            for i in range(n)]


# --- the balancer's end ---------------------------------------------------------------------------


def test_batches_carry_the_lease_and_keep_the_order_in_chunks() -> None:
    issuer = LeaseIssuer(10.0)
    commands = _commands(2 * MAX_COMMANDS_PER_MESSAGE + 1)
    batches = issuer.batches("A", commands, NOW)
    assert [len(b.commands) for b in batches] == [MAX_COMMANDS_PER_MESSAGE, MAX_COMMANDS_PER_MESSAGE, 1]
    assert [c for b in batches for c in b.commands] == commands
    assert {(b.ts, b.valid_until) for b in batches} == {(NOW, NOW + 10.0)}


def test_no_commands_make_no_batch_and_renew_nothing() -> None:
    issuer = LeaseIssuer(9.0)
    assert issuer.batches("A", [], NOW) == []
    assert [sid for sid, _ in issuer.renewals(["A"], NOW)] == ["A"]  # never renewed: due at once


def test_a_renewal_is_due_a_third_of_a_lease_after_the_last_batch() -> None:
    issuer = LeaseIssuer(9.0)
    issuer.batches("A", _commands(1), NOW)
    assert issuer.renewals(["A"], NOW + 2.999) == []
    due = issuer.renewals(["A"], NOW + 3.0)
    assert due == [("A", SessionCommands(ts=NOW + 3.0, commands=[], valid_until=NOW + 12.0))]
    assert issuer.renewals(["A"], NOW + 5.0) == []  # the renewal counts as sent
    assert [sid for sid, _ in issuer.renewals(["A"], NOW + 6.0)] == ["A"]


def test_only_substations_with_sessions_are_renewed() -> None:
    issuer = LeaseIssuer(9.0)
    assert issuer.renewals([], NOW) == []
    assert [sid for sid, _ in issuer.renewals(["B", "A"], NOW)] == ["B", "A"]


def test_a_forgotten_substation_is_due_at_once() -> None:
    issuer = LeaseIssuer(9.0)
    issuer.batches("A", _commands(1), NOW)
    issuer.forget("A")
    assert [sid for sid, _ in issuer.renewals(["A"], NOW + 0.1)] == ["A"]


def test_a_lease_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LeaseIssuer(0.0)


# --- the agent's end ------------------------------------------------------------------------------


def test_no_lease_never_lapses() -> None:
    holder = LeaseHolder()
    assert not holder.on_batch(SessionCommands(ts=NOW, commands=[]))  # a bare command carries no lease
    assert not holder.must_pause(NOW + 1e6, has_sessions=True)


def test_a_lease_lapses_after_its_deadline_only_with_sessions() -> None:
    holder = LeaseHolder()
    holder.on_batch(SessionCommands(ts=NOW, commands=[], valid_until=NOW + 10.0))
    assert not holder.must_pause(NOW + 10.0, has_sessions=True)  # valid up to and including its deadline
    assert not holder.must_pause(NOW + 11.0, has_sessions=False)  # nothing draws power: nothing to pause
    assert holder.must_pause(NOW + 11.0, has_sessions=True)
    holder.pause()
    assert holder.paused
    assert not holder.must_pause(NOW + 12.0, has_sessions=True)  # paused once, not again


def test_the_next_batch_with_a_lease_resumes_and_one_without_does_not() -> None:
    holder = LeaseHolder(until=NOW, paused=True)
    assert not holder.on_batch(SessionCommands(ts=NOW, commands=[]))
    assert holder.paused
    assert holder.on_batch(SessionCommands(ts=NOW + 1, commands=[], valid_until=NOW + 11.0))
    assert not holder.paused and holder.until == NOW + 11.0
    assert not holder.on_batch(SessionCommands(ts=NOW + 2, commands=[], valid_until=NOW + 12.0))  # nothing paused


def test_dropped_lease_starts_clean() -> None:
    holder = LeaseHolder(until=NOW)
    holder.drop()
    assert holder.until is None
    assert not holder.must_pause(NOW + 100.0, has_sessions=True)


def test_issuer_and_holder_agree_on_renewal_timing() -> None:
    """Renewed every third of a lease, an agent never lapses; with the renewals lost it lapses after one lease."""
    issuer, holder = LeaseIssuer(9.0), LeaseHolder()
    for batch in issuer.batches("A", _commands(1), NOW):
        holder.on_batch(batch)
    for t in range(1, 60):
        for _, batch in issuer.renewals(["A"], NOW + t):
            holder.on_batch(batch)
        assert not holder.must_pause(NOW + t, has_sessions=True)
    lost_from = NOW + 60
    issuer.renewals(["A"], lost_from)  # sent, never delivered
    assert not holder.must_pause(lost_from + 5, has_sessions=True)
    assert holder.must_pause(lost_from + 9.5, has_sessions=True)


# --- fencing: epochs (cluster mode) ---------------------------------------------------------------


def test_issuer_stamps_its_epoch_on_batches_and_renewals() -> None:
    issuer = LeaseIssuer(9.0, epoch=7)
    assert {b.epoch for b in issuer.batches("A", _commands(3), NOW)} == {7}
    assert [b.epoch for _, b in issuer.renewals(["A", "B"], NOW + 5)] == [7, 7]
    assert LeaseIssuer(9.0).batches("A", _commands(1), NOW)[0].epoch is None  # single-node: no fencing


def test_holder_keeps_the_highest_epoch_and_refuses_older_ones() -> None:
    holder = LeaseHolder()
    old, new = LeaseIssuer(9.0, epoch=3), LeaseIssuer(9.0, epoch=5)
    assert holder.admits(old.batches("A", _commands(1), NOW)[0])
    assert holder.admits(new.batches("A", _commands(1), NOW + 1)[0])
    assert holder.epoch == 5
    stale = old.batches("A", _commands(1), NOW + 2)[0]
    assert not holder.admits(stale)
    assert holder.epoch == 5 and holder.fenced == 1
    assert not holder.admits(SessionCommands(ts=NOW, commands=[], valid_until=NOW + 9))  # no epoch once one was seen
    assert holder.fenced == 2
    assert holder.admits(new.batches("A", _commands(1), NOW + 3)[0])  # the same epoch goes on
    holder.drop()  # offline: the lease goes, the epoch stays
    assert holder.epoch == 5 and not holder.admits(stale)


def test_holder_without_epochs_admits_everything() -> None:
    holder = LeaseHolder()
    assert holder.admits(SessionCommands(ts=NOW, commands=[]))
    assert holder.epoch is None and holder.fenced == 0


def test_a_fenced_renewal_does_not_keep_the_lease() -> None:
    """The old owner keeps renewing after the new one took over: the agent's lease is the new owner's alone."""
    old, new, holder = LeaseIssuer(9.0, epoch=3), LeaseIssuer(9.0, epoch=8), LeaseHolder()
    for batch in new.batches("A", _commands(1), NOW):
        assert holder.admits(batch)
        holder.on_batch(batch)
    for t in range(1, 30):
        for _, batch in old.renewals(["A"], NOW + t):
            if holder.admits(batch):
                holder.on_batch(batch)
    assert holder.until == NOW + 9.0
    assert holder.must_pause(NOW + 10, has_sessions=True)
