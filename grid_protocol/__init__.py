"""The MQTT contract of the Smart Grid Load Balancer: topics, payload models, codec, reasons.

This package is the product's public API in code. ``docs/protocol.md`` and ``docs/asyncapi.yaml``
describe the same contract; ``tests/unit/test_contract_docs.py`` keeps the three in agreement.
"""

import sys

from grid_runtime.native import NativeBuild

#: Compiled to C (grid_runtime.native): the modules every message passes through (the codec, the id rule, topic
#: building and parsing); the payload models stay interpreted (msgspec structs, which mypyc does not compile).
NATIVE = NativeBuild(sys.modules[__name__], (), modules=("grid_protocol.codec", "grid_protocol.ids",
                                                          "grid_protocol.topics"))
NATIVE.mount()

from grid_protocol.codec import PayloadError, decode, encode  # noqa: E402
from grid_protocol.ids import ID_PATTERN, is_valid_id  # noqa: E402
from grid_protocol.messages import (  # noqa: E402
    ASSIGNMENT_STATUSES,
    CHARGING_STATUSES,
    FINAL_STATUSES,
    Assignment,
    AssignmentStatus,
    BalancerStatus,
    ChargeRequest,
    CompositeSlot,
    ControlCommand,
    ControlResult,
    ErrorReport,
    LimitEntry,
    LimitSchedule,
    QueueEntry,
    QueueState,
    Release,
    ScheduleEntry,
    ScheduleState,
    SessionCommand,
    SessionCommands,
    SessionEvent,
    SessionView,
    SubstationState,
    SubstationStatus,
    Telemetry,
)
from grid_protocol.reasons import Reason  # noqa: E402
from grid_protocol.topics import CHANNELS, Channel, TopicKind, Topics  # noqa: E402

__all__ = [
    "ASSIGNMENT_STATUSES",
    "CHANNELS",
    "CHARGING_STATUSES",
    "FINAL_STATUSES",
    "ID_PATTERN",
    "NATIVE",
    "Assignment",
    "AssignmentStatus",
    "BalancerStatus",
    "Channel",
    "ChargeRequest",
    "CompositeSlot",
    "ControlCommand",
    "ControlResult",
    "ErrorReport",
    "LimitEntry",
    "LimitSchedule",
    "PayloadError",
    "QueueEntry",
    "QueueState",
    "Reason",
    "Release",
    "ScheduleEntry",
    "ScheduleState",
    "SessionCommand",
    "SessionCommands",
    "SessionEvent",
    "SessionView",
    "SubstationState",
    "SubstationStatus",
    "Telemetry",
    "TopicKind",
    "Topics",
    "decode",
    "encode",
    "is_valid_id",
]
