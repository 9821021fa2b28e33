"""A region service (issue 12) over the real BalancerService with an in-memory transport: it subscribes to, answers
on and commands only its own region's topics, refuses a status naming another region, and metrics say the region."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from balancer import metrics
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from tests.unit.test_balancer_metrics import T0, Clock
from tests.unit.test_substation_agent_unit import FakeTransport

EAST = "grid/v1/region/east"


def _service(region: str) -> tuple[BalancerService, FakeTransport]:
    transport = FakeTransport()
    service = BalancerService(BalancerSettings(startup_wait_s=0), transport, clock=Clock(),  # type: ignore[arg-type]
                              region=region)
    return service, transport


def _telemetry(transport: FakeTransport, root: str, sid: str) -> None:
    transport.deliver(f"{root}/substation/{sid}/telemetry", json.dumps({
        "substation_id": sid, "ts": T0, "seq": 1, "capacity_kw": 100, "load_kw": 10, "base_load_kw": 10,
        "ev_load_kw": 0, "active_sessions": 0}).encode())


def test_a_named_region_lives_under_its_topics_only() -> None:
    service, transport = _service("east")
    subscribed = list(transport.subs)
    assert subscribed and all(t.startswith(f"{EAST}/") for t in subscribed), subscribed
    _telemetry(transport, EAST, "A")
    _telemetry(transport, "grid/v1", "B")  # the default region's: not ours, ignored
    assert set(service.core.substations) == {"A"}
    transport.deliver(f"{EAST}/ev/EV_1/request", json.dumps(
        {"request_id": "r1", "requested_kw": 11, "duration_minutes": 60}).encode())
    transport.deliver("grid/v1/ev/EV_2/request", json.dumps(
        {"request_id": "r2", "requested_kw": 11, "duration_minutes": 60}).encode())
    service._flush_commands()
    sent = {p.topic for p in transport.sent}
    assert f"{EAST}/ev/EV_1/assignment" in sent and f"{EAST}/substation/A/command" in sent
    assert not any("EV_2" in t for t in sent) and all(t.startswith(f"{EAST}/") for t in sent), sent
    assert json.loads(next(p.payload for p in transport.sent if p.topic.endswith("EV_1/assignment")))[
        "status"] == "assigned"


def test_a_status_naming_another_region_is_refused_with_a_clear_error() -> None:
    service, transport = _service("east")
    transport.deliver(f"{EAST}/substation/A/status", json.dumps(
        {"state": "online", "substation_id": "A", "region": "west"}).encode())
    errors = [json.loads(p.payload) for p in transport.sent if p.topic == f"{EAST}/substation/A/error"]
    assert len(errors) == 1 and errors[0]["reason"] == "region_mismatch"
    assert "'west'" in errors[0]["detail"] and "'east'" in errors[0]["detail"]
    assert "A" not in service.core.substations
    # The default region's balancer refuses an agent that says east on today's topics too.
    _default, dtransport = _service("default")
    dtransport.deliver("grid/v1/substation/A/status", json.dumps(
        {"state": "online", "substation_id": "A", "region": "east"}).encode())
    assert [json.loads(p.payload)["reason"] for p in dtransport.sent if p.topic == "grid/v1/substation/A/error"] == [
        "region_mismatch"]
    # ... and accepts one that says its own region (or none: default).
    transport.deliver(f"{EAST}/substation/A/status", json.dumps(
        {"state": "online", "substation_id": "A", "region": "east"}).encode())
    assert service.core.substations["A"].region == "east"


def test_one_registry_for_several_regions_labels_every_sample() -> None:
    east, etransport = _service("east")
    default, dtransport = _service("default")
    registry = CollectorRegistry()
    metrics.register([default, east], registry)
    _telemetry(etransport, EAST, "A")
    _telemetry(dtransport, "grid/v1", "B")
    assert registry.get_sample_value("gridlb_substation_capacity_watts", {"substation": "A", "region": "east"}) \
        == 100_000
    assert registry.get_sample_value("gridlb_substation_capacity_watts", {"substation": "B", "region": "default"}) \
        == 100_000
    assert registry.get_sample_value("gridlb_queue_length", {"region": "east"}) == 0
    assert registry.get_sample_value("gridlb_mqtt_connected", {"client": "balancer-east"}) == 0
    assert registry.get_sample_value("gridlb_mqtt_connected", {"client": "balancer"}) == 0


def test_regions_setting_and_each_regions_session() -> None:
    settings = BalancerSettings(regions="default, east", mqtt={"username": "balancer", "password": "pw"})
    assert settings.regions == ("default", "east")
    assert settings.region_mqtt("default")[1] == "balancer"
    mqtt, client_id = settings.region_mqtt("east")
    assert client_id == mqtt.username == "balancer.east" and mqtt.password == "pw"
    assert BalancerSettings().region_mqtt("north")[1] == "balancer-north"
    for bad in ("", "a,a", "a/b", "x,+"):
        try:
            BalancerSettings(regions=bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
