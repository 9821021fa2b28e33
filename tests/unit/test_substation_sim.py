"""Substation simulation: base-load curve and EV session accounting (pure, simulated time)."""

from __future__ import annotations

import itertools
import random

import pytest

from grid_protocol.messages import SessionCommand
from grid_sim.load_curve import (
    BaseLoad,
    LoadCurveParams,
    daily_shape,
    expected_base_load_kw,
    make_base_load,
)
from grid_sim.substation import SubstationSim

H = 3600.0


def cmd(command: str, session_id: str = "s1", ev_id: str = "EV_0001", *, ts: float = 1_700_000_000.0,
        granted_kw: float = 0.0, energy_kwh: float | None = None, duration_minutes: float | None = None,
        reason: str | None = None) -> SessionCommand:
    return SessionCommand(command=command, session_id=session_id, ev_id=ev_id, ts=ts,  # type: ignore[arg-type]
                          granted_kw=granted_kw, energy_kwh=energy_kwh, duration_minutes=duration_minutes,
                          reason=reason)


def sim(base_kw: float = 100.0, capacity_kw: float = 400.0, now: float = 0.0) -> SubstationSim:
    return SubstationSim("A", capacity_kw, lambda _t: base_kw, now_sim=now)


def run(s: SubstationSim, seconds: float, dt: float = 60.0) -> list:
    ended = []
    t = s.now_sim
    end = t + seconds
    while t < end - 1e-9:
        step = min(dt, end - t)
        t += step
        ended += s.step(step, t)
    return ended


# ---------------------------------------------------------------------------- load curve


@pytest.mark.parametrize("share", [0.0, 0.55, 0.7, 0.85, 1.0])
def test_shape_peaks_at_one_with_evening_peak_above_night_trough(share: float) -> None:
    hours = [h / 10 for h in range(240)]
    values = [daily_shape(h, share) for h in hours]
    assert max(values) == pytest.approx(1.0)
    assert min(values) > 0.25
    night = max(daily_shape(h, share) for h in (2, 3, 4))
    evening = max(daily_shape(h, share) for h in (17, 18, 19, 20, 21))
    assert evening > night * 1.6


def test_residential_mix_has_morning_and_evening_peaks() -> None:
    share = 0.7
    shape = [daily_shape(h, share) for h in range(24)]
    morning = max(range(5, 12), key=lambda h: shape[h])
    evening = max(range(12, 24), key=lambda h: shape[h])
    assert 7 <= morning <= 9
    assert 17 <= evening <= 21
    trough = min(range(24), key=lambda h: shape[h])
    assert 1 <= trough <= 5
    assert shape[evening] == pytest.approx(1.0)  # the mostly residential feeder peaks in the evening
    assert shape[12] < shape[morning]  # midday dip between the peaks


def test_shape_is_periodic_and_continuous() -> None:
    assert daily_shape(0.0) == pytest.approx(daily_shape(24.0))
    assert daily_shape(-1.0) == pytest.approx(daily_shape(23.0))
    for h in range(24 * 60):
        a, b = daily_shape(h / 60), daily_shape((h + 1) / 60)
        assert abs(a - b) < 0.02


def test_expected_load_scales_to_peak() -> None:
    params = LoadCurveParams(peak_kw=220.0, residential_share=0.7)
    values = [expected_base_load_kw(t * 60.0, params) for t in range(24 * 60)]
    assert max(values) == pytest.approx(220.0, rel=1e-3)


def test_base_load_deterministic_with_seed_and_never_negative() -> None:
    params = LoadCurveParams(peak_kw=100.0, noise_pct=30.0, noise_tau_s=600.0)  # violent noise

    def day(seed: int) -> list[float]:
        gen = BaseLoad(params, random.Random(seed))
        return [gen(t * 30.0) for t in range(2 * 2880)]

    a, b, c = day(7), day(7), day(8)
    assert a == b
    assert a != c
    assert min(a) >= 0.0
    assert min(a) == 0.0  # the noise did try to go below zero and was clipped


def test_noise_is_correlated_and_bounded_in_typical_use() -> None:
    gen = make_base_load("north", 400.0, 55.0, seed=1)
    peak = gen.params.peak_kw
    assert peak == pytest.approx(220.0)
    samples = [(t, gen(t)) for t in range(0, 86_400, 10)]
    for t, kw in samples:
        assert abs(kw - expected_base_load_kw(t, gen.params)) < 0.2 * peak
    jumps = [abs(b[1] - a[1]) for a, b in itertools.pairwise(samples)]
    assert max(jumps) < 0.03 * peak  # 10 s apart: load wanders, it does not flicker


def test_same_time_gives_same_value_and_substations_differ() -> None:
    gen = make_base_load("north", 400.0, 55.0, seed=1)
    assert gen(1000.0) == gen(1000.0)
    assert make_base_load("north", 400, 55, 1)(5000.0) == make_base_load("north", 400, 55, 1)(5000.0)
    assert make_base_load("north", 400, 55, 1)(5000.0) != make_base_load("south", 400, 55, 1)(5000.0)


def test_invalid_params_are_refused() -> None:
    with pytest.raises(ValueError):
        LoadCurveParams(peak_kw=-1)
    with pytest.raises(ValueError):
        LoadCurveParams(peak_kw=1, residential_share=1.5)
    with pytest.raises(ValueError):
        LoadCurveParams(peak_kw=1, noise_tau_s=0)


# ---------------------------------------------------------------------------- sessions


def test_22_kw_for_30_minutes_delivers_11_kwh() -> None:
    s = sim()
    assert s.apply(cmd("start", granted_kw=22.0), 0.0).outcome == "started"
    assert run(s, 30 * 60, dt=7.0) == []
    assert s.sessions["s1"].delivered_kwh == pytest.approx(11.0)


def test_ends_with_energy_delivered_when_energy_reached() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=22.0, energy_kwh=11.0), 0.0)
    ended = run(s, 3 * H, dt=7 * 60.0)  # steps do not land on the 30-minute mark
    assert len(ended) == 1
    end = ended[0]
    assert (end.session_id, end.ev_id, end.reason) == ("s1", "EV_0001", "energy_delivered")
    assert end.energy_delivered_kwh == 11.0
    assert end.at_sim == pytest.approx(30 * 60)
    assert not s.sessions


def test_ends_with_duration_elapsed() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=11.0, energy_kwh=50.0, duration_minutes=60), 0.0)
    ended = run(s, 2 * H, dt=25 * 60.0)
    assert [(e.reason, e.at_sim) for e in ended] == [("duration_elapsed", pytest.approx(H))]
    assert ended[0].energy_delivered_kwh == pytest.approx(11.0)


def test_first_target_reached_wins() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=11.0, energy_kwh=5.5, duration_minutes=60), 0.0)
    ended = run(s, 2 * H)
    assert ended[0].reason == "energy_delivered"
    assert ended[0].at_sim == pytest.approx(H / 2)


def test_session_without_targets_never_ends_by_itself() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=7.0), 0.0)
    assert run(s, 48 * H, dt=H) == []
    assert s.sessions["s1"].delivered_kwh == pytest.approx(7.0 * 48)


def test_zero_power_session_ends_only_by_duration() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=0.0, energy_kwh=10.0, duration_minutes=10), 0.0)
    ended = run(s, H)
    assert [(e.reason, e.energy_delivered_kwh) for e in ended] == [("duration_elapsed", 0.0)]


def test_update_changes_power_from_then_on() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=22.0, energy_kwh=100.0), 0.0)
    run(s, H / 2)
    assert s.apply(cmd("update", granted_kw=11.0), s.now_sim).outcome == "updated"
    run(s, H)
    assert s.sessions["s1"].delivered_kwh == pytest.approx(11.0 + 11.0)
    assert s.ev_load_kw == 11.0


def test_update_can_change_targets() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=10.0, energy_kwh=100.0), 0.0)
    run(s, H)
    s.apply(cmd("update", granted_kw=10.0, energy_kwh=12.0), s.now_sim)
    ended = run(s, H)
    assert ended[0].reason == "energy_delivered"
    assert ended[0].energy_delivered_kwh == 12.0
    assert ended[0].at_sim == pytest.approx(H + 0.2 * H)


def test_stop_ends_with_command_reason_and_energy_so_far() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=22.0, energy_kwh=40.0), 0.0)
    run(s, H / 2)
    result = s.apply(cmd("stop", reason="released"), s.now_sim)
    assert result.outcome == "stopped"
    assert result.ended is not None
    assert result.ended.reason == "released"
    assert result.ended.energy_delivered_kwh == pytest.approx(11.0)
    assert not s.sessions


def test_stop_without_reason_defaults_to_released() -> None:
    s = sim()
    s.apply(cmd("start", granted_kw=1.0), 0.0)
    result = s.apply(cmd("stop"), 0.0)
    assert result.ended is not None
    assert result.ended.reason == "released"


def test_stop_and_update_of_unknown_session_are_ignored_but_reported() -> None:
    s = sim()
    s.apply(cmd("start", "s1", granted_kw=5.0), 0.0)
    for c in (cmd("stop", "nope"), cmd("update", "nope", granted_kw=50.0)):
        result = s.apply(c, 0.0)
        assert result.outcome == "unknown_session"
        assert not result.changed
        assert result.ended is None
    assert list(s.sessions) == ["s1"]
    assert s.ev_load_kw == 5.0


def test_start_is_idempotent() -> None:
    s = sim()
    first = cmd("start", granted_kw=22.0, energy_kwh=11.0)
    assert s.apply(first, 0.0).outcome == "started"
    run(s, 600)
    assert s.apply(first, s.now_sim).outcome == "duplicate_start"
    assert len(s.sessions) == 1
    assert s.sessions["s1"].started_at_sim == 0.0  # not restarted
    assert s.ev_load_kw == 22.0


def test_start_reusing_a_running_id_for_another_ev_is_refused() -> None:
    s = sim()
    s.apply(cmd("start", ev_id="EV_0001", granted_kw=10.0), 0.0)
    result = s.apply(cmd("start", ev_id="EV_0002", granted_kw=10.0, ts=1_700_000_100.0), 0.0)
    assert result.outcome == "conflicting_start"
    assert s.sessions["s1"].ev_id == "EV_0001"


def test_redelivered_start_after_end_does_not_restart_but_new_start_with_same_id_does() -> None:
    s = sim()
    start = cmd("start", granted_kw=22.0, energy_kwh=1.0)
    s.apply(start, 0.0)
    assert len(run(s, H)) == 1
    assert s.apply(start, s.now_sim).outcome == "already_ended"
    assert not s.sessions
    # A restarted balancer may hand out the same session id again: a different command is a new session.
    again = cmd("start", granted_kw=22.0, energy_kwh=1.0, ts=start.ts + 3600)
    assert s.apply(again, s.now_sim).outcome == "started"


def test_stop_all() -> None:
    s = sim()
    s.apply(cmd("start", "s1", granted_kw=10.0), 0.0)
    s.apply(cmd("start", "s2", "EV_0002", granted_kw=10.0), 0.0)
    run(s, H)
    ends = s.stop_all("substation_offline", s.now_sim)
    assert sorted((e.session_id, e.reason, round(e.energy_delivered_kwh, 6)) for e in ends) == [
        ("s1", "substation_offline", 10.0), ("s2", "substation_offline", 10.0)]
    assert not s.sessions


def test_telemetry_sums() -> None:
    s = sim(base_kw=123.4567, capacity_kw=400.0)
    s.apply(cmd("start", "s1", granted_kw=22.0), 0.0)
    s.apply(cmd("start", "s2", "EV_0002", granted_kw=7.4), 0.0)
    t = s.telemetry(seq=5, ts=1_700_000_000.0)
    assert t.substation_id == "A"
    assert t.seq == 5
    assert t.capacity_kw == 400.0
    assert t.active_sessions == 2
    assert t.ev_load_kw == pytest.approx(29.4)
    assert t.base_load_kw == pytest.approx(123.457)
    assert t.load_kw == pytest.approx(t.base_load_kw + t.ev_load_kw, abs=1e-9)


def test_step_samples_base_load_at_now() -> None:
    seen: list[float] = []

    def base(t: float) -> float:
        seen.append(t)
        return t / 100.0

    s = SubstationSim("A", 100.0, base, now_sim=50.0)
    assert s.base_load_kw == 0.5
    s.step(10.0, 60.0)
    assert s.base_load_kw == 0.6
    assert s.now_sim == 60.0
    assert seen == [50.0, 60.0]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SubstationSim("A", 0.0, lambda _t: 0.0)
