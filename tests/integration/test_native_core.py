"""The compiled core (grid_runtime/native.py, mypyc): built for real, used only while it matches its sources, and
deciding exactly as the interpreted core does.

The rest of the suite runs the core interpreted in-process (tests/conftest.py) and compiled in the services it
starts; these tests hold the two together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import balancer
import grid_protocol
from grid_runtime.native import ENV

ROOT = Path(__file__).resolve().parents[2]

_PACKAGE = '''import sys
from grid_runtime.native import NativeBuild
NATIVE = NativeBuild(sys.modules[__name__], ("pkgx.inner",), depends=("pkgdep",))
NATIVE.mount()
'''
_MODULE = '''class Meter:
    def __init__(self, start: int) -> None:
        self.total = start

    def add(self, xs: list[int]) -> int:
        for x in xs:
            self.total += x
        return self.total{extra}
'''
_PROBE = ("import pkgx, pkgx.inner.calc as c; "
          "print(pkgx.NATIVE.status.split(' ')[0], c.__file__.rsplit('.', 1)[-1], c.Meter(1).add([1, 2, 3]))")


def _env(cwd: Path, mode: str | None = None) -> dict[str, str]:
    """This environment without our GRID_NATIVE (``mode`` instead, if given), importing from ``cwd`` first."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), str(ROOT)])
    if mode is not None:
        env[ENV] = mode
    return env


def _builds_current() -> bool:
    """The balancer's build and the contract's (which ``require`` needs too: the core imports the contract) are
    current: made from these sources by ``./gridctl setup``."""
    stale = [b.top.__name__ for b in (balancer.NATIVE, grid_protocol.NATIVE) if not b.current()]
    assert not stale, f"native build missing or stale: {', '.join(stale)} (run ./gridctl setup)"
    return True


def _run(cwd: Path, args: list[str], mode: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(cwd, mode), capture_output=True, text=True,
                          timeout=300, check=False)


def test_a_build_is_used_only_while_it_matches_its_sources(tmp_path: Path) -> None:
    """A real mypyc build of a small package: mounted while current (the module is the extension), never once a
    source changed (the edited module runs, interpreted), refused under ``require`` until rebuilt; stale too when a
    package it was type-checked against changed."""
    (tmp_path / "pkgx" / "inner").mkdir(parents=True)
    (tmp_path / "pkgdep").mkdir()
    (tmp_path / "pkgdep" / "__init__.py").write_text("LIMIT = 1\n")
    (tmp_path / "pkgx" / "__init__.py").write_text(_PACKAGE)
    (tmp_path / "pkgx" / "inner" / "__init__.py").write_text("")
    calc = tmp_path / "pkgx" / "inner" / "calc.py"
    calc.write_text(_MODULE.format(extra=""))

    assert _run(tmp_path, ["-c", _PROBE]).stdout.split() == ["interpreted", "py", "7"]  # (no build yet)
    built = _run(tmp_path, ["-m", "grid_runtime.native", "build", "pkgx"])
    assert built.returncode == 0, built.stdout + built.stderr
    assert _run(tmp_path, ["-c", _PROBE]).stdout.split() == ["compiled", "so", "7"]
    assert _run(tmp_path, ["-c", _PROBE], "off").stdout.split() == ["interpreted", "py", "7"]
    assert not list((tmp_path / ".build").rglob("*.py"))  # (only extensions: an uncompiled module is the source's)

    calc.write_text(_MODULE.format(extra=" + 100"))  # the source moves on; the build does not
    assert _run(tmp_path, ["-c", _PROBE]).stdout.split() == ["interpreted", "py", "107"]
    refused = _run(tmp_path, ["-c", _PROBE], "require")
    assert refused.returncode != 0 and f"{ENV}=require" in refused.stderr and "older than the sources" in refused.stderr
    assert _run(tmp_path, ["-m", "grid_runtime.native", "status", "pkgx"]).returncode == 1

    assert _run(tmp_path, ["-m", "grid_runtime.native", "build", "pkgx"]).returncode == 0
    assert _run(tmp_path, ["-c", _PROBE], "require").stdout.split() == ["compiled", "so", "107"]
    (tmp_path / "pkgdep" / "__init__.py").write_text("LIMIT = 2\n")
    assert _run(tmp_path, ["-c", _PROBE]).stdout.split() == ["interpreted", "py", "107"]

    # Two builds at once (two shells running ./gridctl): one at a time, each whole; what is left is one build.
    builds = [subprocess.Popen([sys.executable, "-m", "grid_runtime.native", "build", "pkgx", "--force"],
                               cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
              for _ in range(2)]
    assert [b.wait(300) for b in builds] == [0, 0]
    assert _run(tmp_path, ["-c", _PROBE], "require").stdout.split() == ["compiled", "so", "107"]
    assert sorted(p.name for p in (tmp_path / ".build" / "native").iterdir()) == ["pkgx", "pkgx.lock"]


def _digests(mode: str, *extra: str) -> tuple[str, list[str]]:
    out = _run(ROOT, ["-m", "bench", "scale", "--sizes", "3x1000,30x3000", "--paths", "core,service", "--digest",
                      "--seconds", "3", "--steady", "300", "--saturated", "200",
                      "--json", os.devnull, *extra], mode)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    digests = [line.rsplit("digest ", 1)[1] for line in lines if "digest " in line]
    assert len(digests) == 4, out.stdout  # (a size that failed prints no digest)
    return next(line for line in lines if line.startswith("balancer core:")), digests


@pytest.mark.parametrize("extra", [(), ("--schedules=2", "--limited=3", "--distinct-limits")],
                         ids=["plain", "schedules-and-limits"])
def test_the_compiled_core_decides_as_the_interpreted_one(extra: tuple[str, ...]) -> None:
    """The balancer's build is current (``./gridctl setup`` made it from these sources) and its decisions and
    messages are the interpreted core's, effect for effect (the digest hashes every effect in order), at two grid
    sizes, through the core and through the service path, with and without limit schedules and operator limits."""
    assert _builds_current()
    compiled_status, compiled = _digests("require", *extra)
    interpreted_status, interpreted = _digests("off", *extra)
    assert compiled_status.startswith("balancer core: compiled")
    assert interpreted_status.startswith("balancer core: interpreted")
    assert compiled == interpreted


@pytest.mark.timeout(1200)
def test_the_unit_suite_passes_on_the_compiled_core() -> None:
    """The whole unit suite again, in a process whose core is the build (``GRID_NATIVE_TESTS=require``): every
    policy, the property tests against their oracles, the views, the limits. Only the tests that instrument the
    core's methods are skipped there (they ran on the interpreted core in this run)."""
    assert _builds_current()
    env = _env(ROOT)
    env["GRID_NATIVE_TESTS"] = "require"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration",
                          "tests/unit"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1150, check=False)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:]
    instrumenting = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    "--collect-only", "-m", "instruments_compiled", "tests/unit"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=300, check=False)
    n = sum(1 for line in instrumenting.stdout.splitlines() if "::" in line)
    assert n > 0 and f"{n} skipped" in summary, summary  # (nothing else skipped: the rest ran compiled)


def test_the_balancer_says_which_core_it_runs() -> None:
    """``GRID_NATIVE=require`` runs the compiled core (the modules are the build's extensions)."""
    assert _builds_current()
    probe = ("import json, balancer, balancer.core.engine as e, balancer.core.config as c; "
             "print(json.dumps([balancer.NATIVE.status, e.__file__, c.__file__]))")
    status, engine, config = json.loads(_run(ROOT, ["-c", probe], "require").stdout)
    assert status == "compiled"
    assert engine.endswith(".so") and str(balancer.NATIVE.location) in engine
    assert config == str(ROOT / "balancer" / "core" / "config.py")  # (a pydantic model: left interpreted)


def test_the_contract_runs_its_codec_and_topics_compiled() -> None:
    """``grid_protocol``'s codec, id rule and topics are the build's extensions under ``require`` (current: made
    from these sources by ``./gridctl setup``); its payload models (msgspec structs) stay interpreted, and the
    compiled topics and codec answer as the interpreted ones do."""
    assert _builds_current()
    probe = ("import json, grid_protocol as g, grid_protocol.codec as c, grid_protocol.ids as i, "
             "grid_protocol.topics as t, grid_protocol.messages as m; "
             "r = g.encode(g.ChargeRequest(requested_kw=22.0, ev_id='EV_1', request_id='r1', duration_minutes=60)); "
             "print(json.dumps([g.NATIVE.status, c.__file__, i.__file__, t.__file__, m.__file__, "
             "list(g.Topics().parse('grid/v1/ev/EV_1/request')), g.Topics().assignment('EV_1'), "
             "g.decode(r, g.ChargeRequest).ev_id, g.is_valid_id('a+b')]))")
    compiled = json.loads(_run(ROOT, ["-c", probe], "require").stdout)
    interpreted = json.loads(_run(ROOT, ["-c", probe], "off").stdout)
    status, codec, ids, topics, messages = compiled[:5]
    assert status == "compiled" and interpreted[0].startswith("interpreted")
    assert all(f.endswith(".so") and str(grid_protocol.NATIVE.location) in f for f in (codec, ids, topics))
    assert messages == str(ROOT / "grid_protocol" / "messages.py")
    assert compiled[5:] == interpreted[5:] == [["ev_request", "EV_1"], "grid/v1/ev/EV_1/assignment", "EV_1", False]


@pytest.mark.parametrize("mode", ["require", "off"])
def test_the_service_path_bench_runs_on_either_core(mode: str) -> None:
    """``python -m bench service-path`` measures the whole path on either core; the split that swaps the core's
    ``on_request`` (a compiled class's methods cannot be replaced) only on the interpreted one, and says so."""
    out = _run(ROOT, ["-m", "bench", "service-path", "--requests", "300", "--repeat", "1"], mode)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "service+core   CPU µs per request: best" in out.stdout
    if mode == "off":
        assert "service alone  CPU µs per request: best" in out.stdout
    else:
        assert "service alone: not measured on the compiled core" in out.stdout
