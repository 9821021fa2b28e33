"""grid_runtime.lifecycle: the child-server base the local brokers share (stop, kill, cleanup at exit); the services'
stop-aware sleep (wait_event)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from weakref import WeakSet

import pytest

from grid_runtime import lifecycle
from grid_runtime.lifecycle import ChildServer, file_tail, find_executable, wait_event

#: A child that exits 0 on SIGTERM, the way our servers shut down cleanly.
_POLITE = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
           "print('up', flush=True)\n"
           "time.sleep(60)\n")


class _Sleeper(ChildServer):
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir

    def start(self) -> _Sleeper:
        log = self.work_dir / "out.log"
        self._spawn([sys.executable, "-c", _POLITE], log, self.work_dir)
        deadline = time.monotonic() + 30.0
        while "up" not in file_tail(log) and time.monotonic() < deadline:  # its SIGTERM handler is set
            time.sleep(0.01)
        return self


def test_stop_is_a_clean_exit_and_forgets_the_child(tmp_path: Path) -> None:
    server = _Sleeper(tmp_path).start()
    assert server.running and server.pid is not None
    assert server in lifecycle._STOP_AT_EXIT
    server.stop()
    assert not server.running and server.pid is None
    assert server not in lifecycle._STOP_AT_EXIT


def test_kill_is_a_sigkill(tmp_path: Path) -> None:
    server = _Sleeper(tmp_path).start()
    proc = server._proc
    assert proc is not None
    server.kill()
    assert proc.returncode == -signal.SIGKILL
    assert server not in lifecycle._STOP_AT_EXIT
    server.stop()  # nothing left to stop: no error


def test_the_exit_hook_stops_what_was_left_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "_STOP_AT_EXIT", WeakSet())  # (only this test's server, none of another test's)
    server = _Sleeper(tmp_path).start()
    proc = server._proc
    assert proc is not None
    lifecycle._stop_left_running()
    assert proc.returncode == 0 and not server.running


def test_find_executable_prefers_the_environment_and_says_where_it_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRID_TEST_BIN", sys.executable)
    assert find_executable("no-such-program-here", "GRID_TEST_BIN", (), "") == sys.executable
    monkeypatch.delenv("GRID_TEST_BIN")
    with pytest.raises(FileNotFoundError, match=r"\$GRID_TEST_BIN, PATH, /nowhere/x.*apt-get install x"):
        find_executable("no-such-program-here", "GRID_TEST_BIN", ("/nowhere/x",), "apt-get install x")


def test_file_tail(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"{i}\n" for i in range(10)))
    assert file_tail(log, 3) == "7\n8\n9"
    assert file_tail(tmp_path / "missing") == ""


def test_wait_event_says_whether_the_event_came() -> None:
    async def scenario() -> tuple[bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        asyncio.get_running_loop().call_soon(event.set)
        return timed_out, await wait_event(event, 10.0)

    assert asyncio.run(scenario()) == (False, True)


def test_a_loop_on_wait_event_ends_when_cancelled_as_the_event_comes() -> None:
    """A service loop that sleeps on its event must end when cancelled, even when the cancel lands together with the
    event (Python 3.11's asyncio.wait_for returns then and drops the cancel: 0-2 iterations after the wake-up the loop
    ran on for ever)."""

    async def service(event: asyncio.Event) -> None:
        while True:
            await wait_event(event, 10.0)
            event.clear()

    async def scenario() -> None:
        for spins in range(6):  # the cancel lands 0..5 loop iterations after the event
            event = asyncio.Event()
            task = asyncio.create_task(service(event))
            await asyncio.sleep(0.01)  # waiting on the event
            event.set()
            for _ in range(spins):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2.0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task in done, f"still running after a cancel {spins} iterations after the event"

    asyncio.run(scenario())
