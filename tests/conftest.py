"""Shared pytest fixtures: a private Mosquitto per test (never the system broker on :1883).

Fixtures:

* ``mosquitto_bin`` (session): path of the ``mosquitto`` binary; fails (does not skip) when missing.
* ``broker``: a started :class:`broker.local.LocalBroker` in ``tmp_path`` on a free loopback port with
  substations ``A, B, C`` (users ``substation.A`` ...), EVs ``EV_0001`` .. ``EV_0200`` and ``EV_1234``,
  every service account (``balancer``, ``api``, ``observer``, ``loadtest``) and secret ``test-secret``.
  Passwords: ``broker.password_for(username)``.
* ``make_broker(**kwargs)``: factory for brokers with other accounts or options; same defaults as
  ``broker``, keyword arguments of :class:`LocalBroker` override them, ``start=False`` returns it
  unstarted. Every broker it made is stopped at teardown.
* ``stopper``: a list of things to stop at teardown, last first (even when the test failed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project is not necessarily installed in the venv
    sys.path.insert(0, str(ROOT))

from broker.accounts import SERVICE_ACCOUNTS  # noqa: E402
from broker.local import LocalBroker, find_mosquitto  # noqa: E402

TEST_SECRET = "test-secret"
TEST_SUBSTATIONS: tuple[str, ...] = ("A", "B", "C")
TEST_EVS: tuple[str, ...] = (*(f"EV_{i:04d}" for i in range(1, 201)), "EV_1234")

BrokerFactory = Callable[..., LocalBroker]


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the marker exists whatever config file is used.
    config.addinivalue_line("markers", "integration: talks to a real Mosquitto started by the test suite")


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """Path of the mosquitto binary. Missing Mosquitto is a failure, not a skip."""
    try:
        return find_mosquitto()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def make_broker(tmp_path: Path, mosquitto_bin: str) -> Iterator[BrokerFactory]:
    made: list[LocalBroker] = []

    def factory(*, start: bool = True, **kwargs: Any) -> LocalBroker:
        work_dir = kwargs.pop("work_dir", tmp_path / f"broker-{len(made)}")
        kwargs.setdefault("substation_ids", TEST_SUBSTATIONS)
        kwargs.setdefault("ev_ids", TEST_EVS)
        kwargs.setdefault("services", SERVICE_ACCOUNTS)
        kwargs.setdefault("secret", TEST_SECRET)
        kwargs.setdefault("mosquitto_bin", mosquitto_bin)
        instance = LocalBroker(work_dir, **kwargs)
        made.append(instance)
        if start:
            instance.start()
        return instance

    yield factory
    for instance in reversed(made):
        instance.stop()


@pytest.fixture
def stopper() -> Iterator[list[Callable[[], Any]]]:
    todo: list[Callable[[], Any]] = []
    yield todo
    for stop in reversed(todo):
        stop()


@pytest.fixture
def broker(make_broker: BrokerFactory) -> LocalBroker:
    """A started private Mosquitto with the standard test accounts (see module docstring)."""
    return make_broker()
