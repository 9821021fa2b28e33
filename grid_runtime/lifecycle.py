"""Process lifecycle: run an asyncio service until SIGINT/SIGTERM, then let it shut down cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop_event)``; SIGINT/SIGTERM set the event so ``main`` can finish its shutdown."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Stop a child as our services expect: SIGTERM (they shut down cleanly: offline status, summary,
    Mosquitto's persistence), and SIGKILL only if it is not gone within ``timeout``. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode
