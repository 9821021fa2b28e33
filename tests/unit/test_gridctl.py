"""``./gridctl``'s help, the first thing a new user runs: it succeeds under every spelling, names every command the
script knows, and an unknown command fails (the help goes to stderr). Nothing is installed to print it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

GRIDCTL = Path(__file__).resolve().parents[2] / "gridctl"


def _commands() -> set[str]:
    """The commands of the script's ``case "$cmd"`` (help and its spellings aside)."""
    body = GRIDCTL.read_text(encoding="utf-8").split('case "$cmd" in', 1)[1].split("\nesac", 1)[0]
    return set(re.findall(r"^  ([a-z]+)\)", body, re.M)) - {"help"}


@pytest.mark.parametrize("spelling", [[], ["help"], ["-h"], ["--help"]])
def test_help_succeeds_and_names_every_command(spelling: list[str]) -> None:
    run = subprocess.run([str(GRIDCTL), *spelling], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    named = set(re.findall(r"\./gridctl ([a-z]+)", run.stdout))
    assert named == _commands() and {"run", "test", "bench", "check", "setup"} <= named


def test_an_unknown_command_fails_with_the_help() -> None:
    run = subprocess.run([str(GRIDCTL), "bogus"], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 2 and "unknown command 'bogus'" in run.stderr and "./gridctl run" in run.stderr
