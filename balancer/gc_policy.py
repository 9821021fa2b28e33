"""How the balancer process treats its long-lived heap with the cyclic garbage collector (issue 10).

The balancer's state (sessions, ledger, queue, kept ends, indexes) lives as long as the process. Its records are
untracked (``gc=False`` structs), but the containers holding them are not, and a collection pays for them anyway:
a young collection re-traverses every dict re-tracked since the last one (a dict of untracked values is untracked
by a collection and tracked again, into the youngest generation, by its next insert of a fresh tuple: 1,000
substations' share tables at 1,000 x 100k), and an older one every sorted list's every entry (the kept ends, the
queue, the share classes: 180k entries there). So the process freezes what survived (``gc.freeze()``: the tracked
objects move to the permanent generation, which no collection visits; O(1)) at start and then every
``freeze_every_s``, and collections only see what is younger than the last freeze.

Between two freezes the youngest generation is collected once ``young_threshold`` more tracked objects are alive
than at its last collection (CPython's net allocation count; its default is 700). A collection frees nothing here
(no cycles are made per message, issue 10) and re-traverses every survivor, and the survivors of a second are
frozen anyway (a freeze resets the count): at the default, ``./gridctl bench``'s balancer ran ~450 young and ~40
middle collections per 26,000 requests (~3-4 us of CPU per request, a 1-10 ms pause per middle one). At 20,000 the
paced phase's 1,000 requests a second never reached a collection, but the compiled core's sessions are tracked
objects (mypyc classes: a ``Session``, an ``EvState`` and ~3 tuples per placed request, ~8 with paho's in-flight
messages), and at ~12,000 requests a second the pipelined phase made ~6 young collections a run, 2-10 ms each
(17-38 ms a run, some of them in the paced phase's p99). At 200,000 (~25,000 requests a second between two
freezes) it makes none; a rate that still reaches it pays one collection of that many objects (tens of ms) instead of
ten of a tenth.

Frozen objects are still freed by reference counting as usual. A reference cycle is not: one frozen alive that
became garbage later, and one already garbage when the freeze came (a freeze collects nothing), waits for the full
pass every ``full_every_s`` (unfreeze, collect everything, freeze again). Young collections hardly run between
freezes (at 200,000: only above ~25,000 placed requests a second; at 20,000 they did not below ~2,500 either), so in
operation that is every cycle made, and the memory the full pass bounds is the cycles made in ``full_every_s``: the
request path makes none (tests/unit/test_gc_policy.py); what makes some (a reconnect's futures, an exception's
traceback) is rare. Process-wide: one policy for all the region services of a process (the first
one whose periodic step is due acts).
"""

from __future__ import annotations

import gc


class GcPolicy:
    __slots__ = ("_next_freeze", "_next_full", "freeze_every_s", "freezes", "full_every_s", "full_passes",
                 "last_full_collected", "young_threshold")

    def __init__(self, freeze_every_s: float = 1.0, full_every_s: float = 3600.0,
                 young_threshold: int | None = 200_000) -> None:
        """``young_threshold``: set as the youngest generation's at :meth:`start` (None: left as it is)."""
        self.freeze_every_s = freeze_every_s
        self.full_every_s = full_every_s
        self.young_threshold = young_threshold
        self.freezes = 0
        self.full_passes = 0
        #: unreachable objects the last full pass freed (cycles that were frozen alive)
        self.last_full_collected = 0
        self._next_freeze: float | None = None  # None: not started
        self._next_full = 0.0

    @property
    def started(self) -> bool:
        return self._next_freeze is not None

    def start(self, now: float) -> None:
        """After start-up: collect once and freeze everything alive (modules, settings, the services). Once per
        process: a second region's service starting finds it done."""
        if self.started:
            return
        if self.young_threshold is not None:
            gc.set_threshold(self.young_threshold, *gc.get_threshold()[1:])
        gc.collect()
        gc.freeze()
        self.freezes += 1
        self._next_freeze = now + self.freeze_every_s
        self._next_full = now + self.full_every_s

    def step(self, now: float) -> None:
        """From the periodic loop: freeze what survived since the last freeze, and now and then the full pass.
        A clock that steps back restarts the intervals from ``now``."""
        if self._next_freeze is None:
            return
        if now < self._next_freeze - self.freeze_every_s or now < self._next_full - self.full_every_s:
            self._next_freeze, self._next_full = now, now + self.full_every_s  # the clock stepped back
        if now >= self._next_full:
            self._next_full = now + self.full_every_s
            self._next_freeze = now + self.freeze_every_s
            gc.unfreeze()
            self.last_full_collected = gc.collect()
            gc.freeze()
            self.full_passes += 1
            self.freezes += 1
        elif now >= self._next_freeze:
            self._next_freeze = now + self.freeze_every_s
            gc.freeze()
            self.freezes += 1


#: the policy of the ``python -m balancer`` process (balancer/cli.py hands it to its services)
PROCESS_GC = GcPolicy()
