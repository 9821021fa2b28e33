"""Strict JSON decode/encode for every contract payload.

One function, one error type: :func:`decode` raises :class:`PayloadError` (with a stable
:class:`~grid_protocol.reasons.Reason`) for every way a payload can be bad, including the
pitfalls a plain JSON parser lets through: duplicate keys (the last would silently win),
NaN/Infinity, numbers too large for a float, lone surrogates, deep nesting and oversized input.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgspec

from grid_protocol.reasons import Reason

T = TypeVar("T")

#: Application-level size limit. The broker's ``message_size_limit`` is larger; this one applies
#: to every payload the balancer reads so one huge message cannot cost it much.
MAX_PAYLOAD_BYTES = 4096

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


class PayloadError(ValueError):
    """A payload was refused. ``reason`` is machine readable, ``detail`` says what to fix."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:500]


def _decoder(model: type[T]) -> msgspec.json.Decoder[T]:
    dec = _decoders.get(model)
    if dec is None:
        dec = _decoders[model] = msgspec.json.Decoder(model)
    return dec


def _field_names(model: type) -> tuple[bytes, ...]:
    return tuple(f'"{name}"'.encode() for name in getattr(model, "__struct_fields__", ()))


_names_cache: dict[type, tuple[bytes, ...]] = {}


def _reject_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise PayloadError(Reason.DUPLICATE_KEY, f"key {key!r} appears more than once")
        seen[key] = value
    return seen


def _check_duplicates(payload: bytes, model: type) -> None:
    """Exact duplicate-key check, run only when a cheap scan says one is possible."""
    names = _names_cache.get(model)
    if names is None:
        names = _names_cache[model] = _field_names(model)
    if b"\\u" not in payload and not any(payload.count(n) > 1 for n in names):
        return
    try:
        json.loads(payload, object_pairs_hook=_reject_pairs)
    except PayloadError:
        raise
    except RecursionError:
        # json recurses a few frames deeper than msgspec: a payload nested just below msgspec's limit
        # would otherwise skip this check, and a duplicate key in it would pass.
        raise PayloadError(Reason.MALFORMED_JSON, "nested too deeply") from None
    except ValueError as exc:
        # Unchecked means possibly duplicated: refuse rather than let the last value silently win.
        raise PayloadError(Reason.MALFORMED_JSON, f"cannot be checked for duplicate keys ({exc})") from None


def decode(payload: bytes, model: type[T], *, max_bytes: int = MAX_PAYLOAD_BYTES) -> T:
    """Decode ``payload`` into ``model`` or raise :class:`PayloadError`."""
    if len(payload) > max_bytes:
        raise PayloadError(Reason.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes, limit is {max_bytes}")
    try:
        value = _decoder(model).decode(payload)
    except msgspec.ValidationError as exc:
        raise PayloadError(Reason.INVALID_FIELD, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise PayloadError(Reason.MALFORMED_JSON, f"not valid JSON ({exc}); NaN and Infinity are not JSON") from None
    except RecursionError:
        raise PayloadError(Reason.MALFORMED_JSON, "nested too deeply") from None
    except UnicodeDecodeError as exc:  # msgspec raises it (not DecodeError) for bad UTF-8 in a str field
        raise PayloadError(Reason.MALFORMED_JSON, f"not valid UTF-8 ({exc})") from None
    if _encoder.encode(value) != payload:
        # Byte for byte what the encoder writes (every payload our services publish) has each key once and
        # needs no scan: re-encoding costs a fifth of the scan. Anything else is scanned.
        _check_duplicates(payload, model)
    return value


def encode(message: msgspec.Struct) -> bytes:
    """Encode a contract message to compact JSON bytes."""
    return _encoder.encode(message)
