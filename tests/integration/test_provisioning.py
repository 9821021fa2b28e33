"""Accounts added and removed at runtime through Mosquitto's dynamic security plugin (broker/provisioning.py), against
a real broker: no restart, no signal, and the same guarantees as the accounts the broker started with.

The API's endpoints on top of this (drain, move sessions, forget) are tested end to end in test_api_accounts.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from probe import Probe

from broker.local import LocalBroker
from broker.provisioning import AccountExists, DynsecProvisioner
from broker.roles import role_acls
from grid_runtime.mqtt import make_transport
from grid_runtime.settings import MqttSettings

pytestmark = pytest.mark.integration

P = "grid/v1"
NOT_AUTHORIZED = 0x87


@asynccontextmanager
async def provisioner(broker: LocalBroker) -> AsyncIterator[DynsecProvisioner]:
    settings = MqttSettings(host=broker.host, port=broker.port, username="provisioner",
                            password=broker.password_for("provisioner"), session_expiry_s=0)
    transport = make_transport("aiomqtt", settings, client_id="provisioner", clean_start=True)
    prov = DynsecProvisioner(transport, P)
    task = asyncio.create_task(transport.run())
    try:
        await asyncio.wait_for(transport.connected.wait(), 10)
        yield prov
    finally:
        await transport.close()
        task.cancel()


def run(coro_fn: Callable[[DynsecProvisioner], Any], broker: LocalBroker) -> Any:
    async def main() -> Any:
        async with provisioner(broker) as prov:
            return await coro_fn(prov)

    return asyncio.run(main())


def refused(broker: LocalBroker, username: str, password: str) -> bool:
    peer = Probe(broker, username, password=password, connect=False)
    peer.client.reconnect_delay_set(60, 60)
    try:
        return peer.connect().is_failure
    finally:
        peer.close()


def test_a_substation_added_at_runtime_has_exactly_its_own_rights(broker: LocalBroker) -> None:
    creds = run(lambda prov: prov.add_substation("east"), broker)
    assert creds.username == "substation.east" and len(creds.password) >= 32
    assert creds.password not in repr(creds)
    # Its role, as the plugin now holds it, is the one broker/roles.py defines (as for the start-up accounts).
    saved = json.loads(broker.dynsec_file.read_text())
    role = next(r for r in saved["roles"] if r["rolename"] == "substation.east")
    assert {(a["acltype"], a["topic"]) for a in role["acls"]} == \
        {(a.acltype, a.topic) for a in role_acls(P, "substation.east")}

    with Probe(broker, "observer", f"{P}/#") as observer, \
            Probe(broker, "substation.east", password=creds.password) as east:
        assert [rc.value for rc in east.subscribe(f"{P}/substation/A/command", "#")] == [NOT_AUTHORIZED] * 2
        assert not any(rc.is_failure for rc in east.subscribe(f"{P}/substation/east/command"))
        for topic in (f"{P}/substation/A/telemetry", f"{P}/ev/EV_0001/request", f"{P}/balancer/control"):
            rc = east.try_publish(topic, b"fake")
            assert rc is not None and rc.value == NOT_AUTHORIZED, topic
        for kind in ("telemetry", "status", "session"):
            assert east.try_publish(f"{P}/substation/east/{kind}") == 0
        assert observer.wait_for_topic(f"{P}/substation/east/session")
        assert observer.topics() == [f"{P}/substation/east/{k}" for k in ("telemetry", "status", "session")]
    # Created once: a second add is refused and hands out nothing.
    with pytest.raises(AccountExists):
        run(lambda prov: prov.add_substation("east"), broker)
    assert not refused(broker, "substation.east", creds.password)


def test_removing_a_substation_disconnects_its_agent_and_leaves_nothing_retained(broker: LocalBroker) -> None:
    creds = run(lambda prov: prov.add_substation("east"), broker)
    agent = Probe(broker, "substation.east", password=creds.password, connect=False)
    agent.client.will_set(f"{P}/substation/east/status", b'{"state": "offline"}', 1, True)
    agent.client.reconnect_delay_set(60, 60)  # a reconnect (refused from now on) must not race the checks
    dropped: list[str] = []
    agent.client.on_disconnect = lambda _c, _u, _f, rc, _p: dropped.append(str(rc))
    agent.start()
    agent.publish(f"{P}/substation/east/status", b'{"state": "online"}', retain=True)
    with Probe(broker, "observer", f"{P}/substation/east/status") as observer:
        assert observer.wait_until(lambda: len(observer.messages) == 1)  # the retained "online"
        assert run(lambda prov: prov.remove_substation("east"), broker) is True
        # Disconnected at once (MQTT 5 DISCONNECT "Administrative action"); the status cleared after that.
        assert agent.wait_until(lambda: bool(dropped), 5) and dropped == ["Administrative action"]
        assert observer.wait_until(lambda: observer.messages[-1].payload == b"", 5)
        # (Mosquitto 2.0.11 sends no last will for a client it removes: nothing to clear but the "online".)
        assert [m.payload for m in observer.messages] == [b'{"state": "online"}', b""]
    agent.close()
    # Nothing retained for a later reader, and the account is gone.
    with Probe(broker, "observer", f"{P}/substation/east/status") as late:
        time.sleep(0.5)
        assert late.messages == []
    assert refused(broker, "substation.east", creds.password)
    saved = json.loads(broker.dynsec_file.read_text())
    assert not [c for c in saved["clients"] if c["username"] == "substation.east"]
    assert not [r for r in saved["roles"] if r["rolename"] == "substation.east"]
    # Removing again: there was nothing to remove.
    assert run(lambda prov: prov.remove_substation("east"), broker) is False


def test_an_ev_account_added_at_runtime_survives_a_broker_restart_and_is_confined_to_its_topics(
        broker: LocalBroker) -> None:
    creds = run(lambda prov: prov.add_ev("EV_9000"), broker)
    broker.restart()  # the plugin saved it in its state file
    with Probe(broker, "balancer", f"{P}/ev/+/request") as balancer, \
            Probe(broker, "EV_9000", password=creds.password) as ev:
        assert ev.subscribe(f"{P}/ev/EV_0001/assignment")[0].value == NOT_AUTHORIZED
        rc = ev.try_publish(f"{P}/ev/EV_0001/request")
        assert rc is not None and rc.value == NOT_AUTHORIZED
        assert ev.try_publish(f"{P}/ev/EV_9000/request") == 0
        assert balancer.wait_for_topic(f"{P}/ev/EV_9000/request")
        assert balancer.topics() == [f"{P}/ev/EV_9000/request"]
    # Accounts the broker started with are removable the same way.
    assert run(lambda prov: prov.remove_ev("EV_0001"), broker) is True
    assert refused(broker, "EV_0001", broker.password_for("EV_0001"))
    assert run(lambda prov: prov.remove_ev("EV_9000"), broker) is True
    assert refused(broker, "EV_9000", creds.password)


def test_names_that_would_widen_an_account_are_refused_before_anything_is_sent(broker: LocalBroker) -> None:
    async def attempts(prov: DynsecProvisioner) -> list[str]:
        errors = []
        for call in (lambda: prov.add_ev("balancer"), lambda: prov.add_ev("a/b"), lambda: prov.add_ev("EV+"),
                     lambda: prov.add_substation("A.B"), lambda: prov.add_substation("#")):
            try:
                await call()
            except ValueError as exc:
                errors.append(str(exc))
        return errors

    assert len(run(attempts, broker)) == 5
