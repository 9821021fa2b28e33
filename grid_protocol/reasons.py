"""Machine-readable reasons carried in ``reason`` fields (rejections, revocations, updates, errors).

Reasons are stable API: clients branch on them. Human-readable explanation goes in ``detail``.
"""

from enum import StrEnum


class Reason(StrEnum):
    # Bad input (status "rejected" on the EV's assignment topic, or an ErrorReport to a substation).
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MALFORMED_JSON = "malformed_json"
    DUPLICATE_KEY = "duplicate_key"
    INVALID_FIELD = "invalid_field"
    ID_MISMATCH = "id_mismatch"
    RESERVED_ID = "reserved_id"
    RETAINED = "retained"  # a request or release published with the retain flag (it would be replayed later)
    RATE_LIMITED = "rate_limited"  # more messages from one EV or substation than its share: the excess is shed
    STARTING = "starting"  # the balancer is learning the grid after a restart and its input buffer is full
    # Request-level decisions.
    EXPIRED = "expired"  # a new request received after its ``expires_at``: nobody waits for it, it is not placed
    EV_BUSY = "ev_busy"
    QUEUE_FULL = "queue_full"
    EXCEEDS_CAPACITY = "exceeds_capacity"
    NOTHING_TO_RELEASE = "nothing_to_release"
    # Lifecycle reasons.
    ENERGY_DELIVERED = "energy_delivered"
    DURATION_ELAPSED = "duration_elapsed"
    RELEASED = "released"
    STOPPED_BY_AGENT = "stopped_by_agent"
    SUBSTATION_OFFLINE = "substation_offline"
    SUBSTATION_LOST = "substation_lost"
    DECOMMISSIONED = "decommissioned"
    CAPACITY_REDUCED = "capacity_reduced"
    REBALANCED = "rebalanced"
    POWER_AVAILABLE = "power_available"
    PARTIAL_GRANT = "partial_grant"
    NO_HEADROOM = "no_headroom"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_LOST = "session_lost"  # the substation no longer runs a session the balancer gave it (it restarted)
    STALE_TELEMETRY = "stale_telemetry"
    # Limit schedules (DSO limits on a substation, see LimitSchedule).
    LIMIT_SCHEDULED = "limit_scheduled"  # a scheduled limit applies, or starts within the lead time: power is cut
    LIMIT_SHORTFALL = "limit_shortfall"  # under the scheduled limits the EV cannot expect its energy by its departure
    SCHEDULE_FULL = "schedule_full"  # a LimitSchedule would give the substation more entries than it may hold
    # Operator control (ControlResult).
    UNKNOWN_SUBSTATION = "unknown_substation"
    DRAINING = "draining"


#: An agent's ``ended`` event with one of these reasons completes the EV's request: it got what it came for, or
#: it left. Any other reason (``substation_offline``, ``stopped_by_agent``, ...) means the session could not
#: continue: the balancer puts the request back in the queue (``revoked``, then ``queued``), never ``completed``.
FINAL_END_REASONS: frozenset[str] = frozenset({Reason.ENERGY_DELIVERED, Reason.DURATION_ELAPSED, Reason.RELEASED})
