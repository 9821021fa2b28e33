"""docker-compose.yml, the Dockerfile and the files they mount, checked without a Docker engine.

Parsed with PyYAML (merge keys resolved): every service is there, images are pinned, long-running
services have healthchecks and start after what they need is healthy, mounted host paths exist, every
``${VAR}`` is defined in ``.env.example``, Prometheus scrapes the compose services on their metrics
ports, Grafana's provisioning matches the dashboards, the rendered Mosquitto config matches the
project's template, and the account generator of the compose stack produces the dynamic security plugin's state
file and TLS certificates a real Mosquitto accepts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import IMAGE_DYNSEC_PLUGIN, find_free_port, find_mosquitto, render_config
from grid_runtime.credentials import derive_password
from grid_runtime.lifecycle import stop_process
from grid_runtime.metrics import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "monitoring" / "grafana"
MOSQUITTO_CONF = ROOT / "broker" / "compose" / "mosquitto.conf"
INIT_ACCOUNTS = ROOT / "broker" / "compose" / "init-accounts.sh"

#: Python services of the stack and their Prometheus job (monitoring/prometheus/prometheus.yml).
PYTHON_SERVICES = {"balancer": "balancer", "substation-agents": "substation_agents", "ev-fleet": "ev_clients",
                   "recorder": "recorder", "api": "api"}
#: One-shot services: they run to completion before what depends on them starts.
ONE_SHOTS = {"preflight", "mqtt-accounts", "influxdb-tokens", "nats-config"}
#: The 3-node NATS cluster (profile cluster).
NATS_NODES = {"nats-1", "nats-2", "nats-3"}
INIT_NATS = ROOT / "broker" / "compose" / "init-nats.sh"
SERVICES = {*PYTHON_SERVICES, *ONE_SHOTS, *NATS_NODES, "mosquitto", "influxdb", "prometheus", "grafana"}
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?-][^}]*)?\}|([A-Za-z_][A-Za-z0-9_]*))")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env.example: bad line {line!r}"
            values[key] = value
    return values


def _variables(text: str) -> set[str]:
    """Variables a compose file (or Grafana provisioning file) interpolates; ``$$`` is a literal ``$``.
    Comment lines are not interpolated."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    code = re.sub(r"\$__file\{[^}]*\}", "", code)  # Grafana's file expansion, not a variable
    return {a or b for a, b in _VAR.findall(code.replace("$$", ""))}


def _long_running(service: dict[str, Any]) -> bool:
    return service.get("restart") != "no"


def test_every_service_is_defined(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image"
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: image {image!r} is not pinned to a version"


def test_python_services_share_one_non_root_image(services: dict[str, dict[str, Any]]) -> None:
    python = {name for name, s in services.items() if "build" in s}
    assert python == {*PYTHON_SERVICES, *ONE_SHOTS}
    assert {services[name]["build"] for name in python} == {"."}
    assert len({services[name]["image"] for name in python}) == 1
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11\.\d+-slim(-\w+)?$", dockerfile, re.M), "base image python:3.11.x-slim"
    assert re.search(r"^RUN pip install /app", dockerfile, re.M)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert (ROOT / ".dockerignore").is_file()
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".git", ".env", ".run"} <= set(ignored)
    # only the one-shots that write into fresh volumes run as root (they hand the files to their readers)
    assert {name for name in python if "user" in services[name]} == {"mqtt-accounts", "influxdb-tokens", "nats-config"}


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, s in services.items() if not _long_running(s)} == ONE_SHOTS
    for name, service in services.items():
        if _long_running(service):
            check = service.get("healthcheck")
            assert check and not check.get("disable"), f"{name}: no healthcheck"
            assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) > 1, name
            for key in ("interval", "timeout", "retries"):
                assert key in check, f"{name}: healthcheck without {key}"


def test_depends_on_waits_for_healthy_services(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form with a condition"
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if _long_running(services[dep]):
                assert condition == "service_healthy", f"{name} -> {dep}: {condition}"
                assert "healthcheck" in services[dep]
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dep}: {condition}"
    assert services["mosquitto"]["depends_on"] == {"mqtt-accounts": {"condition": "service_completed_successfully"}}
    for name in PYTHON_SERVICES:
        assert "mosquitto" in services[name]["depends_on"] or "balancer" in services[name]["depends_on"], name
    assert set(services["recorder"]["depends_on"]) >= {"mosquitto", "influxdb-tokens"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus", "influxdb-tokens"}
    assert services["influxdb-tokens"]["depends_on"] == {"influxdb": {"condition": "service_healthy"}}


def test_nothing_starts_before_the_preflight_check(services: dict[str, dict[str, Any]]) -> None:
    """Every service waits for preflight, directly or through what it depends on."""

    def upstream(name: str) -> set[str]:
        deps = set(services[name].get("depends_on", {}))
        return deps.union(*(upstream(d) for d in deps)) if deps else set()

    for name in set(services) - {"preflight"}:
        assert "preflight" in upstream(name), name
    checked = services["preflight"]["environment"]["GRIDLB_SECRETS"].split()
    secrets = {k for k in _env_example() if re.search(r"PASSWORD|SECRET|TOKEN", k)}
    assert set(checked) == secrets and set(checked) <= set(services["preflight"]["environment"])


def test_preflight_refuses_the_example_secrets_and_passes_real_ones(services: dict[str, dict[str, Any]]) -> None:
    from gridlb.preflight import main as preflight

    env = {k: v for k, v in _env_example().items()}
    env["GRIDLB_SECRETS"] = services["preflight"]["environment"]["GRIDLB_SECRETS"]
    assert preflight([], env) == 1
    for name in env["GRIDLB_SECRETS"].split():
        env[name] = f"a-real-secret-for-{name.lower()}"
    assert preflight([], env) == 0
    assert preflight([], {**env, "API_TOKEN": "short"}) == 1
    assert preflight([], {**env, "API_TOKEN": ""}) == 1


def test_the_admin_token_stays_with_influxdb(services: dict[str, dict[str, Any]]) -> None:
    """The recorder writes and Grafana reads with tokens made for that alone (monitoring.influx_tokens)."""
    holders = {name for name, s in services.items() if any("INFLUXDB_ADMIN_TOKEN" in str(v)
                                                         for v in s.get("environment", {}).values())}
    assert holders == {"influxdb", "influxdb-tokens", "preflight"}
    assert services["recorder"]["environment"]["INFLUX_TOKEN_FILE"] == "/influx-tokens/recorder.token"
    assert "influx-tokens:/influx-tokens:ro" in services["recorder"]["volumes"]
    assert "influx-tokens:/etc/grafana/influx-tokens:ro" in services["grafana"]["volumes"]
    datasources = (GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text(encoding="utf-8")
    assert "token: $__file{/etc/grafana/influx-tokens/grafana.token}" in datasources
    from monitoring.influx_tokens import TOKENS, bucket_permissions

    assert {(name, action) for name, _, action in TOKENS} == {("recorder.token", "write"), ("grafana.token", "read")}
    (write,) = bucket_permissions("write", "org-1", "bucket-1")
    assert (write.action, write.resource.type, write.resource.id, write.resource.org_id) == (
        "write", "buckets", "bucket-1", "org-1")
    with pytest.raises(ValueError):
        bucket_permissions("write-all", "org-1", "bucket-1")


def test_only_the_fleet_and_the_cluster_are_optional(services: dict[str, dict[str, Any]]) -> None:
    assert {name: s["profiles"] for name, s in services.items() if "profiles" in s} == {
        "ev-fleet": ["fleet"], "nats-config": ["cluster"], **{n: ["cluster"] for n in NATS_NODES}}


def test_mounted_host_paths_exist_and_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).resolve().exists(), f"{name}: {source} does not exist in the repository"
                assert (ROOT / source).resolve().is_relative_to(ROOT), f"{name}: {source} is outside the repository"
            else:
                used.add(source)
    assert used == declared


def test_ports_are_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert set(published) == {"mosquitto", "api", "influxdb", "prometheus", "grafana", *NATS_NODES}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is not bound to 127.0.0.1"


def test_every_variable_is_in_env_example_and_every_example_is_used() -> None:
    used = _variables(COMPOSE_FILE.read_text(encoding="utf-8"))
    defined = _env_example()
    assert used - set(defined) == set(), "variables docker-compose.yml uses but .env.example does not define"
    assert set(defined) - used == set(), ".env.example variables docker-compose.yml never uses"
    secrets = {k: v for k, v in defined.items() if re.search(r"PASSWORD|SECRET|TOKEN", k)}
    assert secrets and all(v.startswith("change-me") for v in secrets.values()), secrets
    assert len(defined["INFLUXDB_ADMIN_PASSWORD"]) >= 8  # InfluxDB's setup refuses shorter ones
    assert ".env" in (ROOT / ".dockerignore").read_text(encoding="utf-8").split()


def test_secrets_are_required_not_defaulted() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for match in re.finditer(r"\$\{([A-Z_]*(?:PASSWORD|SECRET|TOKEN))(.?)", text):
        assert match[2] == ":", f"${{{match[1]}}} must be written ${{{match[1]}:?...}} (no silent default)"


def test_python_services_serve_metrics_on_all_interfaces(services: dict[str, dict[str, Any]]) -> None:
    for name in PYTHON_SERVICES:
        env = services[name]["environment"]
        assert env["MQTT_HOST"] == "mosquitto" and env["MQTT_PORT"] == "1883", name
        if name == "api":
            assert env["API_HOST"] == "0.0.0.0"
        else:
            assert env["METRICS_HOST"] == "0.0.0.0", name
            assert int(env["METRICS_PORT"]) == DEFAULT_PORTS[PYTHON_SERVICES[name]], name


def test_prometheus_targets_are_the_compose_services_and_their_metrics_ports(
        services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    scraped = {}
    for job in config["scrape_configs"]:
        targets = [t for static in job["static_configs"] for t in static["targets"]]
        assert len(targets) == 1, job
        host, _, port = targets[0].rpartition(":")
        scraped[job["job_name"]] = (host, int(port))
    expected = {}
    for name, job in PYTHON_SERVICES.items():
        env = services[name]["environment"]
        expected[job] = (name, int(env["API_PORT"] if name == "api" else env["METRICS_PORT"]))
    assert scraped == expected
    mount = next(v for v in services["prometheus"]["volumes"] if v.startswith("./monitoring/prometheus:"))
    assert mount.split(":")[1] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_grafana_provisioning_matches_the_dashboards_and_its_environment(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources_file = GRAFANA / "provisioning" / "datasources" / "datasources.yml"
    datasources = yaml.safe_load(datasources_file.read_text(encoding="utf-8"))["datasources"]
    uids = {ds["uid"]: ds["type"] for ds in datasources}
    assert uids == {"prometheus": "prometheus", "influxdb": "influxdb"}
    influx = next(ds for ds in datasources if ds["type"] == "influxdb")
    assert influx["jsonData"]["version"] == "Flux"
    # every ${VAR} of the provisioning file is set in the grafana container
    assert _variables(datasources_file.read_text(encoding="utf-8")) <= set(grafana["environment"])
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["./monitoring/grafana/dashboards"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()
    # the dashboards refer to the provisioned datasources only, by uid; uids and titles are unique
    dashboards = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((GRAFANA / "dashboards").glob("*.json"))]
    assert len(dashboards) == 4
    assert len({d["uid"] for d in dashboards}) == len({d["title"] for d in dashboards}) == 4
    for doc in dashboards:
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)), doc["title"]
        for panel in doc["panels"]:
            refs = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
            for ref in filter(None, refs):
                assert uids.get(ref["uid"]) == ref["type"], f"{doc['title']}: {panel['title']}: {ref}"


def test_mosquitto_config_is_the_rendered_project_template(services: dict[str, dict[str, Any]]) -> None:
    rendered = render_config(port=1883, bind_address="0.0.0.0", data_dir="/mosquitto/data/",
                             dynsec_file="/mosquitto/auth/dynsec.json", dynsec_plugin=IMAGE_DYNSEC_PLUGIN,
                             tls_dir="/mosquitto/certs", tls_port=8883, log_file=None, run_user="mosquitto")
    text = MOSQUITTO_CONF.read_text(encoding="utf-8")
    assert text.endswith(rendered), "broker/compose/mosquitto.conf is stale: re-render it (see its header)"
    assert "log_dest stdout" in text  # docker compose logs mosquitto shows it
    volumes = services["mosquitto"]["volumes"]
    assert "./broker/compose/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in volumes
    assert "mosquitto-auth:/mosquitto/auth" in volumes  # read-write: the plugin saves runtime changes there
    assert "mosquitto-certs:/mosquitto/certs:ro" in volumes
    assert any(str(p).endswith(":8883") for p in services["mosquitto"]["ports"])
    assert "mosquitto-auth:/mosquitto/auth" in services["mqtt-accounts"]["volumes"]
    assert "mosquitto-certs:/mosquitto/certs" in services["mqtt-accounts"]["volumes"]
    assert services["mqtt-accounts"]["command"] == ["sh", "/app/broker/compose/init-accounts.sh"]


def _connack(port: int, username: str, password: str, ca: Path | None = None, host: str = "127.0.0.1") -> int:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    if ca is not None:
        client.tls_set(ca_certs=str(ca))
    result: list[int] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: result.append(rc.value)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    deadline = time.monotonic() + 5.0
    while not result and time.monotonic() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    assert result, f"no CONNACK for {username}"
    return result[0]


@pytest.mark.integration
def test_compose_account_generator_makes_accounts_a_real_mosquitto_accepts(
        tmp_path: Path, services: dict[str, dict[str, Any]]) -> None:
    example = _env_example()
    init_env = services["mqtt-accounts"]["environment"]
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG"}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python of this venv
    env["PYTHONPATH"] = str(ROOT)
    for key in init_env:  # what compose would pass, with the values of .env.example
        env[key] = example[key]
    env.update(MQTT_AUTH_DIR=str(tmp_path / "auth"), MQTT_CERTS_DIR=str(tmp_path / "certs"),
               API_AUTH_DIR=str(tmp_path / "api-auth"), MQTT_BROKER_UID=str(os.getuid()))
    done = subprocess.run(["sh", str(INIT_ACCOUNTS)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    substations = [item.split(":")[0] for item in example["SUBSTATIONS"].split(",")]
    users = [c["username"] for c in json.loads((tmp_path / "auth" / "dynsec.json").read_text())["clients"]]
    assert users[:3] == ["balancer", "api", "observer"]
    last_ev = f"EV_{int(example['EV_COUNT']):04d}"
    assert set(users) >= {f"substation.{sid}" for sid in substations} | {"EV_0001", last_ev, "provisioner"}
    assert "loadtest" not in users
    assert {p.name for p in (tmp_path / "certs").iterdir()} == {"ca.crt", "server.crt", "server.key"}
    # The API's token file for hand testing: hashes of the .env tokens, scoped as the README uses them.
    from api.tokens import TokenStore

    store = TokenStore(None, tmp_path / "api-auth" / "api-tokens.json")
    ev, viewer = store.authenticate(example["API_EV_TOKEN"]), store.authenticate(example["API_VIEWER_TOKEN"])
    assert ev is not None and ev.role == "ev" and ev.may_act_for("EV_1234") and not ev.may_act_for("EV_0001")
    assert viewer is not None and viewer.role == "viewer"
    assert example["API_EV_TOKEN"] not in (tmp_path / "api-auth" / "api-tokens.json").read_text()
    # A second run (every `docker compose up`) keeps what the broker added at runtime and the certificates.
    config = json.loads((tmp_path / "auth" / "dynsec.json").read_text())
    config["clients"].append({**config["clients"][0], "username": "substation.east"})
    (tmp_path / "auth" / "dynsec.json").write_text(json.dumps(config))
    cert = (tmp_path / "certs" / "server.crt").read_bytes()
    again = subprocess.run(["sh", str(INIT_ACCOUNTS)], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    users = [c["username"] for c in json.loads((tmp_path / "auth" / "dynsec.json").read_text())["clients"]]
    assert "substation.east" in users and (tmp_path / "certs" / "server.crt").read_bytes() == cert

    port = find_free_port()
    tls_port = find_free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(render_config(port=port, data_dir=tmp_path / "data", dynsec_file=tmp_path / "auth" / "dynsec.json",
                                  log_file=tmp_path / "mosquitto.log", tls_dir=tmp_path / "certs", tls_port=tls_port))
    (tmp_path / "data").mkdir()
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        log = tmp_path / "mosquitto.log"
        deadline = time.monotonic() + 5.0
        while not (log.exists() and b" running" in log.read_bytes()):
            assert proc.poll() is None and time.monotonic() < deadline, f"mosquitto did not start: {log}"
            time.sleep(0.01)
        secret = example["MQTT_ACCOUNT_SECRET"]
        assert _connack(port, "balancer", example["BALANCER_MQTT_PASSWORD"]) == 0
        assert _connack(port, "observer", example["OBSERVER_MQTT_PASSWORD"]) == 0
        assert _connack(port, "recorder", example["RECORDER_MQTT_PASSWORD"]) == 0
        assert _connack(port, "healthcheck", example["HEALTHCHECK_MQTT_PASSWORD"]) == 0
        sub = f"substation.{substations[0]}"
        assert _connack(port, sub, derive_password(secret, sub)) == 0
        assert _connack(port, "EV_0001", derive_password(secret, "EV_0001")) == 0
        assert _connack(port, "balancer", "wrong") != 0
        assert _connack(port, "provisioner", example["PROVISIONER_MQTT_PASSWORD"]) == 0
        assert _connack(port, "EV_1234", example["EV_1234_MQTT_PASSWORD"]) == 0  # the README's hand-test EV
        assert _connack(tls_port, "observer", example["OBSERVER_MQTT_PASSWORD"],
                        ca=tmp_path / "certs" / "ca.crt", host="localhost") == 0
    finally:
        stop_process(proc, 5.0)


def test_cluster_profile_nodes_run_the_generated_configs(services: dict[str, dict[str, Any]]) -> None:
    for i, name in enumerate(sorted(NATS_NODES), start=1):
        node = services[name]
        assert node["command"] == ["-c", f"/nats/conf/{name}.conf"]
        assert node["image"].startswith("nats:2.9.")  # the tested line (Debian's 2.9.10)
        assert node["depends_on"] == {"nats-config": {"condition": "service_completed_successfully"}}
        assert f"{name}-data:/data" in node["volumes"] and "nats-conf:/nats/conf:ro" in node["volumes"]
        assert node["ports"] == [f"127.0.0.1:189{i}:1883"]
    assert services["nats-config"]["command"] == ["sh", "/app/broker/compose/init-nats.sh"]
    # The services follow the cluster when .env says so (empty MQTT_HOSTS: Mosquitto as before).
    for name in PYTHON_SERVICES:
        env = services[name]["environment"]
        assert env["MQTT_PROTOCOL"] == "${MQTT_PROTOCOL:-5}" and env["MQTT_HOSTS"] == "${MQTT_HOSTS:-}", name


def test_compose_cluster_generator_writes_configs_nats_server_accepts(
        tmp_path: Path, services: dict[str, dict[str, Any]]) -> None:
    from broker.nats.cluster import find_nats_server

    example = _env_example()
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG"}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    for key in services["nats-config"]["environment"]:
        env[key] = example[key]
    env["NATS_CONF_DIR"] = str(tmp_path / "conf")
    done = subprocess.run(["sh", str(INIT_NATS)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    conf = tmp_path / "conf"
    assert {p.name for p in conf.iterdir()} == {"accounts.conf", *(f"{n}.conf" for n in NATS_NODES)}
    assert oct((conf / "accounts.conf").stat().st_mode & 0o777) == "0o600"
    accounts = (conf / "accounts.conf").read_text()
    assert f'"password": "{example["BALANCER_MQTT_PASSWORD"]}"' in accounts and '"user": "EV_1234"' in accounts
    assert "nats-route://nats-2:6222" in (conf / "nats-1.conf").read_text()
    for name in NATS_NODES:  # nats-server's own parser (-t: test the configuration and exit)
        checked = subprocess.run([find_nats_server(), "-t", "-c", str(conf / f"{name}.conf")], capture_output=True,
                                 text=True, timeout=30, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
