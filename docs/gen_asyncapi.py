"""Generate ``docs/asyncapi.yaml`` (AsyncAPI 3.0.0) from the contract in :mod:`grid_protocol`.

Everything that can come from the code does: channels, addresses, QoS and retain flags, publishers and
subscribers from :data:`grid_protocol.topics.CHANNELS`; payload schemas from the msgspec models
(``msgspec.json.schema_components``); the reason list from :class:`grid_protocol.reasons.Reason`. Only
prose, the example payloads and the cross-field rules msgspec cannot express (``__post_init__``
checks) are written here. Operations are described from the **balancer's** point of view: ``receive``
for what it consumes, ``send`` for what it publishes.

Usage (from the repository root)::

    .venv/bin/python docs/gen_asyncapi.py           # rewrite docs/asyncapi.yaml
    .venv/bin/python docs/gen_asyncapi.py --check   # exit 1 when docs/asyncapi.yaml is out of date

The output is deterministic (no timestamps, fixed key order); ``tests/unit/test_contract_docs.py``
regenerates it in memory and fails when the committed file differs.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import inspect
import sys
from pathlib import Path
from typing import Any

import msgspec
import yaml

from grid_protocol import codec, messages
from grid_protocol.ids import ID_PATTERN
from grid_protocol.reasons import Reason
from grid_protocol.topics import CHANNELS, DEFAULT_PREFIX, REGION_LEVEL, Channel, TopicKind, Topics

OUTPUT = Path(__file__).resolve().parent / "asyncapi.yaml"
REGENERATE = ".venv/bin/python docs/gen_asyncapi.py"

#: Version of the contract document. The major version is the one in the topic prefix (``grid/v1``);
#: bump the minor version when fields, channels or reasons are added.
CONTRACT_VERSION = "1.0.0"
BINDING_VERSION = "0.2.0"
SCHEMA_REF = "#/components/schemas/{name}"

#: Address parameter name per first topic level of a template (``ev/{id}/...`` -> ``{ev_id}``).
PARAMETER_BY_ROOT = {"ev": "ev_id", "substation": "substation_id"}

#: Cross-field rules of the models' ``__post_init__``: JSON Schema additions that say the same thing.
CROSS_FIELD_RULES: dict[str, dict[str, Any]] = {
    "ChargeRequest": {
        "anyOf": [
            {"required": ["duration_minutes"], "properties": {"duration_minutes": {"type": "number"}}},
            {"required": ["energy_kwh"], "properties": {"energy_kwh": {"type": "number"}}},
        ],
        "x-rules": [
            "At least one of duration_minutes or energy_kwh is given and not null.",
            "min_kw, when given, is not greater than requested_kw.",
        ],
    },
}

#: Example payloads per model: (name, summary, message). Each is checked by decoding it with the codec.
EXAMPLES: dict[type, list[tuple[str, str, msgspec.Struct]]] = {
    messages.Telemetry: [
        ("telemetry", "Substation north at 52 % of its capacity", messages.Telemetry(
            substation_id="north", ts=1767225600.0, seq=42, capacity_kw=400.0, load_kw=207.4,
            base_load_kw=163.4, ev_load_kw=44.0, active_sessions=2)),
    ],
    messages.SubstationStatus: [
        ("online", "Published (retained) on every connect",
         messages.SubstationStatus(state="online", substation_id="north", ts=1767225600.0, capacity_kw=400.0)),
        ("offline-will", "The agent's last will (retained)",
         messages.SubstationStatus(state="offline", substation_id="north")),
    ],
    messages.SessionCommands: [
        ("start", "Start a session of 22 kW for at most 120 minutes", messages.SessionCommands(
            ts=1767225601.0, commands=[messages.SessionCommand(
                command="start", session_id="9f1c2a7e-17", ev_id="EV_1234", ts=1767225601.0, granted_kw=22.0,
                duration_minutes=120.0)])),
        ("batch", "Base load rose: lower one grant, stop the newest session (applied in this order)",
         messages.SessionCommands(ts=1767225900.0, commands=[
             messages.SessionCommand(command="update", session_id="9f1c2a7e-17", ev_id="EV_1234", ts=1767225900.0,
                                     granted_kw=11.0, reason=Reason.CAPACITY_REDUCED),
             messages.SessionCommand(command="stop", session_id="9f1c2a7e-18", ev_id="EV_0042", ts=1767225900.0,
                                     reason=Reason.CAPACITY_REDUCED)])),
        ("renewal-fenced", "Cluster mode: a pure lease renewal from the region owner of epoch 42 (an agent that "
         "has seen a higher epoch refuses it)", messages.SessionCommands(
             ts=1767225610.0, commands=[], valid_until=1767225620.0, epoch=42)),
        ("stop", "Stop: the EV released early", messages.SessionCommands(
            ts=1767229200.0, commands=[messages.SessionCommand(
                command="stop", session_id="9f1c2a7e-17", ev_id="EV_1234", ts=1767229200.0,
                reason=Reason.RELEASED)])),
    ],
    messages.SessionEvent: [
        ("started", "The agent applied a start command", messages.SessionEvent(
            event="started", session_id="9f1c2a7e-17", ev_id="EV_1234", ts=1767225601.2, substation_id="north")),
        ("ended", "The session delivered the energy asked for", messages.SessionEvent(
            event="ended", session_id="9f1c2a7e-17", ev_id="EV_1234", ts=1767232801.0, substation_id="north",
            reason=Reason.ENERGY_DELIVERED, energy_delivered_kwh=40.0)),
    ],
    messages.ErrorReport: [
        ("invalid-field", "A telemetry message without seq was refused", messages.ErrorReport(
            reason=Reason.INVALID_FIELD, detail="Object missing required field `seq`",
            topic=f"{DEFAULT_PREFIX}/substation/north/telemetry", ts=1767225600.5)),
    ],
    messages.ChargeRequest: [
        ("duration", "22 kW for two hours", messages.ChargeRequest(
            request_id="0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b11", ev_id="EV_1234", requested_kw=22.0,
            duration_minutes=120.0)),
        ("energy", "40 kWh, at least 3.7 kW, urgent", messages.ChargeRequest(
            request_id="0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b12", ev_id="EV_1234", requested_kw=11.0,
            energy_kwh=40.0, min_kw=3.7, priority=5)),
    ],
    messages.Release: [
        ("release", "Stop charging (or leave the queue)",
         messages.Release(request_id="0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b11", ev_id="EV_1234")),
    ],
    messages.Assignment: [
        ("assigned", "The request got a session", messages.Assignment(
            request_id="0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b11", ev_id="EV_1234", status="assigned",
            ts=1767225601.0, substation_id="north", granted_kw=22.0, session_id="9f1c2a7e-17")),
        ("queued", "No headroom anywhere: waiting in line", messages.Assignment(
            request_id="0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b11", ev_id="EV_1234", status="queued",
            ts=1767225601.0, reason=Reason.NO_HEADROOM, position=3)),
        ("revoked", "The substation went offline; the request is back in the queue", messages.Assignment(
            request_id="0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b11", ev_id="EV_1234", status="revoked",
            ts=1767226000.0, substation_id="north", granted_kw=22.0, session_id="9f1c2a7e-17",
            reason=Reason.SUBSTATION_OFFLINE,
            detail="substation north went offline; the request is back in the queue and will be re-assigned")),
        ("rejected", "A second request while one is open", messages.Assignment(
            request_id="0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b99", ev_id="EV_1234", status="rejected",
            ts=1767225700.0, reason=Reason.EV_BUSY,
            detail="EV already has open request '0d6f5c1e-3b7a-4c55-9a57-0f5e2d9c8b11'; release it first")),
    ],
    messages.LimitSchedule: [
        ("evening-cut", "The DSO limits substation north to 250 kW from 17:00 to 20:00 (UTC)", messages.LimitSchedule(
            source="dso-north", request_id="dso-17", entries=[messages.LimitEntry(
                start=1767286800.0, end=1767297600.0, limit_kw=250.0)])),
        ("withdraw", "The source withdraws every limit it set", messages.LimitSchedule(source="dso-north", entries=[])),
    ],
    messages.ScheduleState: [
        ("two-sources", "A DSO cut and a tighter OpenADR event inside it: the lowest binds", messages.ScheduleState(
            substation_id="north", ts=1767283200.0, limit_kw=None, source=None,
            entries=[messages.ScheduleEntry(start=1767286800.0, end=1767297600.0, limit_kw=250.0, source="dso-north"),
                     messages.ScheduleEntry(start=1767290400.0, end=1767294000.0, limit_kw=180.0, source="openadr")],
            composite=[
                messages.CompositeSlot(start=1767286800.0, end=1767290400.0, limit_kw=250.0, source="dso-north"),
                messages.CompositeSlot(start=1767290400.0, end=1767294000.0, limit_kw=180.0, source="openadr"),
                messages.CompositeSlot(start=1767294000.0, end=1767297600.0, limit_kw=250.0, source="dso-north")])),
    ],
    messages.BalancerStatus: [
        ("online", "Published (retained) on every connect", messages.BalancerStatus(
            state="online", ts=1767225600.0, version="0.1.0", safety_margin_pct=5.0, stale_after_s=5.0)),
        ("offline-will", "The balancer's last will (retained)", messages.BalancerStatus(state="offline")),
    ],
}

_EXTRA_CHANNEL_TEXT: dict[TopicKind, str] = {
    TopicKind.SUBSTATION_TELEMETRY: "The balancer drops telemetry whose seq is not newer than the last one seen "
    "(unless it is 100 or more behind: the agent restarted). A substation without telemetry for stale_after_s "
    "gets no new sessions; with none for lost_after_s its sessions are revoked (reason substation_lost).",
    TopicKind.SUBSTATION_STATUS: "Last will: the broker publishes the retained offline status when the agent's "
    "connection is lost; the balancer then revokes every session of the substation (reason substation_offline, "
    "no stop command) and re-queues the requests. An empty retained message (clearing the topic) is ignored.",
    TopicKind.SUBSTATION_COMMAND: "Never retained (the agent refuses retained commands). The balancer batches the "
    "commands it decides for one substation while handling a burst of input into one message; the agent applies "
    "them in order (reductions and stops come before starts).",
    TopicKind.SUBSTATION_SESSION: "A started event for a session the balancer does not know is answered with a "
    "stop command (reason unknown_session).",
    TopicKind.SUBSTATION_ERROR: "Sent for telemetry, status and session payloads the balancer refused.",
    TopicKind.EV_REQUEST: "Idempotent per (ev_id, request_id): a repeated request is answered with the latest "
    "answer for it. MQTT 5 requests may name a response topic below {prefix}/reply/ (see the reply channel).",
    TopicKind.EV_RELEASE: "With neither request_id nor session_id, whatever the EV has open is released.",
    TopicKind.EV_ASSIGNMENT: "Every key is present in every message (null when not applicable).",
    TopicKind.SUBSTATION_LIMITS: "Never retained (a retained one is refused with reason retained and cleared). "
    "Within a source the highest priority applies; across sources the lowest limit wins. The balancer plans with "
    "the lowest limit from now to BALANCER_LIMIT_LEAD_S ahead, so sessions are reduced before a limit starts.",
    TopicKind.SUBSTATION_SCHEDULE: "Published on every change and whenever an entry starts or ends; cleared (empty "
    "retained message) when the substation is forgotten.",
    TopicKind.BALANCER_STATUS: "Last will: the broker publishes the retained offline status when the balancer's "
    "connection is lost; a graceful stop publishes it too (with ts). Under the broker ACL only the balancer, api "
    "and observer accounts may read it (not EVs or substation agents).",
}


def _text(doc: str) -> str:
    """A docstring as plain Markdown: dedented, paragraphs unwrapped, reST ``literals`` as `code`."""
    paragraphs = inspect.cleandoc(doc).replace("``", "`").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _doc(model: type) -> str:
    return _text(model.__doc__ or "")


def _parameter(template: str) -> str | None:
    if "{id}" not in template:
        return None
    return PARAMETER_BY_ROOT[template.split("/")[0]]


def channel_address(channel: Channel, prefix: str = DEFAULT_PREFIX) -> str:
    """AsyncAPI address of ``channel``: the template under ``prefix`` with ``{id}`` named by its role."""
    param = _parameter(channel.template)
    template = channel.template if param is None else channel.template.replace("{id}", "{" + param + "}")
    return f"{prefix}/{template}"


def _camel(kind: TopicKind) -> str:
    return "".join(part.capitalize() for part in str(kind).split("_"))


def operation_id(channel: Channel) -> str:
    return f"{balancer_action(channel)}{_camel(channel.kind)}"


def balancer_action(channel: Channel) -> str:
    """``send`` when the balancer publishes on ``channel``, else ``receive``."""
    return "send" if channel.publisher.startswith("balancer") else "receive"


def _schemas() -> dict[str, Any]:
    models = [channel.payload for channel in CHANNELS.values()]
    _, components = msgspec.json.schema_components(models, ref_template=SCHEMA_REF)
    schemas: dict[str, Any] = {}
    for name in sorted(components):
        schema = copy.deepcopy(components[name])
        if "description" in schema:
            schema["description"] = _text(schema["description"])
        for prop_name, prop in schema.get("properties", {}).items():
            if prop_name == "reason":
                prop["description"] = ("Machine-readable reason, at most 64 characters; the values in use are "
                                       "listed in #/components/schemas/Reason.")
        schema.update(copy.deepcopy(CROSS_FIELD_RULES.get(name, {})))
        schemas[name] = schema
    schemas["Reason"] = {
        "title": "Reason",
        "description": _text(Reason.__doc__ or "") + "\n\nReason fields are plain strings: new values "
        "may be added in a minor version, so readers treat an unknown reason like a generic one of its status.",
        "type": "string",
        "enum": [str(reason) for reason in Reason],
    }
    return schemas


def _example_payload(example: msgspec.Struct) -> dict[str, Any]:
    raw = codec.encode(example)
    codec.decode(raw, type(example))  # the example must pass the contract's own validation
    payload: dict[str, Any] = msgspec.json.decode(raw)
    return payload


def _message(channel: Channel) -> dict[str, Any]:
    model = channel.payload
    name = model.__name__
    doc = _doc(model)
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "summary": doc.split("\n\n")[0],
        "contentType": "application/json",
        "payload": {"$ref": SCHEMA_REF.format(name=name)},
    }
    if doc != message["summary"]:
        message["description"] = doc
    if channel.kind in (TopicKind.EV_REQUEST, TopicKind.EV_RELEASE):
        message["correlationId"] = {
            "description": "MQTT 5 correlation data; copied unchanged into the reply sent to the response topic.",
            "location": "$message.header#/correlationData",
        }
        message["bindings"] = {"mqtt": {
            "responseTopic": {"type": "string", "pattern": f"^{DEFAULT_PREFIX}/reply/[^+#]+$",
                              "description": "Optional MQTT 5 response topic; honoured only below "
                                             "{prefix}/reply/ and without wildcards."},
            "correlationData": {"type": "string", "description": "Optional; echoed in the reply."},
            "bindingVersion": BINDING_VERSION,
        }}
    message["examples"] = [
        {"name": ex_name, "summary": summary, "payload": _example_payload(example)}
        for ex_name, summary, example in EXAMPLES.get(model, [])
    ]
    return message


def _channel(channel: Channel) -> dict[str, Any]:
    name = channel.payload.__name__
    description = (f"Publisher: {channel.publisher}. Subscribers: {channel.subscribers}. "
                   f"QoS {channel.qos}, {'retained' if channel.retain else 'not retained'}. "
                   f"{_EXTRA_CHANNEL_TEXT.get(channel.kind, '')}").strip()
    out: dict[str, Any] = {
        "address": channel_address(channel),
        "title": str(channel.kind),
        "summary": channel.summary,
        "description": description,
        "messages": {name: {"$ref": f"#/components/messages/{name}"}},
    }
    param = _parameter(channel.template)
    if param is not None:
        out["parameters"] = {param: {"$ref": f"#/components/parameters/{param}"}}
    out["x-publisher"] = channel.publisher
    out["x-subscribers"] = channel.subscribers
    return out


def _reply_address() -> dict[str, Any]:
    return {
        "description": "The MQTT 5 response topic of the request (only below {prefix}/reply/, no wildcards).",
        "location": "$message.header#/responseTopic",
    }


def _operation(channel: Channel) -> dict[str, Any]:
    name = channel.payload.__name__
    kind = str(channel.kind)
    action = balancer_action(channel)
    verb = "publishes" if action == "send" else "consumes"
    op: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{kind}"},
        "title": f"Balancer {verb} {name}",
        "summary": channel.summary,
        "messages": [{"$ref": f"#/channels/{kind}/messages/{name}"}],
        "bindings": {"mqtt": {"qos": channel.qos, "retain": channel.retain, "bindingVersion": BINDING_VERSION}},
    }
    if channel.kind in (TopicKind.EV_REQUEST, TopicKind.EV_RELEASE):
        op["reply"] = {
            "address": _reply_address(),
            "channel": {"$ref": "#/channels/reply"},
            "messages": [{"$ref": "#/channels/reply/messages/Assignment"}],
        }
    return op


def build() -> dict[str, Any]:
    """The AsyncAPI document as plain data (deterministic)."""
    channels: dict[str, Any] = {str(kind): _channel(channel) for kind, channel in CHANNELS.items()}
    channels["reply"] = {
        "address": None,
        "title": "reply",
        "summary": "MQTT 5 response topic named by a request or release.",
        "description": "Dynamic address: the response topic of the request, honoured only when it starts with "
        f"{{prefix}}/reply/ (default {DEFAULT_PREFIX}/reply/) and has no wildcard; others are ignored and logged. "
        "The broker lets a client read only below its own root, "
        f"{DEFAULT_PREFIX}/reply/<username>/#. The reply carries the request's correlation data and the same "
        "Assignment that is published on the EV's assignment topic. Sent QoS 1, not retained. Requests: every "
        "direct answer. Releases: only rejections (the completed/cancelled answer goes to the assignment topic "
        "only).",
        "messages": {"Assignment": {"$ref": "#/components/messages/Assignment"}},
        "x-publisher": "balancer",
        "x-subscribers": "the requesting client",
    }
    operations: dict[str, Any] = {operation_id(c): _operation(c) for c in CHANNELS.values()}
    messages_: dict[str, Any] = {c.payload.__name__: _message(c) for c in CHANNELS.values()}
    reason_values = ", ".join(str(r) for r in Reason)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Smart Grid Load Balancer MQTT contract",
            "version": CONTRACT_VERSION,
            "description": (
                "EV charging balanced across grid substations over MQTT. Generated from grid_protocol by "
                f"docs/gen_asyncapi.py ({REGENERATE}); do not edit by hand. The human-readable contract, "
                "lifecycle and hand-testing guide is docs/protocol.md.\n\n"
                f"Addresses are shown with the default topic prefix {DEFAULT_PREFIX}; deployments may set "
                "another one with GRID_TOPIC_PREFIX (the prefix carries the major version). Operations are "
                "described from the balancer's point of view: receive = the balancer consumes, send = the "
                "balancer publishes. Payloads are UTF-8 JSON objects of at most "
                f"{codec.MAX_PAYLOAD_BYTES} bytes (balancer limit; the broker refuses more than 65536). "
                "Readers ignore unknown fields; fields are added, never removed.\n\n"
                f"Regions: every substation belongs to a region (SubstationStatus.region). The addresses below are "
                f"region {messages.DEFAULT_REGION}'s; region R has every channel below "
                f"{Topics(region='R').root}/ instead of {DEFAULT_PREFIX}/ (for example "
                f"{Topics(region='R').root}/{CHANNELS[TopicKind.EV_REQUEST].template.replace('{id}', '{ev_id}')}), "
                f"R matching {ID_PATTERN}, and "
                f"{DEFAULT_PREFIX}/{REGION_LEVEL}/{messages.DEFAULT_REGION}/... is not a topic. Each region has "
                "exactly one active balancer (its own retained balancer/status and queue); an EV asks in the region "
                "it charges in and is answered there; agents use their region's channels; a status naming another "
                "region than its topic's is refused (region_mismatch). The MQTT 5 reply root is one per grid "
                f"({DEFAULT_PREFIX}/reply/).\n\n"
                f"Reasons: {reason_values}."
            ),
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:{port}",
                "protocol": "mqtt",
                "protocolVersion": "5.0",
                "title": "Local broker",
                "description": "The private Mosquitto of a local run (gridlb run), loopback only. The port "
                "and hand-testing passwords are in .run/credentials.env (MQTT_PORT, ...). MQTT 3.1.1 "
                "clients work too but get no response topics and no refusal codes.",
                "variables": {"port": {"default": "1884", "description": "MQTT_PORT of the local run (gridlb run "
                                                                      "takes 1884, or a free port if it is busy)."}},
                "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
            },
            "secure": {
                "host": "{host}:{port}",
                "protocol": "mqtts",
                "protocolVersion": "5.0",
                "title": "Broker with TLS",
                "description": "TLS listener (certificates from broker/tls/make-certs.sh); clients verify the "
                "server with the CA (MQTT_TLS_CA).",
                "variables": {
                    "host": {"default": "127.0.0.1", "description": "Broker host name (MQTT_HOST)."},
                    "port": {"default": "8883", "description": "TLS port of the broker."},
                },
                "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _schemas(),
            "messages": messages_,
            "parameters": {
                param: {
                    "description": f"{'EV' if param == 'ev_id' else 'Substation'} id, one topic level matching "
                    f"{ID_PATTERN} (so never / + # or NUL)."
                    + (" It is also the EV's broker username." if param == "ev_id" else
                       " The agent's broker username is substation.<substation_id>."),
                    "examples": ["EV_1234"] if param == "ev_id" else ["north"],
                    "x-pattern": ID_PATTERN,
                }
                for param in sorted(PARAMETER_BY_ROOT.values())
            },
            "securitySchemes": {
                "userPassword": {
                    "type": "userPassword",
                    "description": "Every client has a broker account (no anonymous access). EVs: username == "
                    "ev_id. Substation agents: substation.<id>. Services: balancer, api, observer, loadtest "
                    "(tests only). The ACL confines each account to its topics (docs/protocol.md).",
                },
            },
        },
    }


def render() -> str:
    """The document as YAML text, exactly as committed in docs/asyncapi.yaml."""
    header = (
        "# Generated by docs/gen_asyncapi.py from grid_protocol: do not edit by hand.\n"
        f"# Regenerate with: {REGENERATE}\n"
    )
    body = yaml.safe_dump(build(), sort_keys=False, allow_unicode=True, width=110, default_flow_style=False)
    return header + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/asyncapi.yaml from grid_protocol.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is out of date")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="output file (default %(default)s)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current == text:
            print(f"{args.out} is up to date")
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   str(args.out), "generated", n=1))
        print(f"\n{args.out} is out of date: run {REGENERATE}", file=sys.stderr)
        return 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
