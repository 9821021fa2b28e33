"""broker.accounts and broker.local.render_config without a broker."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import pytest

from broker import accounts
from broker.accounts import (
    SERVICE_ACCOUNTS,
    Account,
    build_accounts,
    derive_password,
    hash_password,
    render_acl,
    substation_username,
    validate_username,
    verify_password,
    write_acl,
    write_password_file,
)
from broker.local import find_free_port, render_config

# Written by mosquitto_passwd 2.0.11 for password "secret".
MOSQUITTO_PASSWD_HASH = (
    "$7$101$0cznPwzGF5FeSIT8$Yrmhc0obvJSdWhDYxK3GTqZDmY4qNT0mLyUZpNkwqIm/YXCUjj9cbgzzMuo2/35xHF27chPyd0/2xFTAOnGz3A=="
)


# --- hash_password --------------------------------------------------------------------------------


def test_hash_password_format() -> None:
    hashed = hash_password("pw")
    match = re.fullmatch(r"\$7\$101\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)", hashed)
    assert match, hashed
    assert len(base64.b64decode(match.group(1))) == 12
    assert len(base64.b64decode(match.group(2))) == 64  # SHA-512 digest


def test_hash_password_reproduces_mosquitto_passwd() -> None:
    salt = base64.b64decode(MOSQUITTO_PASSWD_HASH.split("$")[3])
    assert hash_password("secret", salt) == MOSQUITTO_PASSWD_HASH
    assert verify_password("secret", MOSQUITTO_PASSWD_HASH)
    assert not verify_password("Secret", MOSQUITTO_PASSWD_HASH)


def test_hash_password_random_salt_and_verify() -> None:
    first, second = hash_password("pw"), hash_password("pw")
    assert first != second
    assert verify_password("pw", first) and verify_password("pw", second)
    assert not verify_password("pw2", first)
    with pytest.raises(ValueError):
        verify_password("pw", "$6$plain-crypt")


def test_hashing_hundreds_of_accounts_is_fast() -> None:
    import time

    t0 = time.perf_counter()
    for i in range(500):
        hash_password(f"password-{i}")
    assert time.perf_counter() - t0 < 2.0  # ~0.1 ms each; mosquitto_passwd would be a process each


# --- derive_password ------------------------------------------------------------------------------


def test_derive_password_is_deterministic_and_distinct() -> None:
    pw = derive_password("test-secret", "EV_0001")
    assert pw == derive_password("test-secret", "EV_0001")
    assert re.fullmatch(r"[0-9a-f]{32}", pw)
    assert pw != derive_password("test-secret", "EV_0002")
    assert pw != derive_password("other-secret", "EV_0001")
    with pytest.raises(ValueError):
        derive_password("", "EV_0001")


def test_derive_password_known_value() -> None:
    import hashlib
    import hmac

    expected = hmac.new(b"s", b"balancer", hashlib.sha256).hexdigest()[:32]
    assert derive_password("s", "balancer") == expected


# --- usernames ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "EV+", "EV#1", "EV\x001", "EV 1", "EV\t1", "EV\n", "x" * 65, "EV.1", "EVé", "balancer", "api",
     "observer", "loadtest"],
)
def test_validate_username_rejects_bad_ev_names(name: str) -> None:
    with pytest.raises(ValueError):
        validate_username(name, "ev")


@pytest.mark.parametrize("name", ["EV_0001", "ev-1", "A", "x" * 64, "substation"])
def test_validate_username_accepts_ev_ids(name: str) -> None:
    assert validate_username(name, "ev") == name


@pytest.mark.parametrize(
    "name", ["A", "substation.", "substation.A/B", "substation.A.B", "substation.+", "Substation.A",
             "substation." + "x" * 65, "substation.A B"],
)
def test_validate_username_rejects_bad_substation_names(name: str) -> None:
    with pytest.raises(ValueError):
        validate_username(name, "substation")


def test_substation_usernames() -> None:
    assert substation_username("A") == "substation.A"
    assert validate_username("substation.North-1", "substation") == "substation.North-1"
    for bad in ("", "A/B", "A.B", "A+", "#", "A B"):
        with pytest.raises(ValueError):
            substation_username(bad)


def test_validate_username_services() -> None:
    for name in SERVICE_ACCOUNTS:
        assert validate_username(name, "service") == name
    with pytest.raises(ValueError):
        validate_username("admin", "service")
    with pytest.raises(ValueError):
        validate_username("EV_0001", "robot")  # type: ignore[arg-type]


# --- accounts and files ---------------------------------------------------------------------------


def test_build_accounts() -> None:
    built = build_accounts("s", ["A", "B"], ["EV_0001"], {"balancer": "pw-b", "observer": "pw-o"})
    by_name = {a.username: a.password for a in built}
    assert by_name == {
        "balancer": "pw-b",
        "observer": "pw-o",
        "substation.A": derive_password("s", "substation.A"),
        "substation.B": derive_password("s", "substation.B"),
        "EV_0001": derive_password("s", "EV_0001"),
    }
    assert "loadtest" not in by_name  # only the services that are asked for
    assert "pw-b" not in repr(built)


@pytest.mark.parametrize(
    ("subs", "evs", "services"),
    [
        (["A"], ["EV_1", "EV_1"], {}),  # duplicate EV
        (["A", "A"], [], {}),  # duplicate substation
        ([], ["balancer"], {}),  # EV with a service name
        ([], [], {"balancer": ""}),  # empty password
        ([], [], {"root": "x"}),  # unknown service
        (["A/B"], [], {}),
    ],
)
def test_build_accounts_rejects(subs: list[str], evs: list[str], services: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        build_accounts("s", subs, evs, services)


def test_write_password_file(tmp_path: Path) -> None:
    path = write_password_file(tmp_path / "sub" / "passwd", [Account("EV_0001", "a"), Account("balancer", "b")])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["EV_0001", "balancer"]
    assert verify_password("a", lines[0].split(":", 1)[1])
    assert verify_password("b", lines[1].split(":", 1)[1])
    # Rewriting keeps the mode even if it was loosened.
    path.chmod(0o644)
    write_password_file(path, [Account("EV_0001", "c")])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- ACL ------------------------------------------------------------------------------------------


def _rules(acl: str) -> list[str]:
    return [line.strip() for line in acl.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_render_acl_contents() -> None:
    rules = _rules(render_acl("grid/v1", ["A", "B"]))
    p = "grid/v1"
    for expected in (
        f"pattern write {p}/ev/%u/request",
        f"pattern write {p}/ev/%u/release",
        f"pattern read {p}/ev/%u/assignment",
        f"pattern read {p}/reply/%u/#",
    ):
        assert expected in rules

    def block(user: str) -> list[str]:
        start = rules.index(f"user {user}")
        end = next((i for i in range(start + 1, len(rules)) if rules[i].startswith(("user ", "pattern "))),
                   len(rules))
        return rules[start + 1 : end]

    assert set(block("balancer")) == {
        f"topic deny {p}/ev/balancer/#",
        f"topic read {p}/ev/+/request", f"topic read {p}/ev/+/release",
        f"topic read {p}/substation/+/telemetry", f"topic read {p}/substation/+/status",
        f"topic read {p}/substation/+/session",
        f"topic write {p}/ev/+/assignment", f"topic write {p}/substation/+/command",
        f"topic write {p}/ev/+/request", f"topic write {p}/ev/+/release",  # (only to clear retained ones)
        f"topic write {p}/substation/+/error", f"topic write {p}/substation/+/state",
        f"topic write {p}/reply/#",
        f"topic readwrite {p}/balancer/#",
    }
    assert set(block("api")) == {
        f"topic deny {p}/ev/api/#", f"topic read {p}/#", f"topic write {p}/ev/+/request",
        f"topic write {p}/ev/+/release", f"topic write {p}/balancer/control",
    }
    assert set(block("observer")) == {f"topic deny {p}/ev/observer/#", f"topic read {p}/#"}
    assert set(block("loadtest")) == {
        f"topic deny {p}/ev/loadtest/#", f"topic readwrite {p}/ev/#",
        f"topic write {p}/substation/+/telemetry", f"topic write {p}/substation/+/status",
        f"topic write {p}/substation/+/session", f"topic read {p}/substation/+/command",
    }
    assert set(block("substation.A")) == {
        f"topic deny {p}/ev/substation.A/#",
        f"topic write {p}/substation/A/telemetry", f"topic write {p}/substation/A/status",
        f"topic write {p}/substation/A/session", f"topic read {p}/substation/A/command",
        f"topic read {p}/substation/A/error",
    }
    assert f"topic write {p}/substation/B/telemetry" in block("substation.B")
    # Substation rights are never granted by pattern (an EV account would match it).
    assert not any(r.startswith("pattern") and "/substation/" in r for r in rules)
    # Every rule stays below the prefix.
    assert all(r.split()[-1].startswith(f"{p}/") for r in rules if r.startswith(("topic", "pattern")))


def test_render_acl_prefix_and_no_substations() -> None:
    acl = render_acl("/site-7/grid/", [])
    assert "pattern write site-7/grid/ev/%u/request" in acl
    assert "user substation." not in acl
    assert "grid/v1" not in acl


@pytest.mark.parametrize("prefix", ["", "grid/+", "grid/#", "grid v1", "grid/%u", "a\x00"])
def test_render_acl_rejects_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        render_acl(prefix, ["A"])


def test_render_acl_rejects_bad_substation_ids() -> None:
    with pytest.raises(ValueError):
        render_acl("grid/v1", ["A", "A"])
    with pytest.raises(ValueError):
        render_acl("grid/v1", ["A/B"])


def test_write_acl_mode(tmp_path: Path) -> None:
    path = write_acl(tmp_path / "acl", "grid/v1", ["A"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == render_acl("grid/v1", ["A"])


# --- render_config --------------------------------------------------------------------------------


def _conf(**overrides: object) -> str:
    kwargs: dict[str, object] = {
        "port": 18830, "data_dir": "/w/data", "passwd_file": "/w/passwd", "acl_file": "/w/acl",
        "log_file": "/w/mosquitto.log",
    }
    kwargs.update(overrides)
    return render_config(**kwargs)  # type: ignore[arg-type]


def test_render_config_contents() -> None:
    rules = _rules(_conf(run_user="alice"))
    for expected in (
        "user alice",
        "listener 18830 127.0.0.1",
        "set_tcp_nodelay true",
        "allow_anonymous false",
        "password_file /w/passwd",
        "acl_file /w/acl",
        "use_username_as_clientid true",
        "persistence true",
        "persistence_location /w/data/",
        "autosave_interval 60",
        "max_queued_messages 200000",
        "max_inflight_messages 100",
        "message_size_limit 65536",
        "max_keepalive 300",
        "persistent_client_expiration 1d",
        "connection_messages true",
        "log_dest file /w/mosquitto.log",
        "log_timestamp true",
    ):
        assert expected in rules, expected
    assert not any("$" in r for r in rules)  # every placeholder substituted
    assert not any(r.startswith(("cafile", "certfile", "keyfile")) for r in rules)
    assert sum(r.startswith("listener ") for r in rules) == 1


def test_render_config_defaults_to_current_user() -> None:
    import getpass

    assert f"user {getpass.getuser()}" in _rules(_conf())


def test_render_config_trailing_slash_kept() -> None:
    assert "persistence_location /w/data/" in _rules(_conf(data_dir="/w/data/"))


def test_render_config_tls() -> None:
    rules = _rules(_conf(tls_dir="/certs", tls_port=18831, bind_address="0.0.0.0"))
    assert "listener 18830 0.0.0.0" in rules
    i = rules.index("listener 18831 0.0.0.0")
    assert rules[i + 1 : i + 5] == [
        "cafile /certs/ca.crt", "certfile /certs/server.crt", "keyfile /certs/server.key", "require_certificate false",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": 0},
        {"port": 70000},
        {"data_dir": "/w/my data"},
        {"log_file": "/w/log\nallow_anonymous true"},
        {"tls_dir": "/certs"},  # without tls_port
        {"tls_port": 18831},  # without tls_dir
        {"tls_dir": "/certs", "tls_port": 18830},  # same port as the plain listener
    ],
)
def test_render_config_rejects(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _conf(**overrides)


def test_find_free_port() -> None:
    port = find_free_port()
    assert 1024 <= port <= 65535


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_writes_files_without_printing_passwords(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = accounts.main(["--out", str(tmp_path), "--substations", "A,B", "--ev-count", "3", "--secret", "s",
                        "--service", "balancer=topsecret", "--service", "observer"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "topsecret" not in out and derive_password("s", "EV_0001") not in out
    users = [line.split(":", 1)[0] for line in (tmp_path / "passwd").read_text().splitlines()]
    assert users == ["balancer", "observer", "substation.A", "substation.B", "EV_0001", "EV_0002", "EV_0003"]
    assert (tmp_path / "acl").read_text() == render_acl("grid/v1", ["A", "B"])

    rc = accounts.main(["--out", str(tmp_path), "--evs", "EV_9", "--secret", "s", "--show-passwords"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"EV_9 {derive_password('s', 'EV_9')}" in out
    assert f"balancer {derive_password('s', 'balancer')}" in out  # default services, derived


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MQTT_ACCOUNT_SECRET", raising=False)
    assert accounts.main(["--out", str(tmp_path), "--evs", "EV_1"]) == 2  # no secret
    assert accounts.main(["--out", str(tmp_path), "--evs", "a/b", "--secret", "s"]) == 2
    assert "error:" in capsys.readouterr().err
    monkeypatch.setenv("MQTT_ACCOUNT_SECRET", "from-env")
    assert accounts.main(["--out", str(tmp_path), "--evs", "EV_1", "--show-passwords"]) == 0
    assert derive_password("from-env", "EV_1") in capsys.readouterr().out


def test_api_replica_accounts_get_their_own_copy_of_the_api_block() -> None:
    from broker.accounts import is_api_replica, render_acl, validate_username
    acl = render_acl("grid/v1", ["A"], ["api.2", "api.eu-west"])
    for user in ("api", "api.2", "api.eu-west"):
        block = acl.split(f"\nuser {user}\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert block == [f"topic deny grid/v1/ev/{user}/#", "topic read grid/v1/#", "topic write grid/v1/ev/+/request",
                         "topic write grid/v1/ev/+/release", "topic write grid/v1/balancer/control"]
    assert render_acl("grid/v1", ["A"]).count("\nuser api") == 1
    assert validate_username("api.2", "service") == "api.2" and is_api_replica("api.2")
    assert not is_api_replica("api-2")  # a valid EV id: never a replica
    for bad in ("api.", "api.a/b", "api.+", "apix.2"):
        with pytest.raises(ValueError):
            validate_username(bad, "service")
    with pytest.raises(ValueError):
        render_acl("grid/v1", ["A"], ["observer"])
