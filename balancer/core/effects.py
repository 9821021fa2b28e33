"""Decisions the core hands to its adapter: messages to an EV or to a substation agent.

msgspec Structs, not frozen dataclasses: a decision builds two to five of them, and a frozen dataclass's
``__init__`` (``object.__setattr__`` per field) cost ~1 µs each where a Struct costs ~0.1 µs (issue 10). They
hold messages only (no reference cycles): ``gc=False``."""

from __future__ import annotations

import msgspec

from grid_protocol.messages import Assignment, SessionCommand


class ToEv(msgspec.Struct, frozen=True, gc=False):
    """Publish ``message`` on the EV's assignment topic.

    ``in_reply`` marks the direct answer to the request being handled, which the adapter also
    sends to an MQTT 5 response topic when the request named one.
    """

    ev_id: str
    message: Assignment
    in_reply: bool = False


class ToSubstation(msgspec.Struct, frozen=True, gc=False):
    """Publish ``message`` on the substation's command topic."""

    substation_id: str
    message: SessionCommand


Effect = ToEv | ToSubstation
