"""What a NIXL agent knows of kvfs, kept in step (for kvfs.integrations.nixl).

- ``NixlAgent``: the agent as kvfs drives it: every call under one lock
  (a caller's agent may be in NIXL_THREAD_SYNC_NONE mode), released between
  polls; ``run`` is one loopback transfer polled to its end (NIXL's POSIX
  backend moves bytes only while polled).
- ``Registry``: the memory and files registered with it.

Invariants kept by ``Registry``:
- A segment file is opened and registered (``FILE``: ``(0, 0, fd, "")``) the
  first time a descriptor names it, and its fd stays open while it is
  registered. Callers hold a lease (reads) or a reservation (writes) on a
  segment before they ask for its fd, so it is not unlinked meanwhile.
- A segment is deregistered and closed only once it was retired (unlinked
  by compaction or eviction: its fd's link count is 0) and no open
  descriptor list names it. Every unlink follows a move of the removal
  generation, so all registered segments are checked when it moved; those
  of a list are checked again when the list is released (its lease may
  have been what kept them).
- The arena is registered once with the memory backend; a restarted
  daemon's new arena (a new mapping in the store) replaces it, and the old
  registration is dropped at ``close`` (views of it may still be in use).
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from kvfs import Store
from kvfs.errors import InvalidArgument, KvfsError
from kvfs.format import segment_name
from kvfs.gpu import address_of

from .nixl_plan import Plan, merge_spans

log = logging.getLogger("kvfs.integrations.nixl")

SPIN_POLLS = 200  # polls before a wait starts to sleep (a small transfer is done by then)
MAX_NAP = 200e-6
STAGE_BYTES = 64 << 20  # the bounce buffer between the file backend and device memory, when one is needed


class NixlAgent:
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
        import numpy as np
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


class _Planned(Protocol):
    plan: Plan


@dataclass
class _Segment:
    fd: int
    dlist: Any


@dataclass
class Region:
    """Memory registered with the agent (``KvfsNixl.register``)."""
    start: int
    end: int
    mem: str
    dev: int
    dlist: Any
    backends: list[str]


class Registry:
    def __init__(self, store: Store, nixl: NixlAgent, backend: str, memory: str | None,
                 counters: dict[str, int]) -> None:
        self.store, self.nixl, self.backend, self.memory, self.counters = store, nixl, backend, memory, counters
        self._lock = threading.Lock()
        self._segs: dict[int, _Segment] = {}
        self._regions: list[Region] = []
        self._arena: tuple[Any, int, Any] | None = None  # (the store's arena object, address, registration)
        self._old_arenas: list[Any] = []
        self._open: list[_Planned] = []  # descriptor lists not released: their segments stay registered
        self._gen = -2
        self._writable = store.right in (None, "write", "admin")
        self._stage: tuple[Any, int] | None = None
        self.stage_lock = threading.Lock()

    # -------------------------------------------------------------- memory
    def backends_for(self, mem: str) -> list[str]:
        """The backends that move ``mem`` (POSIX moves DRAM and files only)."""
        return [b for b in (self.backend, self.memory) if b is not None and not (mem == "VRAM" and b == "POSIX")]

    def register_span(self, addr: int, n: int, mem: str, dev: int) -> Region:
        if n <= 0:
            raise InvalidArgument("nothing to register: an empty buffer")
        backends = self.backends_for(mem)
        if not backends:
            raise InvalidArgument(f"no backend here moves {mem} (file backend {self.backend}, memory {self.memory})")
        region = Region(addr, addr + n, mem, dev, self.nixl.register([(addr, n, dev, "")], mem, backends), backends)
        with self._lock:
            self._regions.append(region)
        return region

    def deregister(self, region: Region) -> None:
        with self._lock:
            if region not in self._regions:
                return
            self._regions.remove(region)
        self.nixl.deregister(region.dlist, region.backends)

    def covered(self, addr: int, n: int, mem: str, dev: int) -> bool:
        with self._lock:
            return any(r.mem == mem and r.dev == dev and r.start <= addr and addr + n <= r.end for r in self._regions)

    def check_registered(self, sizes: Sequence[int], addrs: Sequence[int], mem: str, dev: int) -> None:
        """NIXL moves only registered memory: a caller's mistake is an
        error here, not a failed transfer counted against the blocks."""
        for n, a in zip(sizes, addrs):
            if n > 0 and not self.covered(a, n, mem, dev):
                raise InvalidArgument(f"{mem} at {a:#x} ({n} bytes) is not registered: KvfsNixl.register it first")

    def temporary(self, spans: Sequence[tuple[int, int, str, int]]) -> list[Region]:
        """Register what of ``spans`` no region covers yet (merged), for one call."""
        todo: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for addr, n, mem, dev in spans:
            if n and not self.covered(addr, n, mem, dev):
                todo.setdefault((mem, dev), []).append((addr, n))
        out = []
        for (mem, dev), group in todo.items():
            for addr, n in merge_spans(group):
                out.append(self.register_span(addr, n, mem, dev))
                self.counters["temp_registrations"] += 1
        return out

    def stage(self, device: bool) -> tuple[int, int]:
        """(address, bytes) of the bounce buffer, registered DRAM with the
        backends: pinned when it serves device memory (made on first use,
        so pinned only if the first use is for device memory). Callers
        hold ``stage_lock`` while they use it."""
        if self._stage is None:
            buf: Any = None
            if device:
                buf = self.store._gpu_plane().copier.pinned(STAGE_BYTES)
            else:
                buf = memoryview(mmap.mmap(-1, STAGE_BYTES))
            addr = address_of(buf)
            self.register_span(addr, STAGE_BYTES, "DRAM", 0)
            self._stage = (buf, addr)
        return self._stage[1], STAGE_BYTES

    # ------------------------------------------------------------ segments
    def segment_fd(self, stripe: int, seg: int) -> int:
        """The registered fd of a segment file (opened on first use)."""
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
            extra = s is not None  # another thread registered it meanwhile
            if s is None:
                s = self._segs[seg] = _Segment(fd, dlist)
                self.counters["segments_registered"] += 1
        if extra:
            self.nixl.deregister(dlist, [self.backend])
            os.close(fd)
        return s.fd

    def opened(self, x: _Planned) -> None:
        with self._lock:
            self._open.append(x)

    def closed(self, x: _Planned) -> None:
        """A descriptor list is done: forget it, and retire any of its
        segments that went meanwhile."""
        with self._lock:
            if x in self._open:
                self._open.remove(x)
        self.retire(x.plan.segments)

    def open_lists(self) -> list[_Planned]:
        with self._lock:
            return list(self._open)

    def sweep(self) -> None:
        """Retire what is gone, once the removal generation moved."""
        g = self.store._gen
        gen = g.value if g is not None else -1
        if gen == self._gen and gen >= 0:
            return
        self._gen = gen
        with self._lock:
            segs = set(self._segs)
        self.retire(segs)

    def retire(self, segs: set[int]) -> None:
        """Deregister and close those of ``segs`` that were unlinked and
        that no open descriptor list names."""
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

    def segments(self) -> list[int]:
        with self._lock:
            return sorted(self._segs)

    # --------------------------------------------------------------- arena
    def arena_base(self, copies: bool) -> int | None:
        """The arena's address, registered with the memory backend if there
        is one (so ``dram`` descriptors are NIXL's to use); without one it
        is still the address when kvfs does the copies (``copies``). None:
        no T0 path here."""
        arena = self.store.arena
        if arena is None:
            return None
        if self.memory is None:
            return address_of(arena.ro) if copies else None
        cur = self._arena
        if cur is not None and cur[0] is arena:
            return cur[1]
        addr = address_of(arena.ro)
        try:
            dlist = self.nixl.register([(addr, arena.size, 0, "")], "DRAM", [self.memory])
        except Exception as e:  # noqa: BLE001 - T0 through T1 then (or kvfs's copies)
            log.warning("kvfs: NIXL %s cannot register the arena (%s)", self.memory, e)
            self.memory = None
            return address_of(arena.ro) if copies else None
        with self._lock:
            if self._arena is not None:
                self._old_arenas.append(self._arena[2])
            self._arena = (arena, addr, dlist)
        return addr

    def close(self) -> None:
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
        if self.memory is not None:
            for d in arenas:
                self.nixl.deregister(d, [self.memory])
