"""What every part of the storage engine shares, and the rules on it.

The engine (kvfsd.engine.Engine) is built in layers, each a class whose
name says what it owns, each using only the layers below it:

    EngineState  the shared state below (declared here, made by Engine)
    Placement    segments on the stripes, where a record goes (kvfsd.placement)
    Space        disk space, eviction, removal, leases ending (kvfsd.space)
    Puts         plan, write, commit or abort a put (kvfsd.puts)
    Tiering      T0: arena reservations, publish, write-back, promotion (kvfsd.tiering)
    Repair       verify and repair objects (kvfsd.repair)
    Recovery     reconcile segments and index at start, replay T0 (kvfsd.recovery)
    Engine       start, stop, lookups, listings, stats (kvfsd.engine)

Thread-safe; every method may block on disk or on the writer thread (unless
it says "memory only"), so the trio loop calls them through
``trio.to_thread``.

Invariants (kept by every layer, relied on everywhere):
- Only the writer thread opens LMDB write transactions (kvfsd.writer).
- Durability order for a put: payload pwritev (+ fdatasync in sync mode),
  then the index commit that publishes it (+ env.sync in sync mode), then
  the reply. A crash before the commit leaves unpublished bytes: dead space.
- Durability order for a removal: the commit that unpublishes the object,
  then (possibly much later) the unlink of a fully dead segment.
- A segment with a lease or an in-flight reservation is never unlinked.
- In-memory state (segment table, mirror, leases, counters) is guarded by
  ``_lock``; it is never held across disk I/O or a writer round trip.
- The location directory (``dir``) follows the mirror under ``_lock``: an
  entry changes there before the change is acknowledged, and leaves before
  the removal generation is bumped (kvfs.directory).
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvfs.generation import Generation

    from .config import Config
    from .directory import DirectoryWriter
    from .fileperms import FilePerms
    from .index import Index
    from .leases import LeaseTable
    from .mirror import MemEntry
    from .recovery import RecoveryReport
    from .rootlock import RootLock
    from .segments import PutPlan, SegState
    from .shared_tier import SharedTier
    from .t0journal import Journal
    from .tier0 import Tier0
    from .write_back import WriteBackPool
    from .writer import WriterThread


class EngineState:
    cfg: Config
    stripe_unit: int
    capacity: int
    root_lock: RootLock
    index: Index
    writer: WriterThread
    perms: FilePerms
    generation: Generation  # bumped after a removal's commit, before its bytes can be reused
    _lock: threading.Lock  # guards everything in memory below
    _evict_lock: threading.Lock  # one eviction at a time
    leases: LeaseTable
    segs: dict[int, SegState]
    # the segments whose row goes out with the next commit (persisted
    # False): a commit writes these, not a scan of every segment
    unpersisted: set[int]
    open_seg: dict[int, int]  # stripe -> its open segment
    # sealed segments whose SEALED row waits for their fdatasync (fast mode:
    # Placement.durable_round); until the row is out, recovery verifies them
    seal_pending: set[int]
    lru: OrderedDict[bytes, MemEntry]  # the index mirror, least recently used first
    _usage: int  # sum of segment ends (reserved bytes included)
    ns_objects: Counter[str]
    logical_bytes: int
    _dirty_atime: dict[bytes, float]  # access times not yet in LMDB
    _next_seg: int
    _next_seq: int
    _rr: int  # round-robin start stripe of the next object
    counters: Counter[str]
    started: float
    instance: str  # tells clients a restarted daemon from the one they knew
    dir: DirectoryWriter | None
    recovery: RecoveryReport
    t0: Tier0 | None
    journal: Journal | None  # T0 puts not yet written back (kvfsd.t0journal)
    promote_q: OrderedDict[bytes, None]  # T1 objects to copy into T0
    wb_pending: dict[int, PutPlan]  # fast-mode T0 puts whose write-back is queued (under _wb_lock)
    _wb_lock: threading.Lock  # guards wb_pending alone; never held with another lock
    wb_pool: WriteBackPool | None
    remote: SharedTier | None  # the shared tier (T2), if configured

    def _dir_put(self, ok: bytes, m: MemEntry, new: bool = False) -> None:
        """The mirror entry ``ok`` changed (``new``: it is a new resident):
        so does the directory. Caller holds the lock."""
        if self.dir is not None and self.lru.get(ok) is m:
            if new:
                self.dir.enter(ok, m)
            else:
                self.dir.put(ok, m)

    def _dir_put_many(self, oks: list[bytes], ms: list[MemEntry]) -> None:
        """``_dir_put`` of each, one call into the directory. Caller holds the lock."""
        if self.dir is not None:
            self.dir.put_many(oks, ms, self.lru)

