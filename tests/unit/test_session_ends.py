"""The kept order of session ends (balancer/core/ends.py, a multiset of floats) against a brute-force oracle: after
any sequence of starts, grant changes (an end moves, or is lost) and ends, with ties, its k-th end, its first n
and its whole order are those of sorting every filed session's end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.core.ends import SessionEnds
from balancer.core.model import Session


@dataclass
class Stub:
    """What SessionEnds reads of a session."""

    session_id: str
    end: float | None

    def expected_end(self) -> float | None:
        return self.end


ENDS = st.one_of(st.none(), st.sampled_from([0.0, 60.0, 60.0, 1e9]), st.floats(0, 1e5, allow_nan=False))
OPS = st.lists(st.tuples(st.sampled_from(["update", "discard"]), st.integers(0, 12), ENDS), max_size=80)


@pytest.mark.instruments_compiled
@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(0, 15))
def test_the_kept_order_is_the_sorted_ends_of_the_filed_sessions(ops: list[tuple[str, int, float | None]],
                                                                 k: int) -> None:
    ends = SessionEnds()
    oracle: dict[str, float] = {}
    for op, n, end in ops:
        sid = f"s{n}"
        if op == "update":
            ends.update(cast(Session, Stub(sid, end)))
            if end is None:
                oracle.pop(sid, None)
            else:
                oracle[sid] = end
        else:
            ends.discard(sid)
            oracle.pop(sid, None)
        brute = sorted(oracle.values())
        assert list(ends) == brute and len(ends) == len(brute)
        assert ends.kth(k) == (brute[k] if k < len(brute) else None)
        assert ends.first(k) == brute[:k]
