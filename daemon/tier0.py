"""T0 bookkeeping: which objects have a copy in the shared-memory arena, the
arena's LRU, and extents that must outlive their object for a while.

Not thread-safe on its own: every method is called with the engine's lock
held (kvfsd.engine). Invariants kept here:
- an extent is handed out again only after ``free``; ``free`` of an extent
  whose object is leased is deferred ("zombie") until the last lease on that
  object ends, so a client copying out of it never sees it reused;
- a dirty entry (its write-back to T1 not yet committed) is never evicted:
  T0 is its only copy; it is kept apart from the LRU that eviction scans
  until its write-back ends;
- a resident entry is on exactly one of ``lru`` (clean, least recent
  first) and ``dirty``: T0Lists (native/mirror.c), linked through the
  entries, so moving one is no hash-table work;
- eviction bumps the removal generation before the freed bytes can be handed
  out again, so client location caches (kvfs.loccache) see it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Container, Protocol

from kvfs import native

from .arena import Arena
from .arena_alloc import ArenaFull, new_allocator


class Resident(Protocol):
    t0: int
    dirty: bool
    size: int

    def rewire(self) -> None: ...


class Tier0:
    def __init__(self, arena: Arena, max_object: int, leased: Container[bytes],
                 bump_generation: Callable[[], None], changed: Callable[[list[bytes], list[Any]], None]):
        """``leased``: the keys of the objects a lease pins now (a live view:
        kvfsd.leases.LeaseTable.leased_objects)."""
        self.arena = arena
        self.alloc = new_allocator(arena.size)
        self.max_object = max_object
        # resident objects: the clean ones in LRU order (least recent first;
        # what eviction scans), the dirty ones apart until their write-back
        # ends (kvfsd.mirror.t0_written_back moves them), so eviction never
        # scans past them
        self.lru = native.backend.T0List()
        self.dirty = native.backend.T0List()  # filled by a T0 put's publication (kvfsd.mirror.t0_publish)
        self.bytes = 0  # logical bytes of resident objects
        self._leased = leased
        self._evict_round = native.backend.t0_evict_round
        self._bump = bump_generation
        self._changed = changed  # objects' T0 locations changed (the directory follows): (keys, entries)
        self.zombies: dict[bytes, list[int]] = {}  # extents of gone objects still leased
        self.counters: Counter[str] = Counter()
        self.backlog_objects = 0  # committed to T0, write-back to T1 pending
        self.backlog_bytes = 0

    def fits(self, size: int) -> bool:
        return 0 < size <= self.max_object

    def reserve(self, size: int) -> int:
        """An extent for ``size`` bytes, evicting clean unleased objects
        (least recent first) as needed; -1 if none can be made."""
        try:
            return self.alloc.alloc(size)
        except ArenaFull:
            pass
        evicted = False
        try:
            # each round evicts what is missing at best (the largest free
            # extent may grow into the need): no more than that is thrown out
            while self._evict_for(max(self.alloc.rounded(size)[0] - self.alloc.largest_free, 1)):
                evicted = True
                try:
                    return self.alloc.alloc(size)
                except ArenaFull:
                    continue
            self.counters["full"] += 1
            return -1
        finally:
            if evicted:
                self._bump()  # before the caller hands the extent out

    def _evict_for(self, size: int) -> bool:
        """Evict the least recent clean unleased objects holding at least
        ``size`` bytes (or all there are), in one round: one directory update
        for the round, not one per object (a 32 MiB reservation of 4 KiB
        values evicts thousands). Their extents may not be contiguous: the
        caller tries again and asks for another round. False: nothing to evict."""
        oks, ms, offs, nbytes = self._evict_round(self.lru, self._leased, size)
        if not oks:
            return False
        self.bytes -= nbytes
        self.alloc.free_many(offs)  # none is leased: _forget's release_extent would free each at once
        self.counters["evictions"] += len(oks)
        self._changed(oks, ms)
        return True

    def add(self, ok: bytes, m: Resident) -> None:
        """``m`` has its copy at ``m.t0`` now (its wire says so already)."""
        self.lru.append(ok, m)
        self.bytes += m.size
        self._changed([ok], [m])

    def touch(self, m: Resident) -> None:
        """``m`` was read: the most recent now (if clean)."""
        self.lru.move_to_end(m)

    def drop(self, ok: bytes, m: Resident) -> None:
        """Forget the T0 copy of ``m`` (object stays in T1) and free its extent
        (deferred while leased). The caller bumps the generation."""
        self._forget(ok, m)
        self._changed([ok], [m])

    def _forget(self, ok: bytes, m: Resident) -> None:
        """``drop`` but for the directory, which the caller updates."""
        # only m itself: a put of the same key after m's delete may hold
        # the key here now, and it stays (dirty: the journal owes it).
        # m's bytes were counted while it had a copy (t0 >= 0), on a list or not.
        if not self.lru.remove(m):
            self.dirty.remove(m)
        off, m.t0 = m.t0, -1
        m.rewire()
        if off >= 0:
            self.bytes -= m.size
            self.release_extent(ok, off)

    def release_extent(self, ok: bytes, off: int) -> None:
        if ok in self._leased:
            self.zombies.setdefault(ok, []).append(off)
        else:
            self.alloc.free(off)

    def unpinned(self, oks: list[bytes]) -> None:
        """Objects whose last lease ended: free their zombie extents."""
        for ok in oks:
            for off in self.zombies.pop(ok, ()):
                self.alloc.free(off)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"path": str(self.arena.path), "capacity_bytes": self.alloc.size, "allocated_bytes": self.alloc.used,
                # of the daemon's mapping, mapped with 2 MiB pages (kvfsd.arena: huge pages)
                "huge_page_bytes": self.arena.huge_bytes(),
                "bytes": self.bytes, "objects": len(self.lru) + len(self.dirty),
                "free_extents": self.alloc.free_extents,
                "largest_free": self.alloc.largest_free, "hits": c["hits"], "misses": c["misses"],
                "evictions": c["evictions"], "promotions": c["promotions"], "full": c["full"],
                "corrupt_dropped": c["corrupt_dropped"],
                "zombie_extents": sum(len(v) for v in self.zombies.values()),
                "writeback_objects": self.backlog_objects, "writeback_bytes": self.backlog_bytes}
