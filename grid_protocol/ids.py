"""Identifier rules shared by topics, payloads, accounts and the ACL.

Ids become MQTT topic levels and broker usernames, so they must never contain ``/``, ``+``, ``#``
or NUL; the pattern below admits none of them.
"""

import re

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE = re.compile(ID_PATTERN)

#: Client-chosen request ids may be UUIDs or ULIDs, so ``.`` and ``:`` are allowed as well.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


def is_valid_id(value: str) -> bool:
    """True when ``value`` may be used as an EV or substation id (and hence a topic level)."""
    return _ID_RE.fullmatch(value) is not None


def checked_id(value: str, what: str) -> str:
    """``value`` when it may be used as an id; otherwise a ValueError naming ``what`` and the rule (for settings,
    account names and the like, where a bad id is a mistake to report, not a payload to refuse)."""
    if not is_valid_id(value):
        raise ValueError(f"{what} {value[:80]!r} must match {ID_PATTERN}")
    return value
