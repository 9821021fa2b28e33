"""``python -m api``: serve the API and live page with uvicorn until SIGINT/SIGTERM.

Configured by environment variables only: ``API_HOST`` / ``API_PORT`` (default 127.0.0.1:8000),
``API_TOKEN`` (the operator's token), ``API_TOKENS_FILE`` (scoped tokens, hashes only), ``API_PUBLIC_READS``,
``API_REQUEST_TIMEOUT_S`` and the ``MQTT_*`` / ``GRID_*`` / ``LOG_*`` variables of the other services
(``MQTT_USERNAME`` defaults to ``api``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import uvicorn

from api.app import create_app
from api.settings import ApiSettings
from api.tokens import TokenFileError
from grid_runtime.lifecycle import run_until_signalled
from grid_runtime.logs import get_logger
from grid_runtime.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__.split("\n\n")[0] + " "
                                     + __doc__.split("\n\n")[1].replace("\n", " "))
    parser.parse_args(argv)
    settings = load_settings(ApiSettings)
    if settings is None:
        return 2
    log = get_logger("api")
    try:
        app = create_app(settings)
    except TokenFileError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=3, server_header=False)
    server = uvicorn.Server(config)
    failed = False

    async def run(stop: asyncio.Event) -> None:
        nonlocal failed
        serving = asyncio.create_task(server.serve())
        waiter = asyncio.create_task(stop.wait())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
            url = f"http://{settings.host}:{port}/"
            # (a log line, not a print: under `gridlb run` stdout goes to api.log, which is JSON lines only)
            log.info("api_listening", url=url, docs=url + "docs", mqtt_host=settings.mqtt.host,
                     mqtt_port=settings.mqtt.port)
        await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            server.should_exit = True
            await serving
        waiter.cancel()
        failed = not server.started

    run_until_signalled(run)
    log.info("api_exited", ok=not failed)
    return 1 if failed else 0
