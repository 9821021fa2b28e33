"""``python -m replay``: run scenarios against policies, print the table, write JSON and PNG plots.

Examples::

    python -m replay                                   # every shipped scenario x every policy
    python -m replay --scenario burst_1000 --policy least-utilised
    python -m replay --scenario my_grid.yaml --out /tmp/replay --seed 7 --no-plots
    python -m replay --mode live --scenario substation_loss --policy least-utilised   # real broker + services
    python -m replay --mode live --scenario evening_peak --policy round-robin --speedup 300 --duration 1h
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replay.report import format_table, plot_overview, plot_run, write_json
from replay.scenario import Scenario, ScenarioError, load_scenario, parse_duration, shipped_scenarios
from replay.sim import ALL_POLICIES, BASELINE_POLICIES, RunResult, available_policies, run
from replay.timeline import shorten

DEFAULT_OUT = Path(__file__).parent / "results"
#: Live runs write here by default (so they never overwrite the simulation's results).
DEFAULT_LIVE_OUT = DEFAULT_OUT / "live"


def _speedup(text: str) -> float | None:
    if text == "auto":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0 or 'auto'")
    return value


def _duration(text: str) -> float:
    try:
        value = float(parse_duration(text))
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replay", description="Replay scenarios against the balancing "
                                "policies (a fast in-process simulation, or live through the real broker, balancer, "
                                "agents and EV clients): print a table, write JSON and PNG plots.")
    p.add_argument("--scenario", default="all",
                   help="a shipped scenario's name, a scenario file, or 'all' (default); several as a,b")
    p.add_argument("--policy", default="all",
                   help="a policy name, several as a,b, or 'all' (default: every policy the core has)")
    p.add_argument("--mode", choices=("sim", "live"), default="sim",
                   help="sim: the pure core with a simulated clock (default); live: a private Mosquitto, "
                        "python -m balancer, the scenario's substation agents and EV fleet, sped up")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default: {DEFAULT_OUT}, live: {DEFAULT_LIVE_OUT})")
    p.add_argument("--duration", type=_duration, default=None, metavar="T",
                   help="cut each scenario to its first T (e.g. 1h, 45m): later arrivals and events are dropped, "
                        "EVs already there stay until they leave (both modes)")
    p.add_argument("--speedup", type=_speedup, default=None, metavar="N",
                   help="live: scenario seconds per wall second, or 'auto' (default): the whole run in about "
                        "40 s of wall time")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help="live: keep the broker files, service logs and EV records of each run under DIR "
                        "(default: a temporary directory, removed)")
    p.add_argument("--seed", type=int, default=None, help="override every scenario's seed")
    p.add_argument("--command-delay", type=float, default=0.0, metavar="S",
                   help="seconds between a balancer command and the substation applying it (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (faster)")
    p.add_argument("--fail-on-overload", action="store_true",
                   help="exit 1 when a policy other than the baselines overloads a substation")
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and the policies, then exit")
    return p


def _policies(arg: str) -> list[str]:
    available = available_policies()
    names = list(available) if arg == "all" else [n.strip() for n in arg.split(",") if n.strip()]
    for name in names:
        if name not in ALL_POLICIES:
            raise SystemExit(f"unknown policy {name!r}; choose from {', '.join(ALL_POLICIES)} or 'all'")
        if name not in available:
            raise SystemExit(f"policy {name!r} is not implemented by this balancer core yet "
                             f"(available: {', '.join(available)})")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        print("scenarios:", ", ".join(shipped_scenarios()))
        print("policies: ", ", ".join(available_policies()))
        return 0
    if args.command_delay < 0:
        raise SystemExit("--command-delay must be >= 0")
    if args.mode == "live" and args.command_delay:
        raise SystemExit("--command-delay is for --mode sim (live commands take as long as they take)")
    names = shipped_scenarios() if args.scenario == "all" else [s for s in args.scenario.split(",") if s]
    try:
        scenarios = [load_scenario(name) for name in names]
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.duration is not None:
        scenarios = [shorten(sc, args.duration) for sc in scenarios]
    policies = _policies(args.policy)
    out: Path = args.out or (DEFAULT_LIVE_OUT if args.mode == "live" else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "live":
        return _live(args, scenarios, policies, out)
    results: list[RunResult] = []
    plots: dict[tuple[str, str], str] = {}
    for scenario in scenarios:
        per_scenario = []
        for policy in policies:
            print(f"running {scenario.name} x {policy} ...", file=sys.stderr, end="", flush=True)
            result = run(scenario, policy, seed=args.seed, command_delay_s=args.command_delay)
            print(f" {result.sim_seconds / 3600:.1f} h simulated in {result.wall_seconds:.1f} s", file=sys.stderr)
            per_scenario.append(result)
            if not args.no_plots:
                path = out / f"{scenario.name}__{policy}.png"
                plot_run(result, path)
                plots[(scenario.name, policy)] = path.name
        if not args.no_plots and len(per_scenario) > 1:
            plot_overview(per_scenario, out / f"{scenario.name}__overview.png")
        results.extend(per_scenario)
    print(format_table(results))
    write_json(out / "results.json", results, plots)
    print(f"\nwrote {out / 'results.json'}" + ("" if args.no_plots else f" and {len(plots)} plots to {out}"))
    unsafe = [r for r in results if r.policy not in BASELINE_POLICIES and r.metrics.overload_s > 0]
    if args.fail_on_overload and unsafe:
        print("overload with: " + ", ".join(f"{r.scenario}/{r.policy}" for r in unsafe), file=sys.stderr)
        return 1
    return 0


def _live(args: argparse.Namespace, scenarios: list[Scenario], policies: list[str], out: Path) -> int:
    """``--mode live``: each scenario x policy through the real services, one after the other."""
    from replay.live import LiveError, run_live

    results: list[RunResult] = []
    plots: dict[tuple[str, str], str] = {}
    extra: dict[tuple[str, str], dict[str, Any]] = {}
    lost: list[str] = []
    for scenario in scenarios:
        per_scenario = []
        for policy in policies:
            print(f"running {scenario.name} x {policy} live ...", file=sys.stderr, flush=True)
            work = args.work_dir / f"{scenario.name}__{policy}" if args.work_dir is not None else None
            try:
                live = run_live(scenario, policy, speedup=args.speedup, seed=args.seed, work_dir=work)
            except LiveError as exc:
                print(f"live run {scenario.name} x {policy} failed: {exc}", file=sys.stderr)
                return 1
            result = live.result
            extra[(scenario.name, policy)] = {"live": live.info,
                                              "core_violation_samples": live.info["core_violation_samples"]}
            if live.lost:
                lost.append(f"{scenario.name}/{policy}: {len(live.lost)}")
            per_scenario.append(result)
            note = f"  (live, {live.info['speedup']:g}x)"
            if not args.no_plots:
                path = out / f"{scenario.name}__{policy}.png"
                plot_run(result, path, note=note)
                plots[(scenario.name, policy)] = path.name
        if not args.no_plots and len(per_scenario) > 1:
            plot_overview(per_scenario, out / f"{scenario.name}__overview.png", note="  (live)")
        results.extend(per_scenario)
    speedups = sorted({f"{e['live']['speedup']:g}x" for e in extra.values()})
    print(f"mode: live (real broker, balancer, agents and EV clients; speed-up {', '.join(speedups)})")
    print(format_table(results))
    write_json(out / "results.json", results, plots, mode="live", extra=extra)
    print(f"\nwrote {out / 'results.json'}" + ("" if args.no_plots else f" and {len(plots)} plots to {out}"))
    if lost:
        print("EVs not accounted for: " + "; ".join(lost), file=sys.stderr)
    unsafe = [r for r in results if r.policy not in BASELINE_POLICIES and r.metrics.overload_s > 0]
    if args.fail_on_overload and unsafe:
        print("overload with: " + ", ".join(f"{r.scenario}/{r.policy}" for r in unsafe), file=sys.stderr)
        return 1
    return 1 if lost else 0
