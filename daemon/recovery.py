"""Recovery at start: reconcile segment files with the index, then finish
what a crashed daemon owed to T1.

Invariants:
- a segment file with no row holds no published record: removed;
- records of an open segment are verified; what fails is dropped and the
  segment truncated after its last good record; open segments are synced,
  then every segment sealed, so new writes go to new segments;
- T0 starts empty: nothing in an old arena is trusted, except the puts the
  journal says were owed to T1, verified against their client's checksums.
"""
from __future__ import annotations

import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvfs import format as fmt

from .arena import arena_path
from .durable import fsync_dir
from .index import SEG_OPEN, SEG_SEALED, obj_key, split_obj_key
from .mirror import MemEntry, entry_of
from .repair import Repair
from .segments import SegState
from .t0journal import read_pending, rewrite_path

log = logging.getLogger("kvfsd")


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


class Recovery(Repair):
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
                if state == SEG_OPEN:
                    # A killed daemon's unsynced writes may still sit in the
                    # page cache, where the checks above read them: synced
                    # before the SEALED row (which spares the segment these
                    # checks at the next start) is committed below. A SEALED
                    # row already on disk means its segment was synced whole.
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if state == SEG_OPEN and size > good_end:
                truncate[sid] = good_end
                rep.bytes_truncated += size - good_end
        # the stripes' names too (orphans' removals included), before any
        # SEALED row: a power cut after this start finds the segments whole
        for sdir in self.cfg.stripes:
            fsync_dir(sdir)
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
                                          truncate.get(sid, files[sid][1].stat().st_size), persisted=True,
                                          named=True)
        entries = []
        with idx.env.begin() as txn:
            for ns, key, e in idx.iter_objects(txn):
                entries.append((e.atime, obj_key(ns, key), ns, e))
                self._next_seq = max(self._next_seq, e.seq + 1)
        entries.sort(key=lambda t: t[0])
        for _at, ok, ns, e in entries:
            m = entry_of(e)
            self.lru[ok] = m
            self._dir_put(ok, m, new=True)
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
        apath = arena_path(self.cfg.root, self.cfg.shm_dir)
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
        rewrite_path(jpath).unlink(missing_ok=True)  # a rewrite cut short
