"""The kvfs client: control plane over the daemon's Unix socket, data plane
straight from the segment files.

A ``Store`` is safe to share between threads: each thread gets its own
connection to the daemon (requests on one connection are answered in order,
so separate connections are what lets threads overlap).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import xxhash

from . import native
from . import protocol as P
from .dataplane import DataPlane, ReadTask, WriteTask
from .errors import (CapacityError, DaemonUnavailable, InvalidArgument, InvalidKey, KvfsError, NotFound,
                     PermissionDenied, ProtocolError)
from .keys import normalize_key, normalize_keys, normalize_ns
from .optional import missing
from .format import segment_name
from .directory import ABSENT as DIR_ABSENT
from .directory import PRESENT as DIR_PRESENT
from .directory import SLOW as DIR_SLOW
from .directory import UNKNOWN as DIR_UNKNOWN
from .directory import DirectoryReader
from .generation import EPOCH, GenerationReader
from .gpu import DeviceBuffer, GpuPlane, device_buffer, merge_copies
from .loccache import LocationCache
from .meta import encode_meta
from .arena_puts import RESERVE_FIRST, ArenaReservation, put_reserved
from .reservation import Reservation

log = logging.getLogger("kvfs")

BATCH_KEYS = 4096
# puts sent with wait=False whose answers a connection reads later, at most
# (each a batch): past that the oldest answer is waited for
MAX_DEFERRED = 64
# Without T0, values at least this large are written by the client straight
# into the T1 extents the daemon reserves (alloc/commit); smaller ones travel
# inline. With T0, every batch goes through the arena except a single value
# smaller than T0_INLINE_MAX (one round trip beats two for tiny values).
DIRECT_MIN = 256 * 1024
# device puts the GPU does not hash (unaligned or tiny sources) are hashed on
# the host in groups of about this many bytes, each as soon as its copies
# land (one thread per group; a value is one pass)
HASH_GROUP = 8 << 20
T0_INLINE_MAX = 64 * 1024
# device puts run as pipelined sub-batches of about this many bytes (see _put_direct):
# large enough that the GPU hashes several large values at once (a value's
# whole-value sum is one sequential chain), small enough to overlap
DEVICE_SUB_BATCH = 256 << 20


def _sub_batches(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) index ranges of at most ``limit`` bytes each (at
    least one item; ``limit`` 0: one range)."""
    if not limit:
        return [(0, len(sizes))]
    out: list[tuple[int, int]] = []
    a, acc = 0, 0
    for i, n in enumerate(sizes):
        if i > a and acc + n > limit:
            out.append((a, i))
            a, acc = i, 0
        acc += n
    if a < len(sizes):
        out.append((a, len(sizes)))
    return out


class _Arena:
    """The client's mapping of the daemon's shared-memory arena (T0):
    read-write for a client that may put, read-only for a reader (the
    daemon's ACL on the file grants it no more)."""

    def __init__(self, path: str, size: int, writable: bool = True):
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        self.path = path
        self.size = size
        self.writable = writable
        self.rw = memoryview(self.mm)  # read-only itself for a reader: puts never reach it (alloc is refused)
        self.ro = self.rw.toreadonly()


def default_socket_path() -> str:
    env = os.environ.get("KVFS_SOCKET")
    if env:
        return env
    root = os.environ.get("KVFS_ROOT") or str(Path.home() / ".kvfs")
    return str(Path(root) / "kvfs.sock")


@dataclass(frozen=True)
class ObjectInfo:
    ns: str
    key: str
    size: int
    checksum: str  # xxh3-128 hex of the whole value
    meta: dict[str, Any] | None
    tier: str
    extents: list[tuple[str, int, int]]  # (segment path, payload offset, length)
    created: float
    last_access: float


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


@dataclass
class _Landed:
    """A put's source already copied into its arena extent (from a device),
    and its checksums, taken from that copy as it landed."""
    view: memoryview
    n_chunks: int
    sums: list[Any] = field(default_factory=list)  # [object sum, [chunk sums]]

    def __len__(self) -> int:
        return len(self.view)


@dataclass
class _ReadPlan:
    reads: list[ReadTask] = field(default_factory=list)  # T1 chunks
    rown: list[int] = field(default_factory=list)  # item index of each read
    cdst: list[memoryview] = field(default_factory=list)  # T0 chunk copies
    csrc: list[memoryview] = field(default_factory=list)
    csum: list[bytes | None] = field(default_factory=list)
    cown: list[int] = field(default_factory=list)


class _Connection:
    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except PermissionError:
            self.sock.close()
            raise PermissionDenied(f"uid {os.getuid()} may not connect to {path}: a kvfs daemon admits only its "
                                   f"own user, root, and those its --allow-uid/--allow-gid name") from None
        except OSError as e:
            self.sock.close()
            raise DaemonUnavailable(path, e.strerror or str(e)) from None
        self.next_id = 1
        self.broken = False
        self.answered = 0  # replies received: a connection that worked, then broke, was cut (a restart)
        self.reservation: ArenaReservation | None = None  # arena space this connection places puts in
        self.reserve_next = RESERVE_FIRST  # the size of its next reservation (kvfs.arena_puts)
        self.deferred: deque[tuple[int, Callable[[Any, BaseException | None], None]]] = deque()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            k = self.sock.recv_into(view[pos:])
            if k == 0:
                raise ConnectionResetError("daemon closed the connection")
            pos += k
        return bytes(buf)

    def call(self, op: str, args: dict[str, Any], trailer: Sequence[memoryview] = ()) -> Any:
        if self.deferred:
            self.drain()  # answers come in order: theirs first
        if self.broken:
            raise DaemonUnavailable(self.path, "connection lost")
        req_id = self.next_id
        self.next_id += 1
        tlen = sum(len(t) for t in trailer)
        frame = P.request(req_id, op, args, tlen)
        try:
            if tlen and tlen < 65536:
                self.sock.sendall(frame + b"".join(bytes(t) for t in trailer))
            else:
                self.sock.sendall(frame)
                for t in trailer:
                    if len(t):
                        self.sock.sendall(t)
            mlen, _ = P.parse_prefix(self._recv_exact(P.PREFIX.size))
            body = self._recv_exact(mlen)
        except OSError as e:
            self.broken = True
            raise DaemonUnavailable(self.path, f"connection lost: {e}") from None
        rid, result = P.parse_reply(body)
        if rid != req_id:
            self.broken = True
            raise ProtocolError(f"reply to request {rid}, expected {req_id}")
        self.answered += 1
        return result

    def defer(self, op: str, args: dict[str, Any], on_reply: Callable[[Any, BaseException | None], None]) -> None:
        """Send a request and go on: its answer is read by the next call on
        this connection (or ``drain``) and handed to ``on_reply(result,
        error)``. At most MAX_DEFERRED wait: past that the oldest is read
        first (backpressure)."""
        if self.broken:
            raise DaemonUnavailable(self.path, "connection lost")
        while len(self.deferred) >= MAX_DEFERRED:
            self.drain(1)
        req_id = self.next_id
        self.next_id += 1
        try:
            self.sock.sendall(P.request(req_id, op, args))
        except OSError as e:
            self.broken = True
            raise DaemonUnavailable(self.path, f"connection lost: {e}") from None
        self.deferred.append((req_id, on_reply))

    def drain(self, n: int | None = None) -> None:
        """Read the answers of deferred requests (all, or the ``n`` oldest)
        and hand them over. A lost connection fails every one still waiting."""
        while self.deferred and (n is None or n > 0):
            req_id, on_reply = self.deferred.popleft()
            if n is not None:
                n -= 1
            try:
                if self.broken:
                    raise DaemonUnavailable(self.path, "connection lost")
                mlen, _ = P.parse_prefix(self._recv_exact(P.PREFIX.size))
                body = self._recv_exact(mlen)
            except (OSError, DaemonUnavailable) as e:
                self.broken = True
                on_reply(None, e if isinstance(e, DaemonUnavailable) else DaemonUnavailable(self.path, str(e)))
                continue
            try:
                rid, result = P.parse_reply(body)
            except KvfsError as e:
                on_reply(None, e)
                continue
            if rid != req_id:
                self.broken = True
                on_reply(None, ProtocolError(f"reply to request {rid}, expected {req_id}"))
                continue
            self.answered += 1
            on_reply(result, None)

    def notify(self, op: str, args: dict[str, Any]) -> None:
        """A request with id 0: no reply (lease releases)."""
        if self.broken:
            return
        try:
            self.sock.sendall(P.request(0, op, args))
        except OSError:
            self.broken = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Hold:
    """What ``Store.hold`` returns: for each key, where its bytes are
    (``items``: the daemon's wire form, ``[size, checksum, seq, extents,
    t0?]`` with extents ``[stripe, segment, offset, length, chunk sum]``,
    or None for a miss), pinned by one lease until ``release()``."""

    def __init__(self, store: "Store", conn: _Connection, ns: str, keys: list[str],
                 items: list[list[Any] | None], lease: int):
        self.store, self._conn, self.ns, self.keys, self.items, self.lease = store, conn, ns, keys, items, lease

    @property
    def found(self) -> list[bool]:
        return [it is not None for it in self.items]

    def release(self) -> None:
        """End the lease (at most once; never raises)."""
        lease, self.lease = self.lease, 0
        if lease:
            self.store._end_hold(self._conn, lease)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Store:
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
        self._conns: list[_Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        # Holds (Store.hold) live on a connection of their own, shared by all
        # threads under this lock: a lease belongs to the connection that
        # took it, and a hold may be released from another thread.
        self._hold_conn: _Connection | None = None
        self._hold_lock = threading.Lock()
        self.put_errors = 0  # puts sent with wait=False that the daemon refused
        self.reader = DataPlane(threads)
        self._touch_lock = threading.Lock()
        self._touches: dict[str, list[str]] = {}  # cache hits not yet reported to the daemon
        self._n_touches = 0
        self._touched_at = time.monotonic()
        self.cache_locations = cache_locations
        self.arena: _Arena | None = None
        self._dir: DirectoryReader | None = None
        self._gen: GenerationReader | None = None
        self._locs: LocationCache | None = None
        self._adopt(self._conn().call(P.HELLO, {"version": P.PROTOCOL_VERSION}))

    def _adopt(self, hello: dict[str, Any]) -> None:
        """Take the daemon's layout from a hello reply (at connect, and after
        reconnecting to a restarted daemon: new arena, new generation epoch)."""
        if hello.get("version") != P.PROTOCOL_VERSION:
            raise ProtocolError(f"daemon speaks protocol {hello.get('version')}, client {P.PROTOCOL_VERSION}")
        self.stripes: list[str] = list(hello["stripes"])
        self.stripe_unit: int = int(hello["stripe_unit"])
        self.daemon_pid: int = int(hello["pid"])
        self._instance = hello.get("instance")
        if self._gen is None:
            try:
                self._gen = GenerationReader(hello["generation"])
            except (OSError, KeyError, ValueError):
                pass  # cannot map the counter: no location cache, fds kept until LRU-closed
            self._fd_gen = self._gen.value if self._gen is not None else 0
            self._locs = LocationCache(self._gen) if self.cache_locations and self._gen is not None else None
        self._epoch = self._gen.value // EPOCH if self._gen is not None else 0
        dr = hello.get("directory")
        if self._dir is not None:
            self._dir.close()  # the old daemon's
        self._dir = None
        if dr and self._gen is not None:  # directory reads need the generation (seqlock)
            try:
                self._dir = DirectoryReader(dr["path"], int(dr["slots"]), int(hello["pid"]))
            except (OSError, ValueError):
                pass  # no access: every first get asks the daemon
        ar = hello.get("arena")
        # An old mapping is just dropped, never closed: views handed out by
        # get_view may still point into it (the orphaned file stays valid).
        if self.arena is not None and self._gpu is not None:
            self._gpu.forget_arena(self.arena)
        self.arena = None
        self.right: str | None = hello.get("right")  # read, write or admin (kvfsd.access)
        if ar:
            try:
                self.arena = _Arena(ar["path"], int(ar["size"]), writable=self.right != "read")
            except (OSError, ValueError):
                pass  # no access to the arena: T1 only (see the README's trust model)

    # -- connections ----------------------------------------------------------
    def _conn(self) -> _Connection:
        if self._closed:
            raise KvfsError("store is closed")
        c: _Connection | None = getattr(self._local, "conn", None)
        if c is None or c.broken:
            if c is not None:
                c.close()
                if self._locs is not None:
                    self._locs.clear()  # the daemon went away: start from what it says now
            c = self._new_conn()
            self._local.conn = c
        return c

    def _new_conn(self) -> _Connection:
        c = _Connection(self.socket_path)
        with self._conns_lock:
            self._conns = [x for x in self._conns if not x.broken] + [c]
        if hasattr(self, "daemon_pid"):
            hello = c.call(P.HELLO, {"version": P.PROTOCOL_VERSION})
            if hello.get("instance") != self._instance:
                self._adopt(hello)  # a restarted daemon
        return c

    def _call(self, op: str, args: dict[str, Any], trailer: Sequence[memoryview] = ()) -> Any:
        conn = self._conn()
        if self._touches:
            self._flush_touches(conn)  # hits go out before anything that could evict
        try:
            return conn.call(op, args, trailer)
        except DaemonUnavailable:
            if not conn.answered or op not in P.RESENDABLE:
                raise
            # a connection that worked was cut (the daemon restarted): ask
            # once more on a new one, which is safe for these ops
            return self._conn().call(op, args, trailer)

    def close(self) -> None:
        if self._closed:
            return
        c_own: _Connection | None = getattr(self._local, "conn", None)
        if c_own is not None and c_own.deferred and not c_own.broken:
            c_own.drain()  # this thread's puts sent without waiting: their answers, before the socket goes
        self._closed = True
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self.reader.close()
        if self._gpu is not None:
            self._gpu.close()
        if self._gen is not None:
            self._gen.close()
        if self._dir is not None:
            self._dir.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------
    def put(self, key: str | bytes, data: Any, *, ns: str = "default", meta: dict[str, Any] | None = None,
            sync: bool = False, wait: bool = True) -> bool:
        """Store ``data`` under ``key``. False if the key was already there
        (objects are immutable: the existing bytes are kept). ``sync``:
        return only once it is on disk and in the index (as the daemon's
        ``sync`` durability does for every put). ``wait=False``: see
        ``put_many``."""
        return self.put_many([key], [data], ns=ns, metas=[meta], sync=sync, wait=wait)[0]

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
            # T0: the batch goes through the arena (no payload on the socket),
            # except a lone small value and empty ones
            lone_small = len(views) == 1 and len(views[0]) < T0_INLINE_MAX
            direct = [i for i, v in enumerate(views) if len(v) and (not lone_small or isinstance(v, DeviceBuffer))]
        else:
            direct = [i for i, v in enumerate(views)
                      if len(v) >= DIRECT_MIN or (len(v) and isinstance(v, DeviceBuffer))]
        dset = set(direct)
        inline = [i for i in range(len(views)) if i not in dset]
        if self.arena is not None and self.arena.writable:
            # host values go through this connection's arena reservation,
            # one message a batch; device ones (and what it cannot take) the other way
            host = [i for i in direct if not isinstance(views[i], DeviceBuffer)]
            if host:
                placed = self._put_reserved(ns, [[ks[i], len(views[i]), raw_metas[i]] for i in host],
                                            [views[i] for i in host], sync, wait or sync)
                taken = set()
                for i, p in zip(host, placed):
                    if p is not None:
                        out[i] = p
                        taken.add(i)
                direct = [i for i in direct if i not in taken]
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
            for a, b in _sub_batches([len(v) for v in views], DEVICE_SUB_BATCH if dev else 0):
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

    def _start_fill(self, allocs: list[Any], views: list[Any], arena: "_Arena | None") -> Callable[[], list[Any]]:
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

    def _device_or_host(self, data: Any) -> Any:
        dev = device_buffer(data)
        return dev if dev is not None else as_readable(data)

    def _gpu_plane(self) -> GpuPlane:
        if self._gpu is None:
            try:
                plane = GpuPlane(self.reader, use_kvikio=self.gpu_reader != "staging")
            except ImportError as e:
                raise missing("cupy", e) from None
            if self.gpu_reader == "kvikio" and plane.kvikio is None:
                raise missing("kvikio")
            self._gpu = plane
        return self._gpu

    def _start_device_sources(self, allocs: list[Any], views: list[Any], arena: "_Arena | None"
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
            for dst, src, n in merge_copies(copies):
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

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every put acknowledged so far is written back from T0
        to T1 and the index (fast mode acknowledges T0 puts before that).
        False if ``timeout`` seconds passed first."""
        return bool(self._call(P.FLUSH, {"timeout": timeout}))

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

    def _wait_job(self, jid: int, progress: Callable[[str, int, int], None] | None, poll: float) -> dict[str, Any]:
        while True:
            st = self._call(P.JOB, {"id": jid})
            if st["state"] == "failed":
                raise KvfsError(f"{st['kind']} failed in the daemon: {st['error']}")
            if progress is not None and st["total"]:
                progress(st["phase"], st["done"], st["total"])  # the last one shows the bar full
            if st["state"] == "done":
                return dict(st["result"])
            time.sleep(poll)

    # -- reads ----------------------------------------------------------------
    def _path(self, stripe: int, seg: int) -> str:
        return os.path.join(self.stripes[stripe], segment_name(seg))

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
                                               ccsum if self.verify else None))
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

        Keys whose location is cached are read with no round trip; a cached
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
            res = self._call(P.LOOKUP, {"ns": ns, "keys": [ks[i] for i in todo]})
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

    def _known_locations(self, cache: LocationCache, ns: str, ks: list[str]) -> tuple[int, dict[int, list[Any]]]:
        """Locations known without a round trip: this process's cache, then
        the shared directory. Returns them with the generation read before
        (a read from them is valid only if it has not moved after)."""
        gen = cache.generation()
        cached = cache.get_many(ns, ks)
        d = self._dir
        if d is not None and len(cached) < len(ks):
            try:
                found = d.lookup_many(ns, ks, [i for i in range(len(ks)) if i not in cached])
            except ValueError:  # closed under us by a reconnect to a restarted daemon
                found = {}
            cached.update(found)
            cache.put_many(ns, [(ks[i], item) for i, item in found.items()], gen)
        return gen, cached

    def _settle_known(self, cache: LocationCache, ns: str, ks: list[str], cached: dict[int, list[Any]],
                      missed: set[int], sizes: list[int], todo: list[int]) -> list[int]:
        """After reads from known locations: forget those that failed (or
        were not read), count the hits, and return what is left to look up."""
        missed.update(i for i in cached if sizes[i] < 0)
        for i in missed:
            sizes[i] = -1
            cache.drop(ns, ks[i])
        self._touch(ns, [ks[i] for i in cached if i not in missed])
        return [i for i in todo if i not in cached or i in missed]

    def _check_restart(self) -> None:
        """A restarted daemon moves the generation to a new epoch (same
        file): then the arena and directory mapped here are orphans, and
        must not be used again. Re-hello before any data-plane step."""
        if self._gen is not None and self._gen.value // EPOCH != self._epoch:
            try:
                hello = self._conn().call(P.HELLO, {"version": P.PROTOCOL_VERSION})
            except DaemonUnavailable:  # that connection was to the dead daemon
                hello = self._conn().call(P.HELLO, {"version": P.PROTOCOL_VERSION})
            self._adopt(hello)

    def _release(self, lease: int) -> None:
        """End a lease, fire-and-forget, on this thread's connection. If that
        connection is gone the daemon ended the lease itself (or died): a
        release never reconnects and never raises."""
        c: _Connection | None = getattr(self._local, "conn", None)
        if c is not None and not c.broken:
            c.notify(P.RELEASE, {"leases": [lease]})

    def _drop_stale_fds(self) -> None:
        """Something was removed, so segment files may have been unlinked:
        close idle fds so they do not pin the space of deleted files."""
        if self._gen is not None and self._gen.value != self._fd_gen:
            self._fd_gen = self._gen.value
            self.reader.fds.drop_idle()
            self.reader.wfds.drop_idle()

    def _touch(self, ns: str, keys: list[str]) -> None:
        """Report cache hits to the daemon in batches (fire-and-forget)."""
        if not keys:
            return
        with self._touch_lock:
            self._touches.setdefault(ns, []).extend(keys)
            self._n_touches += len(keys)
            if self._n_touches < 256 and time.monotonic() - self._touched_at < 0.5:
                return
        self._flush_touches(self._conn())

    def _flush_touches(self, conn: _Connection) -> None:
        with self._touch_lock:
            batches, self._touches = self._touches, {}
            self._n_touches, self._touched_at = 0, time.monotonic()
        for bns, bkeys in batches.items():
            conn.notify(P.TOUCH, {"ns": bns, "keys": bkeys})

    def get(self, key: str | bytes, *, ns: str = "default") -> bytes:
        k, ns = normalize_key(key), normalize_ns(ns)
        sizes, bufs = self._read_batch(ns, [k], [None], True)
        if sizes[0] < 0 or bufs[0] is None:
            raise NotFound(f"{ns}/{k} not found")
        return bytes(bufs[0])

    def get_into(self, key: str | bytes, out: Any, *, ns: str = "default") -> int:
        k, ns = normalize_key(key), normalize_ns(ns)
        dev = device_buffer(out)
        if dev is not None:
            sizes = self._read_device(ns, [k], [dev])
        else:
            sizes, _ = self._read_batch(ns, [k], [as_writable(out)], False)
        if sizes[0] < 0:
            raise NotFound(f"{ns}/{k} not found")
        return sizes[0]

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
                res = self._call(P.LOOKUP, {"ns": ns, "keys": [ks[i] for i in todo]})
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

    def get_many_into(self, keys: Sequence[str | bytes], outs: Sequence[Any], *, ns: str = "default") -> list[int]:
        ks, ns = normalize_keys(keys), normalize_ns(ns)
        if len(outs) != len(ks):
            raise InvalidArgument("keys and outs must have the same length")
        devs = [device_buffer(o) for o in outs]
        if any(d is not None for d in devs):
            if not all(d is not None for d in devs):
                raise InvalidArgument("outs must be all device buffers or all host buffers")
            res: list[int] = []
            for i in range(0, len(ks), BATCH_KEYS):
                res += self._read_device(ns, ks[i:i + BATCH_KEYS], devs[i:i + BATCH_KEYS])  # type: ignore[arg-type]
            return res
        views: list[memoryview | None] = [as_writable(o) for o in outs]
        out: list[int] = []
        for i in range(0, len(ks), BATCH_KEYS):
            sizes, _ = self._read_batch(ns, ks[i:i + BATCH_KEYS], views[i:i + BATCH_KEYS], False)
            out += sizes
        return out

    def get_many_into_async(self, keys: Sequence[str | bytes], outs: Sequence[Any], *, ns: str = "default",
                            group_size: int | None = None) -> "DeviceReads":
        """Start reading ``keys`` into device buffers and return at once.

        Items are in groups of ``group_size`` consecutive keys (default: one
        group). ``reads.wait(g)`` returns the sizes of group g once its
        bytes are in device memory, so compute on group g can start while
        the next groups are still copying (an inference engine loading a
        KV cache layer by layer: one group per layer). ``reads.result()``
        (or leaving ``with``) waits for everything and ends the lease; the
        lease covers every copy until then. A failed item reads -1 and is
        reported to the daemon; there is no second lookup here (retry it
        with ``get_many_into``)."""
        ks, ns = normalize_keys(keys), normalize_ns(ns)
        if len(outs) != len(ks):
            raise InvalidArgument("keys and outs must have the same length")
        devs = [device_buffer(o) for o in outs]
        if not all(d is not None for d in devs):
            raise InvalidArgument("get_many_into_async takes device buffers only")
        if any(d.readonly for d in devs if d is not None):
            raise InvalidArgument("destination device buffer is read-only")
        gs = group_size or max(1, len(ks))
        gpu = self._gpu_plane()
        self._check_restart()
        self._conn()
        found: dict[int, list[Any]] = {}
        leases: list[int] = []
        sizes = [-1] * len(ks)
        try:
            for b in range(0, len(ks), BATCH_KEYS):
                res = self._call(P.LOOKUP, {"ns": ns, "keys": ks[b:b + BATCH_KEYS]})
                if res["lease"]:
                    leases.append(res["lease"])
                found.update((b + i, item) for i, item in enumerate(res["items"]) if item is not None)
            plan = gpu.plan(ns, ks, found, devs, self.arena, self._path, sizes)  # type: ignore[arg-type]
            pending = gpu.start(ns, ks, found, plan, self.verify == "full", gs)
        except BaseException:
            for lease in leases:
                self._release(lease)
            raise
        return DeviceReads(self, ns, ks, sizes, found, pending, leases)

    def _read_device(self, ns: str, ks: list[str], outs: list[DeviceBuffer]) -> list[int]:
        """Read into device buffers (kvfs.gpu), as the host path does: keys
        whose location is known (cache, directory) are copied with no round
        trip, and such a copy counts only if the removal generation did not
        move until it completed (a seqlock: an extent evicted and reused
        under it is caught); the rest, and what failed, are looked up under
        a lease that ends only once their copies have completed. A failed
        item is reported (the daemon re-checks and drops it) and looked up
        once more."""
        for d in outs:
            if d.readonly:
                raise InvalidArgument("destination device buffer is read-only")
        gpu = self._gpu_plane()
        self._drop_stale_fds()
        self._check_restart()
        self._conn()
        sizes = [-1] * len(ks)
        todo = list(range(len(ks)))
        full = self.verify == "full"
        cache = self._locs
        if cache is not None:
            gen, cached = self._known_locations(cache, ns, ks)
            if cached:
                plan = gpu.plan(ns, ks, cached, outs, self.arena, self._path, sizes)
                missed = gpu.run(ns, ks, cached, plan, full)  # every copy has completed
                if cache.generation() != gen:
                    missed.update(cached)
                todo = self._settle_known(cache, ns, ks, cached, missed, sizes, todo)
        for attempt in range(2):
            if not todo:
                break
            res = self._call(P.LOOKUP, {"ns": ns, "keys": [ks[i] for i in todo]})
            lease = res["lease"]
            found = {i: item for i, item in zip(todo, res["items"]) if item is not None}
            try:
                plan = gpu.plan(ns, ks, found, outs, self.arena, self._path, sizes)
                bad = gpu.run(ns, ks, found, plan, full)
            finally:
                if lease:
                    self._release(lease)
            for i in bad:
                sizes[i] = -1
                if attempt == 0:
                    self._call(P.REPORT_BAD, {"ns": ns, "key": ks[i], "seq": found[i][2]})
            todo = sorted(bad)
        return sizes

    # -- metadata -------------------------------------------------------------
    def contains(self, keys: Sequence[str | bytes], *, ns: str = "default") -> list[bool]:
        """Whether each key is stored. Answered from the shared location
        directory with no round trip (kvfs.directory); only keys it cannot
        settle (it is full, or a slot kept changing) are asked of the daemon."""
        ns = normalize_ns(ns)
        d = self._live_dir(keys)
        try:
            complete = d.complete() if d is not None else False
            fast = d.contains(ns, keys if isinstance(keys, list) else list(keys)) if d is not None else None
        except ValueError:  # closed under us by a reconnect to a restarted daemon
            fast = None
        if fast is None:
            return self._contains_asked(normalize_keys(keys), ns)
        out, seen = fast
        if seen & (1 << DIR_SLOW):  # keys C did not take: the exact rules, key by key
            got = self._dir_states(ns, keys)
            if got is None:
                return self._contains_asked(normalize_keys(keys), ns)
            states, complete = got
            out = [st == DIR_PRESENT for st in states]
            seen = sum(1 << st for st in set(states) if st != DIR_PRESENT)
        ask = []
        if seen & (1 << DIR_UNKNOWN) or (seen & (1 << DIR_ABSENT) and not complete):
            ask = [i for i, hit in enumerate(out) if not hit]
        if ask:
            for i, hit in zip(ask, self._contains_asked(normalize_keys([keys[i] for i in ask]), ns)):
                out[i] = hit
        return out

    def prefix_match(self, keys: Sequence[str | bytes], *, ns: str = "default") -> int:
        """How many of ``keys``, from the first, are all stored (the leading
        run of hits). From the directory, as ``contains``."""
        ns = normalize_ns(ns)
        got = self._dir_states(ns, keys)
        if got is None:
            return self._prefix_asked(normalize_keys(keys), ns)
        states, complete = got
        n = 0
        for st in states:
            if st != DIR_PRESENT:
                break
            n += 1
        if n == len(states) or (states[n] == DIR_ABSENT and complete):
            return n
        return n + self._prefix_asked(normalize_keys(keys[n:]), ns)

    def _dir_states(self, ns: str, keys: Sequence[str | bytes]) -> tuple[bytes | bytearray, bool] | None:
        """Each key's state in the directory (DIR_*), and whether the
        directory held every resident object when the probe began (read
        first: a key stored before this call and spilled is then seen as
        incomplete, never as absent). None: no directory here."""
        d = self._live_dir(keys)
        if d is None:
            return None
        ks = keys if isinstance(keys, list) else list(keys)
        try:
            complete = d.complete()
            states: bytes | bytearray = d.probe(ns, ks)
        except ValueError:  # closed under us by a reconnect to a restarted daemon
            return None
        if DIR_SLOW in states:  # keys C did not take: kvfs.keys' exact rules (raises for a bad key)
            states = bytearray(states)
            for i, st in enumerate(states):
                if st == DIR_SLOW:
                    states[i] = d.holds(ns, normalize_key(ks[i]))
        return states, complete

    def _live_dir(self, keys: Any) -> DirectoryReader | None:
        """The directory, if there is one and its daemon still keeps it
        (else None: ask, and reconnect to, the daemon)."""
        if isinstance(keys, (str, bytes)):
            raise InvalidKey("expected a list of keys, got a single key")
        if self._dir is None:
            return None
        own: _Connection | None = getattr(self._local, "conn", None)
        if own is not None and own.deferred:
            own.drain()  # this thread's puts sent without waiting are published: it sees its own writes
        self._check_restart()  # a restarted daemon has a new directory
        d = self._dir
        return d if d is not None and d.kept() else None

    def _contains_asked(self, ks: list[str], ns: str) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(ks), BATCH_KEYS * 4):
            out += self._call(P.CONTAINS, {"ns": ns, "keys": ks[i:i + BATCH_KEYS * 4]})
        return out

    def _prefix_asked(self, ks: list[str], ns: str) -> int:
        n = 0
        step = BATCH_KEYS * 4
        for i in range(0, len(ks), step):
            got = self._call(P.PREFIX_MATCH, {"ns": ns, "keys": ks[i:i + step]})
            n += got
            if got < len(ks[i:i + step]):
                break
        return n

    def stat(self, key: str | bytes, *, ns: str = "default") -> ObjectInfo:
        r = self._call(P.STAT, {"ns": normalize_ns(ns), "key": normalize_key(key)})
        return ObjectInfo(r["ns"], r["key"], r["size"], r["checksum"],
                          json.loads(r["meta"]) if r["meta"] else None, r["tier"],
                          [tuple(x) for x in r["extents"]], r["created"], r["last_access"])

    def hold(self, keys: Sequence[str | bytes], *, ns: str = "default") -> "Hold":
        """Pin ``keys`` where they are now and say where that is: until the
        hold is released, eviction passes them over and no segment holding
        their bytes is unlinked (compaction waits). For callers that move
        the bytes themselves (NIXL descriptors) or must know a later read
        will find them (LMCache's lookup-and-lock). One round trip; any
        thread may release it. A hold also ends when the daemon's lease
        timeout (``lease_timeout``, 30 s by default) passes, or with this
        store."""
        ns = normalize_ns(ns)
        ks = normalize_keys(keys)
        with self._hold_lock:
            c = self._hold_connection()
            try:
                res = c.call(P.LOOKUP, {"ns": ns, "keys": ks})
            except DaemonUnavailable:
                if not c.answered:
                    raise
                c = self._hold_connection()  # cut after it worked (a restart): once more on a new one
                res = c.call(P.LOOKUP, {"ns": ns, "keys": ks})
        return Hold(self, c, ns, ks, list(res["items"]), int(res["lease"] or 0))

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

    def _hold_connection(self) -> _Connection:
        c = self._hold_conn
        if c is None or c.broken:
            if self._closed:
                raise KvfsError("store is closed")
            c = self._hold_conn = self._new_conn()
        return c

    def _end_hold(self, conn: _Connection, lease: int) -> None:
        with self._hold_lock:
            conn.notify(P.RELEASE, {"leases": [lease]})  # a broken one: the daemon ended it already

    def namespaces(self) -> list[str]:
        return list(self._call(P.NAMESPACES, {}))

    def keys(self, ns: str = "default", *, page: int = 10000, after: str | None = None) -> Iterator[str]:
        """Every key of ``ns`` in order (those past ``after`` if given)."""
        ns = normalize_ns(ns)
        while True:
            r = self._call(P.KEYS, {"ns": ns, "after": after, "limit": page})
            yield from r["keys"]
            if not r["more"] or not r["keys"]:
                return
            after = r["keys"][-1]

    def objects(self, ns: str = "default", *, page: int = 10000, after: str | None = None
                ) -> Iterator[dict[str, Any]]:
        """Every object of ``ns`` in key order (past ``after`` if given), as
        {key, size, tier, created} (what ``kvfs ls --long`` and ``kvfs du`` show)."""
        ns = normalize_ns(ns)
        while True:
            r = self._call(P.KEYS, {"ns": ns, "after": after, "limit": page, "long": True})
            for key, size, tier, created in r["objects"]:
                yield {"key": key, "size": size, "tier": tier, "created": created}
            if not r["more"] or not r["keys"]:
                return
            after = r["keys"][-1]

    def stats(self) -> dict[str, Any]:
        return dict(self._call(P.STATS, {}))

    def report(self, ns: str, counters: dict[str, int]) -> bool:
        """Add an engine adapter's counters (lookups, hit tokens, blocks
        loaded, ...: growth since its last report) to what the daemon shows
        for ``ns`` in ``kvfs stats``."""
        return bool(self._call(P.REPORT, {"ns": normalize_ns(ns), "counters": dict(counters)}))


class DeviceReads:
    """Reads into device memory in flight (``Store.get_many_into_async``)."""

    def __init__(self, store: Store, ns: str, ks: list[str], sizes: list[int], found: dict[int, list[Any]],
                 pending: Any, leases: list[int]) -> None:
        self.store, self.ns, self.ks, self.sizes, self.found = store, ns, ks, sizes, found
        self.pending = pending
        self.leases = leases
        self.done = False

    def wait(self, group: int) -> list[int]:
        """Sizes of group ``group``'s items (-1: missing or failed) once its
        bytes have landed in device memory."""
        bad = self.pending.wait(group)
        gs = self.pending.group_size
        idx = range(group * gs, min(len(self.ks), (group + 1) * gs))
        return [-1 if i in bad else self.sizes[i] for i in idx]

    def result(self) -> list[int]:
        """Wait for every group, report failed items, end the lease."""
        if not self.done:
            self.done = True
            try:
                bad = self.pending.finish()
            finally:
                for lease in self.leases:
                    self.store._release(lease)
            for i in sorted(bad):
                self.sizes[i] = -1
                if i in self.found:
                    self.store._call(P.REPORT_BAD, {"ns": self.ns, "key": self.ks[i], "seq": self.found[i][2]})
        return list(self.sizes)

    def __enter__(self) -> "DeviceReads":
        return self

    def __exit__(self, *exc: object) -> None:
        self.result()


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
