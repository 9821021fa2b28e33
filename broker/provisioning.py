"""Accounts added and removed while the grid runs: a small interface, and its Mosquitto implementation.

:class:`Provisioner` is what the operator endpoints of the API need (``POST``/``DELETE /substations``, ``/evs``):
create an account with its role and hand out its credentials once, revoke one (its connection is dropped at once)
and clear what it left retained. :class:`DynsecProvisioner` does it through Mosquitto's dynamic security plugin
(``$CONTROL/dynamic-security/v1``, commands from ``broker/dynsec.py``) as the ``provisioner`` account, over the
project's MQTT transport. A clustered broker with its own account system (issue 12: NATS accounts) gets another
implementation of the same five methods.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from broker import dynsec
from broker.accounts import EV_ROLE, SUBSTATION_ROLE, substation_username, validate_username
from broker.roles import DYNSEC_RESPONSE_TOPIC, DYNSEC_TOPIC
from grid_protocol.messages import DEFAULT_REGION
from grid_protocol.topics import Topics
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import InMessage, Transport

__all__ = [
    "AccountExists",
    "Credentials",
    "DynsecProvisioner",
    "Provisioner",
    "ProvisionerUnavailable",
    "ProvisioningError",
    "new_password",
]

log = get_logger("broker.provisioning")

#: Answers of the plugin that mean "already as wanted" for the command that got them.
_ROLE_MISSING = "Role not found"
_CLIENT_MISSING = "Client not found"


class ProvisioningError(Exception):
    """The broker refused or did not answer a provisioning command."""


class ProvisionerUnavailable(ProvisioningError):
    """Not connected to the broker (or it did not answer in time)."""


class AccountExists(ProvisioningError):
    """The account to create exists already (its credentials are not handed out again)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep passwords out of logs and tracebacks
        return f"Credentials(username={self.username!r}, password='***')"


def new_password() -> str:
    """A fresh account password: 192 random bits, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


class Provisioner(Protocol):
    """Broker accounts of substations and EVs, changed at runtime."""

    @property
    def connected(self) -> bool: ...

    async def add_substation(self, substation_id: str) -> Credentials:
        """Create ``substation.<id>`` with its role; :class:`AccountExists` when it exists."""
        ...

    async def remove_substation(self, substation_id: str, region: str = DEFAULT_REGION) -> bool:
        """Revoke ``substation.<id>`` (its agent is disconnected) and clear its retained status (under ``region``'s
        topics); False when there was no such account (the status is cleared all the same)."""
        ...

    async def add_ev(self, ev_id: str) -> Credentials: ...

    async def remove_ev(self, ev_id: str) -> bool: ...


class DynsecProvisioner:
    """:class:`Provisioner` over Mosquitto's dynamic security plugin.

    ``transport`` is a connection as the ``provisioner`` account (its role may publish commands and read the
    answers); the owner runs it (``transport.run()``). Commands carry correlation data, so answers are matched
    to them whatever else arrives; one change runs at a time (``add`` checks that the account is new first).
    """

    def __init__(self, transport: Transport, prefix: str, *, timeout_s: float = 5.0,
                 password: Callable[[], str] = new_password) -> None:
        self.transport = transport
        self.topics = Topics(prefix)
        self.timeout_s = timeout_s
        self._password = password
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._lock = asyncio.Lock()
        transport.set_handler(self._on_message)
        transport.subscribe(DYNSEC_RESPONSE_TOPIC, 1)

    @property
    def connected(self) -> bool:
        return self.transport.connected.is_set()

    # ------------------------------------------------------------------ plugin round trips
    def _on_message(self, msg: InMessage) -> None:
        if msg.topic != DYNSEC_RESPONSE_TOPIC:
            return
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("dynsec_response_unreadable", payload=msg.payload[:200].decode(errors="replace"))
            return
        for response in responses if isinstance(responses, list) else []:
            future = self._waiting.pop(str(response.get("correlationData")), None)
            if future is not None and not future.done():
                future.set_result(response)

    async def _send(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` in one message; their answers, in order (``error`` set where one failed)."""
        if not self.connected:
            raise ProvisionerUnavailable("not connected to the broker as the provisioner")
        loop = asyncio.get_running_loop()
        tag = uuid.uuid4().hex[:12]
        futures = []
        for i, command in enumerate(commands):
            key = f"{tag}-{i}"
            command["correlationData"] = key
            futures.append(self._waiting.setdefault(key, loop.create_future()))
        self.transport.publish(DYNSEC_TOPIC, json.dumps({"commands": commands}).encode(), 1)
        try:
            async with asyncio.timeout(self.timeout_s):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise ProvisionerUnavailable(f"the broker did not answer within {self.timeout_s:g} s") from None
        finally:
            for i in range(len(commands)):
                self._waiting.pop(f"{tag}-{i}", None)

    @staticmethod
    def _check(responses: list[dict[str, Any]], allowed: dict[str, str]) -> None:
        for response in responses:
            error = response.get("error")
            if error and allowed.get(response.get("command", "")) != error:
                raise ProvisioningError(f"{response.get('command')}: {error}")

    async def _add(self, username: str) -> Credentials:
        async with self._lock:
            (found,) = await self._send([{"command": "getClient", "username": username}])
            if not found.get("error"):
                raise AccountExists(f"account {username!r} exists already")
            password = self._password()
            prefix = self.topics.prefix
            self._check(await self._send(dynsec.add_account_commands(prefix, username, password)),
                        {"deleteRole": _ROLE_MISSING})
        log.info("account_added", username=username)
        return Credentials(username, password)

    async def _remove(self, username: str) -> bool:
        async with self._lock:
            responses = await self._send(dynsec.remove_account_commands(username))
        self._check(responses, {"deleteClient": _CLIENT_MISSING, "deleteRole": _ROLE_MISSING})
        existed = not responses[0].get("error")
        log.info("account_removed", username=username, existed=existed)
        return existed

    # ------------------------------------------------------------------ Provisioner
    async def add_substation(self, substation_id: str) -> Credentials:
        return await self._add(validate_username(substation_username(substation_id), SUBSTATION_ROLE))

    async def remove_substation(self, substation_id: str, region: str = DEFAULT_REGION) -> bool:
        existed = await self._remove(validate_username(substation_username(substation_id), SUBSTATION_ROLE))
        # The plugin has dropped the agent's connection (Mosquitto 2.0.11 sends no last will then): its retained
        # status is cleared (in its region), so no later reader learns of a substation that is gone.
        self.transport.publish(self.topics.for_region(region).substation_status(substation_id), b"", 1, retain=True)
        return existed

    async def add_ev(self, ev_id: str) -> Credentials:
        return await self._add(validate_username(ev_id, EV_ROLE))

    async def remove_ev(self, ev_id: str) -> bool:
        return await self._remove(validate_username(ev_id, EV_ROLE))
