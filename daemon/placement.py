"""Placement: where a record goes. Segments on the stripes, one open
segment per stripe, objects striped round robin in ``stripe_unit`` chunks.

Invariants:
- a chunk is reserved at the end of its stripe's open segment, under the
  lock; a segment full for it is sealed and a new one opened (its row goes
  out with the next commit: ``_segment_rows``);
- a SEALED row on disk means every record of the segment is on disk
  (recovery verifies only the others): in sync mode each put synced its
  own; in fast mode the row waits for ``durable_round``;
- a segment's file gets its kind's permissions before any client learns
  its name;
- the daemon, not a client, writes record headers, so none can be forged.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import xxhash

from kvfs import format as fmt
from kvfs import native
from kvfs.errors import CapacityError, InvalidArgument

from .durable import fsync_dir
from .engine_state import EngineState
from .fileperms import Kind
from .index import SEG_OPEN, SEG_SEALED
from .segments import ChunkPlan, ObjPlan, SegState

log = logging.getLogger("kvfsd")

class Placement(EngineState):
    def stripe_paths(self) -> list[str]:
        return [str(p) for p in self.cfg.stripes]

    def seg_path(self, stripe: int, seg: int) -> Path:
        return self.cfg.stripes[stripe] / fmt.segment_name(seg)

    def segment_fd(self, seg: int) -> int:
        """The daemon's fd of a segment, -1 if it is gone. The caller holds a
        lease on it (or otherwise knows it cannot be unlinked meanwhile)."""
        with self._lock:
            s = self.segs.get(seg)
            return s.ensure_fd() if s is not None else -1

    def _footprint(self, ns: str, key: str, size: int) -> int:
        nl, kl = len(ns.encode()), len(key.encode())
        su = self.stripe_unit
        if size <= su:
            return fmt.record_span(nl, kl, size)
        n = -(-size // su)
        return sum(fmt.record_span(nl, kl, min(su, size - i * su)) for i in range(n))

    def _place(self, items: list[Any], at: int, nl: int, touched: set[int], out: list[ObjPlan | None],
               carve: Callable[[int, int, int], int] | None = None, res: list[int] | None = None) -> None:
        """Plan each of ``items`` (``native.backend.place_items``: its
        (object key, key, size, meta) at ``at``; ``nl``: the namespace's
        utf-8 length): a sequence number and its chunks, striped from the
        next stripe round robin, reserved at the end of their stripes' open
        segments; its ObjPlan appended to ``out``, None for an item that
        is None. With ``carve`` also its arena extent, out of ``res``.
        Caller holds the lock; what was placed before an error is in
        ``out``, for the caller to abort."""
        state = [self._next_seq, self._rr, 0]
        try:
            native.backend.place_items(items, at, nl, self.stripe_unit, self.cfg.segment_size, len(self.cfg.stripes),
                                       state, self.open_seg, self.segs, touched, self._segment_for,
                                       xxhash.xxh3_128, out, carve, res, InvalidArgument)
        finally:
            self._next_seq, self._rr = state[0], state[1]
            self._usage += state[2]

    def _place_chunk(self, stripe: int, nl: int, kl: int, i: int, length: int, touched: set[int]) -> ChunkPlan:
        """Reserve room for chunk ``i`` at the end of ``stripe``'s open
        segment. Caller holds the lock."""
        seg = self._segment_for(stripe, fmt.record_span(nl, kl, length))
        start = seg.end
        ch = native.backend.place_chunk(seg, stripe, nl, kl, i, length, self.stripe_unit)
        self._usage += seg.end - start
        touched.add(seg.seg)
        return ch

    def _segment_for(self, stripe: int, span: int) -> SegState:
        sid = self.open_seg.get(stripe)
        if sid is not None:
            seg = self.segs[sid]
            if seg.end + span <= self.cfg.segment_size or seg.end == 0:
                return seg
            self.seal(seg)
        sid = self._next_seg
        self._next_seg += 1
        seg = SegState(sid, stripe, self.seg_path(stripe, sid), SEG_OPEN, 0)
        self.perms.apply(seg.ensure_fd(), Kind.DATA)  # before any client learns its name
        self.segs[sid] = seg
        self.unpersisted.add(sid)
        self.open_seg[stripe] = sid
        return seg

    def seal(self, seg: SegState) -> None:
        """No more reservations in ``seg``. Its SEALED row (which spares it
        recovery's checks) goes out with the next commit in sync mode, where
        every record was synced by its put; in fast mode only once
        ``durable_round`` has synced it whole. Caller holds the lock."""
        seg.state = SEG_SEALED
        if self.cfg.durability == "sync":
            self.unpersist(seg)
        else:
            self.seal_pending.add(seg.seg)

    def sync_segments(self, sids: Iterable[int], strict: bool = True) -> set[int]:
        """fdatasync each segment and, the first time, its stripe directory
        (where its name lives): its records written so far are then
        durable. Returns the segments synced (one reclaimed meanwhile is
        skipped; with ``strict`` False, one that fails too, logged)."""
        done: set[int] = set()
        unnamed: list[SegState] = []
        for sid in sids:
            s = self.segs.get(sid)
            if s is None or s.fd < 0:
                continue
            try:
                os.fdatasync(s.fd)
            except OSError as e:
                if e.errno == errno.EBADF and sid not in self.segs:
                    continue  # closed by a reclaim meanwhile: nothing of it is needed
                if strict:
                    raise
                log.error("fdatasync of segment %d failed: %s (it stays unsealed; recovery verifies it)", sid, e)
                continue
            done.add(sid)
            if not s.named:
                unnamed.append(s)
        for d in {s.path.parent for s in unnamed}:
            fsync_dir(d)
        for s in unnamed:
            s.named = True
        return done

    def durable_round(self) -> None:
        """Run before every index sync that is not a sync put's own
        (kvfsd.writer: fast mode's periodic one, a reclaim's, the last at
        stop). A commit may publish records that no fdatasync covered yet:
        every open segment, and every sealed one still pending, is synced
        first, so an index entry on disk points at bytes on disk (the order
        a sync put keeps for itself). A sealed segment whose reservations
        are all committed or aborted is then complete on disk, and its
        SEALED row may go out; until it does, recovery verifies it."""
        with self._lock:
            sids = set(self.open_seg.values()) | self.seal_pending
            ready = {sid for sid in self.seal_pending if sid in self.segs and self.segs[sid].inflight == 0}
            self.seal_pending &= set(self.segs)
        synced = self.sync_segments(sids, strict=False)
        with self._lock:
            for sid in ready & synced:
                self.seal_pending.discard(sid)
                s = self.segs.get(sid)
                if s is not None:
                    self.unpersist(s)

    def unpersist(self, seg: SegState) -> None:
        """``seg``'s row changed: it goes out with the next commit. Caller holds the lock."""
        seg.persisted = False
        self.unpersisted.add(seg.seg)

    @staticmethod
    def _record_head(ns: str, op: ObjPlan, ch: ChunkPlan) -> bytes:
        return Placement.record_head(ns, op.key, len(op.chunks), op.size, op.seq, ch)

    @staticmethod
    def record_head(ns: str, key: str, nchunks: int, size: int, seq: int, ch: ChunkPlan) -> bytes:
        """A chunk's record header and the padding up to its payload: the
        bytes from ``ch.hdr_off`` to ``ch.payload_off``."""
        nsb = ns.encode()
        names = nsb + key.encode()
        gap = ch.payload_off - ch.hdr_off - fmt.HEADER_SIZE - len(names)
        assert 0 <= gap < fmt.RECORD_ALIGN
        return native.backend.record_head(names, len(nsb), ch.idx, nchunks, ch.length, size, ch.chunk_off, seq,
                                          ch.checksum, gap)

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

    def _segment_rows(self) -> list[tuple[int, int, int]]:
        with self._lock:
            return [(s.seg, s.stripe, self.row_state(s)) for s in map(self.segs.get, self.unpersisted)
                    if s is not None and not s.persisted]

    def row_state(self, seg: SegState) -> int:
        """The state ``seg``'s row may say now: OPEN while it is sealed but
        ``durable_round`` has not yet synced it whole. A segment sealed
        before its first row went out (a batch that fills it, or
        compaction sealing a young open segment) is owed that row all the same, and writing its state
        as it is in memory put a SEALED row on disk over records no sync
        had covered: recovery skipped them and reads found them corrupt.
        Caller holds the lock."""
        return SEG_OPEN if seg.seg in self.seal_pending else seg.state

    def _persist_segments(self, txn: Any) -> None:
        for sid, stripe, state in self._segment_rows():
            self.index.put_segment(txn, sid, stripe, state)
