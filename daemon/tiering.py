"""Tiering: the shared-memory arena (T0) over the stripes (T1).

Invariants:
- a T0 put is readable from the arena as soon as it is published (a dirty
  mirror entry); its write-back writes it to T1 and publishes it in LMDB;
  until then T0 is its only copy: it is never evicted, and its journal
  record lets a restarted daemon finish the write-back (kvfsd.t0journal);
- a reservation's rest is one allocator extent owned by one connection;
  values are carved from it in increasing order; what is left goes back
  when the connection ends or asks for another;
- a promoted copy is verified chunk by chunk before it is marked resident.
"""
from __future__ import annotations

import logging
import time

from kvfs import _native_py, native
from kvfs.errors import InvalidArgument

from .index import split_obj_key
from .mirror import MemEntry, t0_publish, t0_written_back
from .puts import Puts
from .segments import ObjPlan, PutPlan
from .t0journal import Pending

log = logging.getLogger("kvfsd")


class Tiering(Puts):
    def reserve_arena(self, size: int) -> tuple[int, int]:
        """(offset, size) of a new reservation of about ``size`` bytes (at
        most half the arena: a client asks for what the rest of its batch
        needs, and a large device batch in one reservation keeps its copies
        going, where each new reservation waits for the answers of the one
        before), evicting clean objects as needed; (-1, 0) if the arena
        cannot make one now. A request above the largest T0 value that
        finds no room (the arena fragmented by dirty objects) is tried
        again at that size. Memory only."""
        if self.t0 is None:
            raise InvalidArgument("this daemon has no arena (T0): put through alloc/commit")
        t0 = self.t0
        want = max(1, min(int(size), t0.alloc.size // 2))
        for n in (want, t0.max_object) if want > t0.max_object else (want,):
            n, _align = t0.alloc.rounded(n)
            with self._lock:
                off = t0.reserve(n)
            if off >= 0:
                return off, n
        return -1, 0

    def release_arena(self, rest: int, end: int) -> None:
        """Give back what is left of a reservation."""
        if self.t0 is not None and rest < end:
            with self._lock:
                self.t0.alloc.free(rest)

    def publish_t0(self, plan: PutPlan) -> None:
        """Make the T0 items of a committed plan readable at once, from the
        arena, as dirty mirror entries (memory only: safe on the loop). The
        write-back (``write_back``) then writes them to T1 and publishes
        them in LMDB. A key that appeared meanwhile keeps its bytes."""
        ns = plan.ns
        t0 = self.t0
        assert t0 is not None
        with self._lock:
            oks, ms, rows, new_bytes, existing = t0_publish(ns, plan.items, self.lru, t0.dirty, time.time())
            for op in existing:
                t0.alloc.free(op.t0)  # unpublished: nobody saw it
                op.t0 = -1
                op.t0_stored = False
            if oks and self.dir is not None:
                self.dir.enter_many(oks, ms)  # readable from here on
            if oks:  # one journal row each, in rows
                t0.bytes += new_bytes
                self.ns_objects[ns] += len(oks)
                self.logical_bytes += new_bytes
                self.counters["puts"] += len(oks)
                self.counters["put_bytes"] += new_bytes
                t0.backlog_objects += len(oks)
                t0.backlog_bytes += new_bytes
                if self.journal is not None:
                    self.journal.published_rows(ns, rows)
            if existing:
                self.counters["puts_existing"] += len(existing)

    def install_many(self, ns: str, items: list[tuple[str, bytes | None, memoryview]]) -> list[bool]:
        """Store values fetched from elsewhere (the shared tier), already
        checked by the caller: (key, meta, value) each, one put for the
        batch. Into T0, as a client's put would (readable at once, written
        back to T1 in the background), when every new value fits the arena;
        else straight into T1 with one commit. Per item whether it was
        stored (False: the key was there)."""
        sizes = [(k, len(v), m) for k, m, v in items]
        if self.t0 is not None:
            plan = self.prepare_put(ns, sizes, t0=True)
            ops = plan.items
            if all(op is None or op.via_t0 for op in ops):
                fresh = [i for i, op in enumerate(ops) if op is not None]
                view = self.t0.arena.view
                try:
                    sums = native.backend.copy_hash_chunked(
                        [view[ops[i].t0:ops[i].t0 + ops[i].size] for i in fresh],  # type: ignore[union-attr]
                        [items[i][2] for i in fresh], self.stripe_unit)
                    self.set_client_sums(plan, [None if op is None else [w, cs]
                                                for op, (w, cs) in zip(ops, _spread(ops, sums))])
                except BaseException:
                    self.abort_put(plan)
                    raise
                self.publish_t0(plan)
                self.queue_write_back(plan)
                return [op is not None and op.t0_stored for op in ops]
            self.abort_put(plan)  # a value the arena cannot take: the whole batch goes to T1
        return self.put_values(ns, items, False)

    def t0_only(self, plan: PutPlan) -> bool:
        """Every new item of the plan goes through T0 (none written to T1 by the client)."""
        return all(op is None or op.t0 >= 0 for op in plan.items)

    def queue_write_back(self, plan: PutPlan) -> None:
        """Fast mode: the pool writes ``plan`` to T1 in the background."""
        with self._wb_lock:
            self.wb_pending[id(plan)] = plan
        assert self.wb_pool is not None
        self.wb_pool.kick()

    def write_back(self, plan: PutPlan, sync: bool) -> list[bool]:
        """Write a committed T0 plan that was never queued to T1 and publish
        it in LMDB (blocking; a worker thread)."""
        return self.write_back_many([plan], sync)[0]

    def take_write_backs(self) -> list[PutPlan]:
        """Every queued plan, now this caller's (oldest first)."""
        with self._wb_lock:
            plans = list(self.wb_pending.values())
            self.wb_pending.clear()
            return plans

    def write_back_many(self, plans: list[PutPlan], sync: bool) -> list[list[bool]]:
        """Write committed T0 plans to T1, then publish them all in one
        commit. Items the client wrote to T1 itself get their headers.
        Durability order as for any put: payload (+ fdatasync in sync
        mode), then the commit that publishes it. Records reserved back to
        back go out in one pwritev (``t0_write_records``); a plan whose write
        fails is dropped (``_write_back_failed``) and the first such error
        raised once the others are published."""
        assert self.t0 is not None
        arena = self.t0.arena.view
        with self._lock:
            fds = {sid: self.segs[sid].fd for p in plans for sid in p.touched}
        # every record of the batch, headers built, neighbours coalesced,
        # written with the GIL released (in C when built)
        failed, runs = native.backend.t0_write_records([(p.ns.encode(), p.items, i) for i, p in enumerate(plans)],
                                                       arena, fds)
        self.counters["writeback_pwritevs"] += len(runs)
        if runs and max(runs) > self.counters["writeback_pwritev_max"]:
            self.counters["writeback_pwritev_max"] = max(runs)
        error: BaseException | None = None
        written: list[PutPlan] = []
        for i, plan in enumerate(plans):
            if i in failed:
                try:  # again one by one: which write fails, and why
                    for ch, bufs, n in _native_py.record_writes(plan.ns.encode(), plan.items, arena):
                        self._pwrite(ch, bufs, n)
                except Exception as e:  # noqa: BLE001 - this plan only; raised below
                    self._write_back_failed(plan)
                    error = error or e
                    continue
            written.append(plan)
        out = self._publish_many(written, sync, self._write_back_failed) if written else []
        if error is not None:
            raise error
        return out

    def _write_back_failed(self, plan: PutPlan) -> None:
        """T1 refused the write (disk full...): the dirty entries cannot stay
        (T0 may not hold what T1 does not); they are dropped as if deleted."""
        with self._lock:
            failed = [(op, False) for op in plan.items if op is not None and op.mem is not None]
            for op, _ in failed:
                log.error("write-back of %s/%s failed: dropped", plan.ns, op.key)
            self._written_back_many(plan.ns, failed)
            if self.journal is not None:
                self.journal.flush()
        self.abort_put(plan)

    def _written_back_many(self, ns: str, done: list[tuple[ObjPlan, bool]]) -> None:
        """T0 items whose write-back finished (``published``) or was skipped,
        (op, published) each: the backlog, the journal and the directory
        are updated once for the batch. Caller holds the lock."""
        t0 = self.t0
        assert t0 is not None
        lru, segs = self.lru, self.segs
        oks, ms, seqs, nbytes, live, gone = t0_written_back(ns, done, lru, t0.lru, t0.dirty)
        for seg, (span, records) in live.items():
            s = segs[seg]
            s.live += span
            s.records += records
        for op, m in gone:
            # deleted while dirty (its mirror entry is gone already), or not
            # published (the write-back failed): it goes, with its T0 copy
            ok = op.ok
            if lru.get(ok) is m:
                del lru[ok]
                if self.dir is not None:
                    self.dir.remove(ok)
                self.ns_objects[ns] -= 1
                if self.ns_objects[ns] <= 0:
                    del self.ns_objects[ns]
                self.logical_bytes -= m.size
            t0.drop(ok, m)
            self.generation.bump()
        if not seqs:
            return
        t0.backlog_objects -= len(seqs) // 8  # (<Q each)
        t0.backlog_bytes -= nbytes
        if self.journal is not None:
            if t0.backlog_objects == 0:
                self.journal.empty()
            else:
                self.journal.done_seqs(seqs)
                if self.journal.too_long():
                    self._rewrite_journal()
        if oks and self.dir is not None:
            self.dir.put_many(oks, ms)

    def _rewrite_journal(self) -> None:
        """The journal reduced to what is still owed: every dirty entry
        not deleted (a deleted one's "done" was written by its delete).
        Caller holds the lock, so nothing is published or written back
        meanwhile."""
        assert self.t0 is not None and self.journal is not None
        rows = []
        for ok, m in self.t0.dirty.items():
            if not m.deleted:
                ns, key = split_obj_key(ok)
                rows.append(Pending(ns, key, m.seq, m.size, m.t0, m.checksum, [x[4] for x in m.exts], m.meta).row())
        try:
            self.journal.rewrite(rows)
        except OSError as e:  # the old journal stays, whole
            log.warning("T0 journal could not be rewritten (%s): it keeps growing", e)

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
            t0.touch(m)
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
                    m.t0 = off
                    m.rewire()
                    self.t0.add(ok, m)
                    self.t0.counters["promotions"] += 1
                    done += 1
                    moved += m.size
                else:
                    self.t0.alloc.free(off)  # never published
        return done


def _spread(ops: list[ObjPlan | None], sums: list[tuple[bytes, list[bytes]]]) -> list[tuple[bytes, list[bytes]]]:
    """``sums`` (one per op that is not None) spread over ``ops`` (a
    placeholder where an op is None)."""
    it = iter(sums)
    return [(b"", []) if op is None else next(it) for op in ops]
