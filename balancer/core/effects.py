"""Decisions the core hands to its adapter: messages to an EV or to a substation agent."""

from __future__ import annotations

from dataclasses import dataclass

from grid_protocol.messages import Assignment, SessionCommand


@dataclass(slots=True, frozen=True)
class ToEv:
    """Publish ``message`` on the EV's assignment topic.

    ``in_reply`` marks the direct answer to the request being handled, which the adapter also
    sends to an MQTT 5 response topic when the request named one.
    """

    ev_id: str
    message: Assignment
    in_reply: bool = False


@dataclass(slots=True, frozen=True)
class ToSubstation:
    """Publish ``message`` on the substation's command topic."""

    substation_id: str
    message: SessionCommand


Effect = ToEv | ToSubstation
