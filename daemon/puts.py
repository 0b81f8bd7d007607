"""Puts: validate, plan, write, then commit or abort.

Invariants:
- a key already stored keeps its bytes: a put of it is a no-op (also when
  a concurrent put of it wins the commit);
- durability order: payloads (+ fdatasync in sync mode), then the commit
  that publishes them, then the mirror and the directory, then the reply;
- a plan's reservations are released exactly once (commit or abort);
- what a T0 item's commit means for T0 is the Tiering layer's
  (``_written_back_many``).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from kvfs import format as fmt
from kvfs import native
from kvfs.errors import InvalidArgument
from kvfs.keys import normalize_key, normalize_keys, normalize_ns
from kvfs.meta import encode_meta

from .index import obj_key
from .mirror import MemEntry
from .segments import ChunkPlan, ObjPlan, PutPlan
from .space import NeedRoom, Space

log = logging.getLogger("kvfsd")


class Puts(Space):
    def prepare_put(self, ns: str, items: list[tuple[Any, int, Any]], *, may_evict: bool = True,
                    t0: bool = False) -> PutPlan:
        """Validate a batch, skip keys already stored, reserve space for the rest.

        Without ``may_evict`` it never blocks (safe on the event loop) and
        raises NeedRoom when eviction would be needed first. With ``t0``
        each item that fits also gets an arena extent for the client to fill
        (T1 space is reserved all the same: the write-back goes there).
        A batch the client placed in the arena itself: ``prepare_placed``."""
        ns = normalize_ns(ns)
        keys = normalize_keys([it[0] for it in items])
        nsb = ns.encode()
        nsp, nl = nsb + b"\x00", len(nsb)
        su = self.stripe_unit
        seen: set[bytes] = set()
        # per item (object key, key, size, meta), None: stored already or repeated in the batch
        fresh: list[tuple[bytes, str, int, bytes | None] | None] = []
        sizes: list[int] = []
        lru = self.lru
        need = 0
        span0 = fmt.record_span(nl, 0, 0)  # record_span is that plus the key's and the value's bytes
        for k, (_key, size, meta) in zip(keys, items):
            if type(size) is not int or size < 0:  # (bool is not int here)
                raise InvalidArgument(f"size of {k!r} must be a non-negative int")
            m = None if meta is None else encode_meta(meta)
            sizes.append(size)
            kb = k.encode()
            ok = nsp + kb
            if ok in seen or ok in lru:
                fresh.append(None)
                continue
            seen.add(ok)
            fresh.append((ok, k, size, m))
            need += span0 + len(kb) + size if size <= su else self._footprint(ns, k, size)
        if need and self.needs_room(need):
            if not may_evict:
                raise NeedRoom(need)
            self._make_room(need)
        plan = PutPlan(ns, [], sizes)
        try:
            with self._lock:
                self._place(fresh, 0, nl, plan.touched, plan.items)
                t0s = self.t0 if t0 else None
                if t0s is not None:
                    for op in plan.items:
                        if op is not None and t0s.fits(op.size):
                            op.t0 = t0s.reserve(op.size)
                            op.via_t0 = op.t0 >= 0
        except BaseException:
            self.abort_put(plan)
            raise
        return plan

    def prepare_placed(self, ns: str, raw: list[Any], res: list[int], *, may_evict: bool = True) -> PutPlan:
        """``prepare_put`` and ``set_client_sums`` of a put_t0 batch: ``raw``
        is its [key, size, meta, arena offset, sums] items, checked in one
        pass (kvfs._native.t0_items) before anything is reserved; each new
        item's arena extent is carved out of the client's reservation
        ``res`` = [rest, end] (its rest moves on, also when a later item
        fails; InvalidArgument for a placement outside it, or once it is
        used up)."""
        ns = normalize_ns(ns)
        nsb = ns.encode()
        nl = len(nsb)
        fresh, sizes, need = native.backend.t0_items(raw, nsb + b"\x00", self.lru, self.stripe_unit,
                                                     fmt.record_span(nl, 0, 0), normalize_key, encode_meta,
                                                     InvalidArgument)
        if need and self.needs_room(need):
            if not may_evict:
                raise NeedRoom(need)
            self._make_room(need)
        placed: list[ObjPlan | None] = []
        plan = PutPlan(ns, placed, sizes)
        assert self.t0 is not None
        try:
            with self._lock:
                self._place(fresh, 1, nl, plan.touched, placed, self.t0.alloc.carve, res)
        except BaseException:
            self.abort_put(plan)  # what was carved is freed, the rest of the reservation moved on
            raise
        ops: list[ObjPlan | None] = [None] * len(raw)
        for f, op in zip(fresh, placed):
            ops[f[0]] = op
        plan.items = ops
        return plan

    # A client with the arena mapped takes a reservation once, places its
    # puts in it itself, and sends each batch in one message (put_t0): the
    # daemon carves each value out of the reservation as its own extent.
    # Invariant: a reservation's rest is one used allocator extent, owned by
    # one connection; values are carved from it in increasing order; what
    # is left goes back when the connection ends or asks for another.

    def put_values(self, ns: str, items: list[tuple[str, bytes | None, memoryview]], sync: bool) -> list[bool]:
        """Put values the daemon holds itself, (key, meta, value) each,
        straight into T1 with one commit (blocking). Per item whether it
        was stored (False: the key was there)."""
        plan = self.prepare_put(ns, [(k, len(v), m) for k, m, v in items])
        pieces = [(i, c.idx, v[c.chunk_off:c.chunk_off + c.length])
                  for i, ((_k, _m, v), op) in enumerate(zip(items, plan.items)) if op is not None for c in op.chunks]
        if all(op is None for op in plan.items):
            self.abort_put(plan)
            return [False] * len(items)
        try:
            self.write_chunks(plan, pieces)
        except BaseException:
            self.abort_put(plan)
            raise
        return self.commit_put(plan, sync)

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
        return PutPlan(ns, [ObjPlan(key, 0, None, seq, [], obj_key(ns, key))], [0]), first

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
        bad = "a checksum entry is [16-byte object sum, [16-byte chunk sums]]"
        for op, s in zip(plan.items, sums):
            if op is None:
                continue
            if type(s) is not list or len(s) != 2:
                raise InvalidArgument(bad)
            whole, parts = s
            chunks = op.chunks
            if type(whole) is not bytes or len(whole) != 16 or type(parts) is not list or len(parts) != len(chunks):
                raise InvalidArgument(bad)
            for c in parts:
                if type(c) is not bytes or len(c) != 16:
                    raise InvalidArgument(bad)
            op.checksum = whole
            for ch, c in zip(chunks, parts):
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
                self.sync_segments(set().union(*(p.touched for p in plans)))
            # the first job writes the segment rows and counters for all: one scan a batch
            jobs = [self.publish_job(p, sync, shared=i == 0) for i, p in enumerate(plans)]
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

    def publish_job(self, plan: PutPlan, sync: bool, before: Callable[[], None] | None = None,
                    shared: bool = True) -> Callable[[Any], Any]:
        """The writer job that publishes ``plan``. With ``before`` it first
        runs it (writing payloads or headers) and then, in sync mode,
        fdatasyncs the touched segments: a put then costs one writer round
        trip and no other thread hop. ``shared=False``: leave the segment
        rows and counters to another job of the same transaction (a batch
        writes them once)."""
        ns = plan.ns

        def job(txn: Any) -> tuple[list[bool], list[ObjPlan], list[tuple[int, int, int]], float]:
            if before is not None:
                before()
                if sync:
                    self.sync_segments(plan.touched)
            # durability order: payloads are written (and synced) above or
            # before this job was queued; this commit publishes them.
            now = time.time()
            ops = [op for op in plan.items if op is not None]
            segrows = self._segment_rows() if shared else []
            for sid, stripe, state in segrows:
                self.index.put_segment(txn, sid, stripe, state)
            self.index.add_namespace(txn, ns, now)
            if any(op.via_t0 for op in ops):
                # a T0 put: only what publish_t0 made the mirror entry for,
                # and not if it was deleted meanwhile (the delete job ran
                # before this one on this same thread, or runs after and
                # unpublishes it)
                with self._lock:
                    live = [not op.via_t0 or (op.mem is not None and not op.mem.deleted) for op in ops]
            else:
                live = [True] * len(ops)
            for op in ops:
                if not op.checksum:
                    op.checksum = op.hasher.digest() if op.hasher is not None else (
                        op.chunks[0].checksum if op.size else fmt.checksum(b""))
            # a concurrent put of the same key may have won: keep its bytes
            it = iter(self.index.add_objects(txn, *native.backend.index_rows(ops, live, now)))
            stored = [ok and next(it) for ok in live]
            if shared:
                self.index.set_counter(txn, b"next_seq", self._next_seq)
                self.index.set_counter(txn, b"next_seg", self._next_seg)
            return stored, ops, segrows, now
        return job

    def finish_commit(self, plan: PutPlan, done: tuple[list[bool], list[ObjPlan], list[tuple[int, int, int]], float]
                      ) -> tuple[list[bool], list[int]]:
        """After the publishing commit: update the mirror (memory only, safe on
        the loop). Returns the per-item result and segments to ``reclaim``."""
        stored, ops, segrows, now = done
        ns = plan.ns
        with self._lock:
            for sid, _stripe, state in segrows:
                s = self.segs.get(sid)
                if s is None:
                    self.unpersisted.discard(sid)
                elif self.row_state(s) == state:  # else it changed meanwhile: written again next commit
                    s.persisted = True
                    self.unpersisted.discard(sid)
            n_t0 = n_new = new_bytes = 0
            written: list[tuple[ObjPlan, bool]] = []
            for op, fresh in zip(ops, stored):
                if op.via_t0:
                    n_t0 += 1
                    if op.mem is not None:
                        written.append((op, fresh))
                    continue
                if not fresh:
                    continue
                m = MemEntry(op.size, op.checksum, op.seq,
                             op.exts(), op.spans())
                m.created = now
                for seg, span in m.spans:
                    self.segs[seg].add_live(span)
                ok = op.ok
                self.lru[ok] = m
                self._dir_put(ok, m, new=True)
                n_new += 1
                new_bytes += op.size
            if self.remote is not None:
                # queued before the T0 backlog below drops: a flush (which
                # reads the backlog without this lock) that sees it empty then
                # finds these uploads queued; once they were queued after it,
                # and flush(remote=True) could return before them
                self.remote.committed(ns, [op.key for op, fresh in zip(ops, stored) if fresh])
            if written:
                self._written_back_many(ns, written)
            # T0 items were counted by publish_t0
            self.ns_objects[ns] += n_new
            self.logical_bytes += new_bytes
            self.counters["puts"] += n_new
            self.counters["put_bytes"] += new_bytes
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

    def abort_put(self, plan: PutPlan) -> None:
        self._reclaim(self._release_reservations(plan))

    def _release_reservations(self, plan: PutPlan) -> list[int]:
        with self._lock:
            touched, frees = native.backend.release_chunks(plan.items, self.segs)
            if self.t0 is not None:
                for off in frees:
                    self.t0.alloc.free(off)  # never published: nobody can have seen it
            # only segments this leaves fully dead need a (blocking) reclaim
            return [sid for sid in touched if self._reclaimable(sid)]

    def _written_back_many(self, ns: str, done: list[tuple[ObjPlan, bool]]) -> None:
        """T0 items whose write-back finished or was skipped, (op, published)
        each (kvfsd.tiering). Caller holds the lock."""
        raise NotImplementedError
