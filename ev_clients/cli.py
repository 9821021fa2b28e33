"""``python -m ev_clients [fleet|loadtest|scenario] [flags]``: a simulated EV fleet that doubles as the load tester.

``scenario`` plays the EVs of a replay scenario (``ev_clients/scenario_fleet.py``; used by
``python -m replay --mode live``).

Examples::

    # a demo fleet: 20 EVs arriving about once a second, until Ctrl-C
    MQTT_ACCOUNT_SECRET=... python -m ev_clients --url mqtt://127.0.0.1:1884

    # the load test of the original HTTP design, over MQTT
    python -m ev_clients loadtest --requests 1000 --concurrent 10 --ramp-up 5 \\
        --url mqtt://127.0.0.1:1884 --save results.json

    # the same through the HTTP API (POST /charge), holding each session 2 s so requests queue
    API_TOKEN=... python -m ev_clients loadtest --requests 200 --url http://127.0.0.1:8000 --release-after 2

Flags override the ``EV_*``/``MQTT_*`` environment (see :mod:`ev_clients.settings`). Exit code 0 when
every request sent was answered, 1 when some never were (their ids are printed and saved), 2 for bad
arguments. SIGINT/SIGTERM stop gracefully (EVs release and disconnect, the summary is printed and
saved); a second signal cancels at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError

from ev_clients import scenario_fleet as scenario_cmd
from ev_clients.fleet import FleetRunner, RunConfig
from ev_clients.metrics import register_fleet_metrics
from ev_clients.settings import EvSettings
from ev_clients.workload import RequestMix, parse_kw_mix, parse_range
from grid_runtime.logs import configure_logging, get_logger
from grid_runtime.metrics import serve_metrics, stop_metrics
from grid_runtime.settings import MqttSettings

COMMANDS = ("fleet", "loadtest", "scenario")

log = get_logger("ev_fleet")


def parse_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (or ``tcp://``, or plain ``host:port``) -> ``(host, port)``; port defaults to 1883."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (use mqtt://host:port, or for the load test "
                         "http://host:port: the HTTP API)")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return parts.hostname, parts.port or 1883


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("broker and EVs")
    g.add_argument("--url", help="broker, mqtt://host:port (default: MQTT_HOST/MQTT_PORT); loadtest also "
                                 "http://host:port: through the HTTP API's POST /charge (EV_API_URL)")
    g.add_argument("--token", help="with an http:// URL: the API's bearer token (EV_API_TOKEN, else API_TOKEN): "
                                   "the operator's, or an EV token covering the EV ids")
    g.add_argument("--client", choices=("aiomqtt", "paho"), help="MQTT library per EV (EV_CLIENT, aiomqtt)")
    g.add_argument("--id-prefix", help="EV id prefix (EV_ID_PREFIX, EV_): ids EV_0001, EV_0002, ...")
    g.add_argument("--retry-after", type=float, metavar="S",
                   help="re-send an unanswered request after S seconds (EV_RETRY_AFTER_S, 5)")
    g.add_argument("--max-attempts", type=_positive_int, metavar="N",
                   help="publishes of a request before it counts as unanswered (EV_MAX_ATTEMPTS, 6)")
    g.add_argument("--timeout", type=float, metavar="S",
                   help="longest wait in the queue, and slack past a charge's expected end (EV_TIMEOUT_S, 60)")
    g.add_argument("--speedup", type=float, help="the agents' SIM_SPEEDUP (EV_SPEEDUP, 1)")
    g.add_argument("--release-early-pct", type=float, metavar="PCT",
                   help="share of charging EVs that leave early (EV_RELEASE_EARLY_PCT, 10)")
    g.add_argument("--seed", type=int, help="random seed (EV_SEED)")
    g = parser.add_argument_group("requests")
    g.add_argument("--requests", type=_positive_int, metavar="N",
                   help="fleet: stop after N arrivals (default: until Ctrl-C); "
                        "loadtest: requests to send, split evenly over the workers (1000)")
    g.add_argument("--kw-mix", default="7.4:3,11:4,22:2,50:1", metavar="KW:W,...",
                   help="requested powers and their weights (default %(default)s)")
    g.add_argument("--energy-kwh", default="10-60", metavar="LO-HI", help="energy range (default %(default)s)")
    g.add_argument("--duration-minutes", default="30-240", metavar="LO-HI",
                   help="duration range for requests by time (default %(default)s)")
    g.add_argument("--duration-pct", type=float, default=20.0, metavar="PCT",
                   help="share of requests by duration instead of energy (default %(default)s)")
    g.add_argument("--priority-pct", type=float, default=15.0, metavar="PCT",
                   help="share of requests with priority > 0 (default %(default)s)")
    g.add_argument("--min-kw-pct", type=float, default=20.0, metavar="PCT",
                   help="share of requests naming a minimum power, 25 or 50 %% of requested (default %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--save", metavar="FILE.json",
                   help="write summary + per-request records as JSON (an open-ended fleet: the last "
                        "EV_KEEP_RECORDS records)")
    g.add_argument("--report-every", type=_non_negative, metavar="S",
                   help="live line interval (default 1 s on a TTY, 5 s otherwise; 0 = off)")
    g.add_argument("--run-for", type=_non_negative, metavar="S", help="stop gracefully after S seconds")
    g.add_argument("--log-level", help="log level (LOG_LEVEL; MQTT connection chatter stays at WARNING)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ev_clients",
        description="Simulated EV fleet and MQTT load tester for the Smart Grid Load Balancer.",
        epilog="Without a command, 'fleet' is run.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{fleet,loadtest,scenario}")
    fleet = sub.add_parser("fleet", help="EVs arrive at a rate, charge and leave (default)")
    _common(fleet)
    fleet.add_argument("--evs", type=_positive_int, metavar="N", help="distinct EV ids (EV_COUNT, 20)")
    fleet.add_argument("--rate", type=float, metavar="PER_S", help="arrivals per second (EV_ARRIVAL_RATE, 1)")
    fleet.add_argument("--arrivals", choices=("poisson", "fixed"), help="arrival process (EV_ARRIVAL_MODE)")
    fleet.add_argument("--keep-records", type=_positive_int, metavar="N",
                       help="without --requests: keep only the last N request records and latency samples "
                            "for the summary and --save (EV_KEEP_RECORDS, 10000); counts stay exact")
    load = sub.add_parser("loadtest", help="closed loop: C workers send N requests back to back")
    _common(load)
    load.add_argument("--concurrent", type=_positive_int, default=10, metavar="C",
                      help="workers, each its own EV id and connection (default %(default)s)")
    load.add_argument("--ramp-up", type=_non_negative, default=5.0, metavar="S",
                      help="start the workers evenly over S seconds (default %(default)s)")
    load.add_argument("--release-after", type=_non_negative, metavar="S",
                      help="hold each session S real seconds before releasing it (EV_RELEASE_AFTER_S, 0 = at "
                           "once); longer fills the substations so requests queue")
    scenario_cmd.add_parser(sub, _positive_int)
    return parser


def _settings(args: argparse.Namespace) -> EvSettings:
    overrides: dict[str, Any] = {}
    for flag, key in (("evs", "count"), ("rate", "arrival_rate"), ("arrivals", "arrival_mode"),
                      ("speedup", "speedup"), ("retry_after", "retry_after_s"), ("max_attempts", "max_attempts"),
                      ("timeout", "timeout_s"), ("id_prefix", "id_prefix"),
                      ("release_early_pct", "release_early_pct"), ("client", "client"), ("seed", "seed"),
                      ("keep_records", "keep_records"), ("release_after", "release_after_s"),
                      ("token", "api_token")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if args.url and urlsplit(args.url).scheme in ("http", "https"):
        if args.command != "loadtest":
            raise ValueError("an http:// URL drives the HTTP API: only the load test does that (the fleet and "
                             "scenarios speak MQTT: mqtt://host:port)")
        overrides["api_url"] = args.url.rstrip("/")
    elif args.url:
        host, port = parse_url(args.url)
        overrides["mqtt"] = MqttSettings(host=host, port=port, hosts="")  # (the URL wins over MQTT_HOSTS)
    settings = EvSettings(**overrides)
    if settings.api_url is not None and settings.api_token is None and os.environ.get("API_TOKEN"):
        settings = settings.model_copy(update={"api_token": SecretStr(os.environ["API_TOKEN"])})
    return settings


def _config(args: argparse.Namespace) -> RunConfig:
    mix = RequestMix(
        kw_mix=parse_kw_mix(args.kw_mix),
        energy_kwh=parse_range(args.energy_kwh),
        duration_minutes=parse_range(args.duration_minutes),
        duration_pct=args.duration_pct,
        priority_pct=args.priority_pct,
        min_kw_pct=args.min_kw_pct,
    )
    if args.command == "loadtest":
        return RunConfig(mode="loadtest", requests=args.requests or 1000, concurrent=args.concurrent,
                         ramp_up_s=args.ramp_up, run_for_s=args.run_for, mix=mix,
                         report_every_s=args.report_every)
    return RunConfig(mode="fleet", requests=args.requests, run_for_s=args.run_for, mix=mix,
                     report_every_s=args.report_every)


def _install_signals(runner: FleetRunner, main_task: asyncio.Task[Any]) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if runner.stop.is_set():
            print(f"\n{signame} again: cancelling", file=sys.stderr)
            main_task.cancel()
        else:
            print(f"\n{signame}: stopping (EVs release and disconnect; again to cancel)", file=sys.stderr)
            runner.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        # not the main thread / not supported: Ctrl-C then simply interrupts
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig.name)


async def _run(runner: FleetRunner) -> None:
    task = asyncio.current_task()
    assert task is not None
    _install_signals(runner, task)
    try:
        await runner.run()
    except asyncio.CancelledError:
        runner.interrupted = True


def start_metrics(settings: EvSettings, runner: FleetRunner) -> Any:
    """Register the fleet's metrics and serve ``/metrics`` (``METRICS_*``); ``None`` when disabled or the port
    is taken (logged: the run goes on without ``/metrics``)."""
    if not settings.grid.metrics.enabled:
        return None
    register_fleet_metrics(runner)
    return serve_metrics(settings.grid.metrics, "ev_clients")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["fleet", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        config = _config(args) if args.command != "scenario" else RunConfig()
    except (ValidationError, ValueError) as exc:
        parser.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    level = (args.log_level or settings.grid.log_level).upper()
    configure_logging(level, settings.grid.log_format, settings.grid.log_file)
    if logging.getLevelName(level) != logging.DEBUG:
        for name in ("grid.mqtt", "mqtt", "httpx"):  # one connect line per EV (or HTTP request) is noise
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.command == "scenario":
        return scenario_cmd.run_cli(args, settings)

    runner = FleetRunner(settings, config)
    metrics = start_metrics(settings, runner)
    try:
        asyncio.run(_run(runner))
    finally:
        stop_metrics(metrics)
    now = runner.clock()
    title = "load test" if config.mode == "loadtest" else "fleet"
    ended = (" (interrupted)" if runner.interrupted
             else f" (after --run-for {config.run_for_s:g} s)" if config.run_for_s and runner.stop.is_set() else "")
    print(f"\n=== {title} summary{ended} ===")
    print(runner.stats.table(now))
    if args.save:
        path = runner.save(args.save)
        print(f"saved {path}")
    code = runner.exit_code()
    if code:
        unanswered = runner.stats.unanswered_count
        if unanswered:
            print(f"FAIL: {unanswered} request(s) never answered", file=sys.stderr)
        else:
            print(f"FAIL: only {runner.stats.sent} of {config.requests} requests were sent", file=sys.stderr)
    return code
