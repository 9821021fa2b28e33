"""The strict codec (guarantee 6: bad input never crashes anything) and the topic builder/parser.

Every bad payload must raise :class:`PayloadError` (and nothing else) with a stable reason, so the
balancer can answer it ``rejected`` instead of crashing or silently accepting a wrong value.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import msgspec
import pytest

from grid_protocol import (
    CHANNELS,
    Assignment,
    ChargeRequest,
    PayloadError,
    Reason,
    Release,
    SessionCommand,
    SessionEvent,
    SubstationStatus,
    Telemetry,
    TopicKind,
    Topics,
    decode,
    encode,
    is_valid_id,
)
from grid_protocol.codec import MAX_PAYLOAD_BYTES

BIG = 10_000_000  # max_bytes for cases that must be judged on their content, not their size
OK_REQ = b'{"requested_kw": 22, "duration_minutes": 60'


def req(extra: str = "", *, base: bytes = OK_REQ) -> bytes:
    """A valid request body with ``extra`` JSON members appended before the closing brace."""
    return base + (b", " + extra.encode() if extra else b"") + b"}"


def refused(payload: bytes, model: type = ChargeRequest, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decode(payload, model, max_bytes=max_bytes)
    return info.value


# ============================================================================ bad input, by class

BAD = [
    # --- malformed JSON
    pytest.param(b"", Reason.MALFORMED_JSON, id="empty"),
    pytest.param(b"{", Reason.MALFORMED_JSON, id="truncated"),
    pytest.param(b"not json", Reason.MALFORMED_JSON, id="not-json"),
    pytest.param(b'{"requested_kw": 22, "duration_minutes": 60,}', Reason.MALFORMED_JSON, id="trailing-comma"),
    pytest.param(b"{'requested_kw': 22, 'duration_minutes': 60}", Reason.MALFORMED_JSON, id="single-quotes"),
    pytest.param(req() + b" {}", Reason.MALFORMED_JSON, id="trailing-garbage"),
    pytest.param(b"\xff\xfe{}", Reason.MALFORMED_JSON, id="not-utf8"),
    pytest.param(b'{"requested_kw": 22, "duration_minutes": 60, "request_id": "\xc3"}', Reason.MALFORMED_JSON,
                 id="invalid-utf8-in-request-id"),
    pytest.param(b'{"requested_kw": 22, "duration_minutes": 60, "ev_id": "EV\xff"}', Reason.MALFORMED_JSON,
                 id="invalid-utf8-in-ev-id"),
    pytest.param(b'{"requested_kw": 22 "duration_minutes": 60}', Reason.MALFORMED_JSON, id="missing-comma"),
    pytest.param(b'{"requested_kw": 022, "duration_minutes": 60}', Reason.MALFORMED_JSON, id="leading-zero"),
    # --- NaN / Infinity literals (stdlib json accepts them)
    pytest.param(b'{"requested_kw": NaN, "duration_minutes": 60}', Reason.MALFORMED_JSON, id="nan"),
    pytest.param(b'{"requested_kw": Infinity, "duration_minutes": 60}', Reason.MALFORMED_JSON, id="infinity"),
    pytest.param(b'{"requested_kw": -Infinity, "duration_minutes": 60}', Reason.MALFORMED_JSON, id="minus-infinity"),
    pytest.param(b'{"requested_kw": 22, "duration_minutes": NaN}', Reason.MALFORMED_JSON, id="nan-duration"),
    pytest.param(req('"x": NaN'), Reason.MALFORMED_JSON, id="nan-in-unknown-field"),
    # --- wrong types
    pytest.param(b'{"requested_kw": "22", "duration_minutes": 60}', Reason.INVALID_FIELD, id="kw-as-string"),
    pytest.param(b'{"requested_kw": true, "duration_minutes": 60}', Reason.INVALID_FIELD, id="kw-as-bool"),
    pytest.param(b'{"requested_kw": null, "duration_minutes": 60}', Reason.INVALID_FIELD, id="kw-null"),
    pytest.param(b'{"requested_kw": [22], "duration_minutes": 60}', Reason.INVALID_FIELD, id="kw-as-list"),
    pytest.param(b'{"requested_kw": {"v": 22}, "duration_minutes": 60}', Reason.INVALID_FIELD, id="kw-as-object"),
    pytest.param(req('"priority": 1.5'), Reason.INVALID_FIELD, id="priority-float"),
    pytest.param(req('"priority": "1"'), Reason.INVALID_FIELD, id="priority-string"),
    pytest.param(req('"ev_id": 1234'), Reason.INVALID_FIELD, id="ev-id-number"),
    pytest.param(req('"request_id": ["a"]'), Reason.INVALID_FIELD, id="request-id-list"),
    pytest.param(b"[1, 2]", Reason.INVALID_FIELD, id="top-level-array"),
    pytest.param(b'"hello"', Reason.INVALID_FIELD, id="top-level-string"),
    pytest.param(b"22", Reason.INVALID_FIELD, id="top-level-number"),
    pytest.param(b"null", Reason.INVALID_FIELD, id="top-level-null"),
    pytest.param(b"{}", Reason.INVALID_FIELD, id="empty-object"),
    pytest.param(b'{"duration_minutes": 60}', Reason.INVALID_FIELD, id="requested-kw-missing"),
    # --- out of range / huge numbers
    pytest.param(b'{"requested_kw": 1e400, "duration_minutes": 60}', Reason.INVALID_FIELD, id="1e400"),
    pytest.param(b'{"requested_kw": -1e400, "duration_minutes": 60}', Reason.INVALID_FIELD, id="minus-1e400"),
    pytest.param(b'{"requested_kw": 1e308, "duration_minutes": 60}', Reason.INVALID_FIELD, id="1e308"),
    pytest.param(b'{"requested_kw": 0, "duration_minutes": 60}', Reason.INVALID_FIELD, id="zero-kw"),
    pytest.param(b'{"requested_kw": -22, "duration_minutes": 60}', Reason.INVALID_FIELD, id="negative-kw"),
    pytest.param(b'{"requested_kw": 1000.001, "duration_minutes": 60}', Reason.INVALID_FIELD, id="kw-above-1000"),
    pytest.param(b'{"requested_kw": 22, "duration_minutes": 0}', Reason.INVALID_FIELD, id="zero-duration"),
    pytest.param(b'{"requested_kw": 22, "duration_minutes": 10081}', Reason.INVALID_FIELD, id="duration-over-7-days"),
    pytest.param(req('"priority": 10'), Reason.INVALID_FIELD, id="priority-10"),
    pytest.param(req('"priority": -1'), Reason.INVALID_FIELD, id="priority-negative"),
    pytest.param(req('"priority": 99999999999999999999999'), Reason.INVALID_FIELD, id="priority-beyond-int64"),
    pytest.param(req('"min_kw": -1'), Reason.INVALID_FIELD, id="min-kw-negative"),
    pytest.param(req('"energy_kwh": 1e999'), Reason.INVALID_FIELD, id="energy-1e999"),
    # --- semantic rules
    pytest.param(req('"min_kw": 22.5'), Reason.INVALID_FIELD, id="min-kw-above-requested"),
    pytest.param(b'{"requested_kw": 22}', Reason.INVALID_FIELD, id="neither-duration-nor-energy"),
    pytest.param(b'{"requested_kw": 22, "duration_minutes": null, "energy_kwh": null}', Reason.INVALID_FIELD,
                 id="duration-and-energy-null"),
    # --- duplicate keys (stdlib json and pydantic: the last one silently wins)
    pytest.param(b'{"requested_kw": 1, "requested_kw": 22, "duration_minutes": 60}', Reason.DUPLICATE_KEY,
                 id="duplicate-key"),
    pytest.param(b'{"requested_kw": 22, "requested_kw": 22, "duration_minutes": 60}', Reason.DUPLICATE_KEY,
                 id="duplicate-key-same-value"),
    pytest.param(req('"ev_id": "EV_1", "ev_id": "EV_2"'), Reason.DUPLICATE_KEY, id="duplicate-ev-id"),
    pytest.param(b'{"requested_kw": 1, "requested_\\u006bw": 22, "duration_minutes": 60}', Reason.DUPLICATE_KEY,
                 id="unicode-escaped-duplicate-key"),
    pytest.param(b'{"requested_kw": 1, "\\u0072\\u0065\\u0071uested_kw": 22, "duration_minutes": 60}',
                 Reason.DUPLICATE_KEY, id="several-escapes-duplicate-key"),
    pytest.param(req('"ev_id": "EV_1", "ev_\\u0069d": "EV_2"'), Reason.DUPLICATE_KEY,
                 id="escaped-duplicate-ev-id"),
    pytest.param(b'{"duration_minutes": 60, "requested_kw": 22, "duration_minutes": 61}', Reason.DUPLICATE_KEY,
                 id="duplicate-non-adjacent"),
    # --- lone surrogates (pass stdlib decode, fail later on encode)
    pytest.param(req('"request_id": "\\ud800"'), Reason.MALFORMED_JSON, id="lone-high-surrogate"),
    pytest.param(req('"request_id": "\\udc00"'), Reason.MALFORMED_JSON, id="lone-low-surrogate"),
    pytest.param(req('"ev_id": "EV\\ud800x"'), Reason.MALFORMED_JSON, id="surrogate-then-char"),
    pytest.param(req('"x": "\\ud800\\u0041"'), Reason.MALFORMED_JSON, id="high-surrogate-then-non-low"),
    pytest.param(req('"x": "\\udfff"'), Reason.MALFORMED_JSON, id="surrogate-in-unknown-field"),
    pytest.param(OK_REQ + b', "request_id": "r\xed\xa0\x80"}', Reason.MALFORMED_JSON, id="raw-surrogate-bytes"),
    # --- ids that would break topics, ACLs or logs
    pytest.param(req('"ev_id": "EV/1"'), Reason.INVALID_FIELD, id="ev-id-slash"),
    pytest.param(req('"ev_id": "EV+1"'), Reason.INVALID_FIELD, id="ev-id-plus"),
    pytest.param(req('"ev_id": "EV#1"'), Reason.INVALID_FIELD, id="ev-id-hash"),
    pytest.param(req('"ev_id": "EV\\u00001"'), Reason.INVALID_FIELD, id="ev-id-nul"),
    pytest.param(req('"ev_id": "EV 1"'), Reason.INVALID_FIELD, id="ev-id-space"),
    pytest.param(req('"ev_id": "EV_1\\n"'), Reason.INVALID_FIELD, id="ev-id-trailing-newline"),
    pytest.param(req('"ev_id": "\\nEV_1"'), Reason.INVALID_FIELD, id="ev-id-leading-newline"),
    pytest.param(req('"ev_id": ""'), Reason.INVALID_FIELD, id="ev-id-empty"),
    pytest.param(req('"ev_id": "' + "E" * 65 + '"'), Reason.INVALID_FIELD, id="ev-id-65-chars"),
    pytest.param(req('"ev_id": "EV.1"'), Reason.INVALID_FIELD, id="ev-id-dot"),
    pytest.param(req('"ev_id": "\u00c9V_1"'), Reason.INVALID_FIELD, id="ev-id-non-ascii"),
    pytest.param(req('"request_id": "r/1"'), Reason.INVALID_FIELD, id="request-id-slash"),
    pytest.param(req('"request_id": "r+1"'), Reason.INVALID_FIELD, id="request-id-plus"),
    pytest.param(req('"request_id": "r#1"'), Reason.INVALID_FIELD, id="request-id-hash"),
    pytest.param(req('"request_id": "r\\u0000"'), Reason.INVALID_FIELD, id="request-id-nul"),
    pytest.param(req('"request_id": "r1\\n"'), Reason.INVALID_FIELD, id="request-id-trailing-newline"),
    pytest.param(req('"request_id": "' + "r" * 129 + '"'), Reason.INVALID_FIELD, id="request-id-129-chars"),
]


@pytest.mark.parametrize(("payload", "reason"), BAD)
def test_bad_request_payload_refused_with_reason(payload: bytes, reason: Reason) -> None:
    err = refused(payload)
    assert err.reason == reason, err
    assert isinstance(err, ValueError) and err.detail and len(err.detail) <= 500


def test_hex_number_refused() -> None:
    err = refused(b'{"requested_kw": 0x16, "duration_minutes": 60}')
    assert err.reason in (Reason.MALFORMED_JSON, Reason.INVALID_FIELD)  # msgspec reads the 0 first


BAD_UTF8_OTHER = [
    pytest.param(b'{"event": "ended", "session_id": "s1", "ev_id": "EV_1", "ts": 1, "reason": "\xc3"}',
                 id="truncated-sequence-in-free-text"),
    pytest.param(b'{"event": "ended", "session_id": "s1", "ev_id": "EV_1", "ts": 1, "reason": "\xed\xa0\x80"}',
                 id="encoded-surrogate-in-free-text"),
    pytest.param(b'{"event": "ended", "session_id": "s1", "ev_id": "EV_1", "ts": 1, "reason": "\xc0\xaf"}',
                 id="overlong-slash-in-free-text"),
]


@pytest.mark.parametrize("payload", BAD_UTF8_OTHER)
def test_invalid_utf8_in_a_free_text_field_is_malformed_not_a_crash(payload: bytes) -> None:
    """msgspec raises UnicodeDecodeError (not its DecodeError) here: the codec must still say PayloadError."""
    assert refused(payload, SessionEvent).reason == Reason.MALFORMED_JSON


def test_invalid_utf8_in_an_ignored_field_never_crashes() -> None:
    try:
        value = decode(OK_REQ + b', "x": "\xc3\xed\xa0\x80"}', ChargeRequest)
    except PayloadError:
        return
    assert value.requested_kw == 22.0


# ----------------------------------------------------------------------------- huge and deep

def test_5000_digit_integer_in_a_number_field() -> None:
    digits = b"9" * 5000
    assert refused(b'{"requested_kw": ' + digits + b', "duration_minutes": 60}', max_bytes=BIG).reason \
        == Reason.INVALID_FIELD
    assert refused(req('"priority": ' + "9" * 5000), max_bytes=BIG).reason == Reason.INVALID_FIELD
    assert refused(b'{"requested_kw": 22, "duration_minutes": -' + digits + b"}", max_bytes=BIG).reason \
        == Reason.INVALID_FIELD


def test_5000_digit_integer_with_default_limit_is_too_large() -> None:
    assert refused(req('"priority": ' + "9" * 5000)).reason == Reason.PAYLOAD_TOO_LARGE


def test_5000_digit_integer_in_an_unknown_field_never_crashes() -> None:
    """Unknown fields are ignored; a huge number there is either ignored or refused, never a crash."""
    try:
        value = decode(req('"x": ' + "9" * 5000), ChargeRequest, max_bytes=BIG)
    except PayloadError:
        return
    assert value.requested_kw == 22.0


def test_duplicate_key_next_to_a_huge_integer_is_not_missed() -> None:
    """The exact duplicate check parses with stdlib json, which refuses > 4300 digits: must not pass."""
    payload = b'{"requested_kw": 1, "requested_kw": 22, "duration_minutes": 60, "x": ' + b"9" * 5000 + b"}"
    assert refused(payload, max_bytes=BIG).reason in (Reason.DUPLICATE_KEY, Reason.MALFORMED_JSON)


DEEP = [
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="arrays-top-level"),
    pytest.param(b"{" + b'"a":{' * 100_000 + b"}" * 100_001, id="objects-top-level"),
    pytest.param(req('"x": ' + "[" * 100_000 + "]" * 100_000), id="arrays-in-unknown-field"),
    pytest.param(req('"x": ' + '{"a":' * 100_000 + "1" + "}" * 100_000), id="objects-in-unknown-field"),
    pytest.param(b'{"requested_kw": ' + b"[" * 100_000 + b"]" * 100_000 + b', "duration_minutes": 60}',
                 id="arrays-in-known-field"),
    pytest.param(b"[" * 100_000, id="unclosed"),
]


@pytest.mark.parametrize("payload", DEEP)
def test_100k_levels_of_nesting(payload: bytes) -> None:
    assert refused(payload).reason == Reason.PAYLOAD_TOO_LARGE  # the size limit alone stops it
    err = refused(payload, max_bytes=BIG)  # and without the size limit: refused, no RecursionError
    assert err.reason in (Reason.MALFORMED_JSON, Reason.INVALID_FIELD)


def test_deep_nesting_in_unknown_field_is_malformed() -> None:
    payload = req('"x": ' + "[" * 100_000 + "]" * 100_000)
    assert refused(payload, max_bytes=BIG).reason == Reason.MALFORMED_JSON


def test_duplicate_key_never_passes_at_any_nesting_depth() -> None:
    """msgspec and stdlib json give up at slightly different depths: no depth lets a duplicate through."""
    top = sys.getrecursionlimit() + 50
    for depth in range(1, top):
        payload = (b'{"requested_kw": 1, "requested_kw": 22, "duration_minutes": 60, "x": '
                   + b"[" * depth + b"]" * depth + b"}")
        with pytest.raises(PayloadError) as info:
            decode(payload, ChargeRequest, max_bytes=BIG)
        assert info.value.reason in (Reason.DUPLICATE_KEY, Reason.MALFORMED_JSON), depth


def test_moderate_nesting_in_unknown_field_is_fine() -> None:
    value = decode(req('"x": ' + "[" * 50 + "]" * 50), ChargeRequest)
    assert value.requested_kw == 22.0


# ----------------------------------------------------------------------------- size

SIZES = [
    pytest.param(MAX_PAYLOAD_BYTES, None, id="at-the-limit-ok"),
    pytest.param(MAX_PAYLOAD_BYTES + 1, Reason.PAYLOAD_TOO_LARGE, id="one-byte-over"),
    pytest.param(1_000_000, Reason.PAYLOAD_TOO_LARGE, id="a-megabyte"),
]


@pytest.mark.parametrize(("size", "reason"), SIZES)
def test_oversized_payload(size: int, reason: Reason | None) -> None:
    body = req()
    payload = body[:-1] + b" " * (size - len(body)) + b"}"  # whitespace padding: valid JSON
    assert len(payload) == size
    if reason is None:
        assert decode(payload, ChargeRequest).requested_kw == 22.0
    else:
        err = refused(payload)
        assert err.reason == reason and str(size) in err.detail


def test_size_limit_is_configurable() -> None:
    assert refused(req(), max_bytes=10).reason == Reason.PAYLOAD_TOO_LARGE
    assert decode(req(), ChargeRequest, max_bytes=len(req())).requested_kw == 22.0


def test_oversized_is_checked_before_parsing() -> None:
    """A huge malformed payload is refused as too large (cheap), not parsed."""
    assert refused(b"{" * 5000).reason == Reason.PAYLOAD_TOO_LARGE


# ============================================================================ good input

def test_original_http_design_body_decodes() -> None:
    r = decode(b'{"ev_id": "EV_1234", "requested_kw": 22, "duration_minutes": 120}', ChargeRequest)
    assert (r.ev_id, r.requested_kw, r.duration_minutes, r.request_id, r.energy_kwh, r.min_kw, r.priority) == (
        "EV_1234", 22.0, 120.0, None, None, None, 0)


GOOD = [
    pytest.param(req(), {"requested_kw": 22.0}, id="minimal"),
    pytest.param(b'{"requested_kw": 11, "energy_kwh": 30}', {"energy_kwh": 30.0, "duration_minutes": None},
                 id="energy-only"),
    pytest.param(req('"min_kw": 22'), {"min_kw": 22.0}, id="min-equals-requested"),
    pytest.param(req('"min_kw": 0'), {"min_kw": 0.0}, id="min-zero"),
    pytest.param(req('"priority": 9'), {"priority": 9}, id="priority-9"),
    pytest.param(req('"request_id": "01HZX3V9Q8K2:abc.def-1_2"'), {"request_id": "01HZX3V9Q8K2:abc.def-1_2"},
                 id="request-id-ulid-like"),
    pytest.param(req('"ev_id": "' + "E" * 64 + '"'), {"ev_id": "E" * 64}, id="ev-id-64-chars"),
    pytest.param(req('"unknown": {"nested": [1, 2, {"x": null}]}'), {"requested_kw": 22.0},
                 id="unknown-fields-ignored"),
    pytest.param(req('"note": "caf\\u00e9 \\u2603 \\ud83d\\ude00"'), {"requested_kw": 22.0},
                 id="escaped-unicode-and-surrogate-pair-in-unknown-field"),
    pytest.param(b'{"requested_kw": 2.2e1, "duration_minutes": 6E1}', {"requested_kw": 22.0,
                                                                      "duration_minutes": 60.0},
                 id="exponent-notation"),
    pytest.param(b' \n\t{"requested_kw": 22, "duration_minutes": 60}\n ', {"requested_kw": 22.0},
                 id="surrounding-whitespace"),
]


@pytest.mark.parametrize(("payload", "expected"), GOOD)
def test_good_request_payloads(payload: bytes, expected: dict[str, Any]) -> None:
    r = decode(payload, ChargeRequest)
    for key, value in expected.items():
        assert getattr(r, key) == value


OTHER_MODELS_BAD = [
    pytest.param(Release, b'{"request_id": "r/1"}', Reason.INVALID_FIELD, id="release-bad-request-id"),
    pytest.param(Release, b'{"ev_id": "EV#1"}', Reason.INVALID_FIELD, id="release-bad-ev-id"),
    pytest.param(Release, b'{"request_id": "a", "request_id": "b"}', Reason.DUPLICATE_KEY, id="release-duplicate"),
    pytest.param(Telemetry, b'{"substation_id": "A/B", "ts": 1, "seq": 0, "capacity_kw": 100, "load_kw": 1, '
                            b'"base_load_kw": 1, "ev_load_kw": 0, "active_sessions": 0}', Reason.INVALID_FIELD,
                 id="telemetry-bad-substation-id"),
    pytest.param(Telemetry, b'{"substation_id": "A", "ts": 1, "seq": -1, "capacity_kw": 100, "load_kw": 1, '
                            b'"base_load_kw": 1, "ev_load_kw": 0, "active_sessions": 0}', Reason.INVALID_FIELD,
                 id="telemetry-negative-seq"),
    pytest.param(Telemetry, b'{"substation_id": "A", "ts": 1, "seq": 0, "capacity_kw": 0, "load_kw": 1, '
                            b'"base_load_kw": 1, "ev_load_kw": 0, "active_sessions": 0}', Reason.INVALID_FIELD,
                 id="telemetry-zero-capacity"),
    pytest.param(Telemetry, b'{"substation_id": "A", "ts": 1, "seq": 0, "capacity_kw": 100, "load_kw": 1, '
                            b'"base_load_kw": NaN, "ev_load_kw": 0, "active_sessions": 0}', Reason.MALFORMED_JSON,
                 id="telemetry-nan-base-load"),
    pytest.param(Telemetry, b'{"substation_id": "A", "ts": 1, "seq": 0, "capacity_kw": 100, "load_kw": 1, '
                            b'"base_load_kw": 1e400, "ev_load_kw": 0, "active_sessions": 0}', Reason.INVALID_FIELD,
                 id="telemetry-1e400-base-load"),
    pytest.param(Telemetry, b'{"substation_id": "A", "ts": 1, "seq": 0, "capacity_kw": 100, "load_kw": 1, '
                            b'"base_load_kw": 1, "base_load_kw": 90, "ev_load_kw": 0, "active_sessions": 0}',
                 Reason.DUPLICATE_KEY, id="telemetry-duplicate-base-load"),
    pytest.param(Telemetry, b'{"substation_id": "A", "ts": 1, "seq": 0}', Reason.INVALID_FIELD,
                 id="telemetry-missing-fields"),
    pytest.param(SessionEvent, b'{"event": "paused", "session_id": "s1", "ev_id": "EV_1", "ts": 1}',
                 Reason.INVALID_FIELD, id="session-event-unknown-event"),
    pytest.param(SessionEvent, b'{"event": "ended", "session_id": "s/1", "ev_id": "EV_1", "ts": 1}',
                 Reason.INVALID_FIELD, id="session-event-bad-session-id"),
    pytest.param(SessionEvent, b'{"event": "ended", "session_id": "s1", "ev_id": "EV_1", "ts": 1e12}',
                 Reason.INVALID_FIELD, id="session-event-ts-far-future"),
    pytest.param(SessionEvent, b'{"event": "ended", "session_id": "s1", "ev_id": "EV_1", "ts": 1, "reason": "'
                               + b"x" * 65 + b'"}', Reason.INVALID_FIELD, id="session-event-reason-too-long"),
    pytest.param(SubstationStatus, b'{"state": "maybe"}', Reason.INVALID_FIELD, id="status-unknown-state"),
    pytest.param(SubstationStatus, b'{"state": "online", "state": "offline"}', Reason.DUPLICATE_KEY,
                 id="status-duplicate-state"),
]


@pytest.mark.parametrize(("model", "payload", "reason"), OTHER_MODELS_BAD)
def test_other_models_refuse_bad_payloads(model: type, payload: bytes, reason: Reason) -> None:
    assert refused(payload, model).reason == reason


ROUND_TRIP = [
    pytest.param(ChargeRequest(requested_kw=22.0, request_id="r-1", ev_id="EV_1", duration_minutes=120.0,
                               min_kw=3.7, priority=2), id="charge-request"),
    pytest.param(Release(request_id="r-1", session_id="s-1", ev_id="EV_1"), id="release"),
    pytest.param(Assignment(request_id="r-1", ev_id="EV_1", status="assigned", ts=1.7e9, substation_id="A",
                            granted_kw=11.0, session_id="s-1"), id="assignment"),
    pytest.param(Assignment(request_id=None, ev_id="EV_1", status="rejected", ts=1.7e9,
                            reason=Reason.MALFORMED_JSON, detail="x" * 512), id="assignment-rejected"),
    pytest.param(Telemetry(substation_id="A", ts=1.7e9, seq=7, capacity_kw=500.0, load_kw=120.5,
                           base_load_kw=100.0, ev_load_kw=20.5, active_sessions=2), id="telemetry"),
    pytest.param(SubstationStatus(state="offline"), id="status"),
    pytest.param(SessionCommand(command="start", session_id="s-1", ev_id="EV_1", ts=1.7e9, granted_kw=11.0,
                                energy_kwh=30.0), id="command"),
    pytest.param(SessionEvent(event="ended", session_id="s-1", ev_id="EV_1", ts=1.7e9,
                              reason=Reason.ENERGY_DELIVERED, energy_delivered_kwh=30.0), id="session-event"),
]


@pytest.mark.parametrize("message", ROUND_TRIP)
def test_encode_decode_round_trip(message: msgspec.Struct) -> None:
    assert decode(encode(message), type(message)) == message


def test_assignment_always_has_every_key() -> None:
    a = Assignment(request_id=None, ev_id="EV_1", status="queued", ts=1.0, position=3)
    keys = set(msgspec.json.decode(encode(a)))
    assert keys == {"request_id", "ev_id", "status", "ts", "substation_id", "granted_kw", "session_id", "reason",
                    "detail", "position", "eta_s"}


def test_decode_raises_only_payload_error_for_arbitrary_bytes() -> None:
    """A cheap fuzz over byte soup built from JSON fragments: PayloadError or a value, nothing else."""
    import random

    rng = random.Random(1234)
    parts = [b"{", b"}", b"[", b"]", b'"requested_kw"', b'"duration_minutes"', b":", b",", b"22", b"NaN",
             b"1e400", b'"\\ud800"', b'"\\u0041"', b"null", b"true", b"-", b".", b"e", b'"', b"\\", b"\xff",
             b'"ev_id"', b'"EV_1"', b" "]
    for _ in range(3000):
        payload = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 30)))
        with contextlib.suppress(PayloadError):
            decode(payload, ChargeRequest)


# ============================================================================ topics

T = Topics()

BUILDERS = [
    pytest.param(T.telemetry, "A", "grid/v1/substation/A/telemetry", TopicKind.SUBSTATION_TELEMETRY, id="telemetry"),
    pytest.param(T.substation_status, "A", "grid/v1/substation/A/status", TopicKind.SUBSTATION_STATUS,
                 id="substation-status"),
    pytest.param(T.command, "A", "grid/v1/substation/A/command", TopicKind.SUBSTATION_COMMAND, id="command"),
    pytest.param(T.session_events, "A", "grid/v1/substation/A/session", TopicKind.SUBSTATION_SESSION,
                 id="session-events"),
    pytest.param(T.substation_error, "A", "grid/v1/substation/A/error", TopicKind.SUBSTATION_ERROR, id="error"),
    pytest.param(T.request, "EV_1234", "grid/v1/ev/EV_1234/request", TopicKind.EV_REQUEST, id="request"),
    pytest.param(T.release, "EV_1234", "grid/v1/ev/EV_1234/release", TopicKind.EV_RELEASE, id="release"),
    pytest.param(T.assignment, "EV_1234", "grid/v1/ev/EV_1234/assignment", TopicKind.EV_ASSIGNMENT,
                 id="assignment"),
]


@pytest.mark.parametrize(("build", "id_", "topic", "kind"), BUILDERS)
def test_topic_build_parse_round_trip(build: Any, id_: str, topic: str, kind: TopicKind) -> None:
    assert build(id_) == topic
    assert T.parse(topic) == (kind, id_)
    assert T.topic(kind, id_) == topic


def test_balancer_status_topic() -> None:
    assert T.balancer_status() == "grid/v1/balancer/status"
    assert T.parse("grid/v1/balancer/status") == (TopicKind.BALANCER_STATUS, None)


def test_every_kind_round_trips_with_custom_prefix() -> None:
    topics = Topics("/site-7/grid/v2/")
    assert topics.prefix == "site-7/grid/v2"
    for kind, channel in CHANNELS.items():
        id_ = "X_1-y" if "{id}" in channel.template else None
        topic = topics.topic(kind, id_)
        assert topic.startswith("site-7/grid/v2/")
        assert topics.parse(topic) == (kind, id_)
        assert Topics().parse(topic) is None  # another prefix does not match
        assert channel.qos in (0, 1)
    assert set(CHANNELS) == set(TopicKind)


def test_filters_match_every_id_of_one_kind() -> None:
    assert T.filter(TopicKind.EV_REQUEST) == "grid/v1/ev/+/request"
    assert T.filter(TopicKind.SUBSTATION_TELEMETRY) == "grid/v1/substation/+/telemetry"
    assert T.filter(TopicKind.BALANCER_STATUS) == "grid/v1/balancer/status"
    assert T.reply_root() == "grid/v1/reply/"


def test_retained_channels_are_the_status_and_state_ones() -> None:
    assert {k for k, c in CHANNELS.items() if c.retain} == {
        TopicKind.SUBSTATION_STATUS, TopicKind.BALANCER_STATUS, TopicKind.SUBSTATION_STATE, TopicKind.BALANCER_QUEUE,
        TopicKind.SUBSTATION_SCHEDULE}


def test_limit_schedule_topics() -> None:
    assert T.substation_limits("A") == "grid/v1/substation/A/limits"
    assert T.substation_schedule("A") == "grid/v1/substation/A/schedule"
    assert T.parse("grid/v1/substation/A/limits") == (TopicKind.SUBSTATION_LIMITS, "A")
    assert T.parse("grid/v1/substation/A/schedule") == (TopicKind.SUBSTATION_SCHEDULE, "A")


def test_balancer_state_and_control_topics() -> None:
    assert T.substation_state("A") == "grid/v1/substation/A/state"
    assert T.parse("grid/v1/substation/A/state") == (TopicKind.SUBSTATION_STATE, "A")
    assert T.parse(T.balancer_queue()) == (TopicKind.BALANCER_QUEUE, None)
    assert T.parse(T.balancer_control()) == (TopicKind.BALANCER_CONTROL, None)
    assert T.parse(T.balancer_control_result()) == (TopicKind.BALANCER_CONTROL_RESULT, None)
    assert T.parse("grid/v1/balancer/control/other") is None


INVALID_IDS = [
    pytest.param("", id="empty"),
    pytest.param("a/b", id="slash"),
    pytest.param("+", id="plus"),
    pytest.param("#", id="hash"),
    pytest.param("EV+1", id="plus-inside"),
    pytest.param("EV#1", id="hash-inside"),
    pytest.param("EV\x001", id="nul"),
    pytest.param("EV 1", id="space"),
    pytest.param("EV_1\n", id="trailing-newline"),
    pytest.param("EV.1", id="dot"),
    pytest.param("É", id="non-ascii"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param(None, id="none"),
]


@pytest.mark.parametrize("bad", INVALID_IDS)
def test_builders_refuse_invalid_ids(bad: str | None) -> None:
    for kind, channel in CHANNELS.items():
        if "{id}" not in channel.template:
            continue
        with pytest.raises(ValueError):
            T.topic(kind, bad)
    if bad is not None:
        assert not is_valid_id(bad)
        with pytest.raises(ValueError):
            T.request(bad)
        with pytest.raises(ValueError):
            T.command(bad)


@pytest.mark.parametrize("prefix", ["", "/", "//", "grid/+/v1", "grid/#", "#", "+", "grid\x00v1"])
def test_invalid_prefix_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        Topics(prefix)


PARSE_NONE = [
    pytest.param("other/v1/ev/EV_1/request", id="foreign-prefix"),
    pytest.param("grid/v1x/ev/EV_1/request", id="prefix-not-at-a-level-boundary"),
    pytest.param("grid/v1", id="prefix-only"),
    pytest.param("grid/v1/", id="prefix-slash"),
    pytest.param("grid/v1/ev/EV_1/unknown", id="unknown-tail"),
    pytest.param("grid/v1/substation/A/request", id="ev-tail-under-substation"),
    pytest.param("grid/v1/ev/EV_1/request/extra", id="extra-level"),
    pytest.param("grid/v1/ev/request", id="missing-id-level"),
    pytest.param("grid/v1/balancer/other", id="balancer-other"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("topic", PARSE_NONE)
def test_parse_ignores_non_contract_topics(topic: str) -> None:
    assert T.parse(topic) is None


def test_parse_returns_invalid_ids_for_the_caller_to_check() -> None:
    kind, id_ = T.parse("grid/v1/ev/a+b/request")  # type: ignore[misc]
    assert kind == TopicKind.EV_REQUEST and id_ == "a+b" and not is_valid_id(id_)
    assert T.parse("grid/v1/ev//request") == (TopicKind.EV_REQUEST, "")


@pytest.mark.instruments_compiled
def test_canonical_payloads_skip_the_duplicate_scan_and_others_are_still_scanned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload byte for byte as the encoder writes it (what every service publishes) has each key once, so
    the duplicate scan is skipped for it; one that differs in any byte (spacing, order, a repeated key) is
    scanned as before."""
    import grid_protocol.codec as codec

    scanned: list[bytes] = []
    real = codec._check_duplicates
    monkeypatch.setattr(codec, "_check_duplicates", lambda p, m: (scanned.append(p), real(p, m)))
    canonical = encode(ChargeRequest(requested_kw=22.0, ev_id="EV_1", request_id="r1", duration_minutes=60.0))
    assert decode(canonical, ChargeRequest).ev_id == "EV_1" and scanned == []
    spaced = canonical.replace(b",", b", ")
    assert decode(spaced, ChargeRequest).ev_id == "EV_1" and scanned == [spaced]
    repeated = canonical[:-1] + b',"ev_id":"EV_2"}'
    assert refused(repeated).reason == Reason.DUPLICATE_KEY and scanned[-1] == repeated
