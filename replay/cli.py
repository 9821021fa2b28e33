"""``python -m replay``: run scenarios against policies, print the table, write JSON and PNG plots.

Examples::

    python -m replay                                   # every shipped scenario x every policy
    python -m replay --scenario burst_1000 --policy least-utilised
    python -m replay --scenario my_grid.yaml --out /tmp/replay --seed 7 --no-plots
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from replay.report import format_table, plot_overview, plot_run, write_json
from replay.scenario import ScenarioError, load_scenario, shipped_scenarios
from replay.sim import ALL_POLICIES, BASELINE_POLICIES, RunResult, available_policies, run

DEFAULT_OUT = Path(__file__).parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replay", description="Replay scenarios against the balancing "
                                "policies (fast in-process simulation): print a table, write JSON and PNG plots.")
    p.add_argument("--scenario", default="all",
                   help="a shipped scenario's name, a scenario file, or 'all' (default); several as a,b")
    p.add_argument("--policy", default="all",
                   help="a policy name, several as a,b, or 'all' (default: every policy the core has)")
    p.add_argument("--mode", choices=("sim", "live"), default="sim",
                   help="sim: the pure core with a simulated clock (default); live: through the broker (not yet)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
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
    if args.mode == "live":
        print("--mode live is not implemented yet: only the in-process simulation (--mode sim) runs so far",
              file=sys.stderr)
        return 2
    if args.command_delay < 0:
        raise SystemExit("--command-delay must be >= 0")
    names = shipped_scenarios() if args.scenario == "all" else [s for s in args.scenario.split(",") if s]
    try:
        scenarios = [load_scenario(name) for name in names]
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return 2
    policies = _policies(args.policy)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
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
