"""The contract in code (grid_protocol), docs/asyncapi.yaml and docs/protocol.md must agree.

* (a) docs/asyncapi.yaml is exactly what docs/gen_asyncapi.py generates from the code today;
* (b) independently of the generator: every CHANNELS entry is in the AsyncAPI document with the right address,
  QoS, retain flag and a payload schema matching the msgspec model (fields, required-ness, types, bounds);
* (c) protocol.md names every topic, Reason, AssignmentStatus value, model and model field, and its topic table
  agrees with CHANNELS (QoS, retain, payload) and with the broker ACL (who may publish / subscribe);
* (d) the JSON examples of protocol.md (marked ``<!-- example: Model -->``), the payloads of its mosquitto
  commands and the AsyncAPI message examples decode with grid_protocol.codec (and match the JSON Schemas);
* (e) the AsyncAPI document is structurally valid AsyncAPI 3.0.0 (required keys, every $ref resolves,
  operations reference their channel's messages, address parameters declared, schemas are valid JSON Schema).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import shlex
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import msgspec
import msgspec.inspect as mi
import pytest
import yaml

import grid_protocol
from broker.accounts import SERVICE_ACCOUNTS
from broker.roles import RECEIVE, SEND, SUBSCRIBE, role_acls, role_of
from grid_protocol import CHANNELS, PayloadError, Reason, TopicKind, Topics, decode
from grid_protocol.ids import ID_PATTERN
from grid_protocol.messages import ASSIGNMENT_STATUSES, CHARGING_STATUSES, FINAL_STATUSES
from grid_protocol.topics import DEFAULT_PREFIX, Channel

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ASYNCAPI = DOCS / "asyncapi.yaml"
PROTOCOL = DOCS / "protocol.md"
GENERATOR = DOCS / "gen_asyncapi.py"
REGENERATE = ".venv/bin/python docs/gen_asyncapi.py"

MODELS: dict[str, type] = {c.payload.__name__: c.payload for c in CHANNELS.values()}


def _all_structs() -> dict[str, type]:
    """The payload models and every Struct nested in them (e.g. SessionCommand inside SessionCommands)."""
    found: dict[str, type] = {}

    def visit(tp: mi.Type) -> None:
        if isinstance(tp, mi.Metadata):
            visit(tp.type)
        elif isinstance(tp, mi.UnionType):
            for t in tp.types:
                visit(t)
        elif isinstance(tp, mi.ListType):
            visit(tp.item_type)
        elif isinstance(tp, mi.StructType) and tp.cls.__name__ not in found:
            found[tp.cls.__name__] = tp.cls
            for field in tp.fields:
                visit(field.type)

    for model in MODELS.values():
        visit(mi.type_info(model))
    return found


STRUCTS = _all_structs()
CHANNEL_IDS = [str(kind) for kind in CHANNELS]


@cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_asyncapi", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def asyncapi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    return doc


@cache
def protocol() -> str:
    return PROTOCOL.read_text(encoding="utf-8")


def address_of(channel: Channel) -> str:
    """The address a channel must have in the AsyncAPI document (default prefix, id named by its role)."""
    root = channel.template.split("/")[0]
    param = {"ev": "{ev_id}", "substation": "{substation_id}"}.get(root, "{id}")
    return f"{DEFAULT_PREFIX}/{channel.template.replace('{id}', param)}"


def resolve(ref: str, doc: dict[str, Any] | None = None) -> Any:
    """Follow a local JSON pointer (``#/a/b``) in the AsyncAPI document."""
    assert ref.startswith("#/"), f"only local references are used, got {ref!r}"
    node: Any = asyncapi() if doc is None else doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref!r} (at {part!r})"
        node = node[part]
    return node


def deref(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(node["$ref"])
    return node


# ---------------------------------------------------------------------------------------------- (a)


def test_asyncapi_yaml_is_generated_from_the_current_code() -> None:
    expected = generator().render()
    actual = ASYNCAPI.read_text(encoding="utf-8") if ASYNCAPI.exists() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "docs/asyncapi.yaml (committed)", "generated now", n=1))[:80])
        pytest.fail(f"docs/asyncapi.yaml is out of date with grid_protocol. Regenerate it with\n    {REGENERATE}\n"
                    f"and commit the result (update docs/protocol.md too).\n{diff}")


def test_generator_is_deterministic() -> None:
    assert generator().render() == generator().render()


# ---------------------------------------------------------------------------------------------- (b)


def _field_type(tp: mi.Type) -> tuple[mi.Type, bool]:
    """(the type without ``None``/metadata, whether ``None`` is allowed)."""
    nullable = False
    if isinstance(tp, mi.UnionType):
        others = [t for t in tp.types if not isinstance(t, mi.NoneType)]
        nullable = len(others) != len(tp.types)
        assert len(others) == 1, f"unexpected union {tp}"
        tp = others[0]
    if isinstance(tp, mi.Metadata):
        tp = tp.type
    return tp, nullable


def _expected_type(tp: mi.Type) -> dict[str, Any]:
    """What the JSON Schema of one field must say, from msgspec's own view of the model."""
    tp, nullable = _field_type(tp)
    out: dict[str, Any] = {"nullable": nullable}
    if isinstance(tp, mi.FloatType | mi.IntType):
        out["type"] = "number" if isinstance(tp, mi.FloatType) else "integer"
        for attr, key in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"),
                          ("lt", "exclusiveMaximum"), ("multiple_of", "multipleOf")):
            if getattr(tp, attr) is not None:
                out[key] = getattr(tp, attr)
    elif isinstance(tp, mi.StrType):
        out["type"] = "string"
        for attr, key in (("pattern", "pattern"), ("max_length", "maxLength"), ("min_length", "minLength")):
            if getattr(tp, attr) is not None:
                out[key] = getattr(tp, attr)
    elif isinstance(tp, mi.LiteralType):
        out["enum"] = sorted(tp.values)
    elif isinstance(tp, mi.BoolType):
        out["type"] = "boolean"
    elif isinstance(tp, mi.StructType):
        out["struct"] = tp.cls.__name__
    elif isinstance(tp, mi.ListType):
        out["type"] = "array"
        out["items"] = _expected_type(tp.item_type)
        for attr, key in (("min_length", "minItems"), ("max_length", "maxItems")):
            if getattr(tp, attr) is not None:
                out[key] = getattr(tp, attr)
    else:
        raise AssertionError(f"field type {tp} is not covered by this test: extend _expected_type")
    return out


def _actual_type(prop: dict[str, Any]) -> dict[str, Any]:
    """The same summary read from a JSON Schema property."""
    nullable = False
    if "anyOf" in prop:
        branches = prop["anyOf"]
        others = [b for b in branches if b.get("type") != "null"]
        nullable = len(others) != len(branches)
        assert len(others) == 1, f"unexpected anyOf {prop}"
        prop = others[0]
    out: dict[str, Any] = {"nullable": nullable}
    if "$ref" in prop:
        out["struct"] = prop["$ref"].rsplit("/", 1)[1]
        return out
    if "enum" in prop:
        out["enum"] = sorted(prop["enum"])
    else:
        out["type"] = prop.get("type")
    if out.get("type") == "array":
        out["items"] = _actual_type(prop["items"])
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf", "pattern",
                "maxLength", "minLength", "minItems", "maxItems"):
        if key in prop:
            out[key] = prop[key]
    return out


def _nested_structs(tp: mi.Type) -> list[mi.StructType]:
    tp, _ = _field_type(tp)
    if isinstance(tp, mi.StructType):
        return [tp]
    if isinstance(tp, mi.ListType):
        return _nested_structs(tp.item_type)
    return []


def _check_schema_against_struct(schema: dict[str, Any], info: mi.StructType) -> None:
    """Properties, required-ness, types, bounds and defaults of ``schema`` are those of the model (recursively)."""
    name = info.cls.__name__
    assert schema.get("type") == "object", f"{name}: not an object schema"
    fields = {f.name: f for f in info.fields}
    assert list(schema["properties"]) == list(fields), f"{name}: property names differ"
    assert sorted(schema.get("required", [])) == sorted(n for n, f in fields.items() if f.required), \
        f"{name}: required fields differ"
    for field_name, field in fields.items():
        prop = schema["properties"][field_name]
        assert _actual_type(prop) == _expected_type(field.type), f"{name}.{field_name}: type differs"
        if field.default is not msgspec.NODEFAULT:
            assert prop.get("default") == field.default, f"{name}.{field_name}: default differs"
        for nested in _nested_structs(field.type):
            nested_schema = asyncapi()["components"]["schemas"][nested.cls.__name__]
            _check_schema_against_struct(nested_schema, nested)


def _channel_entry(channel: Channel) -> tuple[str, dict[str, Any]]:
    matches = [(cid, ch) for cid, ch in asyncapi()["channels"].items() if ch.get("address") == address_of(channel)]
    assert len(matches) == 1, (f"{channel.kind}: expected one AsyncAPI channel with address {address_of(channel)!r}, "
                               f"found {[cid for cid, _ in matches]}; regenerate with {REGENERATE}")
    return matches[0]


@pytest.mark.parametrize("kind", list(CHANNELS), ids=CHANNEL_IDS)
def test_asyncapi_channel_matches_channels_table(kind: TopicKind) -> None:
    channel = CHANNELS[kind]
    channel_id, entry = _channel_entry(channel)

    # Address parameters: exactly the ones in the address, each with the id pattern.
    names = set(re.findall(r"{([^}]+)}", entry["address"]))
    assert set(entry.get("parameters", {})) == names
    for name in names:
        param = deref(entry["parameters"][name])
        assert param.get("x-pattern") == ID_PATTERN and ID_PATTERN in param.get("description", "")

    # Operations on this channel carry the channel's QoS and retain flag.
    ops = [op for op in asyncapi()["operations"].values() if op["channel"]["$ref"] == f"#/channels/{channel_id}"]
    assert ops, f"no operation uses channel {channel_id}"
    for op in ops:
        mqtt = op["bindings"]["mqtt"]
        assert (mqtt["qos"], mqtt["retain"]) == (channel.qos, channel.retain), f"{channel_id}: qos/retain differ"
        assert op["action"] == ("send" if channel.publisher.startswith("balancer") else "receive"), \
            "operations are described from the balancer's point of view"

    # One message whose payload schema is the channel's model.
    messages = [deref(m) for m in entry["messages"].values()]
    assert [m["name"] for m in messages] == [channel.payload.__name__]
    info = mi.type_info(channel.payload)
    assert isinstance(info, mi.StructType)
    _check_schema_against_struct(deref(messages[0]["payload"]), info)


def test_asyncapi_has_a_channel_for_every_kind_and_nothing_unexpected() -> None:
    expected = {address_of(c) for c in CHANNELS.values()}
    addresses = {ch.get("address") for ch in asyncapi()["channels"].values()}
    assert addresses - {None} == expected  # the only extra channel is the dynamic MQTT 5 reply channel


def test_reason_schema_lists_every_reason() -> None:
    assert asyncapi()["components"]["schemas"]["Reason"]["enum"] == [str(r) for r in Reason]


# ---------------------------------------------------------------------------------------------- (c)


def _section(title: str, level: str = "###") -> str:
    """Text of the protocol.md section whose heading is exactly ``title`` (up to the next heading of its level)."""
    text = protocol()
    match = re.search(rf"^{level} {re.escape(title)}\n(.*?)(?=^#{{1,{len(level)}}} |\Z)", text, re.M | re.S)
    assert match, f"docs/protocol.md has no '{level} {title}' section"
    return match.group(1)


def test_protocol_md_names_every_topic_reason_and_status() -> None:
    text = protocol()
    missing = [address_of(c) for c in CHANNELS.values() if f"`{address_of(c)}`" not in text]
    missing += [f"reason {r}" for r in Reason if f"`{r}`" not in text]
    missing += [f"status {s}" for s in ASSIGNMENT_STATUSES if f"`{s}`" not in text]
    missing += ["reply root"] if f"`{DEFAULT_PREFIX}/reply/`" not in text else []
    assert not missing, f"docs/protocol.md does not mention: {missing}"


def test_protocol_md_lifecycle_agrees_with_the_status_groups() -> None:
    """The request lifecycle's words and the status groups the clients, the API and the replay read
    (grid_protocol.messages FINAL_STATUSES, CHARGING_STATUSES) say the same: its status table lists every status
    once, the sentence naming the final ones names exactly FINAL_STATUSES, and the statuses whose EV charges
    ("EV does" begins with "Charge") are exactly CHARGING_STATUSES."""
    section = _section("Request lifecycle", "##")
    rows = dict(re.findall(r"^\| `([a-z]+)` \|.*\| ([^|]*) \|$", section, re.M))
    assert sorted(rows) == sorted(ASSIGNMENT_STATUSES)
    final = re.search(r"^((?:`[a-z]+`(?:, | and )?)+) are final\.", section, re.M)
    assert final, "no sentence naming the final statuses"
    assert set(re.findall(r"`([a-z]+)`", final.group(1))) == FINAL_STATUSES
    assert {status for status, ev_does in rows.items() if ev_does.startswith("Charge")} == CHARGING_STATUSES


def test_protocol_md_reason_table_has_every_reason_once() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \|", _section("Errors and reasons", "##"), re.M)
    assert sorted(rows) == sorted(str(r) for r in Reason)


@pytest.mark.parametrize("model", sorted(STRUCTS), ids=sorted(STRUCTS))
def test_protocol_md_field_table_matches_model(model: str) -> None:
    section = _section(model)
    fields = msgspec.structs.fields(STRUCTS[model])
    rows = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert rows == [f.name for f in fields], f"docs/protocol.md field table of {model} differs from the model"
    for field in fields:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{field.name}` |"))
        assert ("**required" in row) == field.required, f"{model}.{field.name}: required-ness differs in protocol.md"


def _topic_table() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in _section("Topics", "##").splitlines():
        if line.startswith(f"| `{DEFAULT_PREFIX}/"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_protocol_md_topic_table_matches_channels() -> None:
    rows = _topic_table()
    assert set(rows) == {address_of(c) for c in CHANNELS.values()}
    for channel in CHANNELS.values():
        _topic, _direction, qos, retain, payload, _pub, _sub = rows[address_of(channel)]
        assert int(qos) == channel.qos, f"{channel.kind}: QoS in protocol.md"
        assert ("yes" in retain) == channel.retain, f"{channel.kind}: retain flag in protocol.md"
        assert f"`{channel.payload.__name__}`" in payload, f"{channel.kind}: payload in protocol.md"


# --- the ACL columns against the rendered broker ACL ---------------------------------------------

ACCOUNTS = {"EV": "EV_1234", "substation.<id>": "substation.north", **{name: name for name in SERVICE_ACCOUNTS}}
OWN_ID = {"EV": "EV_1234", "substation.<id>": "north"}
OTHER_ID = {"ev": "EV_9999", "substation": "south"}


class _Acl:
    """What the broker's roles (broker/roles.py, loaded into Mosquitto's dynamic security plugin) allow an account
    on a concrete topic: "write" needs a publishClientSend grant, "read" both a subscribePattern and a
    publishClientReceive grant (everything else is denied by default)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @staticmethod
    def _matches(sub: str, topic: str) -> bool:
        s, t = sub.split("/"), topic.split("/")
        for i, level in enumerate(s):
            if level == "#":
                return True
            if i >= len(t) or (level != "+" and level != t[i]):
                return False
        return len(s) == len(t)

    def allowed(self, user: str, topic: str, mode: str) -> bool:
        acls = sorted(role_acls(self.prefix, role_of(user)), key=lambda a: -a.priority)

        def decides(kind: str) -> bool:  # the first matching ACL by priority decides; none: denied
            return next((a.allow for a in acls if a.acltype == kind and self._matches(a.topic, topic)), False)

        return decides(SEND) if mode == "write" else decides(SUBSCRIBE) and decides(RECEIVE)


def _acl_cell(acl: _Acl, channel: Channel, mode: str) -> set[tuple[str, bool]]:
    root = channel.template.split("/")[0]
    out: set[tuple[str, bool]] = set()
    for label, user in ACCOUNTS.items():
        own = OWN_ID.get(label, user)
        own_ok = "{id}" in channel.template and acl.allowed(
            user, f"{DEFAULT_PREFIX}/{channel.template.replace('{id}', own)}", mode)
        other_ok = acl.allowed(user, f"{DEFAULT_PREFIX}/{channel.template.replace('{id}', OTHER_ID.get(root, ''))}",
                               mode)
        if other_ok:
            out.add((label, False))
        elif own_ok:
            out.add((label, True))
    return out


def _doc_cell(cell: str) -> set[tuple[str, bool]]:
    return {(name, bool(own)) for name, own in re.findall(r"`([^`]+)`( \(own\))?", cell)}


@pytest.mark.parametrize("kind", list(CHANNELS), ids=CHANNEL_IDS)
def test_protocol_md_acl_columns_match_broker_acl(kind: TopicKind) -> None:
    channel = CHANNELS[kind]
    acl = _Acl(DEFAULT_PREFIX)
    row = _topic_table()[address_of(channel)]
    assert _doc_cell(row[5]) == _acl_cell(acl, channel, "write"), \
        f"'May publish' of {address_of(channel)} in docs/protocol.md differs from broker/roles.py"
    assert _doc_cell(row[6]) == _acl_cell(acl, channel, "read"), \
        f"'May subscribe' of {address_of(channel)} in docs/protocol.md differs from broker/roles.py"


# ---------------------------------------------------------------------------------------------- (d)

_EXAMPLE_RE = re.compile(r"<!--\s*example:\s*(\w+)\s*-->\s*\n```json\n(.*?)\n```", re.S)


def _json_examples() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _EXAMPLE_RE.finditer(protocol())]


def test_every_json_block_in_protocol_md_is_a_marked_example() -> None:
    assert protocol().count("```json") == len(_json_examples()), \
        "every ```json block in docs/protocol.md needs a preceding <!-- example: ModelName --> marker"
    assert {name for name, _ in _json_examples()} == set(MODELS), "every payload model needs an example"


@pytest.mark.parametrize(("model", "text"), _json_examples() if PROTOCOL.exists() else [])
def test_protocol_md_json_example_decodes(model: str, text: str) -> None:
    assert model in MODELS, f"unknown model {model!r} in an example marker"
    decode(text.encode(), MODELS[model])


def _shell_commands() -> list[tuple[str, str | None]]:
    """mosquitto_pub / mosquitto_rr commands of protocol.md's bash blocks, with their ``# expect: reason``."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", protocol(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            cmd, _, comment = line.partition("  #")
            if re.match(r"\s*mosquitto_(pub|rr)\b", cmd) and " -m " in cmd:
                expect = re.search(r"expect:\s*(\w+)", comment)
                commands.append((cmd.strip(), expect.group(1) if expect else None))
    return commands


def test_protocol_md_has_hand_testing_commands() -> None:
    commands = _shell_commands()
    assert len(commands) >= 4
    assert any("-u observer" in line for line in protocol().splitlines() if "mosquitto_sub" in line)


@pytest.mark.parametrize(("command", "expect"), _shell_commands() if PROTOCOL.exists() else [])
def test_protocol_md_shell_payload_matches_contract(command: str, expect: str | None) -> None:
    args = shlex.split(command)
    topic, payload = args[args.index("-t") + 1], args[args.index("-m") + 1]
    parsed = Topics().parse(topic)
    assert parsed is not None, f"{topic!r} is not a contract topic"
    kind, id_ = parsed
    model = CHANNELS[kind].payload
    if expect is not None:
        with pytest.raises(PayloadError) as err:
            decode(payload.encode(), model)
        assert err.value.reason == expect
        return
    message: Any = decode(payload.encode(), model)
    attr = "ev_id" if str(kind).startswith("ev_") else "substation_id"
    body_id = getattr(message, attr, None)
    assert body_id is None or body_id == id_, f"{command}: body {attr} differs from the topic's id (id_mismatch)"
    user = args[args.index("-u") + 1]
    if kind in (TopicKind.EV_REQUEST, TopicKind.EV_RELEASE) and user not in ("api", "loadtest"):
        assert user == id_, f"{command}: an EV may only publish on its own topics"
    if "-e" in args:
        assert args[args.index("-e") + 1].startswith(f"{DEFAULT_PREFIX}/reply/{user}/"), \
            "response topics must be below the account's own reply root"


def _asyncapi_examples() -> list[tuple[str, str, Any]]:
    out = []
    for message in asyncapi()["components"]["messages"].values():
        for example in message.get("examples", []):
            out.append((message["name"], example["name"], example["payload"]))
    return out


def _validator(model: str) -> jsonschema.Draft7Validator:
    root = dict(asyncapi())
    root["$ref"] = f"#/components/schemas/{model}"
    return jsonschema.Draft7Validator(root)


@pytest.mark.parametrize(("model", "name", "payload"), _asyncapi_examples() if ASYNCAPI.exists() else [])
def test_asyncapi_example_decodes_and_matches_schema(model: str, name: str, payload: Any) -> None:
    decode(json.dumps(payload).encode(), MODELS[model])
    _validator(model).validate(payload)


@pytest.mark.parametrize(("model", "text"), _json_examples() if PROTOCOL.exists() else [])
def test_protocol_md_json_example_matches_schema(model: str, text: str) -> None:
    _validator(model).validate(json.loads(text))


# The JSON Schemas and the codec agree on what is valid (for what JSON Schema can express).
AGREEMENT_SAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("ChargeRequest", {"requested_kw": 22, "duration_minutes": 120}),
    ("ChargeRequest", {"requested_kw": 22, "energy_kwh": 40, "unknown_field": "ignored"}),
    ("ChargeRequest", {"requested_kw": 22}),
    ("ChargeRequest", {"requested_kw": 22, "duration_minutes": None, "energy_kwh": None}),
    ("ChargeRequest", {"requested_kw": 0, "duration_minutes": 120}),
    ("ChargeRequest", {"requested_kw": 1000.5, "duration_minutes": 120}),
    ("ChargeRequest", {"requested_kw": 22, "duration_minutes": 120, "priority": 10}),
    ("ChargeRequest", {"requested_kw": 22, "duration_minutes": 120, "ev_id": "a/b"}),
    ("ChargeRequest", {"requested_kw": 22, "duration_minutes": 120, "request_id": "x" * 129}),
    ("ChargeRequest", {"requested_kw": "22", "duration_minutes": 120}),
    ("Release", {}),
    ("Release", {"session_id": "s 1"}),
    ("Assignment", {"request_id": None, "ev_id": "EV_1", "status": "queued", "ts": 1.0}),
    ("Assignment", {"ev_id": "EV_1", "status": "queued", "ts": 1.0}),
    ("Assignment", {"request_id": "r", "ev_id": "EV_1", "status": "waiting", "ts": 1.0}),
    ("Assignment", {"request_id": "r", "ev_id": "EV_1", "status": "queued", "ts": 1.0, "position": 0}),
    ("Telemetry", {"substation_id": "A", "ts": 1, "seq": 0, "capacity_kw": 1, "load_kw": 0, "base_load_kw": 0,
                   "ev_load_kw": 0, "active_sessions": 0}),
    ("Telemetry", {"substation_id": "A", "ts": 1, "seq": 0, "capacity_kw": 0, "load_kw": 0, "base_load_kw": 0,
                   "ev_load_kw": 0, "active_sessions": 0}),
    ("Telemetry", {"substation_id": "A", "ts": 1, "capacity_kw": 1, "load_kw": 0, "base_load_kw": 0,
                   "ev_load_kw": 0, "active_sessions": 0}),
    ("SubstationStatus", {"state": "online"}),
    ("SubstationStatus", {"state": "maintenance"}),
    ("SessionCommand", {"command": "start", "session_id": "s1", "ev_id": "EV_1", "ts": 1}),
    ("SessionCommand", {"command": "start", "session_id": "s1", "ev_id": "EV_1", "ts": 1, "granted_kw": -1}),
    ("SessionCommands", {"ts": 1, "commands": [{"command": "stop", "session_id": "s1", "ev_id": "EV_1", "ts": 1}]}),
    ("SessionCommands", {"ts": 1, "commands": []}),
    ("SessionCommands", {"ts": 1, "commands": [], "epoch": 7}),
    ("SessionCommands", {"ts": 1, "commands": [], "epoch": 0}),
    ("SessionCommands", {"ts": 1, "commands": [], "epoch": 1.5}),
    ("SessionCommands", {"ts": 1, "commands": [{"command": "stop", "session_id": "s", "ev_id": "E", "ts": 1}] * 201}),
    ("SessionCommands", {"ts": 1, "commands": [{"command": "pause", "session_id": "s1", "ev_id": "EV_1", "ts": 1}]}),
    ("SessionEvent", {"event": "ended", "session_id": "s1", "ev_id": "EV_1", "ts": 1, "reason": "r" * 65}),
    ("ErrorReport", {"reason": "invalid_field", "detail": "d", "topic": "t", "ts": 1}),
    ("ErrorReport", {"reason": "invalid_field", "detail": "d" * 513, "topic": "t", "ts": 1}),
    ("BalancerStatus", {"state": "offline"}),
    ("BalancerStatus", {"state": "offline", "ts": -1}),
]


@pytest.mark.parametrize(("model", "payload"), AGREEMENT_SAMPLES)
def test_schema_and_codec_agree(model: str, payload: dict[str, Any]) -> None:
    schema_ok = _validator(model).is_valid(payload)
    try:
        decode(json.dumps(payload).encode(), STRUCTS[model])
        codec_ok = True
    except PayloadError:
        codec_ok = False
    assert schema_ok == codec_ok, f"JSON Schema says {schema_ok}, the codec says {codec_ok}"


# ---------------------------------------------------------------------------------------------- (e)

_NAME_RE = re.compile(r"^[a-zA-Z0-9.\-_]+$")
ROOT_KEYS = {"asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations", "components"}
CHANNEL_KEYS = {"address", "messages", "title", "summary", "description", "servers", "parameters", "tags",
                "externalDocs", "bindings"}
OPERATION_KEYS = {"action", "channel", "title", "summary", "description", "security", "tags", "externalDocs",
                  "bindings", "traits", "messages", "reply"}
MESSAGE_KEYS = {"headers", "payload", "correlationId", "contentType", "name", "title", "summary", "description",
                "tags", "externalDocs", "bindings", "examples", "traits"}
PARAMETER_KEYS = {"enum", "default", "description", "examples", "location"}
SERVER_KEYS = {"host", "protocol", "protocolVersion", "pathname", "description", "title", "summary", "variables",
               "security", "tags", "externalDocs", "bindings"}
MQTT_OPERATION_BINDING = {"qos", "retain", "messageExpiryInterval", "bindingVersion"}
MQTT_MESSAGE_BINDING = {"payloadFormatIndicator", "correlationData", "contentType", "responseTopic", "bindingVersion"}


def _own_keys(obj: dict[str, Any]) -> set[str]:
    return {k for k in obj if not k.startswith("x-")}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_asyncapi_root_and_info() -> None:
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    assert _own_keys(doc) <= ROOT_KEYS
    assert isinstance(doc["info"]["title"], str) and doc["info"]["title"]
    version = doc["info"]["version"]
    assert isinstance(version, str) and version.split(".")[0] == DEFAULT_PREFIX.rsplit("/v", 1)[1], \
        "info.version's major number is the prefix's version"
    assert isinstance(doc["channels"], dict) and isinstance(doc["operations"], dict)


def test_asyncapi_every_ref_resolves() -> None:
    for ref in _refs(asyncapi()):
        resolve(ref)


def test_asyncapi_component_and_object_names() -> None:
    doc = asyncapi()
    names = list(doc["channels"]) + list(doc["operations"]) + list(doc.get("servers", {}))
    for section in doc.get("components", {}).values():
        names += list(section)
    bad = [n for n in names if not _NAME_RE.match(n)]
    assert not bad, f"names not matching {_NAME_RE.pattern}: {bad}"


def test_asyncapi_servers() -> None:
    servers = asyncapi()["servers"]
    assert {s["protocol"] for s in servers.values()} >= {"mqtt", "mqtts"}
    for name, server in servers.items():
        assert _own_keys(server) <= SERVER_KEYS, name
        assert isinstance(server["host"], str) and isinstance(server["protocol"], str)
        variables = set(re.findall(r"{([^}]+)}", server["host"] + server.get("pathname", "")))
        assert variables == set(server.get("variables", {})), f"server {name}: variables"
        for var in server.get("variables", {}).values():
            assert isinstance(deref(var).get("default"), str)
        for sec in server.get("security", []):
            assert deref(sec)["type"] in {"userPassword", "X509", "plain", "scramSha256", "scramSha512"}


def test_asyncapi_channels_structure() -> None:
    for channel_id, channel in asyncapi()["channels"].items():
        assert _own_keys(channel) <= CHANNEL_KEYS, channel_id
        address = channel.get("address")
        assert address is None or isinstance(address, str)
        names = set(re.findall(r"{([^}]+)}", address or ""))
        assert names == set(channel.get("parameters", {})), f"{channel_id}: address parameters"
        for param in channel.get("parameters", {}).values():
            assert _own_keys(deref(param)) <= PARAMETER_KEYS
        assert channel["messages"], f"{channel_id}: no messages"
        for message in channel["messages"].values():
            message = deref(message)
            assert _own_keys(message) <= MESSAGE_KEYS and "payload" in message
            assert set(message.get("bindings", {}).get("mqtt", {})) <= MQTT_MESSAGE_BINDING
            for example in message.get("examples", []):
                assert set(example) <= {"headers", "payload", "name", "summary"} and "payload" in example


def test_asyncapi_operations_structure() -> None:
    channels = asyncapi()["channels"]
    for op_id, op in asyncapi()["operations"].items():
        assert _own_keys(op) <= OPERATION_KEYS, op_id
        assert op["action"] in ("send", "receive")
        ref = op["channel"]["$ref"]
        assert ref.startswith("#/channels/") and ref.removeprefix("#/channels/") in channels, op_id
        channel_id = ref.removeprefix("#/channels/")
        # An operation's messages must be a subset of its channel's messages.
        for message in op.get("messages", []):
            assert message["$ref"].startswith(f"#/channels/{channel_id}/messages/"), op_id
            resolve(message["$ref"])
        mqtt = op.get("bindings", {}).get("mqtt", {})
        assert set(mqtt) <= MQTT_OPERATION_BINDING and mqtt.get("qos") in (0, 1, 2)
        assert isinstance(mqtt.get("retain"), bool)
        if "reply" in op:
            reply = op["reply"]
            reply_channel = reply["channel"]["$ref"].removeprefix("#/channels/")
            assert reply_channel in channels
            assert deref(reply["address"])["location"].startswith("$message.")
            for message in reply.get("messages", []):
                assert message["$ref"].startswith(f"#/channels/{reply_channel}/messages/")
                resolve(message["$ref"])


def test_asyncapi_every_channel_has_an_operation() -> None:
    used = {op["channel"]["$ref"] for op in asyncapi()["operations"].values()}
    used |= {op["reply"]["channel"]["$ref"] for op in asyncapi()["operations"].values() if "reply" in op}
    assert used == {f"#/channels/{cid}" for cid in asyncapi()["channels"]}


@pytest.mark.parametrize("name", sorted(asyncapi()["components"]["schemas"]) if ASYNCAPI.exists() else [])
def test_asyncapi_schema_is_valid_json_schema(name: str) -> None:
    jsonschema.Draft7Validator.check_schema(asyncapi()["components"]["schemas"][name])


def test_grid_protocol_exports_every_model() -> None:
    for name, model in MODELS.items():
        assert getattr(grid_protocol, name) is model
