"""The cyclic garbage collector in a daemon whose mirror holds millions of
objects.

CPython's full collection walks every tracked object while it holds the
GIL. The mirror has one tracked object per resident object (a MemEntry; its
tuples are untracked), so at a million objects a full collection stops the
event loop and every worker for a large fraction of a second, and it runs
again each time the tracked set grows by a quarter: a put workload paid
about 11 us of collector time per object here (``kvfs bench --puts``), and
a scheduler's ``contains`` waited behind it.

What this does instead (measured in ``stats()``):
- the mirror loaded at start is frozen (``gc.freeze``: moved where no
  collection looks);
- a young collection runs every ``YOUNG`` allocations, not 700: a put
  batch's temporaries (plans, chunk plans) are freed by reference counting
  before one sees them, so they are never promoted;
- every ``FREEZE_S`` seconds, a collection of the young generations, then
  a freeze: what survived (new mirror entries, above all) leaves the
  collector's reach, so the automatic full collections walk only what was
  made since;
- every ``FULL_S`` seconds, one real full collection over everything
  (unfreeze, collect, freeze): a cycle that became garbage after it was
  frozen (a closed connection's task, say) is reclaimed then. That is the
  one long pause left; its length is reported.

Invariant: nothing depends on the collector for correctness, only memory.
The daemon's own structures hold no reference cycles, so what a frozen
cycle can leak until the next full collection is small (a few dozen
objects a second under a heavy put load here).
"""
from __future__ import annotations

import gc
import time
from typing import Any

YOUNG = 20_000
FREEZE_S = 10.0
FULL_S = 3600.0


class GcPolicy:
    def __init__(self) -> None:
        self.last_full_ms = 0.0
        self.full_runs = 0
        self.freezes = 0
        self._last_freeze = self._last_full = time.monotonic()
        gc.set_threshold(YOUNG, 10, 10)

    def started(self) -> None:
        """The mirror is loaded: it never needs walking again."""
        gc.collect()
        gc.freeze()
        self.freezes += 1

    def tick(self) -> None:
        """Called about once a second from the event loop."""
        now = time.monotonic()
        if now - self._last_full >= FULL_S:
            t = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.last_full_ms = (time.perf_counter() - t) * 1e3
            self.full_runs += 1
            self._last_full = self._last_freeze = now
        elif now - self._last_freeze >= FREEZE_S:
            gc.collect(1)
            gc.freeze()
            self.freezes += 1
            self._last_freeze = now

    def stats(self) -> dict[str, Any]:
        return {"frozen": gc.get_freeze_count(), "pending": list(gc.get_count()),
                "collections": [g["collections"] for g in gc.get_stats()], "freezes": self.freezes,
                "full_runs": self.full_runs, "last_full_ms": round(self.last_full_ms, 1),
                "young_threshold": YOUNG, "freeze_every_s": FREEZE_S, "full_every_s": FULL_S}
