"""``python -m replay``: run scenarios against policies, print the table, write JSON and PNG plots.

Examples::

    python -m replay                                   # every shipped scenario x every policy
    python -m replay --scenario burst_1000 --policy least-utilised
    python -m replay --scenario my_grid.yaml --out /tmp/replay --seed 7 --no-plots
    python -m replay --mode live --scenario substation_loss --policy least-utilised   # real broker + services
    python -m replay --mode live --scenario evening_peak --policy round-robin --speedup 300 --duration 1h
    python -m replay --sessions ../shared/benchmarks/acn-caltech-2019-03/sessions.csv --limit-kw 10,20,30,40,50,60
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grid_sim.scenario import LimitsEvent, Scenario, ScenarioError, load_scenario, parse_duration, shipped_scenarios
from grid_sim.timeline import shorten
from replay.benchmark import (
    DEFAULT_MARGIN_PCT,
    DEFAULT_STEP_S,
    BenchRun,
    PublishedError,
    benchmark_json,
    find_published,
    format_benchmark,
    run_benchmark,
)
from replay.report import format_notes, format_table, plot_overview, plot_run, write_json
from replay.sessions import SessionFileError, load_sessions
from replay.sim import ALL_POLICIES, BASELINE_POLICIES, RunResult, available_policies, run
from replay.trace_optimum import format_optimum

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
    bench = p.add_argument_group("session benchmark", "real charging sessions from a CSV file, one site, "
                                 "several limits, beside the offline optimum and the published figures "
                                 "(docs/balancing.md)")
    bench.add_argument("--sessions", metavar="CSV", default=None,
                       help="session file (session_id,station_id,arrival_min,departure_min,requested_kwh,max_kw); "
                            "a relative path is tried from the current directory, then from the repository")
    bench.add_argument("--limit-kw", type=_limits, default=None, metavar="KW[,KW...]",
                       help="site limits to run (default: those of the data set's published results)")
    bench.add_argument("--margin-pct", type=float, default=DEFAULT_MARGIN_PCT, metavar="PCT",
                       help=f"the balancer's safety margin; capacity = limit / (1 - margin) "
                            f"(default {DEFAULT_MARGIN_PCT:g})")
    bench.add_argument("--step", type=_positive, default=DEFAULT_STEP_S, metavar="S",
                       help=f"simulation step and telemetry interval in seconds (default {DEFAULT_STEP_S:g}; 1 is "
                            "the balancer's real cadence at about 5x the CPU, see docs/balancing.md)")
    bench.add_argument("--jobs", type=int, default=1, metavar="N", help="runs in N processes at once (default 1)")
    return p


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a finite number > 0")
    return value


def _limits(text: str) -> list[float]:
    limits = [_positive(part.strip()) for part in text.split(",") if part.strip()]
    if not limits:
        raise argparse.ArgumentTypeError("give one or more limits in kW, e.g. 10,20,30")
    return limits


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
    if args.sessions is not None:
        return _sessions(args)
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
        with_limits = [sc.name for sc in scenarios if any(isinstance(e, LimitsEvent) for e in sc.events)]
        if with_limits and args.scenario != "all":
            raise SystemExit(f"{', '.join(with_limits)}: limit schedules (events of type limits) run in --mode sim "
                             "only for now (tests/integration/test_limit_schedule_e2e.py sends one live)")
        if with_limits:
            print(f"skipping {', '.join(with_limits)} (limit schedules: --mode sim only)", file=sys.stderr)
            scenarios = [sc for sc in scenarios if sc.name not in with_limits]
        return _live(args, scenarios, policies, out)
    results: list[RunResult] = []
    optimum_tables: list[str] = []
    plots: dict[tuple[str, str], str] = {}
    overviews = 0
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
            overviews += 1
        results.extend(per_scenario)
        if any(isinstance(e, LimitsEvent) for e in scenario.events):  # a grid operator's limits: vs the optimum
            optimum_tables.append(f"{scenario.name}: delivered against the offline optimum under the same "
                                  f"time-varying limit\n{format_optimum(per_scenario, DEFAULT_MARGIN_PCT)}")
    print(format_table(results))
    for table in optimum_tables:
        print("\n" + table)
    print(format_notes(results))
    write_json(out / "results.json", results, plots)
    print(f"\nwrote {out / 'results.json'}" + ("" if args.no_plots else _plots_written(plots, overviews, out)))
    unsafe = [r for r in results if r.policy not in BASELINE_POLICIES and r.metrics.overload_s > 0]
    if args.fail_on_overload and unsafe:
        print("overload with: " + ", ".join(f"{r.scenario}/{r.policy}" for r in unsafe), file=sys.stderr)
        return 1
    return 0


def _plots_written(plots: dict[tuple[str, str], str], overviews: int, out: Path) -> str:
    overview = f" + {overviews} overview{'s' if overviews != 1 else ''}" if overviews else ""
    return f" and {len(plots) + overviews} plots ({len(plots)} runs{overview}) to {out}"


def _live(args: argparse.Namespace, scenarios: list[Scenario], policies: list[str], out: Path) -> int:
    """``--mode live``: each scenario x policy through the real services, one after the other."""
    from replay.live import LiveError, run_live

    results: list[RunResult] = []
    plots: dict[tuple[str, str], str] = {}
    extra: dict[tuple[str, str], dict[str, Any]] = {}
    lost: list[str] = []
    overviews = 0
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
            overviews += 1
        results.extend(per_scenario)
    speedups = sorted({f"{e['live']['speedup']:g}x" for e in extra.values()})
    print(f"mode: live (real broker, balancer, agents and EV clients; speed-up {', '.join(speedups)})")
    print(format_table(results))
    print(format_notes(results))
    write_json(out / "results.json", results, plots, mode="live", extra=extra)
    print(f"\nwrote {out / 'results.json'}" + ("" if args.no_plots else _plots_written(plots, overviews, out)))
    if lost:
        print("EVs not accounted for: " + "; ".join(lost), file=sys.stderr)
    unsafe = [r for r in results if r.policy not in BASELINE_POLICIES and r.metrics.overload_s > 0]
    if args.fail_on_overload and unsafe:
        print("overload with: " + ", ".join(f"{r.scenario}/{r.policy}" for r in unsafe), file=sys.stderr)
        return 1
    return 1 if lost else 0


def _sessions(args: argparse.Namespace) -> int:
    """``--sessions``: the session benchmark (every policy x every limit, the optimum, the published figures)."""
    clashing = [flag for flag, used in (("--mode live", args.mode == "live"), ("--scenario", args.scenario != "all"),
                                        ("--duration", args.duration is not None), ("--seed", args.seed is not None),
                                        ("--command-delay", args.command_delay != 0.0)) if used]
    if clashing:
        raise SystemExit(f"--sessions runs the session benchmark in sim mode; it takes no {', '.join(clashing)}")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    if not 0 <= args.margin_pct < 100:
        raise SystemExit("--margin-pct must be in [0, 100)")
    try:
        sessions = load_sessions(args.sessions)
        published = find_published(sessions.sha256)
    except (SessionFileError, PublishedError) as exc:
        print(exc, file=sys.stderr)
        return 2
    limits = args.limit_kw or (published.limits if published is not None else None)
    if not limits:
        raise SystemExit(f"--limit-kw is needed: no published results are known for {sessions.source}")
    policies = _policies(args.policy)
    out: Path = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    print(f"{sessions.name}: {len(sessions.rows)} sessions, {sessions.requested_kwh:,.1f} kWh requested; "
          f"{len(limits)} limit(s) x {len(policies)} policies, {args.step:g} s steps, margin {args.margin_pct:g} %"
          + ("" if published is None else f"; published: {published.name}"), file=sys.stderr)

    def progress(run: BenchRun) -> None:
        print(f"  {run.limit_kw:g} kW x {run.policy}: {run.delivered_pct:.2f} % delivered, "
              f"{run.simulated_s / 86_400:.1f} days simulated in {run.cpu_s:.1f} s CPU", file=sys.stderr, flush=True)

    results = run_benchmark(sessions, limits, policies, margin_pct=args.margin_pct, step_s=args.step,
                            jobs=args.jobs, published=published, progress=progress)
    print(format_benchmark(results, published))
    if published is not None:
        print(f"\npublished: {published.source} (uncontrolled, ignoring the limit: {published.uncontrolled_pct:g} %)")
    else:
        print("\nno published results are known for this file (matched by SHA-256)")
    path = out / f"bench_{sessions.name}.json"
    doc = benchmark_json(sessions, results, published, margin_pct=args.margin_pct, step_s=args.step)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    unsafe = [f"{r.limit_kw:g} kW/{r.policy}" for lim in results for r in lim.runs
              if r.policy not in BASELINE_POLICIES and r.over_limit_s > 0]
    if args.fail_on_overload and unsafe:
        print("over the limit with: " + ", ".join(unsafe), file=sys.stderr)
        return 1
    return 0
