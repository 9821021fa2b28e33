"""Pure packages compiled to C with mypyc, loaded only while the build matches the sources it was built from.

mypyc (the compiler the mypy project ships and compiles mypy itself with) turns type-checked Python into C
extension modules with the same behaviour: on the balancer's allocation core it halves the CPU per decision
(docs/performance.md, session I). The sources stay the truth: a build lives apart from them, under
``.build/native/`` beside the packages, with a stamp naming the sources' digest and the interpreter it was built
for. A process mounts the build (puts its directory ahead of the sources on the packages' ``__path__``) only when
the stamp matches the sources as they are now, so an edited module is never shadowed by an old build: it runs
interpreted until the next ``python -m grid_runtime.native build <package>`` (``./gridctl setup`` runs it).

``GRID_NATIVE``: ``auto`` (default) mounts a current build and runs interpreted without one; ``off`` never mounts;
``require`` refuses to import without a current build (a deployment that must not run slower by accident).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

__all__ = ["ENV", "MODES", "NativeBuild", "force_mode"]

#: The environment variable that chooses whether a build is used, and its values (the first is the default).
ENV = "GRID_NATIVE"
MODES = ("auto", "off", "require")
_forced: str | None = None
#: The project's mypy configuration as the build reads it (a copy of pyproject.toml, see NativeBuild._compile).
_MYPY_CONFIG = "native-mypy.toml"


def force_mode(mode: str | None) -> None:
    """Override ``GRID_NATIVE`` for this process only, before the package is imported (the test suite runs the
    core interpreted in-process: some tests instrument its methods, which compiled classes do not allow; the
    services it starts inherit the environment, not this)."""
    global _forced
    if mode is not None and mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, not {mode!r}")
    _forced = mode


def _mode() -> str:
    mode = _forced or os.environ.get(ENV, MODES[0]).strip().lower() or MODES[0]
    if mode not in MODES:
        raise ImportError(f"{ENV}={mode!r}: must be one of {', '.join(MODES)}")
    return mode


@dataclass
class NativeBuild:
    """What of one top-level package is compiled, and where its build lives.

    ``packages``: dotted names of packages whose modules are compiled (each directory's own modules, not its
    subpackages); ``modules``: single modules compiled besides; ``interpreted``: modules of those packages left to
    the interpreter (mypyc cannot compile them, e.g. a pydantic model). Package ``__init__`` modules are never
    compiled (they are what mounts the build). ``depends``: other top-level packages the compiled code was
    type-checked against (mypyc compiles their annotations into checks at the boundary, so a change there makes
    the build stale too)."""

    top: ModuleType
    packages: tuple[str, ...]
    modules: tuple[str, ...] = ()
    interpreted: tuple[str, ...] = ()
    depends: tuple[str, ...] = ()
    #: "compiled", or why not: filled by :meth:`mount`
    status: str = field(default="not mounted", init=False)

    @property
    def root(self) -> Path:
        """The directory that holds the top-level package (the import root of the sources)."""
        return Path(self.top.__file__ or "").resolve().parents[1]

    @property
    def location(self) -> Path:
        return self.root / ".build" / "native" / self.top.__name__

    def _path(self, dotted: str) -> Path:
        return self.root.joinpath(*dotted.split("."))

    def sources(self) -> list[Path]:
        """What the build is made from: every module of the top-level package (the compiled ones, and those they
        were type-checked against) and of the packages it depends on, in a stable order."""
        return sorted(p for top in (self.top.__name__, *self.depends) for p in self._path(top).rglob("*.py"))

    def compiled(self) -> list[Path]:
        skip = {self._path(m).with_suffix(".py") for m in self.interpreted}
        listed = [p for package in self.packages for p in self._path(package).glob("*.py")]
        listed += [self._path(m).with_suffix(".py") for m in self.modules]
        return sorted(p for p in listed if p.name != "__init__.py" and p not in skip)

    def stamp(self, copy: Path | None = None) -> str:
        """What a build must have been made from to be used now: the sources' digest (with the mypy configuration and
        this module, the recipe) and this interpreter (``copy``: of the copy of the sources under that directory, as
        the build compiles them)."""
        digest = hashlib.sha256()
        for path in self.sources():
            relative = path.relative_to(self.root)
            data = (copy / relative if copy is not None else path).read_bytes()
            digest.update(relative.as_posix().encode() + b"\0" + data + b"\0")
        config = copy / _MYPY_CONFIG if copy is not None else self.root / "pyproject.toml"
        digest.update(b"mypy config\0" + (config.read_bytes() if config.exists() else b""))
        digest.update(b"recipe\0" + Path(__file__).read_bytes())  # (this file: how a build is compiled and mounted)
        return json.dumps({"sources": digest.hexdigest(), "python": sys.implementation.cache_tag,
                           "platform": sysconfig.get_platform()}, sort_keys=True)

    def current(self) -> bool:
        stamp = self.location / "stamp.json"
        try:
            return stamp.read_text(encoding="utf-8") == self.stamp()
        except OSError:
            return False

    # --- loading ----------------------------------------------------------------------------------------------
    def mount(self) -> str:
        """Put a current build ahead of the sources (before any of the packages is imported); returns and keeps
        :attr:`status`."""
        mode = _mode()
        if mode == "off":
            self.status = f"interpreted ({ENV}=off)"
        elif not (self.location / "stamp.json").exists():
            self.status = "interpreted (no build: python -m grid_runtime.native build " + self.top.__name__ + ")"
        elif not self.current():
            self.status = "interpreted (the build is older than the sources: rebuild it)"
        else:
            location = str(self.location)
            if location not in sys.path:
                sys.path.append(location)  # (mypyc's shared library of the group lives at the build's root)
            sys.meta_path.insert(0, _Ahead(set(self.packages) - {self.top.__name__}, self.location))
            if self.modules or self.top.__name__ in self.packages:  # (the top package is being imported: no spec)
                self.top.__path__.insert(0, str(self.location / self.top.__name__))
            self.status = "compiled"
        if mode == "require" and self.status != "compiled":
            raise ImportError(f"{ENV}=require but {self.top.__name__} is {self.status}")
        return self.status

    # --- building ---------------------------------------------------------------------------------------------
    def build(self, *, force: bool = False) -> bool:
        """Compile the packages into :attr:`location`. Returns False when the build was current already (and not
        ``force``). One build at a time (a lock beside it); each in a directory of its own, stamped with the
        sources it copied and compiled (an edit meanwhile makes it stale at once), moved into place whole: a reader
        finds the old build, none, or the new one, never part of one."""
        parent, name = self.location.parent, self.location.name
        parent.mkdir(parents=True, exist_ok=True)
        with open(parent / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.current() and not force:
                return False
            work = Path(tempfile.mkdtemp(dir=parent, prefix=f"{name}.tmp."))
            try:
                self._compile(work)
                old = parent / f"{name}.old.{os.getpid()}"
                if self.location.exists():
                    (self.location / "stamp.json").unlink(missing_ok=True)  # (no process mounts it from now on)
                    self.location.rename(old)
                work.rename(self.location)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return True

    def _compile(self, work: Path) -> None:
        # The sources (and the packages they were type-checked against) are copied to a directory of their own:
        # setuptools reads a pyproject.toml in the directory it runs in, the extensions are written next to the
        # modules they are built from, and the stamp is of exactly what was compiled. mypy reads the project's
        # configuration (its pydantic plugin types the settings models) from a copy under another name (as
        # pyproject.toml, setuptools would read it too), stamped with the sources.
        for path in self.sources():
            target = work / path.relative_to(self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        config = self.root / "pyproject.toml"
        (work / _MYPY_CONFIG).write_bytes(config.read_bytes() if config.exists() else b"")
        stamp = self.stamp(work)
        files = [str(p.relative_to(self.root)) for p in self.compiled()]
        script = ("import sys\nfrom mypyc.build import mypycify\nfrom setuptools import setup\n"
                  f"setup(name='native', ext_modules=mypycify(['--config-file={_MYPY_CONFIG}', "
                  "'--ignore-missing-imports', *sys.argv[1:]], opt_level='3'), "
                  "script_args=['build_ext', '--inplace'])\n")
        env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
        done = subprocess.run([sys.executable, "-c", script, *files], cwd=work, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mypyc build of {self.top.__name__} failed:\n{done.stdout[-4000:]}")
        # Keep only the extensions: a module left uncompiled is found in the sources (next on ``__path__``).
        for path in sorted(work.rglob("*"), reverse=True):
            if path.is_dir():
                if path.name in ("build", ".mypy_cache") or not any(path.iterdir()):
                    shutil.rmtree(path)
            elif not path.name.endswith(".so") and not path.name.endswith(".pyd"):
                path.unlink()
        (work / "stamp.json").write_text(stamp, encoding="utf-8")


class _Ahead(importlib.abc.MetaPathFinder):
    """Finds the mounted packages as the path finder does, with the build's directory first on their
    ``__path__``: their compiled modules come from the build, the rest (``__init__``, the interpreted ones) from
    the sources."""

    def __init__(self, packages: set[str], location: Path) -> None:
        self.packages = packages
        self.location = location

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.packages:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations is not None:
            spec.submodule_search_locations.insert(0, str(self.location.joinpath(*fullname.split("."))))
        return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grid_runtime.native", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("build", "status"))
    p.add_argument("package", help="a top-level package that declares NATIVE (a NativeBuild), e.g. balancer")
    p.add_argument("--force", action="store_true", help="build even when the build is current")
    args = p.parse_args(argv)
    # The package's own import must not mount the build this may replace (``python -m`` runs this file as
    # ``__main__``: the package imports another copy of this module, whose switch is the one it reads).
    importlib.import_module(__spec__.name if __spec__ else "grid_runtime.native").force_mode("off")
    build: NativeBuild = importlib.import_module(args.package).NATIVE
    if args.action == "status":
        current = build.current()
        print("current" if current else "missing or stale", build.location)
        return 0 if current else 1
    t = time.monotonic()
    built = build.build(force=args.force)
    print(f"{args.package}: {'built' if built else 'current'} ({build.location}, {time.monotonic() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
