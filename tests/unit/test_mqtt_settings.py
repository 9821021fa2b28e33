"""``MQTT_PROTOCOL`` and ``MQTT_HOSTS`` (grid_runtime.settings.MqttSettings): parsed once, refused when malformed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from grid_runtime.mqtt import AiomqttTransport, PahoTransport
from grid_runtime.settings import MqttSettings


def test_hosts_override_host_and_port_in_order() -> None:
    s = MqttSettings(host="h", port=1, hosts=" n1:4001, n2:4002,[::1]:4003 ")
    assert s.addresses() == [("n1", 4001), ("n2", 4002), ("::1", 4003)]
    assert MqttSettings(host="h", port=1).addresses() == [("h", 1)]


@pytest.mark.parametrize("bad", ["n1", "n1:", ":80", "n1:0", "n1:65536", "n1:x"])
def test_malformed_hosts_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="host:port"):
        MqttSettings(hosts=bad)


def test_protocol_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MqttSettings().mqtt5
    monkeypatch.setenv("MQTT_PROTOCOL", "3.1.1")
    monkeypatch.setenv("MQTT_HOSTS", "a:1,b:2")
    s = MqttSettings()
    assert not s.mqtt5 and s.addresses() == [("a", 1), ("b", 2)]
    monkeypatch.setenv("MQTT_PROTOCOL", "4")
    with pytest.raises(ValidationError):
        MqttSettings()


def test_both_transports_follow_the_protocol_setting() -> None:
    v311 = MqttSettings(protocol="3.1.1")
    assert not PahoTransport(v311, client_id="c").mqtt5 and not AiomqttTransport(v311).mqtt5
    assert PahoTransport(MqttSettings()).mqtt5 and AiomqttTransport(MqttSettings()).mqtt5
    assert not PahoTransport(MqttSettings(), client_id="c", mqtt5=False).mqtt5  # a pure reader may force 3.1.1
    with pytest.raises(ValueError, match="MQTT 5"):
        PahoTransport(v311, client_id="c").publish("t", b"x", correlation_data=b"c")
