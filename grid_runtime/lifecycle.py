"""Process lifecycle: run an asyncio service until SIGINT/SIGTERM, then let it shut down cleanly; start, stop and
clean up the servers (Mosquitto, nats-server) that tests, benches and ``gridctl`` run as child processes."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from weakref import WeakSet


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop_event)``; SIGINT/SIGTERM set the event so ``main`` can finish its shutdown."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait at most ``timeout`` s for ``event``; whether it is set (a sleep that a stop event cuts short).

    :func:`asyncio.timeout`, not :func:`asyncio.wait_for`: in Python 3.11 wait_for returns normally when a cancel of
    the waiting task lands together with the event, and drops the cancel (the task then runs on: the API hung at
    stop that way). Service code bounds its other awaits with ``async with asyncio.timeout(...)`` for the same
    reason."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


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


def find_executable(name: str, env_var: str, fallbacks: Sequence[str], install_hint: str) -> str:
    """Path of the program ``name``: ``$env_var``, then ``PATH``, then ``fallbacks`` (Debian puts servers in
    /usr/sbin, which is not on a normal user's PATH). FileNotFoundError says where it looked and ``install_hint``."""
    for candidate in (os.environ.get(env_var), shutil.which(name), *fallbacks):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{name} not found (looked at ${env_var}, PATH, {', '.join(fallbacks)}); {install_hint}")


def file_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ("" when it cannot be read): what a start-up error shows."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


#: Servers started by this interpreter and not yet stopped.
_STOP_AT_EXIT: WeakSet[ChildServer] = WeakSet()


@atexit.register
def _stop_left_running() -> None:
    """A script that forgets stop() (or dies on an exception) leaves no server processes behind."""
    for server in list(_STOP_AT_EXIT):
        with contextlib.suppress(Exception):
            server.stop(timeout=2.0)


class ChildServer:
    """One server child process that outlives no one: SIGTERM on :meth:`stop`, SIGKILL on :meth:`kill`, and
    stopped at interpreter exit when its owner did not stop it. Subclasses start it with :meth:`_spawn`."""

    #: :meth:`stop`'s wait for a clean exit before SIGKILL
    stop_timeout_s = 10.0

    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit code once the process has ended by itself (None while it runs or when none was started)."""
        return self._proc.poll() if self._proc is not None else None

    def _spawn(self, argv: Sequence[str], output: Path, cwd: Path) -> subprocess.Popen[bytes]:
        with open(output, "ab") as out:
            # Its own session: a Ctrl-C meant for the services in the foreground must not take the server down
            # before they have said goodbye through it.
            self._proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd,
                                          start_new_session=True)
        _STOP_AT_EXIT.add(self)
        return self._proc

    def signal(self, sig: int) -> None:
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(sig)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout`` (default :attr:`stop_timeout_s`)."""
        if self._proc is not None:
            stop_process(self._proc, self.stop_timeout_s if timeout is None else timeout)
        self._forget()

    def kill(self) -> None:
        """SIGKILL: a crash (whatever the server had not yet saved is lost)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=5.0)
        self._forget()

    def _forget(self) -> None:
        self._proc = None
        _STOP_AT_EXIT.discard(self)
