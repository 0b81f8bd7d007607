"""What every part of the client shares (kvfs.client.Store is built in
layers, each using only those below):

    StoreState    the state below (declared here, made by Store.__init__)
    Session       connections, the daemon's layout, leases (kvfs.session)
    Lookups       contains, prefix_match, stat, listings, holds (kvfs.lookups)
    HostReads     reads into host memory (kvfs.host_reads)
    DeviceReading reads into device memory (kvfs.device_reads)
    Puts          puts from host or device memory (kvfs.client_puts)
    Store         the public object: construction, admin calls (kvfs.client)

A ``Store`` is safe to share between threads: each thread gets its own
connection to the daemon.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import Connection
    from .dataplane import DataPlane
    from .directory import DirectoryReader
    from .generation import GenerationReader
    from .gpu import GpuPlane
    from .loccache import LocationCache
    from .session import ArenaMapping

BATCH_KEYS = 4096  # keys per request at most: larger batches are sent in pieces


class StoreState:
    socket_path: str
    verify: bool | str  # True, False, "header" or "full"
    gpu_reader: str
    _gpu: GpuPlane | None
    _local: threading.local  # .conn: this thread's connection
    _conns: list[Connection]
    _conns_lock: threading.Lock
    _closed: bool
    _hold_conn: Connection | None  # holds' own connection, shared under _hold_lock
    _hold_lock: threading.Lock
    put_errors: int  # puts sent with wait=False that the daemon refused
    reader: DataPlane
    _touch_lock: threading.Lock
    _touches: dict[str, list[str]]  # cache hits not yet reported to the daemon
    _n_touches: int
    _touched_at: float
    cache_locations: bool
    arena: ArenaMapping | None
    _dir: DirectoryReader | None
    _gen: GenerationReader | None
    _locs: LocationCache | None
    # the daemon's layout (Session._adopt)
    stripes: list[str]
    stripe_unit: int
    daemon_pid: int
    _instance: str | None
    _fd_gen: int
    _epoch: int
    remote_tier: dict[str, Any] | None = None  # the daemon's shared tier, if it has one
    _fetch: dict[str, bool] = {}  # {"fetch": True} with a shared tier: a get's lookup reads misses through
    right: str | None  # read, write or admin (kvfsd.access)
