"""The house's floors: a package imports only packages on a lower floor, and no two modules import each other
(directly or round a loop). Read from the code's own import statements (lazy ones inside functions included)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Floor of each top-level package (the ground floor is 0). Same floor: neither imports the other.
FLOORS: dict[str, int] = {
    "grid_runtime": 0,  # plumbing that knows no service and no message (its loader of compiled modules included)
    "grid_protocol": 1,  # the contract (its codec and topics compiled by that loader)
    "grid_sim": 2, "balancer": 2, "broker": 2,  # the simulated world, the balancer, the broker's accounts
    "replay": 3, "substation_agents": 3, "ev_clients": 3, "api": 3, "monitoring": 3,  # what stands on them
    "gridlb": 4, "bench": 4,  # what starts and measures everything
}


def _modules() -> Iterator[tuple[str, Path]]:
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


MODULES = dict(_modules())


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports (``from a.b import c`` names ``a.b.c`` when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        out |= {name for name in names if name in MODULES}
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_every_package_has_a_floor() -> None:
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "tests"}
    assert tops == set(FLOORS)


def test_imports_only_go_down() -> None:
    up = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                if (pa := a.split(".")[0]) != (pb := b.split(".")[0]) and FLOORS[pb] >= FLOORS[pa])
    assert up == []


def test_no_module_imports_round_a_circle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert circles == []


def test_every_package_is_installed() -> None:
    """``pip install .`` (the image) installs only the packages pyproject.toml lists: a new sub-package left out
    works from the checkout and fails in the container."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for package in FLOORS if package != "bench"
             for p in (ROOT / package).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


#: What the pure allocation core may import besides itself and the contract (grid_protocol): computation only. No
#: clock (time), no I/O (os, socket, logging, asyncio, ...), no randomness: time is passed in, effects handed out.
CORE_MAY_IMPORT = frozenset({"__future__", "bisect", "collections", "dataclasses", "datetime", "enum", "functools",
                             "heapq", "itertools", "math", "operator", "typing", "msgspec", "pydantic",
                             "sortedcontainers"})
#: Calls that read the clock, wherever the module came from (``datetime.now()`` needs no ``import time``).
CLOCK_CALLS = frozenset({"now", "utcnow", "today", "time", "monotonic", "perf_counter", "process_time"})


def test_the_core_is_pure() -> None:
    """balancer/core imports no I/O, clock or randomness and reads no clock (issue 10: the core stays pure)."""
    found: list[str] = []
    for name, path in MODULES.items():
        if not name.startswith("balancer.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops = [node.module.split(".")[0]]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in CLOCK_CALLS):
                found.append(f"{name}:{node.lineno} calls .{node.func.attr}()")
                continue
            else:
                continue
            found += [f"{name}:{node.lineno} imports {top}" for top in tops
                      if top not in CORE_MAY_IMPORT and top not in ("balancer", "grid_protocol")]
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [str(node.module)]
            found += [f"{name}:{node.lineno} imports {m} (outside the core)" for m in modules
                      if m.split(".")[0] == "balancer" and not m.startswith("balancer.core")]
    assert found == []


def test_readme_names_every_module_of_the_core() -> None:
    """The README's table of the core's layout ("module of `balancer/core/`") names every module there and in
    ``policies/``, and no module that is gone: the layout it shows is the one in the tree."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| module of `balancer/core/` |"):]
    table = table[:table.index("\n\n")]
    named = set(re.findall(r"`([a-z_]+\.py)`", table))
    core = ROOT / "balancer" / "core"
    present = {p.name for p in [*core.glob("*.py"), *(core / "policies").glob("*.py")] if p.name != "__init__.py"}
    assert named == present
