"""Refilling the location directory once it has free slots again.

A directory that overflowed keeps the newest keys; older residents are
outside it, and while any is, a reader cannot trust a miss and asks the
daemon (kvfs.directory's reader rule). Removals free slots, but a key
outside only comes back at its next update or daemon lookup: after a
store shrinks, every miss could go on costing a round trip. A refill
walks the mirror and enters the keys outside into free slots.

Invariants:
- it runs in a worker thread, ``SLICE`` keys at a time under the engine
  lock (the event loop waits at most one slice), at most ``PER_STEP`` keys
  a step (one step a second: the server's maintenance loop);
- a pass starts only when keys are outside, slots are free (at least
  ``MIN_FREE_SHARE`` of the table, or one per key outside), and removals
  freed slots since the last pass ended: slots free only in buckets the
  keys outside cannot use are not looked for again and again;
- it writes only keys in no slot, into free ones, and only entries still
  the mirror's (``DirectoryWriter.fill``): what a reader sees stays true;
- the pass walks a snapshot of the mirror's keys, most recent first (the
  likeliest to be read get the free slots), and ends early once nothing is
  outside or no slot is free.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine_state import EngineState

SLICE = 4096
PER_STEP = 1 << 18
MIN_FREE_SHARE = 1 / 64


class DirectoryRefill:
    def __init__(self) -> None:
        self._keys: list[bytes] | None = None  # the pass's snapshot of the mirror's keys
        self._pos = 0
        self._freed_at = 0  # the directory's freed count when the last pass ended
        self.passes = 0
        self.entered = 0

    def _worth_a_pass(self, eng: "EngineState") -> bool:
        d = eng.dir
        if d is None or d.freed == self._freed_at:
            return False
        outside, free = d.outside, d.nslots - d.entries
        return outside > 0 and free > 0 and free >= min(outside, int(d.nslots * MIN_FREE_SHARE))

    def step(self, eng: "EngineState") -> int:
        """Go on with the pass (or start one, if worth it): keys entered."""
        d = eng.dir
        if d is None:
            return 0
        if self._keys is None:
            if not self._worth_a_pass(eng):
                return 0
            with eng._lock:
                self._keys = list(reversed(eng.lru))
                self._pos = 0
        entered = walked = 0
        keys = self._keys
        while walked < PER_STEP:
            with eng._lock:
                part = keys[self._pos:self._pos + SLICE]
                if not part or not d.outside or d.entries >= d.nslots:
                    self._keys = None
                    self._freed_at = d.freed
                    self.passes += 1
                    break
                get = eng.lru.get
                ms = [get(k) for k in part]
                oks = [k for k, m in zip(part, ms) if m is not None]
                entered += d.fill(oks, [m for m in ms if m is not None], eng.lru)
            self._pos += len(part)
            walked += len(part)
        self.entered += entered
        return entered
