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
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

import xxhash

from kvfs import format as fmt
from kvfs.errors import CapacityError, InvalidArgument, NotFound
from kvfs.generation import Generation
from kvfs.keys import normalize_key, normalize_ns
from kvfs.meta import encode_meta

from .config import Config
from .eviction import choose_victims
from .index import SEG_OPEN, SEG_SEALED, Extent, Index, ObjEntry, obj_key, split_obj_key
from .leases import LeaseTable
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
    inflight: int = 0  # reservations not yet committed or aborted
    fd: int = -1
    persisted: bool = False  # has a row in the segments table

    def ensure_fd(self) -> int:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o660)
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

    __slots__ = ("size", "wire", "spans")

    def __init__(self, size: int, wire: list[Any], spans: tuple[tuple[int, int], ...]):
        self.size = size
        self.wire = wire  # [size, checksum, seq, [[stripe, seg, payload_off, length, chunk_sum], ...]]
        self.spans = spans  # ((seg, record bytes), ...)

    @classmethod
    def of(cls, e: ObjEntry) -> "MemEntry":
        return cls(e.size, [e.size, e.checksum, e.seq, [x.wire() for x in e.extents]],
                   tuple((x.seg, sp) for x, sp in zip(e.extents, e.spans)))


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


@dataclass
class ObjPlan:
    key: str
    size: int
    meta: bytes | None
    seq: int
    chunks: list[ChunkPlan]
    hasher: Any = None  # running xxh3-128 of the whole value (multi-chunk)
    checksum: bytes = b""


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


class Engine:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stripe_unit = cfg.stripe_unit
        assert cfg.capacity is not None
        self.capacity = cfg.capacity
        self.index = Index(cfg.root, cfg.map_size)
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
        self.generation = Generation(cfg.root)
        self.writer = WriterThread(self.index.env, on_idle=self._flush_atimes)
        self.recovery = self._recover()

    # ------------------------------------------------------------------ setup
    def close(self) -> None:
        try:
            self.writer.call(self._flush_atimes)
            self.writer.call(self._persist_segments, sync=True)
        finally:
            self.writer.stop()
            with self._lock:
                for s in self.segs.values():
                    s.close()
            self.index.close()
            self.generation.close()

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
            for seg, span in m.spans:
                if seg in self.segs:
                    self.segs[seg].live += span
            self.ns_objects[ns] += 1
            self.logical_bytes += e.size
        self._usage = sum(st.end for st in self.segs.values())
        self._reclaim([s for s, st in self.segs.items() if st.live <= 0])
        rep.seconds = time.monotonic() - t0
        if rep.objects_dropped or rep.bytes_truncated or rep.orphan_segments_removed:
            log.warning("recovery: %s", rep)
        return rep

    def _verify_record(self, fd: int, hdr_off: int, ns: str, key: str, e: ObjEntry, i: int) -> bool:
        ext = e.extents[i]
        try:
            head = os.pread(fd, ext.offset - hdr_off, hdr_off)
            hdr, hlen = fmt.decode_header(head)
        except (fmt.BadRecord, OSError):
            return False
        if (hdr.ns, hdr.key, hdr.seq, hdr.chunk_idx, hdr.length) != (ns, key, e.seq, i, ext.length):
            return False
        if fmt.payload_offset(hdr_off, hlen, hdr.length) != ext.offset or hdr.checksum != ext.checksum:
            return False
        return fmt.checksum(os.pread(fd, ext.length, ext.offset)) == ext.checksum

    # ------------------------------------------------------------------ write
    def prepare_put(self, ns: str, items: list[tuple[Any, int, Any]], *, may_evict: bool = True) -> PutPlan:
        """Validate a batch, skip keys already stored, reserve space for the rest.

        Without ``may_evict`` it never blocks (safe on the event loop) and
        raises NeedRoom when eviction would be needed first."""
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
                for f in fresh:
                    plan.items.append(None if f is None else self._reserve(ns, *f, touched=plan.touched))
        except BaseException:
            self.abort_put(plan)
            raise
        return plan

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
        chunks = []
        n = max(1, -(-size // self.stripe_unit))
        for i in range(n):
            off = i * self.stripe_unit
            length = min(self.stripe_unit, size - off)
            stripe = (start + i) % nstripes
            seg = self._segment_for(stripe, fmt.record_span(nl, kl, length))
            hdr, pay, end = fmt.place_record(seg.end, nl, kl, length)
            self._usage += end - seg.end
            seg.end = end
            seg.inflight += 1
            touched.add(seg.seg)
            chunks.append(ChunkPlan(stripe, seg.seg, hdr, pay, end, length, off, i))
        return ObjPlan(key, size, meta, seq, chunks, xxhash.xxh3_128() if n > 1 else None)

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
        seg.ensure_fd()
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
            hdr = fmt.RecordHeader(plan.ns, op.key, ch.idx, len(op.chunks), ch.length, op.size,
                                   ch.chunk_off, op.seq, ch.checksum).encode()
            gap = ch.payload_off - ch.hdr_off - len(hdr)
            assert 0 <= gap < fmt.RECORD_ALIGN
            self._pwrite(ch, [hdr + bytes(gap), data], len(hdr) + gap + ch.length)

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
                hdr = fmt.RecordHeader(plan.ns, op.key, ch.idx, len(op.chunks), ch.length, op.size,
                                       ch.chunk_off, op.seq, ch.checksum).encode()
                self._pwrite(ch, [hdr], len(hdr))

    def _pwrite(self, ch: ChunkPlan, bufs: list[Any], expect: int) -> None:
        try:
            n = os.pwritev(self.segs[ch.seg].fd, bufs, ch.hdr_off)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CapacityError(f"disk full on stripe {self.cfg.stripes[ch.stripe]}",
                                    needed=ch.length, capacity=self.capacity, used=self._usage) from None
            raise
        if n != expect:
            raise CapacityError(f"short write on stripe {self.cfg.stripes[ch.stripe]} (disk full?)",
                                needed=ch.length, capacity=self.capacity, used=self._usage)

    def effective_sync(self, sync: bool) -> bool:
        return sync or self.cfg.durability == "sync"

    def commit_put(self, plan: PutPlan, sync: bool) -> list[bool]:
        """Publish what was written. Returns, per item, whether it was stored
        (False: it was already there, possibly put meanwhile by another client)."""
        sync = self.effective_sync(sync)
        if sync:
            for sid in plan.touched:
                os.fdatasync(self.segs[sid].fd)
        try:
            done = self.writer.call(self.publish_job(plan, sync), sync=sync)
        except BaseException:
            self.abort_put(plan)
            raise
        result, cand = self.finish_commit(plan, done)
        self._reclaim(cand)
        return result

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
            for (op, e), fresh in zip(entries, stored):
                if not fresh:
                    continue
                m = MemEntry.of(e)
                for seg, span in m.spans:
                    self.segs[seg].live += span
                self.lru[obj_key(ns, op.key)] = m
                self.ns_objects[ns] += 1
                self.logical_bytes += op.size
            n_new = sum(stored)
            self.counters["puts"] += n_new
            self.counters["put_bytes"] += sum(op.size for (op, _e), f in zip(entries, stored) if f)
            self.counters["puts_existing"] += len(plan.items) - n_new
        cand = self._release_reservations(plan)
        it = iter(stored)
        return [op is not None and next(it) for op in plan.items], cand

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
                        s.inflight -= 1
                        done.append(c.seg)
                op.chunks = []  # released once only
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
                    evictable=lambda ok: not self.leases.obj_leased(ok),
                    seg_reclaimable=lambda s: self.segs[s].inflight == 0 and not self.leases.seg_leased(s))
            if v.objects:
                self._remove_objects(v.objects, reason="evictions")
            used = self.disk_usage()
            if used + need > cap:
                raise CapacityError(
                    f"no room for {need} bytes: {used} of {cap} bytes used and nothing more can be "
                    f"evicted (leased or in flight)", needed=need, capacity=cap, used=used)

    def _remove_objects(self, oks: list[bytes], reason: str) -> int:
        """Unpublish objects (one commit), then reclaim segments left dead."""
        def job(txn: Any) -> list[tuple[bytes, ObjEntry]]:
            out = []
            for ok in oks:
                ns, key = split_obj_key(ok)
                e = self.index.delete_object(txn, ns, key)
                if e is not None:
                    out.append((ok, e))
            return out
        removed: list[tuple[bytes, ObjEntry]] = self.writer.call(job, sync=self.cfg.durability == "sync")
        segs: list[int] = []
        with self._lock:
            for ok, e in removed:
                if self.lru.pop(ok, None) is None:
                    continue  # never mirrored (a lost race): its spans were not counted
                self._dirty_atime.pop(ok, None)
                ns, _k = split_obj_key(ok)
                self.ns_objects[ns] -= 1
                if self.ns_objects[ns] <= 0:
                    del self.ns_objects[ns]
                self.logical_bytes -= e.size
                for x, span in zip(e.extents, e.spans):
                    s = self.segs.get(x.seg)
                    if s is not None:
                        s.live -= span
                        segs.append(x.seg)
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
                segs.extend(seg for seg, _span in m.spans)
                hit.append(ok)
                out.append(m.wire)
            self.counters["hits"] += len(hit)
            self.counters["misses"] += len(oks) - len(hit)
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
                if ok in self.lru:
                    self.lru.move_to_end(ok)
                    self._dirty_atime[ok] = now
                    n += 1
            self.counters["hits"] += n
            self.counters["cached_hits"] += n

    def contains(self, ns: str, keys: list[Any]) -> list[bool]:
        ns = normalize_ns(ns)
        lru = self.lru
        return [obj_key(ns, normalize_key(k)) in lru for k in keys]

    def prefix_match(self, ns: str, keys: list[Any]) -> int:
        ns = normalize_ns(ns)
        lru = self.lru
        n = 0
        for k in keys:
            if obj_key(ns, normalize_key(k)) not in lru:
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
        return [s for s in freed if self._reclaimable(s)]

    def _reclaimable(self, sid: int) -> bool:
        s = self.segs.get(sid)
        return s is not None and s.live <= 0 and s.inflight == 0

    def reclaim(self, segs: list[int]) -> None:
        self._reclaim(segs)

    def release_owner(self, owner: Hashable) -> None:
        with self._lock:
            freed = self.leases.release_owner(owner)
        if freed:
            self._reclaim(freed)

    def expire_leases(self) -> None:
        with self._lock:
            freed = self.leases.expire(time.monotonic())
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
        with self.index.env.begin() as txn:
            e = self.index.get(txn, ns, key)
        if e is None or (seq is not None and e.seq != seq):
            return False
        for i, x in enumerate(e.extents):
            with self._lock:
                s = self.segs.get(x.seg)
                fd = s.ensure_fd() if s is not None else -1
            if fd < 0 or not self._verify_record(fd, e.header_offsets[i], ns, key, e, i):
                log.warning("corrupt object %s/%s (chunk %d): dropped", ns, key, i)
                self._remove_objects([obj_key(ns, key)], reason="corrupt_dropped")
                return True
        return False

    def stat(self, ns: str, key: Any) -> dict[str, Any]:
        ns, k = normalize_ns(ns), normalize_key(key)
        with self.index.env.begin() as txn:
            e = self.index.get(txn, ns, k)
        if e is None:
            raise NotFound(f"{ns}/{k} not found")
        return {
            "ns": ns, "key": k, "size": e.size, "checksum": e.checksum.hex(), "seq": e.seq,
            "meta": e.meta.decode() if e.meta else None, "tier": "T1",
            "extents": [[str(self.seg_path(x.stripe, x.seg)), x.offset, x.length] for x in e.extents],
            "created": e.created, "last_access": self._dirty_atime.get(obj_key(ns, k), e.atime),
        }

    def namespaces(self) -> list[str]:
        with self.index.env.begin() as txn:
            return self.index.list_namespaces(txn)

    def keys(self, ns: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        ns = normalize_ns(ns)
        with self.index.env.begin() as txn:
            return self.index.iter_keys(txn, ns, after, limit)

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
                                   "live_bytes": sum(s.live for s in segs)})
            used = sum(s.end for s in self.segs.values())
            live = sum(s.live for s in self.segs.values())
            c = dict(self.counters)
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
                                                      "segments_deleted")},
                "recovery": vars(self.recovery),
                "tiers": {"T1": {"objects": len(self.lru), "bytes": self.logical_bytes,
                                 "hits": c.get("hits", 0), "misses": c.get("misses", 0)}},
            }
        return out


class NeedRoom(Exception):
    """prepare_put(may_evict=False) found that eviction must run first."""
