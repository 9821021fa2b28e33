"""balancer/operator_store.py, the file backend: what is saved is read back per region, replaced atomically, and a
damaged file is an error (never silently an empty set: that would undrain every substation)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from balancer.core import OperatorSettings
from balancer.operator_store import FileStore


def test_saved_settings_are_read_back_per_region(tmp_path: Path) -> None:
    path = tmp_path / "state" / "operator.json"
    north, south = FileStore(path, "north"), FileStore(path, "south")
    assert asyncio.run(north.load()) == {}
    done: list[bool] = []
    north.save({"A": OperatorSettings(draining=True), "B": OperatorSettings(capacity_limit_w=40_000)}, done.append)
    south.save({"C": OperatorSettings(draining=True, capacity_limit_w=1_000)})
    assert done == [True]
    assert asyncio.run(FileStore(path, "north").load()) == {"A": OperatorSettings(draining=True),
                                                            "B": OperatorSettings(capacity_limit_w=40_000)}
    assert asyncio.run(FileStore(path, "south").load()) == {"C": OperatorSettings(True, 1_000)}
    north.save({})
    assert asyncio.run(FileStore(path, "north").load()) == {}
    assert [p.name for p in path.parent.iterdir()] == ["operator.json"]  # no temporary file left behind


def test_a_damaged_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "operator.json"
    path.write_text('{"default": {"A": {"draining": "yes"}}}')
    with pytest.raises(msgspec.ValidationError):
        asyncio.run(FileStore(path, "default").load())


def test_a_failed_write_is_reported(tmp_path: Path) -> None:
    """(The control command is then answered as not stored.)"""
    (tmp_path / "not-a-dir").write_text("")
    done: list[bool] = []
    FileStore(tmp_path / "not-a-dir" / "operator.json", "default").save({"A": OperatorSettings(True)}, done.append)
    assert done == [False]
