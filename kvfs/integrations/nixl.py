"""NIXL moves kvfs's bytes (``pip install 'kvfs[nixl]'``; NIXL 1.5).

kvfs hands its objects to a NIXL agent as transfer descriptors, so NIXL's
own file backends move the bytes of blocks in the segment files (T1):
POSIX, or GDS / GDS_MT on a GPU node with GPUDirect Storage. Blocks in the
shared-memory arena (T0) are DRAM descriptors too; by default kvfs copies
those itself (``copies="kvfs"``, measured far faster than UCX), and with
``copies="nixl"`` the memory backend (UCX) moves them::

    import kvfs
    from kvfs.integrations.nixl import KvfsNixl

    kn = KvfsNixl(kvfs.connect())           # an agent of its own: POSIX (+ UCX)
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
  every call here polls until its transfers end (``NixlAgent.run``), and a
  transfer NIXL fails is retried item by item, so one bad block is one miss.
"""
from __future__ import annotations

import ctypes
import importlib
import itertools
import logging
import os
from typing import Any, Sequence, TypeVar

from kvfs import Store
from kvfs import protocol as P
from kvfs.host_reads import as_readable, as_writable
from kvfs.store_state import BATCH_KEYS
from kvfs.errors import InvalidArgument, KvfsError
from kvfs.gpu import DST, SRC, address_of, device_buffer, merge_copies
from kvfs.keys import normalize_keys, normalize_ns
from kvfs.optional import missing

from .nixl_plan import Piece, Plan, failed_items, local, plan_reads, plan_writes
from .nixl_registry import NixlAgent, Region, Registry


def _nixl_api() -> Any:
    """NIXL's Python API: ``nixl._api`` (the meta package picks the build
    for the CUDA it detects), else a build's own module directly."""
    try:
        return importlib.import_module("nixl._api")
    except ImportError as first:
        for name in ("nixl_cu13._api", "nixl_cu12._api"):
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
        raise missing("nixl", first) from None


_api = _nixl_api()
log = logging.getLogger("kvfs.integrations.nixl")

FILE_BACKENDS = ("POSIX", "GDS", "GDS_MT")
# POSIX queue modes (backend params): all four run on these machines
POSIX_MODES: dict[str, dict[str, str]] = {
    "default": {}, "uring": {"use_uring": "true"}, "aio": {"use_aio": "true"},
    "posix_aio": {"use_posix_aio": "true"}}
_names = itertools.count()
Descs = list[tuple[int, int, int]]
_D = TypeVar("_D", bound="_Descriptors")


class _Descriptors:
    """A batch's descriptor lists (what ``NixlRead`` and ``NixlWrite``
    share): ``file`` (FILE: offset, length, fd) and ``dram`` (DRAM: arena
    address, length, 0) are the kvfs sides; ``local(addrs)`` gives the
    caller's sides for per-item addresses, in the same order. Ended once
    (released, committed or aborted); ``with`` ends it."""

    def __init__(self, keys: list[str], ns: str, plan: Plan, registry: Registry) -> None:
        self.keys, self.ns, self.plan, self.registry = keys, ns, plan, registry
        self.ended = False

    @property
    def file(self) -> Descs:
        return self.plan.file

    @property
    def dram(self) -> Descs:
        return self.plan.dram

    def local(self, addrs: Sequence[int], dev: int = 0) -> tuple[Descs, Descs]:
        """(FILE's, DRAM's) caller-side descriptors for per-item addresses."""
        return local(self.plan.file_pieces, addrs, dev), local(self.plan.dram_pieces, addrs, dev)

    def _end(self) -> None:
        raise NotImplementedError

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: object) -> None:
        self._end()


class NixlRead(_Descriptors):
    """Descriptors of located blocks (the sources of READs), pinned by a
    lease until ``release``. ``sizes``: per key, -1 for a miss."""

    def __init__(self, keys: list[str], ns: str, plan: Plan, registry: Registry, hold: Any) -> None:
        super().__init__(keys, ns, plan, registry)
        self.hold = hold

    @property
    def sizes(self) -> list[int]:
        return list(self.plan.sizes)

    def release(self) -> None:
        """End the lease (at most once; never raises)."""
        if not self.ended:
            self.ended = True
            self.hold.release()
            self.registry.closed(self)

    _end = release


class NixlWrite(_Descriptors):
    """Reserved room (the destinations of WRITEs): ``file`` for T1 extents,
    ``dram`` for arena extents. ``KvfsNixl.commit`` after the transfer, or
    ``abort``."""

    def __init__(self, keys: list[str], ns: str, plan: Plan, registry: Registry, reservation: Any) -> None:
        super().__init__(keys, ns, plan, registry)
        self.reservation = reservation

    def abort(self) -> None:
        if not self.ended:
            self.ended = True
            self.reservation.abort()
            self.registry.closed(self)

    _end = abort


def _span(obj: Any, writable: bool) -> tuple[int, int, str, int]:
    """(address, bytes, NIXL memory type, device) of a buffer."""
    d = device_buffer(obj)
    if d is not None:
        if writable and d.readonly:
            raise InvalidArgument("destination device buffer is read-only")
        dv = getattr(d.owner, "device", None)
        idx = getattr(dv, "index", None)  # torch
        dev = idx if idx is not None else getattr(dv, "id", 0)  # cupy
        return d.ptr, d.nbytes, "VRAM", int(dev or 0)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr"):
        # a CPU tensor (no buffer protocol): what NIXL itself takes, by address
        if not obj.is_contiguous():
            raise InvalidArgument("tensor must be contiguous")
        return int(obj.data_ptr()), obj.numel() * obj.element_size(), "DRAM", 0
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
    means ``dram`` descriptors cannot be handed to NIXL. ``copies``: who
    moves memory-to-memory legs (arena to destination, bounce buffer to
    device memory): "kvfs" (default: its data plane on the host, the CUDA
    copy engine from the pinned arena to a GPU) or "nixl" (the memory
    backend). On the H200 machine UCX moved pinned host memory into VRAM at
    0.65-0.76 GB/s against 50 GB/s for the copy engine, and host to host at
    a third of memcpy (kvfs bench --nixl), hence the default; file bytes
    always go through the file backend. ``stage``: move file bytes through
    a registered bounce buffer (automatic where the file backend cannot
    reach the memory: POSIX and device memory; True forces it, for tests)."""

    def __init__(self, store: Store, agent: Any = None, *, backend: str = "POSIX",
                 params: dict[str, str] | None = None, memory: str | None = "UCX", copies: str = "kvfs",
                 stage: bool = False) -> None:
        if backend not in FILE_BACKENDS:
            raise InvalidArgument(f"backend is one of {', '.join(FILE_BACKENDS)}, not {backend!r}")
        if copies not in ("kvfs", "nixl"):
            raise InvalidArgument(f'copies is "kvfs" or "nixl", not {copies!r}')
        self.store = store
        if agent is None:
            # no progress thread: every call here polls its own transfers to
            # the end, and a thread per agent spinning on UCX's workers took
            # two thirds of a 2-core machine (kvfs bench --nixl, 5 agents)
            agent = _api.nixl_agent(f"kvfs-{os.getpid()}-{next(_names)}", _api.nixl_agent_config(
                enable_prog_thread=False, backends=[], sync_mode=_api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW))
        self.nixl = NixlAgent(agent)
        self.backend = backend
        if backend not in agent.backends:
            try:
                agent.create_backend(backend, dict(params or {}))
            except Exception as e:  # noqa: BLE001 - say which backend and why
                raise KvfsError(f"NIXL backend {backend} could not start here: {type(e).__name__}: {e}") from None
        mem_backend: str | None = None
        if memory is not None:
            try:
                if memory not in agent.backends:
                    agent.create_backend(memory, {})
                mem_backend = memory
            except Exception as e:  # noqa: BLE001 - T0 through T1 then
                log.warning("kvfs: NIXL memory backend %s did not start (%s): arena blocks are read from T1", memory, e)
        self.always_stage = stage
        self.copies = copies
        self.counters: dict[str, int] = {k: 0 for k in (
            "reads", "read_bytes", "file_chunks", "dram_chunks", "staged_chunks", "misses", "verify_failed",
            "xfer_failed", "writes", "written_bytes", "segments_registered", "segments_retired",
            "temp_registrations")}
        self.registry = Registry(store, self.nixl, backend, mem_backend, self.counters)

    @property
    def memory(self) -> str | None:
        """The memory backend in use (None: none; ``dram`` descriptors are
        then kvfs's to copy, and with copies="nixl" T0 blocks are read from T1)."""
        return self.registry.memory

    def register(self, buf: Any) -> Region:
        """Register ``buf`` (host or device memory) with the agent's
        backends that move it, so transfers into or out of it need no
        registration of their own. Returns what ``deregister`` takes."""
        addr, n, mem, dev = _span(buf, writable=False)
        return self.registry.register_span(addr, n, mem, dev)

    def deregister(self, region: Region) -> None:
        self.registry.deregister(region)

    def registered_segments(self) -> list[int]:
        """Segment ids registered with the agent now."""
        return self.registry.segments()

    def _staged(self, mem: str) -> bool:
        return self.always_stage or (mem == "VRAM" and self.backend == "POSIX")

    def _nixl_touches(self, mem: str) -> bool:
        """Whether NIXL moves bytes into or out of the caller's ``mem``
        (else only kvfs's copies do, and it needs no registration)."""
        return not self._staged(mem) or self.copies == "nixl"

    # ------------------------------------------------------------------ reads
    def descriptors(self, keys: Sequence[str | bytes], *, ns: str = "default") -> NixlRead:
        """Locate ``keys`` and pin them (a lease) until the result is
        released: its ``file`` and ``dram`` lists are the remote sides of
        NIXL READs into the caller's registered memory."""
        ns = normalize_ns(ns)
        ks = normalize_keys(keys)
        reg = self.registry
        reg.sweep()
        hold = self.store.hold(ks, ns=ns)
        try:
            arena = (reg.arena_base(self.copies == "kvfs")
                     if any(it is not None and it[4] is not None for it in hold.items) else None)
            plan = plan_reads(hold.items, reg.segment_fd, arena)
        except BaseException:
            hold.release()
            raise
        rd = NixlRead(ks, ns, plan, reg, hold)
        reg.opened(rd)
        return rd

    def read(self, rd: NixlRead, addrs: Sequence[int], *, mem: str = "DRAM", dev: int = 0) -> list[int]:
        """Run ``rd``'s READs into per-item destinations (registered ``mem``
        addresses, each with room for its item) and verify what arrived.
        Returns sizes; -1: a miss, or a block that failed (reported to the
        daemon; ``get_many_into`` looks those up once more)."""
        if len(addrs) != len(rd.keys):
            raise InvalidArgument("one destination address per key")
        plan = rd.plan
        staged = self._staged(mem)
        self._check(plan, addrs, mem, dev, staged)
        if staged:
            bad = self._through_stage("READ", plan.file_pieces, plan.file, addrs, mem, dev)
        else:
            bad = self._move("READ", local(plan.file_pieces, addrs, dev), mem, plan.file_pieces, plan.file, "FILE",
                             self.backend)
        check = plan.pieces()
        if self.copies == "nixl":
            bad |= self._move("READ", local(plan.dram_pieces, addrs, dev), mem, plan.dram_pieces, plan.dram, "DRAM",
                              self.memory or "")
        elif plan.dram_pieces:
            sums = [p.checksum for p in plan.dram_pieces] if self.store.verify and mem == "DRAM" else None
            copied_bad = self._copy(plan.dram_pieces, [addrs[p.item] + p.pos for p in plan.dram_pieces],
                                    [a for a, _n, _d in plan.dram], mem, "DRAM", sums)
            bad |= copied_bad
            if sums is not None:
                check = plan.file_pieces  # checked as they were copied
                self.counters["verify_failed"] += len(copied_bad)
        if self.store.verify:
            bad |= self._verify(check, addrs, mem, bad)
        sizes = list(plan.sizes)
        for i in bad:
            sizes[i] = -1
        self.counters["reads"] += 1
        self.counters["file_chunks"] += len(plan.file)
        self.counters["dram_chunks"] += len(plan.dram)
        self.counters["read_bytes"] += sum(s for s in sizes if s > 0)
        self._report_bad(rd, bad)
        return sizes

    def _check(self, plan: Plan, addrs: Sequence[int], mem: str, dev: int, staged: bool) -> None:
        """The caller's memory must be registered where NIXL touches it:
        file pieces moved straight there, or any leg NIXL's memory backend
        moves."""
        if (plan.file and not staged) or (self.copies == "nixl" and plan.pieces()):
            self.registry.check_registered(plan.sizes, addrs, mem, dev)

    def _copy(self, pieces: Sequence[Piece], dsts: list[int], srcs: list[int], dst_mem: str, src_mem: str,
              sums: list[bytes] | None) -> set[int]:
        """Memory-to-memory legs by kvfs itself: the data plane between host
        buffers (verifying as it copies, with ``sums``), the CUDA copy
        engine to or from device memory (the arena and the stage are
        pinned). Returns the items that failed their checksums."""
        if not pieces:
            return set()
        if dst_mem == "DRAM" and src_mem == "DRAM":
            good = self.store.reader.copy([_host_view(d, p.length) for d, p in zip(dsts, pieces)],
                                          [_host_view(s_, p.length) for s_, p in zip(srcs, pieces)],
                                          sums if sums is not None else [None] * len(pieces))
            return failed_items(pieces, good)
        gpu = self.store._gpu_plane()
        arena = self.store.arena
        if arena is not None:
            gpu.arena_address(arena)  # pinned once, so the copy engine moves it at full speed
        issue = gpu.copier.h2d if dst_mem == "VRAM" else gpu.copier.d2h
        for d, s_, n in merge_copies([(d, s_, p.length) for d, s_, p in zip(dsts, srcs, pieces)],
                                     gpu.copier.allocation, DST if dst_mem == "VRAM" else SRC):
            issue(d, s_, n)
        gpu.copier.sync()
        return set()

    def _move(self, op: str, mine: Descs, mem: str, pieces: Sequence[Piece], remote: Descs, remote_mem: str,
              backend: str) -> set[int]:
        """One transfer of ``pieces`` (local sides ``mine``); if NIXL fails
        it, one per item, so a failure costs only the items it is in.
        Returns the failed items."""
        if not pieces:
            return set()
        if self.nixl.run(op, mine, mem, remote, remote_mem, backend):
            return set()
        self.counters["xfer_failed"] += 1
        by_item: dict[int, list[int]] = {}
        for j, p in enumerate(pieces):
            by_item.setdefault(p.item, []).append(j)
        return {item for item, js in by_item.items()
                if not self.nixl.run(op, [mine[j] for j in js], mem, [remote[j] for j in js], remote_mem, backend)}

    def _through_stage(self, op: str, pieces: list[Piece], files: Descs, addrs: Sequence[int], mem: str,
                       dev: int) -> set[int]:
        """File bytes between the file backend and memory it cannot reach
        (POSIX and device memory), through the registered bounce buffer:
        file -> stage -> memory for READ, the reverse for WRITE, in groups
        that fit the stage."""
        if not pieces:
            return set()
        if self.memory is None and self.copies == "nixl":
            raise InvalidArgument(f"{self.backend} cannot move device memory and no memory backend is here: "
                                  "use GDS/GDS_MT, or copies='kvfs'")
        bad: set[int] = set()
        with self.registry.stage_lock:
            base, room = self.registry.stage(mem == "VRAM")
            j = 0
            while j < len(pieces):
                k, used = j, 0
                while k < len(pieces) and (k == j or used + pieces[k].length <= room):
                    used += pieces[k].length
                    k += 1
                if used > room:
                    raise InvalidArgument(f"a chunk of {used} bytes does not fit the {room}-byte stage")
                group = pieces[j:k]
                at = list(itertools.accumulate([0] + [p.length for p in group[:-1]]))
                staged = [(base + a, p.length, 0) for a, p in zip(at, group)]
                theirs = [(addrs[p.item] + p.pos, p.length, dev) for p in group]

                def file_leg() -> set[int]:
                    return self._move(op, staged, "DRAM", group, files[j:k], "FILE", self.backend)

                def memory_leg() -> set[int]:
                    if self.copies == "nixl":
                        return self._move(op, theirs, mem, group, staged, "DRAM", self.memory or "")
                    there, here = [t[0] for t in theirs], [t[0] for t in staged]
                    if op == "READ":
                        return self._copy(group, there, here, mem, "DRAM", None)
                    return self._copy(group, here, there, "DRAM", mem, None)
                for leg in ((file_leg, memory_leg) if op == "READ" else (memory_leg, file_leg)):
                    bad |= leg()
                self.counters["staged_chunks"] += len(group)
                j = k
        return bad

    def _verify(self, pieces: list[Piece], addrs: Sequence[int], mem: str, skip: set[int]) -> set[int]:
        todo = [p for p in pieces if p.item not in skip]
        if not todo:
            return set()
        if mem == "DRAM":
            sums = self.store.reader.hash_many([_host_view(addrs[p.item] + p.pos, p.length) for p in todo])
            bad = failed_items(todo, [s == p.checksum for s, p in zip(sums, todo)])
        else:
            bad = self.store._gpu_plane().verify_ranges([(p.item, addrs[p.item] + p.pos, p.length, p.checksum)
                                                         for p in todo])
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
        (host, or device memory); sizes, -1 for a miss. Buffers that are
        not registered are, for the call."""
        ks = normalize_keys(keys)
        if len(outs) != len(ks):
            raise InvalidArgument("keys and outs must have the same length")
        spans = [_span(o, writable=True) for o in outs]
        mems = {(m, d) for _a, _n, m, d in spans}
        if len(mems) > 1:
            raise InvalidArgument("outs must all be host memory or all on one device")
        mem, dev = mems.pop() if mems else ("DRAM", 0)
        temp = self.registry.temporary(spans) if self._nixl_touches(mem) else []
        try:
            out: list[int] = []
            for b in range(0, len(ks), BATCH_KEYS):
                out += self._get_batch(ks[b:b + BATCH_KEYS], spans[b:b + BATCH_KEYS], ns, mem, dev)
            return out
        finally:
            for r in temp:
                self.registry.deregister(r)

    def _get_batch(self, ks: list[str], spans: list[tuple[int, int, str, int]], ns: str, mem: str,
                   dev: int) -> list[int]:
        sizes = [-1] * len(ks)
        todo = list(range(len(ks)))
        for attempt in range(2):
            if not todo:
                break
            with self.descriptors([ks[i] for i in todo], ns=ns) as rd:
                found = rd.plan.sizes
                for j, i in enumerate(todo):
                    if found[j] > spans[i][1]:
                        raise InvalidArgument(f"buffer of {spans[i][1]} bytes is too small for {ns}/{ks[i]} "
                                              f"({found[j]} bytes)")
                got = self.read(rd, [spans[i][0] for i in todo], mem=mem, dev=dev)
            if attempt == 0:
                self.counters["misses"] += sum(1 for n in found if n < 0)
            for j, i in enumerate(todo):
                sizes[i] = got[j]
            # failed (and reported): looked up once more, another copy may serve it
            todo = [i for j, i in enumerate(todo) if got[j] < 0 <= found[j]]
        return sizes

    # ----------------------------------------------------------------- writes
    def reserve(self, keys: Sequence[str | bytes], sizes: Sequence[int], *, ns: str = "default",
                metas: Sequence[dict[str, Any] | None] | None = None, t0: bool = False) -> NixlWrite:
        """Room for values, as the destination sides of NIXL WRITEs: T1
        extents (``file``), or with ``t0`` arena extents (``dram``; the
        daemon writes those back to T1). Then ``write`` and ``commit``."""
        reg = self.registry
        reg.sweep()
        use_t0 = t0 and (self.memory is not None or self.copies == "kvfs") and self.store.arena is not None
        res = self.store.reserve(keys, list(sizes), ns=ns, metas=metas, t0=use_t0)
        try:
            arena = (reg.arena_base(self.copies == "kvfs")
                     if any(it is not None and it[2] >= 0 for it in res.items) else None)
            plan = plan_writes(res.items, res.sizes, reg.segment_fd, arena)
        except BaseException:
            res.abort()
            raise
        wd = NixlWrite(res.keys, res.ns, plan, reg, res)
        reg.opened(wd)
        return wd

    def write(self, wd: NixlWrite, addrs: Sequence[int], *, mem: str = "DRAM", dev: int = 0) -> bool:
        """Run ``wd``'s WRITEs from per-item sources (registered). False:
        NIXL failed one (then ``abort``)."""
        plan = wd.plan
        staged = self._staged(mem)
        self._check(plan, addrs, mem, dev, staged)
        if staged:
            bad = self._through_stage("WRITE", plan.file_pieces, plan.file, addrs, mem, dev)
        else:
            bad = self._move("WRITE", local(plan.file_pieces, addrs, dev), mem, plan.file_pieces, plan.file,
                             "FILE", self.backend)
        if self.copies == "nixl":
            bad |= self._move("WRITE", local(plan.dram_pieces, addrs, dev), mem, plan.dram_pieces, plan.dram,
                              "DRAM", self.memory or "")
        elif plan.dram_pieces:
            if self.store.arena is None or not self.store.arena.writable:
                raise KvfsError("the daemon gave arena extents to a client that cannot write the arena")
            bad |= self._copy(plan.dram_pieces, [a for a, _n, _d in plan.dram],
                              [addrs[p.item] + p.pos for p in plan.dram_pieces], "DRAM", mem, None)
        return not bad

    def commit(self, wd: NixlWrite, sources: Sequence[Any], *, sync: bool = False) -> list[bool]:
        """Publish what was written, with the checksums of ``sources`` (the
        buffers written from: host or device). Per item: stored, or False
        (already there)."""
        if wd.ended:
            raise KvfsError("this write was already committed or aborted")
        try:
            sums = self._source_sums(wd, [_span(s, writable=False) for s in sources])
        except BaseException:
            wd.abort()
            raise
        wd.ended = True
        try:
            stored = wd.reservation.commit(sums, sync=sync)  # a failed commit: the daemon dropped the put
        finally:
            self.registry.closed(wd)
        self.counters["writes"] += 1
        self.counters["written_bytes"] += sum(n for n, s in zip(wd.plan.sizes, stored) if s and n > 0)
        return stored

    def _source_sums(self, wd: NixlWrite, spans: list[tuple[int, int, str, int]]) -> list[Any]:
        unit = self.store.stripe_unit
        sizes = wd.plan.sizes
        sums: list[Any] = [None] * len(sizes)
        host = [i for i, n in enumerate(sizes) if n >= 0 and spans[i][2] == "DRAM"]
        for i, (w, cs) in zip(host, self.store.reader.hash_chunked([_host_view(spans[i][0], sizes[i]) for i in host],
                                                                   unit)):
            sums[i] = [w, cs]
        dev = [i for i, n in enumerate(sizes) if n >= 0 and spans[i][2] == "VRAM"]
        if dev:
            got = self.store._gpu_plane().hash_values([(spans[i][0], sizes[i]) for i in dev], unit)
            for i, (w, cs) in zip(dev, got):
                sums[i] = [w, cs]
        for i, item in enumerate(wd.reservation.items):
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
            got = self.store.put_many([ks[i] for i in empty], [b""] * len(empty), ns=ns, sync=sync,
                                      metas=None if metas is None else [metas[i] for i in empty])
            for i, g in zip(empty, got):
                out[i] = g
        full = [i for i, s in enumerate(spans) if s[1] > 0]
        temp = self.registry.temporary([spans[i] for i in full if self._nixl_touches(spans[i][2])])
        try:
            for b in range(0, len(full), BATCH_KEYS):
                sel = full[b:b + BATCH_KEYS]
                mems = {(spans[i][2], spans[i][3]) for i in sel}
                if len(mems) > 1:
                    raise InvalidArgument("datas must all be host memory or all on one device")
                mem, dev = mems.pop()
                with self.reserve([ks[i] for i in sel], [spans[i][1] for i in sel], ns=ns, t0=t0,
                                  metas=None if metas is None else [metas[i] for i in sel]) as wd:
                    if not self.write(wd, [spans[i][0] for i in sel], mem=mem, dev=dev):
                        self.counters["xfer_failed"] += 1
                        raise KvfsError("NIXL failed a WRITE into kvfs (the put was aborted: nothing stored)")
                    for i, g in zip(sel, self.commit(wd, [datas[i] for i in sel], sync=sync)):
                        out[i] = g
        finally:
            for r in temp:
                self.registry.deregister(r)
        return out

    def close(self) -> None:
        """Release what is still held, deregister everything and close the
        segment fds (the agent itself stays the caller's, or is dropped
        with this object)."""
        for x in self.registry.open_lists():
            if isinstance(x, NixlRead):
                x.release()
            elif isinstance(x, NixlWrite):
                x.abort()
        self.registry.close()

    def __enter__(self) -> "KvfsNixl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
