"""``gridlb``: one argparse subcommand per service and tool, each handing the rest of the line to the same main as
``python -m <module>``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridlb.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
#: Runnable packages that are not a command: the CLI itself, and the benchmarks (``python -m bench``).
NOT_COMMANDS = {"gridlb", "bench"}


def test_every_runnable_service_has_a_command() -> None:
    runnable = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.glob("*/**/__main__.py")
                if ".venv" not in p.parts and "tests" not in p.parts}
    assert runnable - NOT_COMMANDS <= {c.module for c in COMMANDS}
    assert {"api", "monitoring.recorder", "replay"} <= {c.module for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_each_command_resolves_to_a_main(command: object) -> None:
    assert callable(command.main())  # type: ignore[attr-defined]


def test_the_rest_of_the_line_goes_to_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--list"]) == 0
    out = capsys.readouterr().out
    assert "scenarios:" in out and "steady_day" in out


def test_help_after_a_command_is_the_command_s_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--help"])
    assert exc.value.code == 0
    assert "usage: python -m replay" in capsys.readouterr().out


def test_an_unknown_or_missing_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["nope"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert all(c.name in build_parser().format_help() for c in COMMANDS)
