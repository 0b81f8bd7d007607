"""Reads into host memory: from the arena (T0) and the segment files (T1),
by the data plane's threads.

Invariants:
- every byte served is verified against its checksum (unless the store
  was opened with ``verify=False``): a mismatch is reported to the daemon
  and read once more, never returned;
- locations come from the location cache or the directory when they are
  current (the removal generation did not move), else from a lookup that
  leases them for the read;
- a view of the arena (``get_view``) stays valid while the lease it holds
  lasts.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

from . import native
from . import protocol as P
from .dataplane import ReadTask
from .errors import InvalidArgument, NotFound
from .directory import fd_id
from .generation import EPOCH
from .keys import normalize_key, normalize_keys, normalize_ns
from .lookups import Lookups

log = logging.getLogger("kvfs")


@dataclass
class _ReadPlan:
    reads: list[ReadTask] = field(default_factory=list)  # T1 chunks
    rown: list[int] = field(default_factory=list)  # item index of each read
    cdst: list[memoryview] = field(default_factory=list)  # T0 chunk copies
    csrc: list[memoryview] = field(default_factory=list)
    csum: list[bytes | None] = field(default_factory=list)
    cown: list[int] = field(default_factory=list)


def as_readable(data: Any) -> memoryview:
    try:
        mv = data if isinstance(data, memoryview) else memoryview(data)
    except TypeError:
        raise InvalidArgument(f"value must be bytes-like or a NumPy array, not {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise InvalidArgument("value must be C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) and mv.nbytes else mv


def as_writable(out: Any) -> memoryview:
    try:
        mv = out if isinstance(out, memoryview) else memoryview(out)
    except TypeError:
        raise InvalidArgument(f"destination must be a writable buffer (bytearray, memoryview, "
                              f"NumPy array), not {type(out).__name__}") from None
    if mv.readonly:
        raise InvalidArgument("destination buffer is read-only")
    if not mv.c_contiguous:
        raise InvalidArgument("destination buffer must be C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) and mv.nbytes else mv


class HostReads(Lookups):
    def _direct(self) -> tuple[Any, Any, Any, int, dict[int, int] | None] | None:
        """What a direct read (``dir_read``) needs, if reads may go straight
        to where the directory places them now: (directory, arena or None,
        generation buffer, the generation, open segment files or None).
        None when they may not: no directory, ``cache_locations=False``
        (every read asks the daemon), or a removal or restart since the last
        located read (that path catches up with it first). Only the C data
        plane gets the open files: it dups each fd under the GIL, where the
        Python twin could read an fd number closed and reused between its
        lookup and its read."""
        d, gen = self._dir, self._gen
        if d is None or gen is None or self._locs is None:
            return None
        g = gen.value
        if not self._caught_up(g):
            return None
        fds = self.reader.fds.by_id if native.name == "native" else None
        return d, self.arena.ro if self.arena is not None else None, gen.buffer, g, fds

    def _direct_read(self, ns: str, key: Any, out: Any) -> int:
        """A get_into answered from the directory in one native call: copied
        from the arena, or read from a segment file this client already has
        open (FdCache.by_id); no lookup, no lease, no Python per chunk. The
        size, or -1 when the located path must answer: the directory does not
        place the object where this call can reach it, a removal or a restart
        happened since the last read, ``out`` is not a writable host buffer,
        or a chunk failed verification (that path reads again and reports
        it). Keys and namespaces that are not plain ASCII are left to that
        path too, which checks them."""
        # _direct() inlined (every get_into starts here). The generation is
        # checked before the copy too: after a removal the located path
        # catches up first, rather than a large copy made only to be thrown
        # away (a node that promotes and evicts bumps it often)
        d, gen, arena = self._dir, self._gen, self.arena
        if d is None or gen is None or self._locs is None:
            return -1
        g = gen.value
        if g != self._fd_gen or g // EPOCH != self._epoch:  # _caught_up(g), inlined too (0.07 us of 2.1)
            return -1
        try:
            n = native.backend.dir_read(d.mm, d.nslots, ns.encode(), key, arena.ro if arena is not None else None,
                                        out, gen.buffer, g, self.verify, self.reader.threads,
                                        self.reader.fds.by_id if native.name == "native" else None)
        except (TypeError, ValueError, BufferError):
            return -1  # not a plain writable host buffer, or a mapping closed by a reconnect
        if n >= 0:
            self._touch(ns, [key])
        return n

    def _direct_reads(self, ns: str, ks: list[str], outs: list[memoryview]) -> list[int] | None:
        """``_direct_read`` of a batch in one native call: per key the size or
        a negative (that key takes the located path); None when the whole
        batch must."""
        direct = self._direct()
        if direct is None:
            return None
        d, arena, gen, g, fds = direct
        try:
            got: list[int] = native.backend.dir_read_many(d.mm, d.nslots, ns.encode(), ks, arena, outs, gen, g,
                                                           self.verify, self.reader.threads, fds)
        except (TypeError, ValueError, BufferError):
            return None
        self._touch(ns, [k for k, n in zip(ks, got) if n >= 0])
        return got

    def _plan_reads(self, ns: str, ks: list[str], found: dict[int, list[Any]], outs: list[memoryview | None],
                    allow_alloc: bool, sizes: list[int], bufs: list[bytearray | None]) -> "_ReadPlan":
        """Copy tasks (T0 hits, from the arena) and read tasks (T1, from the
        segment files) for the found items (index -> wire item); fills sizes
        and allocates bufs where asked. Items in T0 only that this client
        cannot map count as misses."""
        plan = _ReadPlan()
        arena = self.arena
        for i, item in found.items():
            size, _csum, _seq, exts = item[:4]
            t0 = item[4] if len(item) > 4 else None
            if t0 is not None and arena is None and not t0[1]:
                continue  # only in T0, and no arena here
            dest = outs[i]
            if dest is None:
                if not allow_alloc:
                    continue
                fresh = bytearray(size)
                bufs[i] = fresh
                dest = memoryview(fresh)
            if size > len(dest):
                raise InvalidArgument(f"buffer of {len(dest)} bytes is too small for {ns}/{ks[i]} ({size} bytes)")
            pos = 0
            for stripe, seg, off, length, ccsum in exts:
                if t0 is not None and arena is not None:
                    # chunk by chunk, so each copy is verified by its own sum
                    # (in parallel) exactly as the T1 record would be
                    plan.cdst.append(dest[pos:pos + length])
                    plan.csrc.append(arena.ro[t0[0] + pos:t0[0] + pos + length])
                    plan.csum.append(ccsum if self.verify else None)
                    plan.cown.append(i)
                else:
                    plan.reads.append(ReadTask(self._path(stripe, seg), off, dest[pos:pos + length],
                                               ccsum if self.verify else None, fd_id(seg, stripe)))
                    plan.rown.append(i)
                pos += length
            sizes[i] = size
        return plan

    def _run_reads(self, plan: "_ReadPlan") -> set[int]:
        """Run a read plan; returns the items that failed (missing, short, mismatched)."""
        bad: set[int] = set()
        if plan.cdst:
            bad.update(o for o, good in zip(plan.cown, self.reader.copy(plan.cdst, plan.csrc, plan.csum))
                       if not good)
        if plan.reads:
            bad.update(o for o, good in zip(plan.rown, self.reader.run(plan.reads)) if not good)
        return bad

    def _read_batch(self, ns: str, ks: list[str], outs: list[memoryview | None], allow_alloc: bool
                    ) -> tuple[list[int], list[bytearray | None]]:
        """Read ``ks`` into ``outs`` (or into new bytearrays where an out is
        None and allow_alloc). Returns sizes (-1: miss) and the allocated
        buffers.

        Keys the directory places in the arena or in open segment files are
        read in one native call first (_direct_reads); the rest take
        _read_located."""
        if allow_alloc or not ks or any(o is None for o in outs):
            return self._read_located(ns, ks, outs, allow_alloc)
        got = self._direct_reads(ns, ks, outs)  # type: ignore[arg-type]
        if got is None:
            return self._read_located(ns, ks, outs, allow_alloc)
        rest = [i for i, n in enumerate(got) if n < 0]
        if rest:
            sizes, _ = self._read_located(ns, [ks[i] for i in rest], [outs[i] for i in rest], False)
            for i, n in zip(rest, sizes):
                got[i] = n
        return got, [None] * len(ks)

    def _read_located(self, ns: str, ks: list[str], outs: list[memoryview | None], allow_alloc: bool
                      ) -> tuple[list[int], list[bytearray | None]]:
        """_read_batch by locations. Keys whose location is cached are read with no round trip; a cached
        read that fails (file gone, short, mismatch) just falls through to a
        lookup. So does a cached T0 read during which the removal generation
        moved (its extent may have been evicted and reused under it: the
        generation works as a seqlock here). A chunk from a fresh lookup
        that fails verification is reported to the daemon (which re-checks
        and drops it) and looked up once more."""
        sizes = [-1] * len(ks)
        bufs: list[bytearray | None] = [None] * len(ks)
        todo = list(range(len(ks)))
        cache = self._locs
        self._drop_stale_fds()
        self._check_restart()
        if cache is not None:
            gen, cached = self._known_locations(cache, ns, ks)
            if cached:
                plan = self._plan_reads(ns, ks, cached, outs, allow_alloc, sizes, bufs)
                missed = self._run_reads(plan)
                if plan.cdst and cache.generation() != gen:
                    missed.update(plan.cown)
                todo = self._settle_known(cache, ns, ks, cached, missed, sizes, todo)
        for attempt in range(2):
            if not todo:
                break
            gen = cache.generation() if cache is not None else 0
            res = self._call(P.LOOKUP, {"ns": ns, "keys": [ks[i] for i in todo], **self._fetch})
            lease = res["lease"]
            found = {i: item for i, item in zip(todo, res["items"]) if item is not None}
            try:
                plan = self._plan_reads(ns, ks, found, outs, allow_alloc, sizes, bufs)
                bad_set = self._run_reads(plan)
            finally:
                if lease:
                    self._release(lease)
            bad = sorted(bad_set)
            for i in bad:
                sizes[i] = -1
                if attempt == 0:
                    self._call(P.REPORT_BAD, {"ns": ns, "key": ks[i], "seq": found[i][2]})
            if cache is not None:
                cache.put_many(ns, [(ks[i], found[i]) for i in found if i not in bad_set and sizes[i] >= 0], gen)
            todo = bad
        return sizes, bufs

    def get(self, key: str | bytes, *, ns: str = "default") -> bytes:
        k, ns = normalize_key(key), normalize_ns(ns)
        sizes, bufs = self._read_batch(ns, [k], [None], True)
        if sizes[0] < 0 or bufs[0] is None:
            raise NotFound(f"{ns}/{k} not found")
        return bytes(bufs[0])

    @contextmanager
    def get_view(self, key: str | bytes, *, ns: str = "default") -> Generator[memoryview, None, None]:
        """A read-only view of the value, without a copy when it is in T0:

            with store.get_view(key) as v:
                arr = np.frombuffer(v, dtype=np.float16)   # use it inside the block

        The view points into the shared-memory arena and the lease taken for
        it keeps those bytes from being reused until the block ends; it is
        released at the end of the block (do not keep it, or arrays made from
        it, afterwards). Verified once, before it is handed out (unless
        verify=False). A value only in T1 is read into a new buffer."""
        with self.get_views([key], ns=ns) as views:
            if views[0] is None:
                raise NotFound(f"{normalize_ns(ns)}/{normalize_key(key)} not found")
            yield views[0]

    @contextmanager
    def get_views(self, keys: Sequence[str | bytes], *, ns: str = "default"
                  ) -> Generator[list[memoryview | None], None, None]:
        """``get_view`` for a batch, with one lookup round trip: a list of
        read-only views (None for a miss), valid inside the block."""
        ks, ns = normalize_keys(keys), normalize_ns(ns)
        self._check_restart()
        views: list[memoryview | None] = [None] * len(ks)
        leases: list[int] = []
        try:
            todo = list(range(len(ks)))
            for attempt in range(2):
                if not todo:
                    break
                res = self._call(P.LOOKUP, {"ns": ns, "keys": [ks[i] for i in todo], **self._fetch})
                if res["lease"]:
                    leases.append(res["lease"])  # held until the block ends
                found = {i: item for i, item in zip(todo, res["items"]) if item is not None}
                bad = self._make_views(ns, ks, found, views)
                for i in bad:
                    if attempt == 0:
                        self._call(P.REPORT_BAD, {"ns": ns, "key": ks[i], "seq": found[i][2]})
                todo = bad
            yield views
        finally:
            for v in views:
                if v is not None:
                    try:
                        v.release()
                    except BufferError:
                        pass  # the caller kept an export: its bytes stay mapped, unleased
            for lease in leases:
                self._release(lease)

    def _make_views(self, ns: str, ks: list[str], found: dict[int, list[Any]],
                    views: list[memoryview | None]) -> list[int]:
        """Views of the found items: arena slices for T0 hits (verified in
        one parallel batch), new buffers for the rest. Returns the items
        that failed verification."""
        arena = self.arena
        t1: dict[int, list[Any]] = {}
        parts: list[memoryview] = []
        owners: list[int] = []
        sums: list[bytes] = []
        for i, item in found.items():
            size, _csum, _seq, exts, t0 = item
            if t0 is None or arena is None:
                t1[i] = item
                continue
            views[i] = view = arena.ro[t0[0]:t0[0] + size]
            pos = 0
            for x in exts:
                parts.append(view[pos:pos + x[3]])
                owners.append(i)
                sums.append(x[4])
                pos += x[3]
        bad: set[int] = set()
        if self.verify and parts:
            bad.update(o for o, got, want in zip(owners, self.reader.hash_many(parts), sums) if got != want)
        for p in parts:
            p.release()
        if t1:
            sizes = [-1] * len(ks)
            bufs: list[bytearray | None] = [None] * len(ks)
            plan = self._plan_reads(ns, ks, t1, [None] * len(ks), True, sizes, bufs)
            failed = self._run_reads(plan)
            for i in t1:
                buf = bufs[i]
                if i in failed or sizes[i] < 0 or buf is None:
                    if sizes[i] >= 0:
                        bad.add(i)
                    continue
                views[i] = memoryview(buf).toreadonly()
        for i in bad:
            v, views[i] = views[i], None
            if v is not None:
                v.release()
        return sorted(bad)
