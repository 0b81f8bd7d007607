"""The kvfs client: control plane over the daemon's Unix socket, data plane
straight from the arena and the segment files.

``Store`` is the top of the client's layers (kvfs.store_state lists them:
session, lookups, host reads, device reads, puts); this module adds its
construction and the admin calls (delete, evict, verify, compact, stats).

A ``Store`` is safe to share between threads: each thread gets its own
connection to the daemon (requests on one connection are answered in order,
so separate connections are what lets threads overlap).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable

from . import native
from . import protocol as P
from .client_puts import Puts
from .connection import Connection, default_socket_path
from .dataplane import DataPlane
from .directory import DirectoryReader
from .errors import InvalidArgument, KvfsError
from .generation import GenerationReader
from .gpu import GpuPlane
from .keys import normalize_key, normalize_keys, normalize_ns
from .loccache import LocationCache
from .session import ArenaMapping
from .store_state import BATCH_KEYS

log = logging.getLogger("kvfs")


class Store(Puts):
    """A connection to the kvfs daemon. See ``kvfs.connect``."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    """A connection to the kvfs daemon. See ``kvfs.connect``."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, verify: bool | str = True,
                 threads: int = 8, cache_locations: bool = True, gpu_reader: str = "auto"):
        self.socket_path = str(socket) if socket is not None else default_socket_path()
        if verify not in (True, False, "header", "full"):
            raise InvalidArgument('verify is True, False, "header" or "full"')
        if gpu_reader not in ("auto", "kvikio", "staging"):
            raise InvalidArgument('gpu_reader is "auto", "kvikio" or "staging"')
        self.verify = verify
        self.gpu_reader = gpu_reader
        self._gpu: GpuPlane | None = None
        self._local = threading.local()
        self._conns: list[Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        # Holds (Store.hold) live on a connection of their own, shared by all
        # threads under this lock: a lease belongs to the connection that
        # took it, and a hold may be released from another thread.
        self._hold_conn: Connection | None = None
        self._hold_lock = threading.Lock()
        self.put_errors = 0  # puts sent with wait=False that the daemon refused
        self.reader = DataPlane(threads)
        self._touch_lock = threading.Lock()
        self._touches: dict[str, list[str]] = {}  # cache hits not yet reported to the daemon
        self._n_touches = 0
        self._touched_at = time.monotonic()
        self.cache_locations = cache_locations
        self.arena: ArenaMapping | None = None
        self._dir: DirectoryReader | None = None
        self._gen: GenerationReader | None = None
        self._locs: LocationCache | None = None
        self._adopt(self._conn().call(P.HELLO, {"version": P.PROTOCOL_VERSION}))

    def capabilities(self) -> dict[str, Any]:
        """What this client can do here: the data-plane backend, the arena,
        CUDA, kvikio and whether it runs true GDS or its compatibility mode,
        and whether the arena is pinned yet. Imports CUDA libraries only if
        they are installed; pins nothing (see ``pin_arena``)."""
        caps: dict[str, Any] = {"right": self.right, "native": native.name, "arena": self.arena is not None,
                                "cuda": False,
                                "gpu_reader": self.gpu_reader, "verify": self.verify}
        try:
            import cupy
            caps["cuda"] = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:  # noqa: BLE001 - not installed, no driver, no device
            return caps
        if caps["cuda"]:
            caps.update(self._gpu_plane().capabilities())
        return caps

    def pin_arena(self) -> bool:
        """Register the T0 arena with CUDA now (the first device transfer
        does it otherwise, and an inference server would rather pay that
        at start than on its first request). False: no arena, or CUDA
        refused, or no CUDA here."""
        if self.arena is None:
            return False
        try:
            plane = self._gpu_plane()
        except KvfsError:  # no CuPy here: nothing to pin for
            return False
        plane.arena_address(self.arena)
        return plane.arena_pinned()  # (capabilities() would also build the hashing kernels)

    def delete(self, keys: Iterable[str | bytes] | str | bytes, *, ns: str = "default") -> int:
        ks = [normalize_key(keys)] if isinstance(keys, (str, bytes)) else normalize_keys(keys)
        ns = normalize_ns(ns)
        return sum(self._call(P.DELETE, {"ns": ns, "keys": ks[i:i + BATCH_KEYS]})
                   for i in range(0, len(ks), BATCH_KEYS))

    def evict(self, to: int, *, ns: str | None = None) -> dict[str, Any]:
        """Evict least recently used objects (of ``ns``, else of the whole
        store) until their values total at most ``to`` bytes; objects in use
        (leased, or not yet written back from T0) stay. Returns what was
        done: objects, bytes_before/after, reached, skipped_in_use,
        disk_before/after."""
        return dict(self._call(P.EVICT, {"to": int(to), "ns": None if ns is None else normalize_ns(ns)}))

    def verify_store(self, *, deep: bool = False, repair: bool = False,
               progress: Callable[[str, int, int], None] | None = None, poll: float = 0.2) -> dict[str, Any]:
        """Reconcile the daemon's index and segments both ways (see ``kvfs
        verify``) while it serves; ``deep`` hashes every payload, ``repair``
        drops broken objects and stores orphans again. The daemon runs it as
        a job; ``progress(phase, done, total)`` is called as it goes.
        Returns the report."""
        jid = self._call(P.VERIFY, {"deep": deep, "repair": repair})["job"]
        return self._wait_job(jid, progress, poll)

    def compact(self, *, threshold: float | None = None, stripe: str | None = None,
                progress: Callable[[str, int, int], None] | None = None, poll: float = 0.2) -> dict[str, Any]:
        """Compact sealed segments at least ``threshold`` dead (default: the
        daemon's setting), of one stripe directory or all, while the daemon
        serves (see ``kvfs compact``). Returns what it did."""
        jid = self._call(P.COMPACT, {"threshold": threshold, "stripe": stripe})["job"]
        return self._wait_job(jid, progress, poll)

    def gc_remote(self, older_than: float, *, dry_run: bool = False,
                  progress: Callable[[str, int, int], None] | None = None, poll: float = 0.2) -> dict[str, Any]:
        """Remove shared-tier objects (and their presence records) not
        accessed for ``older_than`` seconds (see ``kvfs gc --remote``).
        Returns what it removed (``dry_run``: what it would)."""
        jid = self._call(P.GC_REMOTE, {"older_than": older_than, "dry_run": dry_run})["job"]
        return self._wait_job(jid, progress, poll)

    def stats(self) -> dict[str, Any]:
        return dict(self._call(P.STATS, {}))

    def report(self, ns: str, counters: dict[str, int]) -> bool:
        """Add an engine adapter's counters (lookups, hit tokens, blocks
        loaded, ...: growth since its last report) to what the daemon shows
        for ``ns`` in ``kvfs stats``."""
        return bool(self._call(P.REPORT, {"ns": normalize_ns(ns), "counters": dict(counters)}))


def connect(socket: str | os.PathLike[str] | None = None, *, verify: bool | str = True, threads: int = 8,
            cache_locations: bool = True, gpu_reader: str = "auto") -> Store:
    """Connect to the kvfs daemon at ``socket`` ($KVFS_SOCKET, else
    $KVFS_ROOT/kvfs.sock, else ~/.kvfs/kvfs.sock). ``verify=False`` skips
    checksum verification of reads (faster; trusts the disk). Host reads
    verify every byte unless ``verify=False``; reads into device memory
    check each T1 record's header by default and every byte with
    ``verify="full"`` (see kvfs.gpu). ``gpu_reader`` picks how T1 reaches
    device memory: kvikio when importable ("auto"), always kvikio, or
    pinned staging through the native data plane ("staging").
    ``cache_locations`` lets repeated gets skip the daemon round trip (see
    kvfs.loccache; removals are still seen at once)."""
    return Store(socket, verify=verify, threads=threads, cache_locations=cache_locations, gpu_reader=gpu_reader)
