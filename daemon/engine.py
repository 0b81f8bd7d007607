"""The storage engine: segments on the stripes, the LMDB index, the T0
arena, leases, eviction and recovery, as layers (kvfsd.engine_state lists
them and the invariants they share). This module is the top: starting and
stopping, lookups and listings, stats.

Invariants kept here:
- lookups, ``contains`` and ``prefix_match`` read only the mirror (memory
  only): they never touch LMDB or disk, so they run on the event loop;
- a lookup's lease pins every segment and object it names until released
  or expired (kvfsd.leases);
- at close, what is still queued for write-back is written first: T0 is
  its only copy.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable

import lmdb

from kvfs import native
from kvfs.errors import InvalidArgument, KvfsError, NotFound
from kvfs.generation import Generation
from kvfs.keys import normalize_key, normalize_keys, normalize_ns

from .arena import Arena, arena_path
from .config import Config
from .dir_refill import DirectoryRefill
from .directory import DirectoryWriter
from .fileperms import FilePerms, Kind, secure_store
from .index import Index, obj_key, split_obj_key
from .leases import LeaseTable
from .mirror import MemEntry
from .recovery import Recovery
from .rootlock import RootLock
from .segments import PutPlan, SegState
from .t0journal import Journal
from .tier0 import Tier0
from .write_back import WriteBackPool, pool_size
from .writer import WriterThread

log = logging.getLogger("kvfsd")


class Engine(Recovery):
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.remote = None  # the shared tier, made last (its threads read the engine)
        self.stripe_unit = cfg.stripe_unit
        assert cfg.capacity is not None
        self.capacity = cfg.capacity
        self.root_lock = RootLock(cfg.root, "a kvfs daemon")
        try:
            self.index = Index(cfg.root, cfg.map_size)
        except BaseException as e:
            self.root_lock.release()
            if isinstance(e, lmdb.Error):
                raise _damaged(cfg.root, e) from None
            raise
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self.leases = LeaseTable(cfg.lease_timeout)
        self.segs: dict[int, SegState] = {}
        self.unpersisted: set[int] = set()  # segments whose row goes out with the next commit
        self.open_seg: dict[int, int] = {}
        self.seal_pending: set[int] = set()
        self.lru: OrderedDict[bytes, MemEntry] = OrderedDict()  # index mirror, least recent first
        self._usage = 0  # sum of segment ends (reserved bytes included)
        self.ns_objects: Counter[str] = Counter()
        self.logical_bytes = 0
        self._dirty_atime: dict[bytes, float] = {}
        self._next_seg = 0
        self._next_seq = 0
        self._rr = 0  # round-robin start stripe for the next object
        self.counters: Counter[str] = Counter()
        self.started = time.time()
        self.instance = os.urandom(8).hex()  # tells clients a restarted daemon from the one they knew
        self.perms = FilePerms(cfg.policy)
        self.generation = Generation(cfg.root)
        try:
            # every start: what an earlier run granted is re-granted or revoked
            secure_store(self.perms, cfg.root, cfg.stripes)
        except BaseException:
            self.index.env.close()
            self.root_lock.release()
            raise
        self.writer = WriterThread(self.index.env, fast_sync_interval=cfg.sync_interval, on_idle=self._flush_atimes,
                                   before_sync=self.durable_round)
        self.dir: DirectoryWriter | None = (DirectoryWriter(cfg.root, cfg.dir_slots, lambda: len(self.lru),
                                                             shm_dir=cfg.shm_dir) if cfg.dir_slots else None)
        if self.dir is not None:
            self.perms.apply(self.dir.path, Kind.SHARED_RO)
        self.dir_refill = DirectoryRefill()
        try:
            self.recovery = self._recover()
        except Exception as e:
            # A damaged index (a failing disk, a bit flip) yields anything:
            # LMDB's errors, undecodable keys or entries. OSError is the
            # disk's, not the index's: said as it is.
            try:
                self.writer.stop()
                self.index.env.close()
            except lmdb.Error:
                pass
            self.root_lock.release()
            if isinstance(e, OSError):
                raise
            log.error("recovery could not read the index", exc_info=True)
            raise _damaged(cfg.root, e) from None
        # T0 starts empty after every start: nothing in an old arena is
        # trusted, except what the journal says was owed to T1, verified.
        self.t0: Tier0 | None = None
        self.journal: Journal | None = None
        self.promote_q: OrderedDict[bytes, None] = OrderedDict()
        self.wb_pending: dict[int, PutPlan] = {}  # fast-mode T0 puts whose write-back is queued
        # guards wb_pending alone: queueing a put on the event loop never waits
        # for the engine lock, which the write-back holds while it settles a batch
        self._wb_lock = threading.Lock()
        self.wb_pool: WriteBackPool | None = None
        self._replay_t0()
        if cfg.shm_size:
            self.journal = Journal(arena_path(cfg.root, cfg.shm_dir).with_suffix(".journal"))  # the daemon's alone
            arena = Arena(cfg.root, cfg.shm_size, shm_dir=cfg.shm_dir)
            self.perms.apply(arena.path, Kind.DATA)
            self.t0 = Tier0(arena, max(cfg.shm_size // 4, 1),
                            self.leases.leased_objects, self.generation.bump, self._dir_put_many)
            self.wb_pool = WriteBackPool(self, pool_size(len(cfg.stripes)))
        if cfg.remote is not None:
            from .shared_tier import SharedTier  # obstore and hiredis only when asked for
            self.remote = SharedTier(cfg.remote, self)

    def close(self) -> None:
        try:
            if self.remote is not None:
                self.remote.close()
            if self.wb_pool is not None:
                self.wb_pool.stop()
            left = self.take_write_backs()
            if left:
                self.write_back_many(left, False)  # T0 is its only copy: write it out before exit
            self.writer.call(self._flush_atimes)
            # sealed segments synced whole here get their SEALED rows in the
            # last commit (else each start after a clean stop re-checks them)
            self.durable_round()
            self.writer.call(self._persist_segments, sync=True)
        finally:
            self.writer.stop()
            with self._lock:
                for s in self.segs.values():
                    s.close()
            self.index.close()
            self.generation.close()
            if self.t0 is not None:
                self.t0.arena.close()
            if self.journal is not None:
                self.journal.close()  # everything was written back above
            if self.dir is not None:
                self.dir.close()
            self.root_lock.release()

    def lookup(self, ns: str, keys: list[Any], owner: Hashable | None, *, lease: bool = True
               ) -> tuple[int, list[tuple[Any, ...] | None]]:
        """Locations of ``keys`` (wire form) and one lease that pins them all
        (0: no hit or no lease asked). Memory only: safe on the event loop.
        The caller must release the lease."""
        ns = normalize_ns(ns)
        oks = [obj_key(ns, normalize_key(k)) for k in keys]
        now = time.time()
        out: list[tuple[Any, ...] | None] = []
        lid = 0
        with self._lock:
            segs: list[int] = []
            hit: list[bytes] = []
            ms: list[Any] = []
            lru = self.lru
            for ok in oks:
                m = lru.get(ok)
                if m is None:
                    out.append(None)
                    continue
                lru.move_to_end(ok)
                self._dirty_atime[ok] = now
                self._tier_hit(ok, m)
                segs.extend(seg for seg, _span in m.spans)
                hit.append(ok)
                ms.append(m)
                out.append(m.wire)
            if hit and self.dir is not None and self.dir.outside:
                # a full directory: what is read now (maybe outside it) takes
                # the coldest slots, so the next reader finds it there
                self.dir.enter_many(hit, ms)
            self.counters["hits"] += len(hit)
            self.counters["misses"] += len(oks) - len(hit)
            if self.t0 is not None:
                self.t0.counters["misses"] += len(oks) - len(hit)
            if lease and hit:
                lid = self.leases.grant(owner, segs, hit, time.monotonic())
        return lid, out

    def touch(self, ns: str, keys: list[Any]) -> None:
        """Hits a client served from its location cache: keep the LRU honest.
        Memory only: safe on the event loop."""
        ns = normalize_ns(ns)
        now = time.time()
        with self._lock:
            n = 0
            for k in keys:
                ok = obj_key(ns, normalize_key(k))
                m = self.lru.get(ok)
                if m is not None:
                    self.lru.move_to_end(ok)
                    self._dirty_atime[ok] = now
                    self._tier_hit(ok, m)
                    n += 1
            self.counters["hits"] += n
            self.counters["cached_hits"] += n

    def contains(self, ns: str, keys: list[Any]) -> list[bool]:
        pre = normalize_ns(ns).encode() + b"\x00"  # obj_key's layout
        lru = self.lru
        return [pre + k.encode() in lru for k in normalize_keys(keys)]

    def prefix_match(self, ns: str, keys: list[Any]) -> int:
        pre = normalize_ns(ns).encode() + b"\x00"
        lru = self.lru
        n = 0
        for k in normalize_keys(keys):
            if pre + k.encode() not in lru:
                break
            n += 1
        return n

    def compaction_args(self, threshold: float | None, stripe: str | None) -> tuple[float, int | None]:
        """``kvfs compact``'s arguments checked: (threshold, stripe index)."""
        t = self.cfg.compact_threshold if threshold is None else threshold
        if not 0.0 < t <= 1.0:
            raise InvalidArgument("the threshold is the share of dead bytes, in (0, 1]")
        if stripe is None:
            return t, None
        paths = [str(p) for p in self.cfg.stripes]
        want = str(Path(stripe).expanduser().absolute())
        if want not in paths:
            raise InvalidArgument(f"{stripe} is not a stripe of this store ({', '.join(paths)})")
        return t, paths.index(want)

    def compact(self, threshold: float | None = None, stripe: str | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        """``kvfs compact`` (kvfsd.compaction). ``stripe``: a stripe directory."""
        from .compaction import compact
        return compact(self, *self.compaction_args(threshold, stripe), progress)

    def dead_bytes(self) -> int:
        with self._lock:
            return sum(s.end - s.live for s in self.segs.values())

    def stat(self, ns: str, key: Any) -> dict[str, Any]:
        ns, k = normalize_ns(ns), normalize_key(key)
        with self.index.env.begin() as txn:
            e = self.index.get(txn, ns, k)
        if e is None:
            m = self.lru.get(obj_key(ns, k))
            if m is None or not m.dirty:
                raise NotFound(f"{ns}/{k} not found")
            return {"ns": ns, "key": k, "size": m.size, "checksum": m.checksum.hex(), "seq": m.seq,
                    "meta": m.meta.decode() if m.meta else None, "tier": "T0", "extents": [], "created": time.time(),
                    "last_access": time.time()}
        return {
            "ns": ns, "key": k, "size": e.size, "checksum": e.checksum.hex(), "seq": e.seq,
            "meta": e.meta.decode() if e.meta else None, "tier": self._tier_name(obj_key(ns, k)),
            "extents": [[str(self.seg_path(x.stripe, x.seg)), x.offset, x.length] for x in e.extents],
            "created": e.created, "last_access": self._dirty_atime.get(obj_key(ns, k), e.atime),
        }

    def _tier_name(self, ok: bytes) -> str:
        m = self.lru.get(ok)
        return "T0+T1" if m is not None and m.t0 >= 0 else "T1"

    def create_namespace(self, ns: str) -> None:
        """An empty namespace (a `mkdir` in the mount). Blocking."""
        ns = normalize_ns(ns)
        self.writer.call(lambda txn: self.index.add_namespace(txn, ns, time.time()),
                         sync=self.cfg.durability == "sync")

    def object_entry(self, ns: str, key: str) -> MemEntry | None:
        """The mirror entry of an object (memory only: safe on the loop)."""
        return self.lru.get(obj_key(ns, key))

    def namespaces(self) -> list[str]:
        with self.index.env.begin() as txn:
            return self.index.list_namespaces(txn)

    def keys(self, ns: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        ns = normalize_ns(ns)
        with self.index.env.begin() as txn:
            return self.index.iter_keys(txn, ns, after, limit)

    def list_objects(self, ns: str, after: str | None, limit: int) -> tuple[list[list[Any]], bool]:
        """``kvfs ls --long`` / ``du``: [key, size, tier, created] per object, in key order."""
        ns = normalize_ns(ns)
        with self.index.env.begin() as txn:
            entries, more = self.index.iter_entries(txn, ns, after, limit)
        return [[k, e.size, self._tier_name(obj_key(ns, k)), e.created] for k, e in entries if e is not None], more

    def refill_directory(self) -> int:
        """Keys outside the directory into slots removals freed (a step of
        ``DirectoryRefill``; blocking, the server calls it once a second)."""
        return self.dir_refill.step(self)

    def _flush_atimes(self, txn: Any) -> None:
        with self._lock:
            dirty, self._dirty_atime = self._dirty_atime, {}
        if self.remote is not None and dirty:
            self.remote.accessed(split_obj_key(ok) for ok in dirty)
        for ok, at in dirty.items():
            ns, key = split_obj_key(ok)
            e = self.index.get(txn, ns, key)
            if e is not None and at > e.atime:
                e.atime = at
                txn.put(ok, e.encode(), db=self.index.objects)

    def _t0_stats(self) -> dict[str, Any]:
        if self.t0 is None:
            return {"capacity_bytes": 0}
        out = self.t0.stats()
        if self.wb_pool is not None:  # batches the pool wrote: against the T0 puts, how well they batch
            out["writeback_batches"] = self.wb_pool.batches
        if self.journal is not None:  # what a crash would replay, and how often it was cut back
            out["journal_bytes"], out["journal_rewrites"] = self.journal.size, self.journal.rewrites
        return out

    def stats(self) -> dict[str, Any]:
        index = {"commits": self.writer.commits, "used_bytes": self.index.used_bytes()}  # LMDB's own: not under the lock
        with self._lock:
            per_stripe = []
            for si, p in enumerate(self.cfg.stripes):
                segs = [s for s in self.segs.values() if s.stripe == si]
                per_stripe.append({"path": str(p), "segments": len(segs),
                                   "disk_bytes": sum(s.end for s in segs),
                                   "live_bytes": sum(s.live for s in segs),
                                   "chunks": sum(s.records for s in segs)})
            used = sum(s.end for s in self.segs.values())
            live = sum(s.live for s in self.segs.values())
            c = dict(self.counters)
            tiers: dict[str, Any] = {
                "T0": self._t0_stats(),
                "T1": {"objects": len(self.lru) - (self.t0.backlog_objects if self.t0 else 0),
                       "bytes": self.logical_bytes - (self.t0.backlog_bytes if self.t0 else 0),
                       "hits": c.get("t1_hits", 0), "misses": c.get("misses", 0)}}
            out: dict[str, Any] = {
                "version": 1,
                "uptime_s": time.time() - self.started,
                "durability": self.cfg.durability,
                "data_plane": native.name,  # the daemon's own per-object loops: "native" (C) or "python" (twins)
                "capacity_bytes": self.capacity,
                "disk_bytes": used,
                "live_bytes": live,
                "dead_bytes": used - live,
                "objects": len(self.lru),
                "logical_bytes": self.logical_bytes,
                "namespaces": dict(self.ns_objects),
                "segments": len(self.segs),
                "leases": len(self.leases),
                "stripes": per_stripe,
                "counters": {k: c.get(k, 0) for k in ("puts", "put_bytes", "puts_existing", "hits", "misses",
                                                      "cached_hits", "deletes", "evictions", "corrupt_dropped",
                                                      "segments_deleted", "inline_put_bytes", "compactions",
                                                      "compacted_bytes")},
                "recovery": vars(self.recovery),
                "tiers": tiers,
                "promote_queue": len(self.promote_q),
                # the LMDB index: write transactions committed since start, and the pages in use
                "index": index,
                "directory": (dict(self.dir.stats(), refill_passes=self.dir_refill.passes,
                                   refilled=self.dir_refill.entered) if self.dir is not None else None),
            }
        # the shared tier (T2): its own lock
        tiers["T2"] = self.remote.stats() if self.remote is not None else None
        return out


def _damaged(root: Path, e: Exception) -> KvfsError:
    what = str(e) if isinstance(e, lmdb.Error) else f"{type(e).__name__}: {e}"
    return KvfsError(f"the index at {root / 'index'} is damaged ({what}); the segments hold everything needed "
                     f"to rebuild it: kvfs rebuild-index --root {root}")
