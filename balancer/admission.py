"""Per-account admission: one EV or substation cannot take the balancer's time from everyone else.

Each sender (an EV id on its request/release topics, a substation id on its telemetry topic; the broker ACL
confines an account to its own topics, so the topic id is the account) has a token bucket: ``rate`` messages per
second on average, bursts of ``burst``. A message over the budget is shed before it is decoded (the cheapest
possible path, so a flood is drained as fast as it arrives and does not pile up behind a valid request of another
EV), counted, and answered at most once per ``notice_every_s`` per sender: the sender learns why, and the answers
cannot become a flood of their own. Memory: a bucket that has refilled is the same as no bucket, so idle ones are
swept; the buckets are kept in the order of their last message, so a sweep reads only the idle ones (a sweep that
read all of them took 4-10 ms at the bench's 26,000 EVs, a pause in the answers). A message that is refused once
read (malformed, invalid, retained ...) is charged ``REFUSED_COST`` tokens: honest traffic spends the budget
slowly, junk fast. Pure: time is passed in.
"""

from __future__ import annotations

import msgspec

#: What a refused message costs, in messages: a sender of junk gets a quarter of an honest sender's budget.
REFUSED_COST = 4.0


class _Bucket(msgspec.Struct, gc=False):
    """Untracked by the cyclic GC (it holds numbers only): one per sender, tens of thousands in a burst of EVs, and a
    tracked one would be traversed by every full collection (the bench's paced p99)."""

    tokens: float
    at: float
    noticed_at: float = float("-inf")
    shed: int = 0  # shed since the last notice (reported in it)


class Admission:
    """Token buckets per key, bounded by :meth:`sweep`."""

    __slots__ = ("_buckets", "burst", "notice_every_s", "rate")

    def __init__(self, rate: float, burst: float, notice_every_s: float = 1.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.notice_every_s = notice_every_s
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def admit(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket; False when it has none (shed the message). The bucket moves to the
        end of the order (``now`` only grows: the monotonic clock)."""
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            buckets[key] = _Bucket(self.burst - 1, now)
            return True
        buckets[key] = bucket
        tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if tokens >= 1:
            bucket.tokens = tokens - 1
            return True
        bucket.tokens = tokens
        bucket.shed += 1
        return False

    def charge(self, key: str, tokens: float) -> None:
        """Take ``tokens`` more from ``key`` (down to ``-burst``): a message that turned out to be refused costs
        more than one that is served, so a flood of junk runs dry long before a busy honest sender does."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = max(-self.burst, bucket.tokens - tokens)

    def notice_due(self, key: str, now: float) -> int:
        """After a shed message: the number shed since the last notice if one is due now (0: stay silent)."""
        bucket = self._buckets.get(key)
        if bucket is None or now - bucket.noticed_at < self.notice_every_s:
            return 0
        bucket.noticed_at = now
        shed, bucket.shed = bucket.shed, 0
        return shed

    def sweep(self, now: float, limit: int | None = None) -> bool:
        """Forget buckets that are full again (and have nothing to report): they behave as new ones. Reads the
        buckets oldest message first and stops at the first that is not full yet (every later one had a message
        since); a bucket out of order (a clock that stepped back) is only forgotten later, never too early. One
        with a notice pending is kept, behind the others (read once a sweep; forgotten later, never earlier).

        ``limit``: read at most that many (the service sweeps in slices and reads the socket in between: the
        20,000 EVs of a burst going idle at once took 2-5 ms in one piece). True when it stopped there: more may
        be due."""
        refill_s, notice_s, buckets = self.burst / self.rate, self.notice_every_s, self._buckets
        full: list[str] = []
        kept: list[str] = []
        looked = 0
        for key, b in buckets.items():
            if now - b.at < refill_s:
                break
            if looked == limit:
                break
            looked += 1
            if now - b.noticed_at >= notice_s:
                full.append(key)
            else:
                kept.append(key)
        for key in full:
            del buckets[key]
        for key in kept:
            buckets[key] = buckets.pop(key)
        return looked == limit
