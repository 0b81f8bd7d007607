"""NIXL moves kvfs's bytes (``pip install 'kvfs[nixl]'``; NIXL 1.5).

kvfs hands its objects to a NIXL agent as transfer descriptors, so NIXL's
own backends do the copying: POSIX (or GDS / GDS_MT on a GPU node with
GPUDirect Storage) for blocks in the segment files (T1), a memory backend
(UCX) for blocks in the shared-memory arena (T0)::

    import kvfs
    from kvfs.integrations.nixl import KvfsNixl

    kn = KvfsNixl(kvfs.connect())           # an agent of its own: POSIX + UCX
    kn = KvfsNixl(store, agent, backend="GDS_MT")  # or the engine's agent
    kn.register(buf)                         # once: the destination memory
    sizes = kn.get_many_into(keys, outs, ns=ns)  # Store.get_many_into's contract
    kn.put_many(keys, datas, ns=ns)              # Store.put_many's

    with kn.descriptors(keys, ns=ns) as rd:  # for callers that run the transfer
        rd.file, rd.dram                     # remote sides: FILE and DRAM lists
        rd.local(addrs)                      # the matching local sides
        sizes = kn.read(rd, addrs)           # ... or this: transfer + verify

Rules (those of the client, kept here too):
- **Registration in step.** Each segment file is opened and registered
  (``FILE``: ``(0, 0, fd, "")``) the first time a descriptor names it, the
  arena (``DRAM``) once with the memory backend; a segment that compaction
  or eviction retired (unlinked: its fd's link count is 0) is deregistered
  and closed at the next call after the removal generation moved, once no
  descriptor list still names it; a restarted daemon's new arena replaces
  the old registration.
- **Leases.** ``descriptors`` takes a hold (``Store.hold``): until the
  caller releases it, eviction passes those blocks over and no segment
  holding them is unlinked (compaction waits). The hold also ends with the
  daemon's lease timeout (30 s by default).
- **Verification.** Bytes that arrived are checked against kvfs's checksums
  before a call reports them good: on the host with the native hasher, in
  device memory with the GPU hasher (kvfs.gpu_hash). A mismatch is
  reported to the daemon (which re-checks and drops a bad copy) and is a
  miss (-1) after one more lookup, never bytes handed over as good.
- **Writes.** ``Store.reserve`` extents, NIXL WRITE into them, then commit
  with the checksums of the source bytes: nothing is visible before the
  commit, and bytes that landed wrong fail their checksum for every reader.
- **Progress.** NIXL's POSIX backend moves bytes only while it is polled;
  every call here polls until its transfers end (``_Agent.run``), and a
  transfer NIXL fails is retried item by item, so one bad block is one miss.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from kvfs import Store
from kvfs.client import BATCH_KEYS, as_readable, as_writable
from kvfs.errors import InvalidArgument, KvfsError
from kvfs.format import segment_name
from kvfs.gpu import address_of, device_buffer
from kvfs.keys import normalize_keys, normalize_ns
from kvfs.optional import need
from kvfs import protocol as P

from .nixl_plan import Piece, Plan, failed_items, local, merge_spans, plan_reads, plan_writes

need("nixl")
import numpy as np  # noqa: E402 - nixl needs it
from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t  # noqa: E402

log = logging.getLogger("kvfs.integrations.nixl")

FILE_BACKENDS = ("POSIX", "GDS", "GDS_MT")
# POSIX queue modes (backend params): all four run on these machines
POSIX_MODES: dict[str, dict[str, str]] = {
    "default": {}, "uring": {"use_uring": "true"}, "aio": {"use_aio": "true"},
    "posix_aio": {"use_posix_aio": "true"}}
SPIN_POLLS = 200  # polls before the wait starts to sleep (a small transfer is done by then)
MAX_NAP = 200e-6
_names = itertools.count()


class _Agent:
    """A NIXL agent as kvfs uses it: every call under one lock (a caller's
    agent may be in NIXL_THREAD_SYNC_NONE mode), released between polls so
    several threads' transfers progress together."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.lock = threading.RLock()

    def register(self, regions: list[tuple[int, int, int, str]], mem: str, backends: list[str]) -> Any:
        with self.lock:
            return self.agent.register_memory(regions, mem, backends=backends)

    def deregister(self, dlist: Any, backends: list[str]) -> None:
        try:
            with self.lock:
                self.agent.deregister_memory(dlist, backends=backends)
        except Exception as e:  # noqa: BLE001 - nothing left to do about it
            log.warning("kvfs: NIXL deregistration failed: %s", e)

    def run(self, op: str, local_descs: list[tuple[int, int, int]], local_mem: str,
            remote_descs: list[tuple[int, int, int]], remote_mem: str, backend: str) -> bool:
        """One loopback transfer, polled to its end. False: NIXL failed it
        (an error status or exception: a short read, a bad descriptor)."""
        if not local_descs:
            return True
        a = self.agent
        handle = None
        try:
            with self.lock:
                ld = a.get_xfer_descs(np.array(local_descs, dtype=np.uint64), local_mem)
                rd = a.get_xfer_descs(np.array(remote_descs, dtype=np.uint64), remote_mem)
                handle = a.initialize_xfer(op, ld, rd, a.name, backends=[backend])
                state = a.transfer(handle)
            polls = 0
            while state == "PROC":
                polls += 1
                if polls > SPIN_POLLS:
                    time.sleep(min(MAX_NAP, 1e-6 * (polls - SPIN_POLLS)))
                with self.lock:
                    state = a.check_xfer_state(handle)
            return state == "DONE"
        except Exception as e:  # noqa: BLE001 - NIXL raises its own error classes
            log.debug("kvfs: NIXL %s via %s failed: %s", op, backend, e)
            return False
        finally:
            if handle is not None:
                try:
                    with self.lock:
                        handle.release()
                except Exception:  # noqa: BLE001 - NIXL keeps it on its leak list
                    pass


@dataclass
class _Segment:
    fd: int
    dlist: Any


@dataclass
class _Region:
    start: int
    end: int
    mem: str
    dev: int
    dlist: Any
    backends: list[str]


@dataclass
class NixlRead:
    """Descriptors of located blocks, pinned by a lease until ``release``.
    ``file`` / ``dram``: the remote (source) sides of a READ, FILE and DRAM
    lists; ``local(addrs)`` gives the destination sides for per-item
    addresses. ``sizes``: per key, -1 for a miss."""
    keys: list[str]
    ns: str
    plan: Plan
    hold: Any
    owner: "KvfsNixl"
    released: bool = False

    @property
    def sizes(self) -> list[int]:
        return list(self.plan.sizes)

    @property
    def file(self) -> list[tuple[int, int, int]]:
        return self.plan.file

    @property
    def dram(self) -> list[tuple[int, int, int]]:
        return self.plan.dram

    def local(self, addrs: Sequence[int], dev: int = 0) -> tuple[list[tuple[int, int, int]],
                                                                list[tuple[int, int, int]]]:
        """(FILE's, DRAM's) destination descriptors for per-item addresses."""
        return local(self.plan.file_pieces, addrs, dev), local(self.plan.dram_pieces, addrs, dev)

    def release(self) -> None:
        """End the lease (at most once; never raises)."""
        if not self.released:
            self.released = True
            self.hold.release()
            self.owner._closed(self)

    def __enter__(self) -> "NixlRead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class NixlWrite:
    """Reserved room as descriptors (the remote, destination sides of a
    WRITE): ``file`` for T1 extents, ``dram`` for arena extents. Commit
    with ``KvfsNixl.commit`` after the transfer; ``abort`` otherwise."""
    keys: list[str]
    ns: str
    plan: Plan
    reservation: Any
    owner: "KvfsNixl"
    done: bool = False
    counted: list[int] = field(default_factory=list)

    @property
    def file(self) -> list[tuple[int, int, int]]:
        return self.plan.file

    @property
    def dram(self) -> list[tuple[int, int, int]]:
        return self.plan.dram

    def local(self, addrs: Sequence[int], dev: int = 0) -> tuple[list[tuple[int, int, int]],
                                                                list[tuple[int, int, int]]]:
        return local(self.plan.file_pieces, addrs, dev), local(self.plan.dram_pieces, addrs, dev)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.reservation.abort()
            self.owner._closed(self)

    def __enter__(self) -> "NixlWrite":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _span(obj: Any, writable: bool) -> tuple[int, int, str, int]:
    """(address, bytes, NIXL memory type, device) of a buffer."""
    d = device_buffer(obj)
    if d is not None:
        if writable and d.readonly:
            raise InvalidArgument("destination device buffer is read-only")
        dev = getattr(getattr(d.owner, "device", None), "index", None)  # torch
        if dev is None:
            dev = getattr(getattr(d.owner, "device", None), "id", 0)  # cupy
        return d.ptr, d.nbytes, "VRAM", int(dev or 0)
    mv = as_writable(obj) if writable else as_readable(obj)
    return address_of(mv), len(mv), "DRAM", 0


def _host_view(addr: int, n: int) -> memoryview:
    return memoryview((ctypes.c_char * n).from_address(addr)).cast("B") if n else memoryview(b"")


class KvfsNixl:
    """kvfs objects as NIXL transfers. ``agent``: a ``nixl_agent`` to use
    (default: one of its own). ``backend``: the file backend, POSIX, GDS or
    GDS_MT, created on the agent if it has none by that name (``params``:
    its init parameters, e.g. ``POSIX_MODES["uring"]``). ``memory``: the
    backend that moves arena bytes (UCX); None, or one that cannot start,
    means T0 copies are read from T1 where they are written back already
    (and are misses where they are not) and puts go to T1."""

    def __init__(self, store: Store, agent: Any = None, *, backend: str = "POSIX",
                 params: dict[str, str] | None = None, memory: str | None = "UCX") -> None:
        if backend not in FILE_BACKENDS:
            raise InvalidArgument(f"backend is one of {', '.join(FILE_BACKENDS)}, not {backend!r}")
        self.store = store
        self._own = agent is None
        if agent is None:
            agent = nixl_agent(f"kvfs-{os.getpid()}-{next(_names)}",
                               nixl_agent_config(backends=[], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW))
        self.nixl = _Agent(agent)
        self.backend = backend
        if backend not in agent.backends:
            try:
                agent.create_backend(backend, dict(params or {}))
            except Exception as e:  # noqa: BLE001 - say which backend and why
                raise KvfsError(f"NIXL backend {backend} could not start here: {type(e).__name__}: {e}") from None
        self.memory: str | None = None
        if memory is not None:
            try:
                if memory not in agent.backends:
                    agent.create_backend(memory, {})
                self.memory = memory
            except Exception as e:  # noqa: BLE001 - T0 through T1 then
                log.warning("kvfs: NIXL memory backend %s did not start (%s): arena blocks are read from T1", memory, e)
        self._lock = threading.Lock()
        self._segs: dict[int, _Segment] = {}
        self._regions: list[_Region] = []
        self._arena: tuple[Any, int, Any] | None = None  # (the store's arena object, address, registration)
        self._old_arenas: list[Any] = []
        self._open: list[NixlRead | NixlWrite] = []  # descriptor lists not released: their segments stay
        self._gen = -2
        self._writable = store.right in (None, "write", "admin")
        self.counters: dict[str, int] = {k: 0 for k in (
            "reads", "read_bytes", "file_chunks", "dram_chunks", "misses", "verify_failed", "xfer_failed",
            "writes", "written_bytes", "segments_registered", "segments_retired", "temp_registrations")}

    # ------------------------------------------------------------ registration
    def register(self, buf: Any) -> _Region:
        """Register ``buf`` (host or device memory) with the agent's
        backends that move it; transfers into or out of it then need no
        registration of their own. Returns what ``deregister`` takes."""
        addr, n, mem, dev = _span(buf, writable=False)
        return self._register_span(addr, n, mem, dev)

    def deregister(self, region: _Region) -> None:
        with self._lock:
            if region in self._regions:
                self._regions.remove(region)
        self.nixl.deregister(region.dlist, region.backends)

    def _backends_for(self, mem: str) -> list[str]:
        if mem == "VRAM":
            return [b for b in (self.backend, self.memory) if b is not None and b != "POSIX"]
        return [b for b in (self.backend, self.memory) if b is not None]

    def _register_span(self, addr: int, n: int, mem: str, dev: int) -> _Region:
        if n <= 0:
            raise InvalidArgument("nothing to register: an empty buffer")
        backends = self._backends_for(mem)
        if not backends:
            raise InvalidArgument(f"no backend here moves {mem} (file backend {self.backend}, memory {self.memory})")
        dlist = self.nixl.register([(addr, n, dev, "")], mem, backends)
        region = _Region(addr, addr + n, mem, dev, dlist, backends)
        with self._lock:
            self._regions.append(region)
        return region

    def _covered(self, addr: int, n: int, mem: str, dev: int) -> bool:
        with self._lock:
            return any(r.mem == mem and r.dev == dev and r.start <= addr and addr + n <= r.end for r in self._regions)

    def _check_registered(self, sizes: Sequence[int], addrs: Sequence[int], mem: str, dev: int) -> None:
        """NIXL moves only registered memory: a caller's mistake is an
        error here, not a failed transfer counted against the blocks."""
        for n, a in zip(sizes, addrs):
            if n > 0 and not self._covered(a, n, mem, dev):
                raise InvalidArgument(f"{mem} at {a:#x} ({n} bytes) is not registered: KvfsNixl.register it first")

    def _temporary(self, spans: Sequence[tuple[int, int, str, int]]) -> list[_Region]:
        """Register what of ``spans`` no region covers yet (merged), for one call."""
        todo: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for addr, n, mem, dev in spans:
            if n and not self._covered(addr, n, mem, dev):
                todo.setdefault((mem, dev), []).append((addr, n))
        out = []
        for (mem, dev), group in todo.items():
            for addr, n in merge_spans(group):
                out.append(self._register_span(addr, n, mem, dev))
                self.counters["temp_registrations"] += 1
        return out

    def _segment_fd(self, stripe: int, seg: int) -> int:
        """The registered fd of a segment file (opened on first use; callers
        hold a lease or a reservation on it, so it is not unlinked meanwhile)."""
        with self._lock:
            s = self._segs.get(seg)
            if s is not None:
                return s.fd
        path = os.path.join(self.store.stripes[stripe], segment_name(seg))
        fd = -1
        if self._writable:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                self._writable = False  # a reader's grant: r-- on segments
        if fd < 0:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dlist = self.nixl.register([(0, 0, fd, "")], "FILE", [self.backend])
        except Exception as e:  # noqa: BLE001 - e.g. GDS: cuFileHandleRegister refused the file
            os.close(fd)
            raise KvfsError(f"NIXL {self.backend} cannot register {path}: {type(e).__name__}: {e}") from None
        with self._lock:
            s = self._segs.get(seg)
            if s is not None:  # another thread registered it meanwhile
                extra = (fd, dlist)
            else:
                s = self._segs[seg] = _Segment(fd, dlist)
                extra = None
                self.counters["segments_registered"] += 1
            got = s.fd
        if extra is not None:
            self.nixl.deregister(extra[1], [self.backend])
            os.close(extra[0])
        return got

    def _closed(self, x: "NixlRead | NixlWrite") -> None:
        """A descriptor list is done: forget it, and retire any of its
        segments that went meanwhile (its lease was what kept them)."""
        with self._lock:
            if x in self._open:
                self._open.remove(x)
        self._retire(x.plan.segments)

    def _sweep(self) -> None:
        """Once the removal generation moved (every unlink of a segment
        comes after a move), retire every registered segment that is gone."""
        g = self.store._gen
        gen = g.value if g is not None else -1
        if gen == self._gen and gen >= 0:
            return
        self._gen = gen
        with self._lock:
            segs = set(self._segs)
        self._retire(segs)

    def _retire(self, segs: set[int]) -> None:
        """Deregister and close those of ``segs`` that were unlinked
        (retired by compaction or eviction) and that no open descriptor
        list names."""
        gone: list[_Segment] = []
        with self._lock:
            live = set().union(*(x.plan.segments for x in self._open)) if self._open else set()
            for sid in segs - live:
                s = self._segs.get(sid)
                if s is None:
                    continue
                try:
                    retired = os.fstat(s.fd).st_nlink == 0
                except OSError:
                    retired = True
                if retired:
                    gone.append(self._segs.pop(sid))
        for s in gone:
            self.nixl.deregister(s.dlist, [self.backend])
            os.close(s.fd)
            self.counters["segments_retired"] += 1

    def registered_segments(self) -> list[int]:
        """Segment ids registered with the agent now."""
        with self._lock:
            return sorted(self._segs)

    def _arena_base(self) -> int | None:
        """The arena's address, registered with the memory backend (again
        after a daemon restart mapped a new arena); None: no T0 path here."""
        arena = self.store.arena
        if arena is None or self.memory is None:
            return None
        cur = self._arena
        if cur is not None and cur[0] is arena:
            return cur[1]
        addr = address_of(arena.ro)
        try:
            dlist = self.nixl.register([(addr, arena.size, 0, "")], "DRAM", [self.memory])
        except Exception as e:  # noqa: BLE001 - T0 through T1 then
            log.warning("kvfs: NIXL %s cannot register the arena (%s): arena blocks are read from T1", self.memory, e)
            self.memory = None
            return None
        with self._lock:
            if self._arena is not None:
                self._old_arenas.append(self._arena[2])  # an old daemon's: dropped at close
            self._arena = (arena, addr, dlist)
        return addr

    # ------------------------------------------------------------------ reads
    def descriptors(self, keys: Sequence[str | bytes], *, ns: str = "default") -> NixlRead:
        """Locate ``keys`` and pin them (a lease) until the result is
        released: its ``file`` and ``dram`` lists are the remote sides of
        NIXL READs into the caller's registered memory."""
        ns = normalize_ns(ns)
        ks = normalize_keys(keys)
        self._sweep()
        hold = self.store.hold(ks, ns=ns)
        try:
            arena = self._arena_base() if any(it is not None and it[4] is not None for it in hold.items) else None
            plan = plan_reads(hold.items, self._segment_fd, arena)
        except BaseException:
            hold.release()
            raise
        rd = NixlRead(ks, ns, plan, hold, self)
        with self._lock:
            self._open.append(rd)
        return rd

    def read(self, rd: NixlRead, addrs: Sequence[int], *, mem: str = "DRAM", dev: int = 0) -> list[int]:
        """Run ``rd``'s READs into per-item destinations (registered ``mem``
        addresses, each with room for its item) and verify what arrived.
        Returns sizes; -1: a miss, or a block that failed (reported to the
        daemon; ``get_many_into`` looks those up once more)."""
        if len(addrs) != len(rd.keys):
            raise InvalidArgument("one destination address per key")
        plan = rd.plan
        if plan.file and mem == "VRAM" and self.backend == "POSIX":
            raise InvalidArgument("T1 blocks into device memory need the GDS or GDS_MT backend (POSIX moves DRAM)")
        self._check_registered(plan.sizes, addrs, mem, dev)
        bad = self._move("READ", plan.file_pieces, plan.file, "FILE", self.backend, addrs, mem, dev)
        bad |= self._move("READ", plan.dram_pieces, plan.dram, "DRAM", self.memory or "", addrs, mem, dev)
        if self.store.verify:
            bad |= self._verify(plan.pieces(), addrs, mem, bad)
        sizes = list(plan.sizes)
        for i in bad:
            sizes[i] = -1
        self.counters["reads"] += 1
        self.counters["file_chunks"] += len(plan.file)
        self.counters["dram_chunks"] += len(plan.dram)
        self.counters["read_bytes"] += sum(s for s in sizes if s > 0)
        self._report_bad(rd, bad)
        return sizes

    def _move(self, op: str, pieces: list[Piece], remote: list[tuple[int, int, int]], remote_mem: str,
              backend: str, addrs: Sequence[int], mem: str, dev: int) -> set[int]:
        """One transfer for all ``pieces``; if NIXL fails it, one per item,
        so a failure costs only the items it is in. Returns failed items."""
        if not pieces:
            return set()
        mine = local(pieces, addrs, dev)
        if self.nixl.run(op, mine, mem, remote, remote_mem, backend):
            return set()
        self.counters["xfer_failed"] += 1
        by_item: dict[int, list[int]] = {}
        for j, p in enumerate(pieces):
            by_item.setdefault(p.item, []).append(j)
        bad = set()
        for item, js in by_item.items():
            if not self.nixl.run(op, [mine[j] for j in js], mem, [remote[j] for j in js], remote_mem, backend):
                bad.add(item)
        return bad

    def _verify(self, pieces: list[Piece], addrs: Sequence[int], mem: str, skip: set[int]) -> set[int]:
        todo = [p for p in pieces if p.item not in skip]
        if not todo:
            return set()
        if mem == "DRAM":
            sums = self.store.reader.hash_many([_host_view(addrs[p.item] + p.pos, p.length) for p in todo])
            bad = failed_items(todo, [s == p.checksum for s, p in zip(sums, todo)])
        else:
            plane = self.store._gpu_plane()
            bad = plane.verify_ranges([(p.item, addrs[p.item] + p.pos, p.length, p.checksum) for p in todo])
        self.counters["verify_failed"] += len(bad)
        return bad

    def _report_bad(self, rd: NixlRead, bad: set[int]) -> None:
        for i in bad:
            item = rd.hold.items[i]
            if item is not None:
                try:
                    self.store._call(P.REPORT_BAD, {"ns": rd.ns, "key": rd.keys[i], "seq": item[2]})
                except KvfsError:
                    pass  # the daemon re-checks on the next report

    def get_many_into(self, keys: Sequence[str | bytes], outs: Sequence[Any], *, ns: str = "default") -> list[int]:
        """``Store.get_many_into`` through NIXL: each value into its buffer
        (host, or device with GDS/GDS_MT for T1 blocks); sizes, -1 for a
        miss. Unregistered buffers are registered for the call."""
        ks = normalize_keys(keys)
        if len(outs) != len(ks):
            raise InvalidArgument("keys and outs must have the same length")
        spans = [_span(o, writable=True) for o in outs]
        mems = {(m, d) for _a, _n, m, d in spans}
        if len(mems) > 1:
            raise InvalidArgument("outs must all be host memory or all on one device")
        mem, dev = mems.pop() if mems else ("DRAM", 0)
        temp = self._temporary(spans)
        try:
            out: list[int] = []
            for b in range(0, len(ks), BATCH_KEYS):
                out += self._get_batch(ks[b:b + BATCH_KEYS], spans[b:b + BATCH_KEYS], ns, mem, dev)
            return out
        finally:
            for r in temp:
                self.deregister(r)

    def _get_batch(self, ks: list[str], spans: list[tuple[int, int, str, int]], ns: str, mem: str,
                   dev: int) -> list[int]:
        sizes = [-1] * len(ks)
        todo = list(range(len(ks)))
        for attempt in range(2):
            if not todo:
                break
            with self.descriptors([ks[i] for i in todo], ns=ns) as rd:
                for j, i in enumerate(todo):
                    if rd.plan.sizes[j] > spans[i][1]:
                        raise InvalidArgument(f"buffer of {spans[i][1]} bytes is too small for {ns}/{ks[i]} "
                                              f"({rd.plan.sizes[j]} bytes)")
                got = self.read(rd, [spans[i][0] for i in todo], mem=mem, dev=dev)
                found = rd.plan.sizes
            again = []
            for j, i in enumerate(todo):
                sizes[i] = got[j]
                if got[j] < 0 and found[j] >= 0:
                    again.append(i)  # failed, reported: once more (another copy may serve it)
            self.counters["misses"] += sum(1 for j in range(len(todo)) if found[j] < 0)
            todo = again
        return sizes

    # ----------------------------------------------------------------- writes
    def reserve(self, keys: Sequence[str | bytes], sizes: Sequence[int], *, ns: str = "default",
                metas: Sequence[dict[str, Any] | None] | None = None, t0: bool = False) -> NixlWrite:
        """Room for values, as the destination sides of NIXL WRITEs:
        T1 extents (``file``), or with ``t0`` arena extents (``dram``; the
        daemon writes them back to T1). Then ``commit``."""
        self._sweep()
        use_t0 = t0 and self.memory is not None and self.store.arena is not None
        res = self.store.reserve(keys, list(sizes), ns=ns, metas=metas, t0=use_t0)
        try:
            arena = self._arena_base() if any(it is not None and it[2] >= 0 for it in res.items) else None
            plan = plan_writes(res.items, res.sizes, self._segment_fd, arena)
        except BaseException:
            res.abort()
            raise
        wd = NixlWrite(res.keys, res.ns, plan, res, self)
        with self._lock:
            self._open.append(wd)
        return wd

    def write(self, wd: NixlWrite, addrs: Sequence[int], *, mem: str = "DRAM", dev: int = 0) -> bool:
        """Run ``wd``'s WRITEs from per-item sources (registered). False:
        NIXL failed one (then ``abort``)."""
        plan = wd.plan
        if plan.file and mem == "VRAM" and self.backend == "POSIX":
            raise InvalidArgument("device sources into T1 need the GDS or GDS_MT backend (POSIX moves DRAM)")
        self._check_registered(plan.sizes, addrs, mem, dev)
        ok = self.nixl.run("WRITE", local(plan.file_pieces, addrs, dev), mem, plan.file, "FILE", self.backend)
        ok = ok and self.nixl.run("WRITE", local(plan.dram_pieces, addrs, dev), mem, plan.dram, "DRAM",
                                  self.memory or "")
        if not ok:
            self.counters["xfer_failed"] += 1
        return ok

    def commit(self, wd: NixlWrite, sources: Sequence[Any], *, sync: bool = False) -> list[bool]:
        """Publish what was written, with the checksums of ``sources`` (the
        buffers written from: host or device). Per item: stored, or False
        (already there)."""
        if wd.done:
            raise KvfsError("this write was already committed or aborted")
        spans = [_span(s, writable=False) for s in sources]
        try:
            sums = self._source_sums(wd, spans)
            wd.done = True
            stored = wd.reservation.commit(sums, sync=sync)
        except BaseException:
            wd.abort()
            raise
        finally:
            self._closed(wd)
        self.counters["writes"] += 1
        self.counters["written_bytes"] += sum(n for n, s in zip(wd.plan.sizes, stored) if s and n > 0)
        return stored

    def _source_sums(self, wd: NixlWrite, spans: list[tuple[int, int, str, int]]) -> list[Any]:
        unit = self.store.stripe_unit
        idx = [i for i, n in enumerate(wd.plan.sizes) if n >= 0]
        sums: list[Any] = [None] * len(wd.plan.sizes)
        host = [i for i in idx if spans[i][2] == "DRAM"]
        for i, s in zip(host, self.store.reader.hash_chunked([_host_view(spans[i][0], wd.plan.sizes[i])
                                                               for i in host], unit)):
            sums[i] = [s[0], s[1]]
        dev = [i for i in idx if spans[i][2] == "VRAM"]
        if dev:
            plane = self.store._gpu_plane()
            for i, s in zip(dev, plane.hash_values([(spans[i][0], wd.plan.sizes[i]) for i in dev], unit)):
                sums[i] = [s[0], s[1]]
        for i in idx:
            item = wd.reservation.items[i]
            if item is not None and item[2] < 0 and len(sums[i][1]) != len(item[1]):
                raise KvfsError("the daemon's chunks are not its stripe unit")
        return sums

    def put_many(self, keys: Sequence[str | bytes], datas: Sequence[Any], *, ns: str = "default",
                 metas: Sequence[dict[str, Any] | None] | None = None, sync: bool = False,
                 t0: bool = False) -> list[bool]:
        """``Store.put_many`` through NIXL: reserve, WRITE (into T1 extents
        with the file backend, or with ``t0`` into the arena with the memory
        backend), commit. Per item: stored, or False (already there).
        Empty values travel inline (nothing to move)."""
        ks = normalize_keys(keys)
        if len(datas) != len(ks) or (metas is not None and len(metas) != len(ks)):
            raise InvalidArgument("keys, datas and metas must have the same length")
        spans = [_span(d, writable=False) for d in datas]
        out = [False] * len(ks)
        empty = [i for i, s in enumerate(spans) if s[1] == 0]
        if empty:
            for i, got in zip(empty, self.store.put_many([ks[i] for i in empty], [b""] * len(empty), ns=ns,
                                                         metas=None if metas is None else [metas[i] for i in empty],
                                                         sync=sync)):
                out[i] = got
        full = [i for i, s in enumerate(spans) if s[1] > 0]
        temp = self._temporary([spans[i] for i in full])
        try:
            for b in range(0, len(full), BATCH_KEYS):
                sel = full[b:b + BATCH_KEYS]
                mems = {(spans[i][2], spans[i][3]) for i in sel}
                if len(mems) > 1:
                    raise InvalidArgument("datas must all be host memory or all on one device")
                mem, dev = mems.pop()
                with self.reserve([ks[i] for i in sel], [spans[i][1] for i in sel], ns=ns,
                                  metas=None if metas is None else [metas[i] for i in sel], t0=t0) as wd:
                    if not self.write(wd, [spans[i][0] for i in sel], mem=mem, dev=dev):
                        raise KvfsError("NIXL failed a WRITE into kvfs (the put was aborted: nothing stored)")
                    for i, got in zip(sel, self.commit(wd, [datas[i] for i in sel], sync=sync)):
                        out[i] = got
        finally:
            for r in temp:
                self.deregister(r)
        return out

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Release what is still held, deregister everything, close the fds
        (and the agent's backends, if the agent is this object's own)."""
        for x in list(self._open):
            x.release() if isinstance(x, NixlRead) else x.abort()
        with self._lock:
            segs, self._segs = list(self._segs.values()), {}
            regions, self._regions = self._regions, []
            arenas = self._old_arenas + ([self._arena[2]] if self._arena is not None else [])
            self._arena, self._old_arenas = None, []
        for s in segs:
            self.nixl.deregister(s.dlist, [self.backend])
            os.close(s.fd)
        for r in regions:
            self.nixl.deregister(r.dlist, r.backends)
        for d in arenas:
            if self.memory is not None:
                self.nixl.deregister(d, [self.memory])

    def __enter__(self) -> "KvfsNixl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
