"""Puts: through the connection's arena reservation (one message a batch,
none to wait for with ``wait=False``), inline for tiny values, straight
into T1 extents when there is no arena room, from host or device memory.

Invariants:
- checksums are of the caller's bytes, computed by the client, checked by
  every later read;
- a put returns only once the daemon answered, unless ``wait=False``: then
  its answer is read by the connection's next call (or ``flush``/close), a
  refusal counted in ``put_errors``;
- ``sync=True`` returns only once the value is on disk and in the index;
- nothing a client placed is visible before the daemon publishes it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import xxhash

from . import protocol as P
from .arena_puts import put_one, put_reserved
from .dataplane import WriteTask
from .device_puts import sub_batches
from .device_reads import DeviceReading
from .errors import CapacityError, InvalidArgument, KvfsError, ProtocolError
from .gpu import SRC, DeviceBuffer, merge_copies
from .keys import normalize_key, normalize_keys, normalize_ns
from .meta import encode_meta
from .reservation import Reservation
from .session import ArenaMapping
from .store_state import BATCH_KEYS

log = logging.getLogger("kvfs")

# Without T0, values at least this large are written by the client straight
# into the T1 extents the daemon reserves (alloc/commit); smaller ones travel
# inline. With T0, every non-empty value goes through the arena: the
# connection keeps its reservation between puts, so even a lone 4 KiB put is
# one message (inline, it went to T1 through the writer thread and an LMDB
# commit, and waited for both: 2.3 x slower on the 2-core VM).
DIRECT_MIN = 256 * 1024
# device puts the GPU does not hash (unaligned or tiny sources) are hashed on
# the host in groups of about this many bytes, each as soon as its copies
# land (one thread per group; a value is one pass)
HASH_GROUP = 8 << 20
# device puts run as pipelined sub-batches of about this many bytes (see _put_direct):
# large enough that the GPU hashes several large values at once (a value's
# whole-value sum is one sequential chain), small enough to overlap
DEVICE_SUB_BATCH = 256 << 20


def _into_extents(v: Any) -> bool:
    """Without the arena, a value goes into T1 extents (alloc/commit), not
    inline: large ones, and every device one."""
    return len(v) >= DIRECT_MIN or isinstance(v, DeviceBuffer)


@dataclass
class _Landed:
    """A put's source already copied into its arena extent (from a device),
    and its checksums, taken from that copy as it landed."""
    view: memoryview
    n_chunks: int
    sums: list[Any] = field(default_factory=list)  # [object sum, [chunk sums]]

    def __len__(self) -> int:
        return len(self.view)


class Puts(DeviceReading):
    def put(self, key: str | bytes, data: Any, *, ns: str = "default", meta: dict[str, Any] | None = None,
            sync: bool = False, wait: bool = True) -> bool:
        """Store ``data`` under ``key``. False if the key was already there
        (objects are immutable: the existing bytes are kept). ``sync``:
        return only once it is on disk and in the index (as the daemon's
        ``sync`` durability does for every put). ``wait=False``: see
        ``put_many``."""
        got = self._put_one(key, data, ns, meta, sync, wait)
        if got is not None:
            return got
        return self.put_many([key], [data], ns=ns, metas=[meta], sync=sync, wait=wait)[0]

    def _put_one(self, key: str | bytes, data: Any, ns: str, meta: dict[str, Any] | None, sync: bool,
                 wait: bool) -> bool | None:
        """A lone host value through the connection's current reservation
        (kvfs.arena_puts.put_one); None: ``put_many`` puts it (no
        reservation or no room in it yet, a device or empty value, no
        arena, hits to report first, a restarted daemon...)."""
        arena = self.arena
        conn = getattr(self._local, "conn", None)
        if arena is None or not arena.writable or conn is None or conn.broken or self._touches:
            return None
        if self._gen is not None and not self._caught_up(self._gen.value):
            return None  # put_many drops stale fds, or re-hellos a restarted daemon, first
        view = self._device_or_host(data)
        if isinstance(view, DeviceBuffer) or not len(view):
            return None
        ns, k = normalize_ns(ns), normalize_key(key)
        try:
            return put_one(self, conn, ns, k, view, None if meta is None else encode_meta(meta), sync, wait or sync)
        except OSError as e:
            if e.errno in (28, 122):
                raise CapacityError(f"disk full while writing: {e}") from None
            raise

    def put_many(self, keys: Sequence[str | bytes], datas: Sequence[Any], *, ns: str = "default",
                 metas: Sequence[dict[str, Any] | None] | None = None, sync: bool = False,
                 wait: bool = True) -> list[bool]:
        """Store each value under its key; per item True (stored) or False
        (already there). ``wait=False`` (fast mode, values placed in the
        arena): return once the bytes are in the arena and the batch is
        sent, without waiting for the daemon's answer. The values are this
        thread's to read at once (a later call on its connection reads the
        answer first) and other processes' within microseconds; True then
        means "sent" (False: already there when the call began), and a put
        the daemon refuses is logged and counted in ``put_errors``."""
        ns = normalize_ns(ns)
        ks = normalize_keys(keys)
        if len(datas) != len(ks) or (metas is not None and len(metas) != len(ks)):
            raise InvalidArgument("keys, datas and metas must have the same length")
        views: list[Any] = [self._device_or_host(d) for d in datas]
        raw_metas: list[bytes | None] = [encode_meta(m) for m in metas] if metas is not None else [None] * len(ks)
        out: list[bool] = [False] * len(ks)
        if self.arena is not None:
            # T0: the batch goes through the arena (no payload on the socket), except empty values
            direct = [i for i, v in enumerate(views) if len(v)]
        else:
            direct = [i for i, v in enumerate(views) if len(v) and _into_extents(v)]
        dset = set(direct)
        inline = [i for i in range(len(views)) if i not in dset]
        if self.arena is not None and self.arena.writable:
            # values go through this connection's arena reservation, host
            # ones a message a batch, device ones a message a sub-batch as
            # their copies land; what it cannot take goes the other way
            taken = set()
            for on_device in (False, True):
                sel = [i for i in direct if isinstance(views[i], DeviceBuffer) == on_device]
                if not sel:
                    continue
                placed = self._put_reserved(ns, [[ks[i], len(views[i]), raw_metas[i]] for i in sel],
                                            [views[i] for i in sel], sync, wait or sync)
                for i, p in zip(sel, placed):
                    if p is not None:
                        out[i] = p
                        taken.add(i)
            # what the arena did not take (it was full): small host values
            # inline, one round trip, as without T0; the rest into T1 extents
            rest = [i for i in direct if i not in taken]
            small = {i for i in rest if not _into_extents(views[i])}
            inline += [i for i in rest if i in small]
            direct = [i for i in rest if i not in small]
        for idx, fn in ((inline, self._put_inline), (direct, self._put_direct)):
            for b in range(0, len(idx), BATCH_KEYS):
                sel = idx[b:b + BATCH_KEYS]
                got = fn(ns, [[ks[i], len(views[i]), raw_metas[i]] for i in sel], [views[i] for i in sel], sync)
                for i, g in zip(sel, got):
                    out[i] = g
        return out

    def _put_reserved(self, ns: str, items: list[list[Any]], views: list[Any], sync: bool,
                      wait: bool = True) -> list[bool | None]:
        """kvfs.arena_puts: per item stored, already there, or None (not taken)."""
        self._drop_stale_fds()
        self._check_restart()
        conn = self._conn()  # reconnecting to a restarted daemon maps its new arena first
        if self.arena is None or not self.arena.writable:
            return [None] * len(items)
        if self._touches:
            self._flush_touches(conn)  # hits go out before anything that could evict
        try:
            return put_reserved(self, conn, ns, items, views, sync, wait)
        except OSError as e:
            if e.errno in (28, 122):
                raise CapacityError(f"disk full while writing: {e}") from None
            raise

    def _remember_t0(self, ns: str, stored: list[tuple[str, int, int, int, bytes, list[bytes]]], gen: int) -> None:
        """The writer knows where its values went: a get of them by this
        process needs no lookup (the same rules as any cached location).
        ``stored``: (key, size, seq, arena offset, sum, chunk sums)."""
        if self._locs is None or not stored:
            return
        unit = self.stripe_unit
        entries = []
        for key, size, seq, off, w, cs in stored:
            exts = [[-1, -1, -1, min(unit, size - j * unit), c] for j, c in enumerate(cs)]  # T0 only: no T1 place
            entries.append((key, [size, w, seq, exts, [off, False]]))
        self._locs.put_many(ns, entries, gen)

    def _put_inline(self, ns: str, items: list[list[Any]], views: list[memoryview], sync: bool) -> list[bool]:
        return list(self._call(P.PUT, {"ns": ns, "items": items, "sync": sync}, views))

    def _put_direct(self, ns: str, items: list[list[Any]], views: list[Any], sync: bool) -> list[bool]:
        """alloc -> copy payloads into the arena extents (T0) or write them
        into the reserved T1 extents -> commit with their checksums.

        A batch with device sources runs as sub-batches of about
        DEVICE_SUB_BATCH bytes, pipelined on this thread: while one
        sub-batch's copies are in flight, the next one is allocated and its
        copies queued, then the first is committed. The daemon's per-item
        work (alloc, commit) thus hides under the DMA instead of adding to
        it. An error aborts every sub-batch not yet committed (those
        committed stay stored)."""
        self._drop_stale_fds()
        self._check_restart()
        self._conn()  # reconnecting to a restarted daemon maps its new arena first
        arena = self.arena
        gen = self._locs.generation() if self._locs is not None else 0
        dev = any(isinstance(v, DeviceBuffer) for v in views)
        stored: list[bool] = []
        open_puts: list[int] = []  # allocated, not committed: aborted on failure
        inflight: tuple[Any, list[list[Any]], Callable[[], list[Any]]] | None = None
        try:
            sizes = [len(v) for v in views]
            for a, b in (sub_batches(sizes, DEVICE_SUB_BATCH, len(sizes)) if dev else [(0, len(sizes))]):
                res = self._call(P.ALLOC, {"ns": ns, "items": items[a:b], "t0": arena is not None})
                open_puts.append(res["put"])
                fill = self._start_fill(res["items"], views[a:b], arena)
                if inflight is not None:
                    stored += self._commit(ns, gen, *inflight, sync)
                    open_puts.pop(0)
                inflight = (res, items[a:b], fill)
            if inflight is not None:
                stored += self._commit(ns, gen, *inflight, sync)
                open_puts.pop(0)
        except BaseException as e:
            if dev and self._gpu is not None:
                try:
                    self._gpu.sync()  # no copy may still land in an extent given back
                except Exception:  # noqa: BLE001 - a failed device: its copies are over
                    pass
            for pid in open_puts:
                try:
                    self._call(P.ABORT, {"put": pid})
                except KvfsError:
                    pass
            if isinstance(e, OSError) and e.errno in (28, 122):
                raise CapacityError(f"disk full while writing: {e}") from None
            raise
        return stored

    def _commit(self, ns: str, gen: int, res: dict[str, Any], items: list[list[Any]],
                fill: Callable[[], list[Any]], sync: bool,
                call: Callable[[str, dict[str, Any]], Any] | None = None) -> list[bool]:
        """Commit an alloc's put (on ``call``'s connection: the one that
        allocated; default this thread's)."""
        sums = fill()
        stored = list((call or self._call)(P.COMMIT, {"put": res["put"], "sums": sums, "sync": sync}))
        if self._locs is not None:
            # the writer knows where its values went: a get of them by this
            # process needs no lookup (same rules as any cached location)
            self._locs.put_many(ns, [
                (it[0], [it[1], s[0], alloc[0], [[c[0], c[1], c[2], c[3], cs] for c, cs in zip(alloc[1], s[1])],
                         [alloc[2], False] if alloc[2] >= 0 else None])
                for it, alloc, s, ok in zip(items, res["items"], sums, stored)
                if ok and alloc is not None], gen)
        return stored

    def _start_fill(self, allocs: list[Any], views: list[Any], arena: "ArenaMapping | None") -> Callable[[], list[Any]]:
        """Put the payloads where the daemon said: host sources are copied
        into their arena extents or written to their T1 extents now, device
        sources' copies are queued. Returns what waits for the rest and
        gives the checksums: per item [object sum, [chunk sums]] or None.

        Checksums are of the caller's bytes (not of the arena copy: another
        group member scribbling on the arena before the commit must make
        the object fail verification, not be published as valid), chunk by
        chunk as T1 will hold them."""
        finish_device: Callable[[], None] | None = None
        if any(isinstance(v, DeviceBuffer) for v in views):
            views, finish_device = self._start_device_sources(allocs, views, arena)
        tasks: list[WriteTask] = []
        cdst: list[memoryview] = []
        csrc: list[memoryview] = []
        t0_src: list[memoryview] = []  # what the checksums of T0 items are taken from
        multi: list[memoryview] = []
        for item, v in zip(allocs, views):
            if item is None or isinstance(v, _Landed):
                continue  # a device source on its way into its arena extent
            _seq, chunks, t0 = item
            if t0 >= 0 and arena is not None:
                cdst.append(arena.rw[t0:t0 + len(v)])
                csrc.append(v)
                t0_src.append(v)
            elif t0 >= 0:
                raise ProtocolError("the daemon gave an arena extent to a client without the arena")
            else:
                pos = 0
                for stripe, seg, off, length in chunks:
                    tasks.append(WriteTask(self._path(stripe, seg), off, v[pos:pos + length]))
                    pos += length
                if len(chunks) > 1:
                    multi.append(v)
        chunk_sums = iter(self.reader.write(tasks))
        self.reader.copy(cdst, csrc, [None] * len(cdst))
        t0_sums = iter(self.reader.hash_chunked(t0_src, self.stripe_unit))  # one pass per value
        whole = iter(self.reader.hash_many(multi))
        sums: list[Any] = []
        for item, v in zip(allocs, views):
            if item is None or isinstance(v, _Landed):
                sums.append(v if item is not None else None)  # _Landed: its sums come at the end
                continue
            if item[2] >= 0:
                w, cs = next(t0_sums)
                if len(cs) != len(item[1]):
                    raise ProtocolError("the daemon's chunks are not its stripe unit")
                sums.append([w, cs])
                continue
            cs = [next(chunk_sums) for _ in item[1]]
            sums.append([next(whole) if len(cs) > 1 else cs[0], cs])

        def finish() -> list[Any]:
            if finish_device is not None:
                finish_device()
            return [s.sums if isinstance(s, _Landed) else s for s in sums]
        return finish

    def _start_device_sources(self, allocs: list[Any], views: list[Any], arena: "ArenaMapping | None"
                              ) -> tuple[list[Any], Callable[[], None]]:
        """Device sources of a put: queue their DMA into their arena extents
        (registered, so at full speed), or copy them into host memory where
        they got no extent (those are complete on return). Returns the
        sources as host bytes (``_Landed`` for arena copies) and what waits
        for the copies and sets each ``_Landed``'s checksums.

        Checksums are of the source bytes: the GPU hashes them while the
        copy engine moves them (gpu_hash; values 8-byte aligned and over
        240 bytes), else the host hashes each arena copy as soon as it
        has landed, in groups, while later copies are still in flight."""
        gpu = self._gpu_plane()
        base = gpu.arena_address(arena) if arena is not None else 0  # registered on first use
        after = gpu.producer_events([v for v in views if isinstance(v, DeviceBuffer)])
        gpu.copier.wait_on_stream(after)
        hasher = gpu.hasher()
        out: list[Any] = []
        on_gpu: list[tuple[_Landed, tuple[int, int]]] = []
        groups: list[tuple[list[_Landed], Any]] = []  # host-hashed values, and an event after their copies
        group: list[_Landed] = []
        queued = 0
        staged = False
        copies: list[tuple[int, int, int]] = []  # (arena address, source, length) not issued yet

        def issue() -> None:
            for dst, src, n in merge_copies(copies, gpu.copier.allocation, SRC):
                gpu.copier.d2h(dst, src, n)
            copies.clear()
        for item, v in zip(allocs, views):
            if not isinstance(v, DeviceBuffer) or item is None:
                out.append(v)
                continue
            t0 = item[2]
            if t0 >= 0 and arena is not None:
                copies.append((base + t0, v.ptr, len(v)))  # direct values are never empty
                landed = _Landed(arena.rw[t0:t0 + len(v)], len(item[1]))
                out.append(landed)
                if hasher is not None and hasher.usable(v.ptr, len(v)):
                    on_gpu.append((landed, (v.ptr, len(v))))
                    continue
                group.append(landed)
                queued += len(v)
                if queued >= HASH_GROUP:
                    issue()
                    groups.append((group, gpu.copier.record()))
                    group, queued = [], 0
            else:
                host = memoryview(bytearray(len(v)))
                gpu.to_host(host, v)
                out.append(host)
                staged = True
        issue()
        if group:
            groups.append((group, gpu.copier.record()))
        landed_all = gpu.copier.record()  # after this sub-batch's copies (not the next one's)
        job = hasher.start([src for _l, src in on_gpu], self.stripe_unit, after) if on_gpu else None
        gpu.counters["device_hashed_values"] += len(on_gpu)

        def hash_landed(g: tuple[list[_Landed], Any]) -> None:
            vals, ev = g
            gpu.copier.wait(ev)
            for landed, (w, cs) in zip(vals, self.reader.hash_chunked([x.view for x in vals], self.stripe_unit, 1)):
                landed.sums = [w, cs]
        hashing = [gpu.pool().submit(hash_landed, g) for g in groups]
        if staged:
            gpu.sync()  # the caller writes those host copies to T1 right away

        def finish() -> None:
            for f in hashing:
                f.result()
            gpu.copier.wait(landed_all)
            if job is not None:
                for (landed, _src), (w, cs) in zip(on_gpu, job.result()):
                    # a last chunk of <= 240 bytes is XXH3's short path: the host's
                    for ci, c in enumerate(cs):
                        if c is None:
                            off = ci * self.stripe_unit
                            cs[ci] = xxhash.xxh3_128_digest(landed.view[off:off + self.stripe_unit])
                    landed.sums = [w, cs]
            for x in out:
                if isinstance(x, _Landed) and len(x.sums[1]) != x.n_chunks:
                    raise ProtocolError("the daemon's chunks are not its stripe unit")
        return out, finish

    def reserve(self, keys: Sequence[str | bytes], sizes: Sequence[int], *, ns: str = "default",
                metas: Sequence[dict[str, Any] | None] | None = None, t0: bool = False) -> Reservation:
        """Reserve room for values the caller writes itself (with NIXL's
        backends, say): T1 extents in the segment files, or with ``t0`` (and
        an arena mapped here) arena extents, which the daemon writes back to
        T1 itself. Fill them, then ``commit`` with the checksums of what was
        meant to be written; nothing is visible before that (see
        kvfs.reservation). One round trip; any thread may commit or abort."""
        ns = normalize_ns(ns)
        ks = normalize_keys(keys)
        if len(sizes) != len(ks) or (metas is not None and len(metas) != len(ks)):
            raise InvalidArgument("keys, sizes and metas must have the same length")
        if any(not isinstance(n, int) or n <= 0 for n in sizes):
            raise InvalidArgument("a reserved size is a positive int (store empty values with put)")
        raw = [encode_meta(m) for m in metas] if metas is not None else [None] * len(ks)
        items = [[k, int(n), m] for k, n, m in zip(ks, sizes, raw)]
        gen = self._locs.generation() if self._locs is not None else 0
        with self._hold_lock:
            c = self._hold_connection()
            res = c.call(P.ALLOC, {"ns": ns, "items": items, "t0": bool(t0) and self.arena is not None})
        return Reservation(self, c, ns, ks, [int(n) for n in sizes], res, gen)

    def flush(self, timeout: float = 60.0, *, remote: bool = False) -> bool:
        """Wait until every put acknowledged so far is written back from T0
        to T1 and the index (fast mode acknowledges T0 puts before that);
        with ``remote``, and until the shared tier's upload queue is empty
        (uploaded, or dropped and counted). False if ``timeout`` seconds
        passed first."""
        return bool(self._call(P.FLUSH, {"timeout": timeout, **({"remote": True} if remote else {})}))
