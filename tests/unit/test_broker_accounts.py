"""broker.accounts, broker.roles, broker.dynsec and broker.local.render_config without a broker."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path

import pytest

from broker import dynsec
from broker.accounts import (
    SERVICE_ACCOUNTS,
    balancer_username,
    build_accounts,
    substation_username,
    validate_username,
)
from broker.accounts import cli as accounts_cli
from broker.local import find_free_port, render_config
from broker.roles import DYNSEC_TOPIC, RECEIVE, SEND, SUBSCRIBE, is_own_role, role_acls, role_of
from grid_runtime.credentials import derive_password

# Written by `mosquitto_ctrl dynsec init FILE admin secret` (2.0.11).
CTRL_CLIENT = {"password": "QwVPaWz79PW2EBMetwtHi5F+dDAWYJQZhAR37ja25nM1cv9rM75awoCrCmCkCR9uLSAwprFwQ9SDqHLW/MFR0g==",
               "salt": "tLvKrWh8UjCdxq8u", "iterations": 101}


# --- password hashes ------------------------------------------------------------------------------


def test_hash_fields_format_and_verify() -> None:
    fields = dynsec.hash_fields("pw")
    assert fields["iterations"] == 101
    assert len(base64.b64decode(fields["salt"])) == 12
    assert len(base64.b64decode(fields["password"])) == 64  # SHA-512 digest
    assert dynsec.verify_fields("pw", fields) and not dynsec.verify_fields("pw2", fields)
    assert dynsec.hash_fields("pw") != fields  # random salt


def test_hash_fields_reproduce_mosquitto_ctrl() -> None:
    salt = base64.b64decode(CTRL_CLIENT["salt"])
    assert dynsec.hash_fields("secret", salt) == CTRL_CLIENT
    assert dynsec.verify_fields("secret", CTRL_CLIENT)
    assert not dynsec.verify_fields("Secret", CTRL_CLIENT)


def test_hashing_hundreds_of_accounts_is_fast() -> None:
    import time

    t0 = time.perf_counter()
    for i in range(500):
        dynsec.hash_fields(f"password-{i}")
    assert time.perf_counter() - t0 < 2.0  # ~0.1 ms each


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


# --- roles ----------------------------------------------------------------------------------------


def _grants(rolename: str, prefix: str = "grid/v1") -> dict[str, set[str]]:
    out: dict[str, set[str]] = {SEND: set(), SUBSCRIBE: set(), RECEIVE: set()}
    for acl in role_acls(prefix, rolename):
        if acl.allow:
            out[acl.acltype].add(acl.topic)
    assert out[SUBSCRIBE] == out[RECEIVE], f"{rolename}: every read grants the subscription and the delivery"
    return out


def test_roles_of_accounts() -> None:
    assert [role_of(u) for u in ("balancer", "api", "api.2", "observer", "recorder", "healthcheck", "loadtest",
                                 "provisioner", "substation.A", "EV_0001", "A")] == [
        "balancer", "api", "api", "reader", "reader", "healthcheck", "loadtest", "provisioner", "substation.A",
        "ev.EV_0001", "ev.A"]


def test_role_grants() -> None:
    p = "grid/v1"
    assert _grants("balancer") == {
        SEND: {f"{p}/ev/+/assignment", f"{p}/substation/+/command", f"{p}/substation/+/error",
               f"{p}/substation/+/state", f"{p}/substation/+/schedule", f"{p}/reply/#", f"{p}/balancer/#",
               # (only to clear retained requests, releases and limit schedules)
               f"{p}/ev/+/request", f"{p}/ev/+/release", f"{p}/substation/+/limits"},
        SUBSCRIBE: {f"{p}/ev/+/request", f"{p}/ev/+/release", f"{p}/substation/+/telemetry",
                    f"{p}/substation/+/status", f"{p}/substation/+/session", f"{p}/substation/+/limits",
                    f"{p}/substation/+/schedule", f"{p}/balancer/#"},
        RECEIVE: {f"{p}/ev/+/request", f"{p}/ev/+/release", f"{p}/substation/+/telemetry",
                  f"{p}/substation/+/status", f"{p}/substation/+/session", f"{p}/substation/+/limits",
                  f"{p}/substation/+/schedule", f"{p}/balancer/#"}}
    denied = [a for a in role_acls(p, "balancer") if not a.allow]
    assert [(a.acltype, a.topic, a.priority) for a in denied] == [(SEND, f"{p}/ev/balancer/#", 1)]
    assert all(a.allow for role in ("api", "reader", "substation.A", "ev.EV_1") for a in role_acls(p, role))
    def everywhere(*tails: str) -> set[str]:  # in the default region and in every other (issue 12)
        return {f"{p}/{t}" for t in tails} | {f"{p}/region/+/{t}" for t in tails}

    api = _grants("api")
    assert api[SEND] == everywhere("ev/+/request", "ev/+/release", "balancer/control", "substation/+/limits")
    assert api[SUBSCRIBE] == {f"{p}/#"}
    assert _grants("reader") == {SEND: set(), SUBSCRIBE: {f"{p}/#"}, RECEIVE: {f"{p}/#"}}
    assert _grants("healthcheck") == {SEND: set(), SUBSCRIBE: set(), RECEIVE: set()}
    assert _grants("substation.A") == {
        SEND: everywhere("substation/A/telemetry", "substation/A/status", "substation/A/session"),
        SUBSCRIBE: everywhere("substation/A/command", "substation/A/error", "balancer/status"),
        RECEIVE: everywhere("substation/A/command", "substation/A/error", "balancer/status")}
    assert _grants("ev.EV_1") == {
        SEND: everywhere("ev/EV_1/request", "ev/EV_1/release"),
        SUBSCRIBE: everywhere("ev/EV_1/assignment", "balancer/status") | {f"{p}/reply/EV_1/#"},
        RECEIVE: everywhere("ev/EV_1/assignment", "balancer/status") | {f"{p}/reply/EV_1/#"}}
    prov = _grants("provisioner")
    assert prov[SEND] == {DYNSEC_TOPIC, *everywhere("substation/+/status")}
    assert prov[SUBSCRIBE] == {DYNSEC_TOPIC + "/response"}
    # Everything but the plugin's control topic stays below the prefix.
    for role in ("balancer", "api", "reader", "loadtest", "substation.A", "ev.EV_1"):
        assert all(acl.topic.startswith(f"{p}/") for acl in role_acls(p, role)), role


def test_a_regions_balancer_role_grants_only_its_regions_topics() -> None:
    p, east = "grid/v1", "grid/v1/region/east"
    assert role_of("balancer.east") == "balancer.east" and is_own_role("balancer.east")
    grants = _grants("balancer.east")
    default = _grants("balancer")

    def moved(topics: set[str]) -> set[str]:
        return {t if t == f"{p}/reply/#" else t.replace(f"{p}/", f"{east}/", 1) for t in topics}

    assert grants == {kind: moved(topics) for kind, topics in default.items()}
    assert f"{p}/reply/#" in grants[SEND]  # MQTT 5 replies: one reply root per grid
    assert all(t.startswith(f"{east}/") for t in grants[SUBSCRIBE])
    for bad in ("balancer.default", "balancer.a+b", "balancer."):
        with pytest.raises(ValueError):
            role_acls(p, bad)
    assert validate_username("balancer.east", "service") == "balancer.east"
    assert balancer_username("east") == "balancer.east" and balancer_username("default") == "balancer"
    for bad in ("balancer.default", "balancer.a.b", "balancer."):
        with pytest.raises(ValueError):
            validate_username(bad, "service")


def test_role_grants_follow_the_prefix_and_refuse_bad_ones() -> None:
    assert {a.topic for a in role_acls("/site-7/grid/", "substation.A")} >= {"site-7/grid/substation/A/telemetry"}
    for prefix in ("", "grid/+", "grid/#", "grid v1", "grid/%u", "a\x00"):
        with pytest.raises(ValueError):
            role_acls(prefix, "balancer")
    with pytest.raises(ValueError):
        role_acls("grid/v1", "root")


# --- the plugin's state file and commands ---------------------------------------------------------


def test_render_config() -> None:
    built = build_accounts("s", ["A"], ["EV_0001"], {"balancer": "pw-b", "api.2": "pw-a"})
    config = dynsec.render_config("grid/v1", built)
    assert config["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    clients = {c["username"]: c for c in config["clients"]}
    assert list(clients) == ["balancer", "api.2", "substation.A", "EV_0001"]
    assert [r["rolename"] for r in clients["api.2"]["roles"]] == ["api"]
    assert [r["rolename"] for r in clients["EV_0001"]["roles"]] == ["ev.EV_0001"]
    assert dynsec.verify_fields("pw-b", clients["balancer"])
    assert dynsec.verify_fields(derive_password("s", "substation.A"), clients["substation.A"])
    roles = {r["rolename"]: r for r in config["roles"]}
    # Every shared role exists (accounts added later use them), plus each account's own.
    assert set(roles) == {"api", "balancer", "healthcheck", "loadtest", "provisioner", "reader", "substation.A",
                          "ev.EV_0001"}
    assert {a["topic"] for a in roles["substation.A"]["acls"] if a["acltype"] == SEND} == {
        f"grid/v1{region}/substation/A/{channel}" for region in ("", "/region/+")
        for channel in ("telemetry", "status", "session")}
    assert [(r["rolename"], a["topic"]) for r in config["roles"] for a in r["acls"] if not a["allow"]] == [
        ("balancer", "grid/v1/ev/balancer/#")]  # the one deny: the balancer never writes as an EV "balancer"
    assert "pw-b" not in json.dumps(config)


def test_write_config_mode(tmp_path: Path) -> None:
    path = dynsec.write_config(tmp_path / "sub" / "dynsec.json", {"clients": []})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    dynsec.write_config(path, {"clients": []})  # rewriting keeps the mode even if it was loosened
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_merge_config_keeps_runtime_accounts_and_updates_the_rest() -> None:
    old = dynsec.render_config("grid/v1", build_accounts("s", ["A"], [], {"balancer": "old"}))
    # Added at runtime, and an old version's grant the current one no longer has.
    old["clients"].append({"username": "substation.east", **dynsec.hash_fields("e"),
                           "roles": [{"rolename": "substation.east"}]})
    old["roles"].append({"rolename": "substation.east", "acls": []})
    next(r for r in old["roles"] if r["rolename"] == "reader")["acls"].append(
        {"acltype": SEND, "topic": "grid/v1/#", "allow": True, "priority": 0})
    merged = dynsec.merge_config(old, "grid/v1", build_accounts("s", ["A", "B"], [], {"balancer": "new"}))
    clients = {c["username"]: c for c in merged["clients"]}
    assert list(clients) == ["balancer", "substation.A", "substation.east", "substation.B"]
    assert dynsec.verify_fields("new", clients["balancer"]) and dynsec.verify_fields("e", clients["substation.east"])
    roles = {r["rolename"]: r for r in merged["roles"]}
    assert {a["acltype"] for a in roles["reader"]["acls"]} == {SUBSCRIBE, RECEIVE}
    assert "substation.east" in roles and "substation.B" in roles


def test_account_commands() -> None:
    add = dynsec.add_account_commands("grid/v1", "substation.east", "pw")
    assert [c["command"] for c in add] == ["deleteRole", "createRole", "createClient"]
    assert add[1]["rolename"] == "substation.east" and add[1]["acls"]
    assert add[2] == {"command": "createClient", "username": "substation.east", "password": "pw",
                      "roles": [{"rolename": "substation.east"}]}
    assert [c["command"] for c in dynsec.add_account_commands("grid/v1", "api.3", "pw")] == ["createClient"]
    assert dynsec.remove_account_commands("EV_9") == [{"command": "deleteClient", "username": "EV_9"},
                                                       {"command": "deleteRole", "rolename": "ev.EV_9"}]
    assert dynsec.remove_account_commands("api.3") == [{"command": "deleteClient", "username": "api.3"}]


# --- render_config --------------------------------------------------------------------------------


def _rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _conf(**overrides: object) -> str:
    kwargs: dict[str, object] = {
        "port": 18830, "data_dir": "/w/data", "dynsec_file": "/w/dynsec.json", "log_file": "/w/mosquitto.log",
        "dynsec_plugin": "/usr/lib/dynsec.so",
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
        "plugin /usr/lib/dynsec.so",
        "plugin_opt_config_file /w/dynsec.json",
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
    assert not any(r.startswith(("password_file", "acl_file")) for r in rules)  # the plugin holds the accounts
    assert not any(r.startswith(("cafile", "certfile", "keyfile")) for r in rules)
    assert sum(r.startswith("listener ") for r in rules) == 1


def test_render_config_defaults_to_current_user() -> None:
    import getpass

    assert f"user {getpass.getuser()}" in _rules(_conf())


def test_render_config_logs_to_stdout_without_a_file() -> None:
    assert "log_dest stdout" in _rules(_conf(log_file=None))


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


def test_cli_writes_the_state_file_without_printing_passwords(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = accounts_cli.main(["--out", str(tmp_path), "--substations", "A,B", "--ev-count", "3", "--evs", "EV_1234",
                        "--secret", "s", "--service", "balancer=topsecret", "--service", "observer"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "topsecret" not in out and derive_password("s", "EV_0001") not in out
    config = json.loads((tmp_path / "dynsec.json").read_text())
    users = [c["username"] for c in config["clients"]]
    assert users == ["balancer", "observer", "substation.A", "substation.B", "EV_0001", "EV_0002", "EV_0003",
                     "EV_1234"]

    # --merge keeps what the broker added since, and sets the listed passwords.
    config["clients"].append({"username": "EV_9", **dynsec.hash_fields("x"), "roles": [{"rolename": "ev.EV_9"}]})
    dynsec.write_config(tmp_path / "dynsec.json", config)
    rc = accounts_cli.main(["--out", str(tmp_path), "--substations", "A", "--secret", "s", "--merge",
                        "--service", "balancer=rotated", "--show-passwords"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "balancer rotated" in out and "more kept" in out
    merged = {c["username"]: c for c in json.loads((tmp_path / "dynsec.json").read_text())["clients"]}
    assert "EV_9" in merged and dynsec.verify_fields("rotated", merged["balancer"])

    rc = accounts_cli.main(["--out", str(tmp_path), "--evs", "EV_9", "--secret", "s", "--show-passwords"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"EV_9 {derive_password('s', 'EV_9')}" in out
    assert f"balancer {derive_password('s', 'balancer')}" in out  # default services, derived
    assert f"provisioner {derive_password('s', 'provisioner')}" in out


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MQTT_ACCOUNT_SECRET", raising=False)
    assert accounts_cli.main(["--out", str(tmp_path), "--evs", "EV_1"]) == 2  # no secret
    assert accounts_cli.main(["--out", str(tmp_path), "--evs", "a/b", "--secret", "s"]) == 2
    assert "error:" in capsys.readouterr().err
    monkeypatch.setenv("MQTT_ACCOUNT_SECRET", "from-env")
    assert accounts_cli.main(["--out", str(tmp_path), "--evs", "EV_1", "--show-passwords"]) == 0
    assert derive_password("from-env", "EV_1") in capsys.readouterr().out


def test_api_replica_accounts_share_the_api_role() -> None:
    from broker.accounts import is_api_replica
    config = dynsec.render_config("grid/v1", build_accounts("s", [], [], {"api": "a", "api.2": "b"}))
    assert [c["roles"] for c in config["clients"]] == [[{"rolename": "api"}], [{"rolename": "api"}]]
    assert validate_username("api.2", "service") == "api.2" and is_api_replica("api.2")
    assert not is_api_replica("api-2")  # a valid EV id: never a replica
    for bad in ("api.", "api.a/b", "api.+", "apix.2"):
        with pytest.raises(ValueError):
            validate_username(bad, "service")


def test_service_account_passwords_given_derived_and_extra() -> None:
    from broker.accounts import service_account_passwords

    got = service_account_passwords("s3cret", ["balancer", "api"], {"api": "given-pw", "loadtest": "lt-pw"})
    assert got == {"balancer": derive_password("s3cret", "balancer"), "api": "given-pw", "loadtest": "lt-pw"}


def test_account_book_answers_for_its_accounts_only() -> None:
    from broker.accounts import AccountBook

    class Book(AccountBook):
        def __init__(self) -> None:
            self._passwords = {"substation.A": "pw-a"}

    book = Book()
    assert book.substation_credentials("A") == ("substation.A", "pw-a")
    with pytest.raises(KeyError, match="no account 'EV_0001' on this Book"):
        book.password_for("EV_0001")
