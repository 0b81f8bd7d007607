"""The storage engine: segments on the stripes, the LMDB index, leases,
eviction and recovery. Thread-safe; every method may block on disk or on the
writer thread, so the trio loop calls them through ``trio.to_thread``.

Invariants (kept here, relied on everywhere):
- Only the writer thread opens LMDB write transactions (see kvfsd.writer).
- Durability order for a put: payload pwritev (+ fdatasync in sync mode),
  then the index commit that publishes it (+ env.sync in sync mode), then
  the reply. A crash before the commit leaves unpublished bytes: dead space.
- Durability order for a removal: the commit that unpublishes the object,
  then (possibly much later) the unlink of a fully dead segment.
- A segment with a lease or an in-flight reservation is never unlinked.
- In-memory state (segment table, LRU, leases, counters) is guarded by
  ``self._lock``; it is never held across disk I/O or a writer round trip.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

import lmdb
import xxhash

from kvfs import format as fmt
from kvfs.errors import CapacityError, InvalidArgument, KvfsError, NotFound
from kvfs.generation import Generation
from kvfs.keys import normalize_key, normalize_keys, normalize_ns
from kvfs.meta import encode_meta

from kvfs import native

from .arena import Arena, arena_path
from .config import Config
from .directory import DirectoryWriter
from .eviction import choose_victims
from .fileperms import FilePerms, Kind, secure_store
from .index import SEG_OPEN, SEG_SEALED, Extent, Index, ObjEntry, obj_key, split_obj_key
from .leases import LeaseTable
from .rootlock import RootLock
from .storecheck import check_record
from .t0journal import Journal, Pending, read_pending
from .tier0 import Tier0
from .write_back import WriteBackPool, pool_size
from .writer import WriterThread

log = logging.getLogger("kvfsd")



@dataclass
class SegState:
    seg: int
    stripe: int
    path: Path
    state: int
    end: int  # reserved end: every reservation lies below it
    live: int = 0  # bytes of published records (header to aligned end)
    records: int = 0  # published records (chunks) in it
    # reservations not yet committed or aborted: start -> end (a record being
    # written lies inside one; kvfs verify does not call it an orphan)
    reserved: dict[int, int] = field(default_factory=dict)
    fd: int = -1
    persisted: bool = False  # has a row in the segments table

    def add_live(self, span: int) -> None:
        self.live += span
        self.records += 1

    def drop_live(self, span: int) -> None:
        self.live -= span
        self.records -= 1

    @property
    def inflight(self) -> int:
        return len(self.reserved)

    def ensure_fd(self) -> int:
        if self.fd < 0:
            # the owner's alone until its kind's ACL is applied (Engine._segment_for)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class MemEntry:
    """The in-memory mirror of one index entry: what lookups answer with.
    Lookups, contains and prefix_match read only this mirror, so they never
    touch LMDB (or disk) and run on the event loop; LMDB is the durable copy,
    and the mirror is changed only after the commit that changes LMDB."""

    __slots__ = ("size", "checksum", "seq", "exts", "spans", "wire", "t0", "dirty", "deleted", "hits", "meta",
                 "created")

    def __init__(self, size: int, checksum: bytes, seq: int, exts: list[list[Any]],
                 spans: tuple[tuple[int, int], ...], *, t0: int = -1, dirty: bool = False):
        self.size = size
        self.checksum = checksum
        self.seq = seq
        self.exts = exts  # [[stripe, seg, payload_off, length, chunk_sum], ...]
        self.spans = spans  # ((seg, record bytes), ...); () while dirty: not yet counted live
        self.t0 = t0  # arena offset of the T0 copy, -1: none
        self.dirty = dirty  # in T0 only: write-back to T1 not committed yet
        self.deleted = False  # removed while dirty: the write-back must not publish it
        self.hits = 0  # T1 hits (promotion policy)
        self.meta: bytes | None = None  # kept only while dirty (LMDB has it after)
        self.created = 0.0  # for the mount's mtime
        self.wire: list[Any] = []
        self.rewire()

    def rewire(self) -> None:
        """What lookups answer: [size, checksum, seq, extents, t0] where t0 is
        None or [arena offset, also in T1]. Replaced, never mutated, so a
        reply being encoded on the loop never sees a half-made change."""
        self.wire = [self.size, self.checksum, self.seq, self.exts,
                     None if self.t0 < 0 else [self.t0, not self.dirty]]

    @classmethod
    def of(cls, e: ObjEntry) -> "MemEntry":
        m = cls(e.size, e.checksum, e.seq, [x.wire() for x in e.extents],
                tuple((x.seg, sp) for x, sp in zip(e.extents, e.spans)))
        m.created = e.created
        return m


@dataclass
class ChunkPlan:
    stripe: int
    seg: int
    hdr_off: int
    payload_off: int
    end: int
    length: int
    chunk_off: int
    idx: int
    checksum: bytes = b""
    start: int = -1  # where the reservation begins (the segment's end before it)


@dataclass
class ObjPlan:
    key: str
    size: int
    meta: bytes | None
    seq: int
    chunks: list[ChunkPlan]
    hasher: Any = None  # running xxh3-128 of the whole value (multi-chunk)
    checksum: bytes = b""
    t0: int = -1  # arena extent the client fills (T0 put), -1: the client writes T1 itself
    via_t0: bool = False  # a T0 put item (stays True after t0 is handed to ``mem``)
    mem: "MemEntry | None" = None  # the dirty mirror entry publish_t0 made
    t0_stored: bool = False  # publish_t0's answer for this item


@dataclass
class PutPlan:
    ns: str
    items: list[ObjPlan | None]  # None: already there (or repeated in the batch)
    sizes: list[int]
    touched: set[int] = field(default_factory=set)  # segments written to


@dataclass
class RecoveryReport:
    seconds: float = 0.0
    segments_checked: int = 0
    records_verified: int = 0
    objects_dropped: int = 0
    bytes_truncated: int = 0
    orphan_segments_removed: int = 0
    t0_replayed: int = 0  # fast-mode T0 puts a crashed daemon had not written back, now in T1
    t0_replay_failed: int = 0  # ... whose arena bytes failed their checksums (not stored)


class Engine:
    def __init__(self, cfg: Config):
        self.cfg = cfg
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
        self.open_seg: dict[int, int] = {}
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
        self.writer = WriterThread(self.index.env, on_idle=self._flush_atimes)
        self.dir: DirectoryWriter | None = DirectoryWriter(cfg.root, cfg.dir_slots) if cfg.dir_slots else None
        if self.dir is not None:
            self.perms.apply(self.dir.path, Kind.SHARED_RO)
        try:
            self.recovery = self._recover()
        except lmdb.Error as e:
            try:
                self.writer.stop()
                self.index.env.close()
            except lmdb.Error:
                pass
            self.root_lock.release()
            raise _damaged(cfg.root, e) from None
        # T0 starts empty after every start: nothing in an old arena is
        # trusted, except what the journal says was owed to T1, verified.
        self.t0: Tier0 | None = None
        self.journal: Journal | None = None
        self.promote_q: OrderedDict[bytes, None] = OrderedDict()
        self.wb_pending: dict[int, PutPlan] = {}  # fast-mode T0 puts whose write-back is queued
        self.wb_pool: WriteBackPool | None = None
        self._replay_t0()
        if cfg.shm_size:
            self.journal = Journal(arena_path(cfg.root).with_suffix(".journal"))  # the daemon's alone
            arena = Arena(cfg.root, cfg.shm_size)
            self.perms.apply(arena.path, Kind.DATA)
            self.t0 = Tier0(arena, max(cfg.shm_size // 4, 1),
                            self.leases.obj_leased, self.generation.bump, self._dir_put)
            self.wb_pool = WriteBackPool(self, pool_size(len(cfg.stripes)))

    # ------------------------------------------------------------------ setup
    def close(self) -> None:
        try:
            if self.wb_pool is not None:
                self.wb_pool.stop()
            left = self.take_write_backs(list(self.wb_pending.values()))
            if left:
                self.write_back_many(left, False)  # T0 is its only copy: write it out before exit
            self.writer.call(self._flush_atimes)
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

    def stripe_paths(self) -> list[str]:
        return [str(p) for p in self.cfg.stripes]

    def seg_path(self, stripe: int, seg: int) -> Path:
        return self.cfg.stripes[stripe] / fmt.segment_name(seg)

    def _recover(self) -> RecoveryReport:
        """Reconcile segment files and the index (see kvfs.format, recovery rule)."""
        t0 = time.monotonic()
        rep = RecoveryReport()
        idx = self.index
        with idx.env.begin() as txn:
            rows = {seg: (stripe, state) for seg, stripe, state in idx.iter_segments(txn)}
            self._next_seq = idx.get_counter(txn, b"next_seq")
            next_seg = idx.get_counter(txn, b"next_seg")
        files: dict[int, tuple[int, Path]] = {}
        for si, sdir in enumerate(self.cfg.stripes):
            for name in os.listdir(sdir):
                sid = fmt.parse_segment_name(name)
                if sid is not None:
                    files[sid] = (si, sdir / name)
        self._next_seg = max([next_seg] + [s + 1 for s in files] + [s + 1 for s in rows])
        # Files with no row hold no published record (rows are committed with
        # or before the first object that points into them).
        for sid, (_si, path) in files.items():
            if sid not in rows:
                os.unlink(path)
                rep.orphan_segments_removed += 1
        drop: set[bytes] = set()
        truncate: dict[int, int] = {}
        for sid, (stripe, state) in rows.items():
            rep.segments_checked += 1
            if sid not in files:
                log.warning("segment %d is missing from stripe %d; dropping its objects", sid, stripe)
                with idx.env.begin() as txn:
                    drop.update(ok for _off, ok in idx.iter_segment_records(txn, sid))
                continue
            path = files[sid][1]
            size = path.stat().st_size
            good_end = 0
            fd = os.open(path, os.O_RDONLY)
            try:
                with idx.env.begin() as txn:
                    for off, ok in idx.iter_segment_records(txn, sid):
                        ns, key = split_obj_key(ok)
                        e = idx.get(txn, ns, key)
                        if e is None:
                            continue
                        ext_i = next((i for i, (x, h) in enumerate(zip(e.extents, e.header_offsets))
                                      if x.seg == sid and h == off), -1)
                        if ext_i < 0:
                            continue
                        ext = e.extents[ext_i]
                        end = ext.offset + ext.length
                        ok_rec = end <= size
                        if ok_rec and state == SEG_OPEN:
                            ok_rec = self._verify_record(fd, off, ns, key, e, ext_i)
                            rep.records_verified += 1
                        if ok_rec:
                            good_end = max(good_end, off + e.spans[ext_i])
                        else:
                            drop.add(ok)
            finally:
                os.close(fd)
            if state == SEG_OPEN and size > good_end:
                truncate[sid] = good_end
                rep.bytes_truncated += size - good_end
        # Drop what failed, seal every segment: new writes go to new segments.
        def fix(txn: Any) -> None:
            for ok in drop:
                ns, key = split_obj_key(ok)
                idx.delete_object(txn, ns, key)
            for sid, (stripe, _state) in rows.items():
                if sid in files:
                    idx.put_segment(txn, sid, stripe, SEG_SEALED)
                else:
                    idx.delete_segment(txn, sid)
            idx.set_counter(txn, b"next_seg", self._next_seg)
        self.writer.call(fix, sync=True)
        rep.objects_dropped = len(drop)
        for sid, end in truncate.items():
            os.truncate(files[sid][1], end)
        # Rebuild in-memory state from the index.
        for sid, (stripe, _state) in rows.items():
            if sid in files:
                self.segs[sid] = SegState(sid, stripe, files[sid][1], SEG_SEALED,
                                          truncate.get(sid, files[sid][1].stat().st_size), persisted=True)
        entries = []
        with idx.env.begin() as txn:
            for ns, key, e in idx.iter_objects(txn):
                entries.append((e.atime, obj_key(ns, key), ns, e))
                self._next_seq = max(self._next_seq, e.seq + 1)
        entries.sort(key=lambda t: t[0])
        for _at, ok, ns, e in entries:
            m = MemEntry.of(e)
            self.lru[ok] = m
            self._dir_put(ok, m)
            for seg, span in m.spans:
                if seg in self.segs:
                    self.segs[seg].add_live(span)
            self.ns_objects[ns] += 1
            self.logical_bytes += e.size
        self._usage = sum(st.end for st in self.segs.values())
        self._reclaim([s for s, st in self.segs.items() if st.live <= 0])
        rep.seconds = time.monotonic() - t0
        if rep.objects_dropped or rep.bytes_truncated or rep.orphan_segments_removed:
            log.warning("recovery: %s", rep)
        return rep

    def _replay_t0(self) -> None:
        """Write to T1 the fast-mode T0 puts that a crashed daemon owed
        (kvfsd.t0journal), from its orphaned arena, each verified against
        the checksums its client committed. Then both files go."""
        apath = arena_path(self.cfg.root)
        jpath = apath.with_suffix(".journal")
        pending = read_pending(jpath)
        rep = self.recovery
        if pending:
            try:
                fd = os.open(apath, os.O_RDONLY)
            except FileNotFoundError:
                log.error("T0 journal names %d unwritten puts but the arena is gone: lost", len(pending))
                rep.t0_replay_failed = len(pending)
                pending = []
            else:
                try:
                    size = os.fstat(fd).st_size
                    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
                finally:
                    os.close(fd)
                view = memoryview(mm) if mm is not None else memoryview(b"")
                su = self.stripe_unit
                for p in pending:
                    if not (0 <= p.off and p.off + p.size <= len(view)):
                        rep.t0_replay_failed += 1
                        continue
                    # bytes, not a view: a copy survives any error below
                    val = memoryview(bytes(view[p.off:p.off + p.size]))
                    n = max(1, -(-p.size // su))
                    if [fmt.checksum(val[i * su:(i + 1) * su]) for i in range(n)] != p.chunk_sums:
                        rep.t0_replay_failed += 1
                        log.error("T0 put %s/%s failed verification in the old arena: not stored", p.ns, p.key)
                        continue
                    if self._store_value(p.ns, p.key, p.meta, val, True):
                        rep.t0_replayed += 1
                view.release()
                if mm is not None:
                    mm.close()
                log.warning("T0 journal: %d puts written to T1 after a crash, %d lost",
                            rep.t0_replayed, rep.t0_replay_failed)
        jpath.unlink(missing_ok=True)

    @staticmethod
    def _verify_record(fd: int, hdr_off: int, ns: str, key: str, e: ObjEntry, i: int) -> bool:
        return check_record(fd, hdr_off, ns, key, e, i) is None

    # ------------------------------------------------------------------ write
    def prepare_put(self, ns: str, items: list[tuple[Any, int, Any]], *, may_evict: bool = True,
                    t0: bool = False, placed: Callable[[int, int], int] | None = None) -> PutPlan:
        """Validate a batch, skip keys already stored, reserve space for the rest.

        Without ``may_evict`` it never blocks (safe on the event loop) and
        raises NeedRoom when eviction would be needed first. With ``t0``
        each item that fits also gets an arena extent for the client to fill
        (T1 space is reserved all the same: the write-back goes there).
        With ``placed`` the client filled arena bytes already: ``placed(i,
        size)`` gives item i's arena offset (carved out of its reservation;
        raises ValueError for a placement it may not have); items already
        stored are not asked."""
        ns = normalize_ns(ns)
        norm: list[tuple[str, int, bytes | None]] = []
        for key, size, meta in items:
            k = normalize_key(key)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"size of {k!r} must be a non-negative int")
            norm.append((k, size, encode_meta(meta)))
        seen: set[str] = set()
        fresh = []
        for k, size, meta in norm:
            exists = k in seen or obj_key(ns, k) in self.lru
            seen.add(k)
            fresh.append(None if exists else (k, size, meta))
        need = sum(self._footprint(ns, k, size) for k, size, _m in (f for f in fresh if f))
        if need and self.needs_room(need):
            if not may_evict:
                raise NeedRoom(need)
            self._make_room(need)
        plan = PutPlan(ns, [], [size for _k, size, _m in norm])
        try:
            with self._lock:
                for i, f in enumerate(fresh):
                    op = None if f is None else self._reserve(ns, *f, touched=plan.touched)
                    if op is not None and placed is not None:
                        plan.items.append(op)  # before the carve: an abort frees what it carved
                        op.t0 = placed(i, op.size)
                        op.via_t0 = True
                        continue
                    if op is not None and t0 and self.t0 is not None and self.t0.fits(op.size):
                        op.t0 = self.t0.reserve(op.size)
                        op.via_t0 = op.t0 >= 0
                    plan.items.append(op)
        except BaseException:
            self.abort_put(plan)
            raise
        return plan

    # ------------------------------------------------------------------ arena reservations
    # A client with the arena mapped takes a reservation once, places its
    # puts in it itself, and sends each batch in one message (put_t0): the
    # daemon carves each value out of the reservation as its own extent.
    # Invariant: a reservation's rest is one used allocator extent, owned by
    # one connection; values are carved from it in increasing order; what
    # is left goes back when the connection ends or asks for another.
    def reserve_arena(self, size: int) -> tuple[int, int]:
        """(offset, size) of a new reservation of about ``size`` bytes (at
        most the largest T0 value), evicting clean objects as needed;
        (-1, 0) if the arena cannot make one now. Memory only."""
        if self.t0 is None:
            raise InvalidArgument("this daemon has no arena (T0): put through alloc/commit")
        size = max(1, min(int(size), self.t0.max_object))
        size, _align = self.t0.alloc.rounded(size)
        with self._lock:
            off = self.t0.reserve(size)
        return (off, size) if off >= 0 else (-1, 0)

    def carve_arena(self, rest: int, off: int, n: int) -> int:
        """Make a client-placed value at ``off`` an extent of its own (see
        ArenaAllocator.carve); returns the reservation's new rest. Caller
        holds the lock."""
        assert self.t0 is not None
        try:
            return self.t0.alloc.carve(rest, off, n)
        except ValueError as e:
            raise InvalidArgument(f"bad arena placement: {e}") from None

    def release_arena(self, rest: int, end: int) -> None:
        """Give back what is left of a reservation."""
        if self.t0 is not None and rest < end:
            with self._lock:
                self.t0.alloc.free(rest)

    def _footprint(self, ns: str, key: str, size: int) -> int:
        nl, kl = len(ns.encode()), len(key.encode())
        n = max(1, -(-size // self.stripe_unit))
        return sum(fmt.record_span(nl, kl, min(self.stripe_unit, size - i * self.stripe_unit)) for i in range(n))

    def _reserve(self, ns: str, key: str, size: int, meta: bytes | None, touched: set[int]) -> ObjPlan:
        seq = self._next_seq
        self._next_seq += 1
        nstripes = len(self.cfg.stripes)
        start = self._rr
        self._rr = (self._rr + 1) % nstripes
        nl, kl = len(ns.encode()), len(key.encode())
        n = max(1, -(-size // self.stripe_unit))
        chunks = [self._place_chunk((start + i) % nstripes, nl, kl, i,
                                    min(self.stripe_unit, size - i * self.stripe_unit), touched)
                  for i in range(n)]
        return ObjPlan(key, size, meta, seq, chunks, xxhash.xxh3_128() if n > 1 else None)

    def _place_chunk(self, stripe: int, nl: int, kl: int, i: int, length: int, touched: set[int]) -> ChunkPlan:
        """Reserve room for chunk ``i`` at the end of ``stripe``'s open
        segment. Caller holds the lock."""
        seg = self._segment_for(stripe, fmt.record_span(nl, kl, length))
        start = seg.end
        hdr, pay, end = fmt.place_record(start, nl, kl, length)
        self._usage += end - start
        seg.end = end
        seg.reserved[start] = end
        touched.add(seg.seg)
        return ChunkPlan(stripe, seg.seg, hdr, pay, end, length, i * self.stripe_unit, i, start=start)

    def _segment_for(self, stripe: int, span: int) -> SegState:
        sid = self.open_seg.get(stripe)
        if sid is not None:
            seg = self.segs[sid]
            if seg.end + span <= self.cfg.segment_size or seg.end == 0:
                return seg
            seg.state = SEG_SEALED
            seg.persisted = False  # the sealed state goes out with the next commit
        sid = self._next_seg
        self._next_seg += 1
        seg = SegState(sid, stripe, self.seg_path(stripe, sid), SEG_OPEN, 0)
        self.perms.apply(seg.ensure_fd(), Kind.DATA)  # before any client learns its name
        self.segs[sid] = seg
        self.open_seg[stripe] = sid
        return seg

    def write_chunks(self, plan: PutPlan, pieces: list[tuple[int, int, memoryview]]) -> None:
        """Write payload pieces: (item index, chunk index, bytes). Called in a
        worker thread, in order (the whole-object hash is a running one)."""
        for item_i, chunk_i, data in pieces:
            op = plan.items[item_i]
            assert op is not None
            ch = op.chunks[chunk_i]
            assert len(data) == ch.length
            ch.checksum = fmt.checksum(data)
            if op.hasher is not None:
                op.hasher.update(data)
            head = self._record_head(plan.ns, op, ch)
            self._pwrite(ch, [head, data], len(head) + ch.length)

    # ------------------------------------------------------------------ streamed puts
    # A put whose size is unknown until it ends (a file written through the
    # mount): writes go straight to their final place in T1, so the bytes
    # are written once and the commit only adds headers and the index entry.
    # Chunks are reserved full-size as writes reach them; ``end_stream``
    # trims the last one. Nothing is readable before ``commit_put``.
    def begin_stream(self, ns: str, key: str) -> tuple[PutPlan, int]:
        """A plan with one item and no chunks yet, and the stripe its chunk 0 goes to."""
        ns, key = normalize_ns(ns), normalize_key(key)
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            first = self._rr
            self._rr = (self._rr + 1) % len(self.cfg.stripes)
        return PutPlan(ns, [ObjPlan(key, 0, None, seq, [])], [0]), first

    def reserve_stream_chunk(self, plan: PutPlan, first: int, i: int) -> ChunkPlan:
        """Room for full-size chunk ``i`` (blocking: it may evict)."""
        op = plan.items[0]
        assert op is not None
        nl, kl = len(plan.ns.encode()), len(op.key.encode())
        span = fmt.record_span(nl, kl, self.stripe_unit)
        if self.needs_room(span):
            self._make_room(span)
        with self._lock:
            ch = self._place_chunk((first + i) % len(self.cfg.stripes), nl, kl, i, self.stripe_unit, plan.touched)
            op.chunks.append(ch)  # from here on abort_put releases it
        return ch

    def end_stream(self, plan: PutPlan, first: int, size: int) -> None:
        """The value is ``size`` bytes: chunks it never wrote are reserved and
        zero-filled (holes), chunks past its end are released, and the last
        chunk is trimmed to its length and placed where ``place_record``
        puts a record of that length, which recovery checks (blocking)."""
        op = plan.items[0]
        assert op is not None
        su = self.stripe_unit
        n = max(1, -(-size // su))
        have = {c.idx: c for c in op.chunks}
        extra = [c for c in op.chunks if c.idx >= n]
        for i in range(n - 1):
            if i not in have:
                have[i] = self.reserve_stream_chunk(plan, first, i)
                self.write_payload(have[i], bytes(su), 0)
        last_len = size - (n - 1) * su
        nl, kl = len(plan.ns.encode()), len(op.key.encode())
        with self._lock:
            for c in extra:
                self.segs[c.seg].reserved.pop(c.start, None)  # slack: the segment's space is reclaimed with it
            op.chunks = [c for c in op.chunks if c.idx < n]
            dead = [c.seg for c in extra if self._reclaimable(c.seg)]
        self._reclaim(dead)
        last = have.get(n - 1)
        if last is None:  # nothing written there: reserve it at its exact length
            with self._lock:
                last = self._place_chunk((first + n - 1) % len(self.cfg.stripes), nl, kl, n - 1, last_len,
                                         plan.touched)
                op.chunks.append(last)
            if last_len:
                self.write_payload(last, bytes(last_len), 0)
        else:
            hdr, pay, end = fmt.place_record(last.start, nl, kl, last_len)
            if pay != last.payload_off:  # a short tail (< 64 KiB) has its payload right after its header
                data = os.pread(self.segs[last.seg].fd, last_len, last.payload_off)
                last.payload_off = pay
                self.write_payload(last, data.ljust(last_len, b"\0"), 0)
            with self._lock:
                seg = self.segs[last.seg]
                if seg.end == last.end:  # nothing was placed after it: give the slack back
                    self._usage -= last.end - end
                    seg.end = end
                    last.end = end
            last.hdr_off, last.length = hdr, last_len
        op.chunks.sort(key=lambda c: c.idx)
        op.size = size
        plan.sizes[0] = size
        plan.touched = {c.seg for c in op.chunks}

    def write_payload(self, ch: ChunkPlan, data: Any, within: int) -> int:
        """Write payload bytes of a reserved chunk at ``within`` (blocking)."""
        return self._pwrite_at(ch, [data], ch.payload_off + within, len(data))

    def set_client_sums(self, plan: PutPlan, sums: list[Any]) -> None:
        """Checksums the client computed over the payloads it wrote itself
        (alloc/commit path): per item ``[object_sum, [chunk_sum, ...]]``."""
        if not isinstance(sums, list) or len(sums) != len(plan.items):
            raise InvalidArgument("commit needs one checksum entry per item")
        for op, s in zip(plan.items, sums):
            if op is None:
                continue
            if not (isinstance(s, list) and len(s) == 2 and isinstance(s[0], bytes) and len(s[0]) == 16
                    and isinstance(s[1], list) and len(s[1]) == len(op.chunks)
                    and all(isinstance(c, bytes) and len(c) == 16 for c in s[1])):
                raise InvalidArgument("a checksum entry is [16-byte object sum, [16-byte chunk sums]]")
            op.checksum = s[0]
            for ch, c in zip(op.chunks, s[1]):
                ch.checksum = c

    def write_headers(self, plan: PutPlan) -> None:
        """Write the record headers of payloads a client wrote itself. The
        daemon, not the client, writes headers, so a client cannot forge one."""
        for op in plan.items:
            if op is None:
                continue
            for ch in op.chunks:
                head = self._record_head(plan.ns, op, ch)
                self._pwrite(ch, [head], len(head))

    @staticmethod
    def _record_head(ns: str, op: ObjPlan, ch: ChunkPlan) -> bytes:
        return Engine.record_head(ns, op.key, len(op.chunks), op.size, op.seq, ch)

    @staticmethod
    def record_head(ns: str, key: str, nchunks: int, size: int, seq: int, ch: ChunkPlan) -> bytes:
        """A chunk's record header and the padding up to its payload: the
        bytes from ``ch.hdr_off`` to ``ch.payload_off``."""
        hdr = fmt.RecordHeader(ns, key, ch.idx, nchunks, ch.length, size, ch.chunk_off, seq, ch.checksum).encode()
        gap = ch.payload_off - ch.hdr_off - len(hdr)
        assert 0 <= gap < fmt.RECORD_ALIGN
        return hdr + bytes(gap)

    def _pwrite(self, ch: ChunkPlan, bufs: list[Any], expect: int) -> None:
        self._pwrite_at(ch, bufs, ch.hdr_off, expect)

    def _pwrite_at(self, ch: ChunkPlan, bufs: list[Any], off: int, expect: int) -> int:
        try:
            n = os.pwritev(self.segs[ch.seg].fd, bufs, off)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CapacityError(f"disk full on stripe {self.cfg.stripes[ch.stripe]}",
                                    needed=ch.length, capacity=self.capacity, used=self._usage) from None
            raise
        if n != expect:
            raise CapacityError(f"short write on stripe {self.cfg.stripes[ch.stripe]} (disk full?)",
                                needed=ch.length, capacity=self.capacity, used=self._usage)
        return n

    def effective_sync(self, sync: bool) -> bool:
        return sync or self.cfg.durability == "sync"

    def commit_put(self, plan: PutPlan, sync: bool) -> list[bool]:
        """Publish what was written. Returns, per item, whether it was stored
        (False: it was already there, possibly put meanwhile by another client)."""
        return self._publish_written(plan, self.effective_sync(sync), self.abort_put)

    def _publish_written(self, plan: PutPlan, sync: bool, on_error: Callable[[PutPlan], None]) -> list[bool]:
        return self._publish_many([plan], sync, on_error)[0]

    def _publish_many(self, plans: list[PutPlan], sync: bool,
                      on_error: Callable[[PutPlan], None]) -> list[list[bool]]:
        """Payloads and headers are written: fdatasync them (sync mode), then
        one commit that publishes every plan. ``on_error`` undoes a plan."""
        try:
            if sync:
                for sid in set().union(*(p.touched for p in plans)):
                    os.fdatasync(self.segs[sid].fd)
            jobs = [self.publish_job(p, sync) for p in plans]
            done = self.writer.call(lambda txn: [job(txn) for job in jobs], sync=sync)
        except BaseException:
            for p in plans:
                on_error(p)
            raise
        out: list[list[bool]] = []
        cand: list[int] = []
        for p, d in zip(plans, done):
            result, c = self.finish_commit(p, d)
            out.append(result)
            cand += c
        self._reclaim(cand)
        return out

    def publish_job(self, plan: PutPlan, sync: bool,
                    before: Callable[[], None] | None = None) -> Callable[[Any], Any]:
        """The writer job that publishes ``plan``. With ``before`` it first
        runs it (writing payloads or headers) and then, in sync mode,
        fdatasyncs the touched segments: a put then costs one writer round
        trip and no other thread hop."""
        ns = plan.ns

        def job(txn: Any) -> tuple[list[bool], list[tuple[ObjPlan, ObjEntry]], list[tuple[int, int, int]]]:
            if before is not None:
                before()
                if sync:
                    for sid in plan.touched:
                        os.fdatasync(self.segs[sid].fd)
            # durability order: payloads are written (and synced) above or
            # before this job was queued; this commit publishes them.
            now = time.time()
            entries: list[tuple[ObjPlan, ObjEntry]] = []
            for op in plan.items:
                if op is None:
                    continue
                if not op.checksum:
                    op.checksum = op.hasher.digest() if op.hasher is not None else (
                        op.chunks[0].checksum if op.size else fmt.checksum(b""))
                exts = [Extent(c.stripe, c.seg, c.payload_off, c.length, c.checksum) for c in op.chunks]
                entries.append((op, ObjEntry(op.size, op.checksum, op.seq, now, now, op.meta, exts,
                                             [c.hdr_off for c in op.chunks], [c.end - c.hdr_off for c in op.chunks])))
            segrows = self._segment_rows()
            for sid, stripe, state in segrows:
                self.index.put_segment(txn, sid, stripe, state)
            self.index.add_namespace(txn, ns, now)
            stored = []
            for op, e in entries:
                # a concurrent put of the same key may have won: keep its bytes
                fresh = txn.get(obj_key(ns, op.key), db=self.index.objects) is None
                if op.via_t0:
                    # a T0 put: only what publish_t0 made the mirror entry for,
                    # and not if it was deleted meanwhile (the delete job ran
                    # before this one on this same thread, or runs after and
                    # unpublishes it)
                    with self._lock:
                        fresh = fresh and op.mem is not None and not op.mem.deleted
                if fresh:
                    self.index.put_object(txn, ns, op.key, e)
                stored.append(fresh)
            self.index.set_counter(txn, b"next_seq", self._next_seq)
            self.index.set_counter(txn, b"next_seg", self._next_seg)
            return stored, entries, segrows
        return job

    def finish_commit(self, plan: PutPlan, done: tuple[list[bool], list[tuple[ObjPlan, ObjEntry]],
                                                     list[tuple[int, int, int]]]) -> tuple[list[bool], list[int]]:
        """After the publishing commit: update the mirror (memory only, safe on
        the loop). Returns the per-item result and segments to ``reclaim``."""
        stored, entries, segrows = done
        ns = plan.ns
        with self._lock:
            for sid, _stripe, state in segrows:
                s = self.segs.get(sid)
                if s is not None and s.state == state:
                    s.persisted = True
            n_t0 = 0
            for (op, e), fresh in zip(entries, stored):
                if op.via_t0:
                    n_t0 += 1
                    if op.mem is not None:
                        self._written_back(ns, op, e if fresh else None)
                    continue
                if not fresh:
                    continue
                m = MemEntry.of(e)
                for seg, span in m.spans:
                    self.segs[seg].add_live(span)
                self.lru[obj_key(ns, op.key)] = m
                self._dir_put(obj_key(ns, op.key), m)
                self.ns_objects[ns] += 1
                self.logical_bytes += op.size
            # T0 items were counted by publish_t0
            n_new = sum(f for (op, _e), f in zip(entries, stored) if not op.via_t0)
            self.counters["puts"] += n_new
            self.counters["put_bytes"] += sum(op.size for (op, _e), f in zip(entries, stored)
                                              if f and not op.via_t0)
            self.counters["puts_existing"] += len(plan.items) - n_new - n_t0
            if n_t0 and self.journal is not None:
                self.journal.flush()  # under the lock: before any later delete is acknowledged
        result = [op is not None and (op.t0_stored if op.via_t0 else f)
                  for op, f in zip(plan.items, self._per_item(plan, stored))]
        cand = self._release_reservations(plan)
        return result, cand

    @staticmethod
    def _per_item(plan: PutPlan, stored: list[bool]) -> list[bool]:
        it = iter(stored)
        return [op is not None and next(it) for op in plan.items]

    # ------------------------------------------------------------------ T0 puts
    def _dir_put(self, ok: bytes, m: MemEntry) -> None:
        """The mirror entry ``ok`` changed: so does the directory. Caller holds the lock."""
        if self.dir is not None and self.lru.get(ok) is m:
            self.dir.put(ok, m)

    def publish_t0(self, plan: PutPlan) -> None:
        """Make the T0 items of a committed plan readable at once, from the
        arena, as dirty mirror entries (memory only: safe on the loop). The
        write-back (``write_back``) then writes them to T1 and publishes
        them in LMDB. A key that appeared meanwhile keeps its bytes."""
        ns = plan.ns
        assert self.t0 is not None
        journal: list[Pending] = []
        with self._lock:
            for op in plan.items:
                if op is None or op.t0 < 0:
                    continue
                ok = obj_key(ns, op.key)
                if ok in self.lru:
                    self.t0.alloc.free(op.t0)  # unpublished: nobody saw it
                    op.t0 = -1
                    op.t0_stored = False
                    self.counters["puts_existing"] += 1
                    continue
                exts = [[c.stripe, c.seg, c.payload_off, c.length, c.checksum] for c in op.chunks]
                m = MemEntry(op.size, op.checksum, op.seq, exts, (), dirty=True)
                m.meta = op.meta
                m.created = time.time()
                self.lru[ok] = m
                self.t0.add(ok, m, op.t0)
                op.mem = m
                op.t0_stored = True
                self.ns_objects[ns] += 1
                self.logical_bytes += op.size
                self.counters["puts"] += 1
                self.counters["put_bytes"] += op.size
                self.t0.backlog_objects += 1
                self.t0.backlog_bytes += op.size
                journal.append(Pending(ns, op.key, op.seq, op.size, op.t0, op.checksum,
                                       [c.checksum for c in op.chunks], op.meta))
            if self.journal is not None and journal:
                self.journal.published(journal)

    def t0_only(self, plan: PutPlan) -> bool:
        """Every new item of the plan goes through T0 (none written to T1 by the client)."""
        return all(op is None or op.t0 >= 0 for op in plan.items)

    def queue_write_back(self, plan: PutPlan) -> None:
        """Fast mode: the pool writes ``plan`` to T1 in the background."""
        with self._lock:
            self.wb_pending[id(plan)] = plan
        assert self.wb_pool is not None
        self.wb_pool.kick()

    def write_back(self, plan: PutPlan, sync: bool, queued: bool = False) -> list[bool]:
        """Write a committed T0 plan to T1 and publish it in LMDB (blocking;
        a worker thread). ``queued``: taken from the background queue
        (whoever takes it first writes it); [] if another taker had it."""
        if queued and not self.take_write_backs([plan]):
            return []
        return self.write_back_many([plan], sync)[0]

    def take_write_backs(self, plans: list[PutPlan]) -> list[PutPlan]:
        """Of queued plans, those this caller now owns (the rest were taken)."""
        with self._lock:
            return [p for p in plans if self.wb_pending.pop(id(p), None) is not None]

    def write_back_many(self, plans: list[PutPlan], sync: bool) -> list[list[bool]]:
        """Write committed T0 plans to T1, then publish them all in one
        commit. Items the client wrote to T1 itself get their headers.
        Durability order as for any put: payload (+ fdatasync in sync
        mode), then the commit that publishes it. A plan whose write fails
        is dropped (``_write_back_failed``) and the first such error raised
        once the others are published."""
        assert self.t0 is not None
        arena = self.t0.arena.view
        written: list[PutPlan] = []
        error: BaseException | None = None
        for plan in plans:
            try:
                self._write_records(plan, arena)
            except Exception as e:  # noqa: BLE001 - this plan only; raised below
                self._write_back_failed(plan)
                error = error or e
                continue
            written.append(plan)
        out = self._publish_many(written, sync, self._write_back_failed) if written else []
        if error is not None:
            raise error
        return out

    def _write_records(self, plan: PutPlan, arena: memoryview) -> None:
        for op in plan.items:
            if op is None:
                continue
            m = op.mem
            for ch in op.chunks:
                if m is None:
                    if not op.via_t0:  # the client wrote the payload
                        head = self._record_head(plan.ns, op, ch)
                        self._pwrite(ch, [head], len(head))
                    continue
                if m.deleted:
                    continue
                head = self._record_head(plan.ns, op, ch)
                src = arena[m.t0 + ch.chunk_off:m.t0 + ch.chunk_off + ch.length]
                self._pwrite(ch, [head, src], len(head) + ch.length)

    def _write_back_failed(self, plan: PutPlan) -> None:
        """T1 refused the write (disk full...): the dirty entries cannot stay
        (T0 may not hold what T1 does not); they are dropped as if deleted."""
        with self._lock:
            for op in plan.items:
                if op is not None and op.mem is not None:
                    log.error("write-back of %s/%s failed: dropped", plan.ns, op.key)
                    self._written_back(plan.ns, op, None)
            if self.journal is not None:
                self.journal.flush()
        self.abort_put(plan)

    def _written_back(self, ns: str, op: ObjPlan, e: ObjEntry | None) -> None:
        """A T0 item's write-back finished (``e``: published) or was skipped.
        Caller holds the lock."""
        m = op.mem
        assert m is not None and self.t0 is not None
        if not m.dirty:
            return
        ok = obj_key(ns, op.key)
        self.t0.backlog_objects -= 1
        self.t0.backlog_bytes -= op.size
        if self.journal is not None:
            if self.t0.backlog_objects == 0:
                self.journal.empty()
            else:
                self.journal.done(ns, op.key, op.seq)
        m.dirty = False
        m.meta = None
        if e is not None and self.lru.get(ok) is m and not m.deleted:
            m.spans = tuple((x.seg, sp) for x, sp in zip(e.extents, e.spans))
            for seg, span in m.spans:
                self.segs[seg].add_live(span)
            m.rewire()
            self._dir_put(ok, m)
            return
        # deleted while dirty (its mirror entry is gone already), or not
        # published (the write-back failed): it goes, with its T0 copy
        if self.lru.get(ok) is m:
            del self.lru[ok]
            if self.dir is not None:
                self.dir.remove(ok)
            self.ns_objects[ns] -= 1
            if self.ns_objects[ns] <= 0:
                del self.ns_objects[ns]
            self.logical_bytes -= m.size
        self.t0.drop(ok, m)
        self.generation.bump()

    def abort_put(self, plan: PutPlan) -> None:
        self._reclaim(self._release_reservations(plan))

    def _release_reservations(self, plan: PutPlan) -> list[int]:
        with self._lock:
            done = []
            for op in plan.items:
                if op is None:
                    continue
                for c in op.chunks:
                    s = self.segs.get(c.seg)
                    if s is not None:
                        s.reserved.pop(c.start, None)
                        done.append(c.seg)
                op.chunks = []  # released once only
                if op.t0 >= 0 and op.mem is None and self.t0 is not None:
                    self.t0.alloc.free(op.t0)  # never published: nobody can have seen it
                op.t0 = -1
            # only segments this leaves fully dead need a (blocking) reclaim
            return [sid for sid in set(done) if self._reclaimable(sid)]

    def _segment_rows(self) -> list[tuple[int, int, int]]:
        with self._lock:
            return [(s.seg, s.stripe, s.state) for s in self.segs.values() if not s.persisted]

    def _persist_segments(self, txn: Any) -> None:
        for sid, stripe, state in self._segment_rows():
            self.index.put_segment(txn, sid, stripe, state)

    # ------------------------------------------------------------------ space
    def disk_usage(self) -> int:
        return self._usage

    def needs_room(self, need: int) -> bool:
        return self._usage + need > self.capacity * self.cfg.high_watermark

    def _make_room(self, need: int) -> None:
        cap = self.capacity
        if need > cap:
            raise CapacityError(f"value needs {need} bytes on disk; the capacity is {cap}",
                                needed=need, capacity=cap, used=self.disk_usage())
        with self._evict_lock:
            used = self.disk_usage()
            if used + need <= cap * self.cfg.high_watermark:
                return
            target = int(cap * self.cfg.low_watermark) - need
            with self._lock:
                # a generator: the walk stops as soon as the target is reached,
                # instead of copying the whole LRU order under the lock
                lru = ((ok, m.spans) for ok, m in self.lru.items())
                seg_live = {s: st.live for s, st in self.segs.items()}
                seg_size = {s: st.end for s, st in self.segs.items()}
                v = choose_victims(
                    lru, seg_live, seg_size, used, max(target, 0),
                    evictable=lambda ok: not self.leases.obj_leased(ok) and not self.lru[ok].dirty,
                    seg_reclaimable=lambda s: self.segs[s].inflight == 0 and not self.leases.seg_leased(s))
            if v.objects:
                self._remove_objects(v.objects, reason="evictions")
            used = self.disk_usage()
            if used + need > cap:
                raise CapacityError(
                    f"no room for {need} bytes: {used} of {cap} bytes used and nothing more can be "
                    f"evicted (leased or in flight)", needed=need, capacity=cap, used=used)

    def evict(self, to: int, ns: str | None = None) -> dict[str, Any]:
        """``kvfs evict``: evict least recently used objects (of ``ns``, or
        of the whole store) until their values total at most ``to`` bytes.
        Leased objects and those not yet written back from T0 are skipped.
        Disk space comes back as segments die whole (compaction moves the
        survivors of mostly-dead ones); the report says what it was and is.
        Blocking."""
        if to < 0:
            raise InvalidArgument("the target size must be >= 0")
        prefix = None if ns is None else obj_key(normalize_ns(ns), "")
        with self._evict_lock:
            disk_before = self.disk_usage()
            with self._lock:
                scope = [(ok, m) for ok, m in self.lru.items() if prefix is None or ok.startswith(prefix)]
                before = sum(m.size for _ok, m in scope)
                left = before
                victims: list[bytes] = []
                skipped = 0
                for ok, m in scope:  # least recently used first
                    if left <= to:
                        break
                    if m.dirty or self.leases.obj_leased(ok):
                        skipped += 1
                        continue
                    victims.append(ok)
                    left -= m.size
            removed = self._remove_objects(victims, reason="evictions") if victims else 0
        return {"ns": ns, "to": to, "objects": removed, "bytes_before": before, "bytes_after": left,
                "reached": left <= to, "skipped_in_use": skipped,
                "disk_before": disk_before, "disk_after": self.disk_usage()}

    def _remove_objects(self, oks: list[bytes], reason: str) -> int:
        """Unpublish objects (one commit), then reclaim segments left dead."""
        def job(txn: Any) -> list[bytes]:
            out = []
            with self._lock:
                # T0-only objects are in the mirror, not in LMDB: marking them
                # here, on the writer thread, orders it with their publish job
                for ok in oks:
                    m = self.lru.get(ok)
                    if m is not None and m.dirty:
                        m.deleted = True
                        out.append(ok)
            for ok in oks:
                ns, key = split_obj_key(ok)
                if self.index.delete_object(txn, ns, key) is not None and ok not in out:
                    out.append(ok)
            return out
        removed: list[bytes] = self.writer.call(job, sync=self.cfg.durability == "sync")
        segs: list[int] = []
        with self._lock:
            for ok in removed:
                m = self.lru.pop(ok, None)
                if m is None:
                    continue  # never mirrored (a lost race): its spans were not counted
                if self.dir is not None:
                    self.dir.remove(ok)  # before the generation bump below
                self._dirty_atime.pop(ok, None)
                self.promote_q.pop(ok, None)
                ns, _k = split_obj_key(ok)
                self.ns_objects[ns] -= 1
                if self.ns_objects[ns] <= 0:
                    del self.ns_objects[ns]
                self.logical_bytes -= m.size
                if self.t0 is not None and m.t0 >= 0 and not m.dirty:
                    self.t0.drop(ok, m)  # a dirty one is freed when its write-back ends
                for seg, span in m.spans:  # () while dirty: never counted
                    s = self.segs.get(seg)
                    if s is not None:
                        s.drop_live(span)
                        segs.append(seg)
            self.counters[reason] += len(removed)
            if removed:
                # after the unpublishing commit, before any unlink: clients
                # drop cached locations (see kvfs.generation)
                self.generation.bump()
        self._reclaim(segs)
        return len(removed)

    def _reclaim(self, segs: list[int]) -> None:
        """Unlink segments that are fully dead, unleased and not being written.
        Their rows are deleted in a commit first; files go after it."""
        doomed: list[SegState] = []
        with self._lock:
            for sid in set(segs):
                s = self.segs.get(sid)
                if s is None or s.live > 0 or s.inflight > 0 or self.leases.seg_leased(sid):
                    continue
                if self.open_seg.get(s.stripe) == sid:
                    del self.open_seg[s.stripe]
                del self.segs[sid]
                self._usage -= s.end
                doomed.append(s)
        if not doomed:
            return
        def job(txn: Any) -> None:
            for s in doomed:
                self.index.delete_segment(txn, s.seg)
        self.writer.call(job)
        for s in doomed:
            s.close()
            try:
                # emptied first: a client may still hold the file open (its
                # data plane caches descriptors), and an unlinked file keeps
                # its blocks while any descriptor does. No lease pins it, so
                # no reader may rely on its bytes: a stale one reads short
                # and looks up again.
                os.truncate(s.path, 0)
                os.unlink(s.path)
            except FileNotFoundError:
                pass
        with self._lock:
            self.counters["segments_deleted"] += len(doomed)

    # ------------------------------------------------------------------ read
    def lookup(self, ns: str, keys: list[Any], owner: Hashable | None, *, lease: bool = True
               ) -> tuple[int, list[list[Any] | None]]:
        """Locations of ``keys`` (wire form) and one lease that pins them all
        (0: no hit or no lease asked). Memory only: safe on the event loop.
        The caller must release the lease."""
        ns = normalize_ns(ns)
        oks = [obj_key(ns, normalize_key(k)) for k in keys]
        now = time.time()
        out: list[list[Any] | None] = []
        lid = 0
        with self._lock:
            segs: list[int] = []
            hit: list[bytes] = []
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
                out.append(m.wire)
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

    def _tier_hit(self, ok: bytes, m: MemEntry) -> None:
        """Count a hit per tier and apply the promotion policy: a T1 object
        is copied into T0 on its ``promote_after``-th access (by a
        background task: ``promote``). Caller holds the lock."""
        t0 = self.t0
        if t0 is None:
            self.counters["t1_hits"] += 1
            return
        if m.t0 >= 0:
            t0.counters["hits"] += 1
            t0.touch(ok)
            return
        t0.counters["misses"] += 1
        self.counters["t1_hits"] += 1
        m.hits += 1
        after = self.cfg.promote_after
        if after and m.hits >= after and not m.dirty and t0.fits(m.size) and len(self.promote_q) < 4096:
            self.promote_q[ok] = None

    def promote_some(self, limit_bytes: int = 256 << 20) -> int:
        """Copy queued T1 objects into T0 (blocking: a worker thread), up to
        about ``limit_bytes``. The copy is verified chunk by chunk before the
        object is marked resident. Returns how many were promoted."""
        if self.t0 is None:
            return 0
        done = 0
        moved = 0
        while moved < limit_bytes:
            with self._lock:
                if not self.promote_q:
                    break
                ok, _ = self.promote_q.popitem(last=False)
                m = self.lru.get(ok)
                if m is None or m.t0 >= 0 or m.dirty:
                    continue
                off = self.t0.reserve(m.size)
                if off < 0:
                    self.promote_q.clear()  # T0 holds only dirty or leased objects now
                    break
                segs = [seg for seg, _ in m.spans]
                lid = self.leases.grant(("promote",), segs, [ok], time.monotonic())
                fds = [self.segs[x[1]].ensure_fd() for x in m.exts]
            arena = self.t0.arena.view
            dests, pos = [], 0
            for x in m.exts:
                dests.append(arena[off + pos:off + pos + x[3]])
                pos += x[3]
            try:
                st = native.backend.read_many(fds, [x[2] for x in m.exts], dests, [x[4] for x in m.exts], 4)
            finally:
                for d in dests:
                    d.release()
            with self._lock:
                self.leases.release(lid)
                self._drain_unpinned()
                if all(v == 0 for v in st) and self.lru.get(ok) is m and m.t0 < 0:
                    self.t0.add(ok, m, off)
                    self.t0.counters["promotions"] += 1
                    done += 1
                    moved += m.size
                else:
                    self.t0.alloc.free(off)  # never published
        return done

    def _drain_unpinned(self) -> None:
        """Free T0 extents whose objects lost their last lease. Caller holds the lock."""
        freed = self.leases.take_unpinned()
        if self.t0 is not None and self.t0.zombies:
            self.t0.unpinned(freed)

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

    def release(self, lids: list[int], owner: Hashable | None) -> list[int]:
        """End leases (memory only: safe on the event loop). Returns segments
        no longer leased; the caller passes them to ``reclaim`` (which may
        block) if any."""
        with self._lock:
            freed: list[int] = []
            for lid in lids:
                freed += self.leases.release(lid, owner)
            self._drain_unpinned()
        return [s for s in freed if self._reclaimable(s)]

    def segment_fd(self, seg: int) -> int:
        """The daemon's fd of a segment, -1 if it is gone. The caller holds a
        lease on it (or otherwise knows it cannot be unlinked meanwhile)."""
        with self._lock:
            s = self.segs.get(seg)
            return s.ensure_fd() if s is not None else -1

    def _reclaimable(self, sid: int) -> bool:
        s = self.segs.get(sid)
        return s is not None and s.live <= 0 and s.inflight == 0

    def reclaim(self, segs: list[int]) -> None:
        self._reclaim(segs)

    def release_owner(self, owner: Hashable) -> None:
        with self._lock:
            freed = self.leases.release_owner(owner)
            self._drain_unpinned()
        if freed:
            self._reclaim(freed)

    def expire_leases(self) -> None:
        with self._lock:
            freed = self.leases.expire(time.monotonic())
            self._drain_unpinned()
        if freed:
            self._reclaim(freed)

    def delete(self, ns: str, keys: list[Any]) -> int:
        ns = normalize_ns(ns)
        oks = [obj_key(ns, normalize_key(k)) for k in keys]
        n = self._remove_objects(oks, reason="deletes")
        return n

    def verify_object(self, ns: str, key: str, seq: int | None = None) -> bool:
        """Re-read an object and drop it if any chunk fails. True if dropped."""
        ns, key = normalize_ns(ns), normalize_key(key)
        if self._verify_t0(ns, key, seq):
            return True
        with self.index.env.begin() as txn:
            e = self.index.get(txn, ns, key)
        if e is None or (seq is not None and e.seq != seq):
            return False
        for i, x in enumerate(e.extents):
            fd = self.segment_fd(x.seg)
            if fd < 0 or not self._verify_record(fd, e.header_offsets[i], ns, key, e, i):
                log.warning("corrupt object %s/%s (chunk %d): dropped", ns, key, i)
                self._remove_objects([obj_key(ns, key)], reason="corrupt_dropped")
                return True
        return False

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

    def verify_store(self, deep: bool = False, repair: bool = False,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        """``kvfs verify`` while serving (kvfsd.verify explains the checks).
        Blocking; clients go on reading and writing. What pass 1 finds
        broken is checked again under a lease before it counts (an object
        deleted or moved meanwhile is no problem); pass 2 scans every
        segment with its own file descriptors, and leaves out records of
        puts still being written, segments reclaimed during the scan and
        keys the daemon holds in memory (T0 puts not yet written back)."""
        from .verify import MAX_LISTED, VerifyReport, check_index, find_orphans

        t0 = time.monotonic()
        rep = VerifyReport(mode="online", deep=deep)
        suspects = check_index(self.index, self.segment_fd, deep, rep, progress)
        rep.broken, rep.broken_count = [], 0
        broken = []
        for ns, key, seq in suspects:
            reason = self._recheck(ns, key, seq, deep)
            if reason is not None:
                rep.add_broken(ns, key, reason)
                broken.append(obj_key(ns, key))
        with self._lock:
            segs = [(s.stripe, s.seg, s.path) for s in self.segs.values()]
        fds: dict[int, int] = {}

        def writing() -> Callable[[int, int], bool]:
            # taken before find_orphans reads the index: a put commits, then
            # ends its reservation, so a record is in one or the other
            with self._lock:
                busy = {sid: dict(s.reserved) for sid, s in self.segs.items() if s.reserved}
            return lambda seg, off: any(a <= off < b for a, b in busy.get(seg, {}).items())
        try:
            for _st, sid, path in segs:
                try:
                    fds[sid] = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # reclaimed since
            orphans = find_orphans(self.index, [(st, sid, fds[sid], os.fstat(fds[sid]).st_size)
                                                for st, sid, _p in segs if sid in fds], fds, deep, rep, progress,
                                   writing)
            with self._lock:
                orphans = [(ns, k, e) for ns, k, e in orphans
                           if all(x.seg in self.segs for x in e.extents) and obj_key(ns, k) not in self.lru]
            rep.orphan_count = len(orphans)
            rep.orphans = [[ns, k, e.size] for ns, k, e in orphans][:MAX_LISTED]
            if repair:
                if broken:
                    rep.repaired_dropped = self._remove_objects(broken, reason="corrupt_dropped")
                for ns, k, e in orphans:
                    rep.repaired_indexed += self._put_again(ns, k, e, fds)
        finally:
            for fd in fds.values():
                os.close(fd)
        rep.seconds = time.monotonic() - t0
        return rep.as_dict()

    def _recheck(self, ns: str, key: str, seq: int, deep: bool) -> str | None:
        """What is wrong with ``ns``/``key`` (put ``seq``) now, under a lease;
        None if nothing, or if it is gone or was stored again meanwhile."""
        from .verify import check_entry
        ok = obj_key(ns, key)
        with self._lock:
            m = self.lru.get(ok)
            if m is None or m.seq != seq:
                return None
            lid = self.leases.grant("verify", [seg for seg, _span in m.spans], [ok], time.monotonic())
        try:
            with self.index.env.begin() as txn:
                e = self.index.get(txn, ns, key)
            if e is None or e.seq != seq:
                return None
            return check_entry(self.segment_fd, ns, key, e, deep)
        finally:
            freed = self.release([lid], "verify")
            if freed:
                self._reclaim(freed)

    def _put_again(self, ns: str, key: str, e: ObjEntry, fds: dict[int, int]) -> int:
        """Store an orphan through the put path (a copy: its old records stay
        dead bytes). 1 if stored, 0 if its key appeared meanwhile or its bytes
        no longer verify."""
        data = bytearray()
        for x in e.extents:
            chunk = os.pread(fds[x.seg], x.length, x.offset)
            if fmt.checksum(chunk) != x.checksum:
                return 0
            data += chunk
        return int(self._store_value(ns, key, None, memoryview(data), False))

    def _store_value(self, ns: str, key: str, meta: bytes | None, value: memoryview, sync: bool) -> bool:
        """Put one value from the daemon itself (blocking). False: the key is there."""
        plan = self.prepare_put(ns, [(key, len(value), meta)])
        op = plan.items[0]
        if op is None:
            return False
        try:
            self.write_chunks(plan, [(0, c.idx, value[c.chunk_off:c.chunk_off + c.length]) for c in op.chunks])
        except BaseException:
            self.abort_put(plan)
            raise
        return self.commit_put(plan, sync)[0]

    def _verify_t0(self, ns: str, key: str, seq: int | None) -> bool:
        """Re-hash an object's T0 copy (any client may write the arena: see
        the README's trust model). A bad copy of an object also in T1 is
        dropped from T0; a bad T0-only object is dropped altogether (its
        write-back would carry the damage). True if the object is gone."""
        ok = obj_key(ns, key)
        with self._lock:
            m = self.lru.get(ok)
            if self.t0 is None or m is None or m.t0 < 0 or (seq is not None and m.seq != seq):
                return False
            lid = self.leases.grant(("verify",), (), [ok], time.monotonic())  # keeps the extent
            off, exts, dirty = m.t0, m.exts, m.dirty
        try:
            view = self.t0.arena.view
            parts, pos = [], 0
            for x in exts:
                parts.append(view[off + pos:off + pos + x[3]])
                pos += x[3]
            good = native.backend.hash_many(parts) == [x[4] for x in exts]
            for p in parts:
                p.release()
        finally:
            with self._lock:
                self.leases.release(lid)
                self._drain_unpinned()
        if good:
            return False
        log.warning("corrupt T0 copy of %s/%s: dropped%s", ns, key, " (not yet in T1: object lost)" if dirty else "")
        if dirty:
            self._remove_objects([ok], reason="corrupt_dropped")
            return True
        with self._lock:
            if self.lru.get(ok) is m and m.t0 >= 0:
                self.t0.drop(ok, m)
                self.generation.bump()
                self.t0.counters["corrupt_dropped"] += 1
        return False

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

    def remove_namespace(self, ns: str) -> bool:
        """Remove an empty namespace; False if it holds objects. Blocking."""
        ns = normalize_ns(ns)

        def job(txn: Any) -> bool:
            with self._lock:
                if self.ns_objects.get(ns):
                    return False
            keys, _more = self.index.iter_keys(txn, ns, None, 1)
            return not keys and self.index.delete_namespace(txn, ns)
        return bool(self.writer.call(job, sync=self.cfg.durability == "sync"))

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

    # ------------------------------------------------------------------ upkeep
    def _flush_atimes(self, txn: Any) -> None:
        with self._lock:
            dirty, self._dirty_atime = self._dirty_atime, {}
        for ok, at in dirty.items():
            ns, key = split_obj_key(ok)
            e = self.index.get(txn, ns, key)
            if e is not None and at > e.atime:
                e.atime = at
                txn.put(ok, e.encode(), db=self.index.objects)

    def stats(self) -> dict[str, Any]:
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
                "T0": self.t0.stats() if self.t0 is not None else {"capacity_bytes": 0},
                "T1": {"objects": len(self.lru) - (self.t0.backlog_objects if self.t0 else 0),
                       "bytes": self.logical_bytes - (self.t0.backlog_bytes if self.t0 else 0),
                       "hits": c.get("t1_hits", 0), "misses": c.get("misses", 0)}}
            out = {
                "version": 1,
                "uptime_s": time.time() - self.started,
                "durability": self.cfg.durability,
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
                "directory": self.dir.stats() if self.dir is not None else None,
            }
        return out


def _damaged(root: Path, e: Exception) -> KvfsError:
    return KvfsError(f"the index at {root / 'index'} is damaged ({e}); the segments hold everything needed "
                     f"to rebuild it: kvfs rebuild-index --root {root}")


class NeedRoom(Exception):
    """prepare_put(may_evict=False) found that eviction must run first."""
