"""The pure-Python data plane: the same API and results as the C extension
kvfs._native (native/kvfs_native.c), on ``os.preadv``/``os.pwritev`` (which
release the GIL) and python-xxhash, spread over a thread pool.

Used when the extension is missing, or forced with KVFS_NATIVE=0.
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import xxhash

MAX_THREADS = 64
_INLINE_BELOW = 256 << 10

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _map(fn: Callable[[int], Any], n: int, threads: int, total: int) -> list[Any]:
    global _pool, _pool_size
    if threads <= 1 or n <= 1 or total < _INLINE_BELOW:
        return [fn(i) for i in range(n)]
    threads = min(threads, MAX_THREADS)
    with _pool_lock:
        if _pool is None or _pool_size < threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="kvfs-dp"), threads
        pool = _pool
    return list(pool.map(fn, range(n)))


def _mv(b: Any, writable: bool) -> memoryview:
    mv = memoryview(b)
    if writable and mv.readonly:
        raise TypeError("dests must be writable contiguous buffers")
    if not mv.c_contiguous:
        raise TypeError("buffers must be contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) and mv.nbytes else mv


def _check_len(*seqs: Sequence[Any]) -> int:
    n = len(seqs[0])
    if any(len(s) != n for s in seqs):
        raise ValueError("all sequences must have the same length")
    return n


def _sum_ok(data: memoryview, want: bytes | None) -> bool:
    return want is None or xxhash.xxh3_128_digest(data) == want


def read_many(fds: Sequence[int], offsets: Sequence[int], dests: Sequence[Any], sums: Sequence[bytes | None],
              threads: int = 1) -> list[int]:
    n = _check_len(fds, offsets, dests, sums)
    views = [_mv(d, True) for d in dests]

    def one(i: int) -> int:
        dest, off, pos = views[i], offsets[i], 0
        while pos < len(dest):
            try:
                got = os.preadv(fds[i], [dest[pos:]], off + pos)
            except OSError as e:
                return -(e.errno or 5)
            if got <= 0:
                return 1
            pos += got
        return 0 if _sum_ok(dest, sums[i]) else 2

    return _map(one, n, threads, sum(len(v) for v in views))


def copy_many(dests: Sequence[Any], srcs: Sequence[Any], sums: Sequence[bytes | None], threads: int = 1) -> list[int]:
    n = _check_len(dests, srcs, sums)
    dv = [_mv(d, True) for d in dests]
    sv = [_mv(s, False) for s in srcs]
    for i in range(n):
        if len(dv[i]) != len(sv[i]):
            raise ValueError(f"srcs[{i}] and dests[{i}] differ in length")

    def one(i: int) -> int:
        dv[i][:] = sv[i]
        return 0 if _sum_ok(dv[i], sums[i]) else 2

    return _map(one, n, threads, sum(len(v) for v in dv))


def write_many(fds: Sequence[int], offsets: Sequence[int], srcs: Sequence[Any], threads: int = 1) -> list[bytes]:
    n = _check_len(fds, offsets, srcs)
    sv = [_mv(s, False) for s in srcs]

    def one(i: int) -> bytes:
        src, off, pos = sv[i], offsets[i], 0
        while pos < len(src):
            k = os.pwritev(fds[i], [src[pos:]], off + pos)
            if k <= 0:
                raise OSError(28, "No space left on device")
            pos += k
        return xxhash.xxh3_128_digest(src)

    return _map(one, n, threads, sum(len(v) for v in sv))


def hash_many(bufs: Sequence[Any], threads: int = 1) -> list[bytes]:
    sv = [_mv(b, False) for b in bufs]
    return _map(lambda i: xxhash.xxh3_128_digest(sv[i]), len(sv), threads, sum(len(v) for v in sv))


def hash_chunked(bufs: Sequence[Any], chunk: int, threads: int = 1) -> list[tuple[bytes, list[bytes]]]:
    """Per buffer: (xxh3-128 of the whole, [xxh3-128 of each ``chunk``-byte
    chunk]); a buffer of at most one chunk has one chunk sum, its whole sum."""
    if chunk <= 0:
        raise ValueError("chunk must be > 0")
    sv = [_mv(b, False) for b in bufs]

    def one(i: int) -> tuple[bytes, list[bytes]]:
        v = sv[i]
        if len(v) <= chunk:
            d = xxhash.xxh3_128_digest(v)
            return d, [d]
        return (xxhash.xxh3_128_digest(v),
                [xxhash.xxh3_128_digest(v[p:p + chunk]) for p in range(0, len(v), chunk)])
    return _map(one, len(sv), threads, sum(len(v) for v in sv))


def copy_hash_chunked(dsts: Sequence[Any], srcs: Sequence[Any], chunk: int,
                      threads: int = 1) -> list[tuple[bytes, list[bytes]]]:
    """``hash_chunked(srcs)``, each source copied to its destination too (the
    C version does both in one pass)."""
    if len(dsts) != len(srcs):
        raise ValueError("dsts and srcs differ in length")
    dv, sv = [_mv(d, True) for d in dsts], [_mv(s, False) for s in srcs]
    if any(len(d) != len(v) for d, v in zip(dv, sv)):
        raise ValueError("a destination is not the size of its source")
    out = hash_chunked(sv, chunk, threads)
    for d, v in zip(dv, sv):
        d[:] = v
    return out


def lanes_hash(buf: Any, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """xxh3-128 of ``buf[off:off + length]`` per range (the C extension
    computes them the GPU's way, kvfs/xxh3_lanes.h; the sums are the same)."""
    v = _mv(buf, False)
    out = []
    for off, length in ranges:
        if off % 1024 or length <= 240 or off + length > len(v):
            raise ValueError("a range must start on a 1 KiB boundary, be > 240 bytes and fit")
        out.append(xxhash.xxh3_128_digest(v[off:off + length]))
    return out


def aligned_buffer(size: int, alignment: int = 4096) -> Any:
    """Anonymous mmap: page-aligned (hence aligned to any power of two up to
    the page size) and zero-filled."""
    if size < 0:
        raise ValueError("size must be >= 0")
    if alignment < 8 or alignment & (alignment - 1) or alignment > mmap.PAGESIZE:
        raise ValueError("alignment must be a power of two from 8 to the page size")
    return bytearray() if size == 0 else mmap.mmap(-1, size)


def dir_probe(directory: Any, nslots: int, ns: bytes, keys: list[Any], prefix: bool = False) -> bytes:
    """Whether each key is in the location directory (kvfs.directory,
    ``probe_py``: the C ``dir_probe``'s twin)."""
    from .directory import check_slots, probe_py
    check_slots(nslots)
    return probe_py(directory, nslots, ns, keys, prefix)


def dir_contains(directory: Any, nslots: int, ns: bytes, keys: list[Any]) -> tuple[list[bool], int]:
    """``dir_probe`` as a list of bools (True: present) and a bitmask of the
    other states met (``1 << state``)."""
    states = dir_probe(directory, nslots, ns, keys)
    seen = 0
    for st in set(states) - {1}:
        seen |= 1 << st
    return [st == 1 for st in states], seen


def dir_read(directory: Any, nslots: int, ns: bytes, key: Any, arena: Any, dest: Any, gen: Any, gen_before: int,
             verify: bool, threads: int = 1, fds: dict[int, int] | None = None) -> int:
    """One get_into from where the directory places it
    (kvfs.directory.read_py, the C ``dir_read``'s twin): the size, -1 not
    answerable that way, -2 a chunk failed verification."""
    from .directory import check_slots, read_py
    check_slots(nslots)
    if fds is not None and not isinstance(fds, dict):
        raise TypeError("fds must be a dict or None")
    return read_py(directory, nslots, ns, key, arena, _mv(dest, True), gen, gen_before, verify, fds)


def dir_read_many(directory: Any, nslots: int, ns: bytes, keys: Sequence[Any], arena: Any, dests: Sequence[Any],
                  gen: Any, gen_before: int, verify: bool, threads: int = 1,
                  fds: dict[int, int] | None = None) -> list[int]:
    """``dir_read`` of a batch: per key the size, -1 or -2; every key -1 if
    the generation moved by the end."""
    if len(keys) != len(dests):
        raise ValueError("keys and dests must have the same length")
    views = [_mv(d, True) for d in dests]
    out = [dir_read(directory, nslots, ns, k, arena, v, gen, gen_before, verify, threads, fds)
           for k, v in zip(keys, views)]
    return [-1] * len(out) if struct.unpack_from("<Q", gen, 0)[0] != gen_before else out


def dir_put(directory: Any, nslots: int, h: bytes, size: int, seq: int, checksum: bytes, t0: int, flags: int,
            exts: list[Any], displace: int = 0) -> int:
    """The location directory writer's put (kvfs.directory.put_py, the C
    ``dir_put``'s twin): 1 new slot, 0 updated, 2 took the coldest key's
    slot (``displace``), -1 no room."""
    from .directory import put_py
    return put_py(directory, nslots, h, size, seq, checksum, t0, flags, exts, displace)


def dir_put_entry(directory: Any, nslots: int, ok: bytes, m: Any, displace: int = 0) -> int:
    """``dir_put`` of a mirror entry (kvfsd.mirror.MemEntry) under the key
    hash of its object key ``ok``: in T1 unless dirty."""
    from .directory import IN_T1
    return dir_put(directory, nslots, xxhash.xxh3_128_digest(ok), m.size, m.seq, m.checksum, m.t0,
                   0 if m.dirty else IN_T1, m.exts, displace)


def dir_put_entries(directory: Any, nslots: int, oks: list[bytes], ms: list[Any],
                    displace: int = 0, current: dict[bytes, Any] | None = None,
                    yield_gil: bool = True) -> tuple[int, int, int]:
    """``dir_put_entry`` of each: (slots taken, slots taken from other keys,
    entries left out); with ``current``, only of those that are
    ``current[key]`` (the mirror's entry for their key now). (``yield_gil``:
    the C version's; here the GIL is Python's to give.)"""
    if len(oks) != len(ms):
        raise ValueError("one entry per object key")
    if current is not None and not isinstance(current, dict):
        raise TypeError("current is a dict or None")
    rs = [dir_put_entry(directory, nslots, ok, m, displace) for ok, m in zip(oks, ms)
          if current is None or current.get(ok) is m]
    return rs.count(1), rs.count(2), rs.count(-1)


def pack_entry(size: int, checksum: bytes, seq: int, created: float, atime: float, meta: bytes | None,
               rows: list[Any]) -> bytes:
    """An index entry (kvfsd.index.encode_entry): msgpack of the list of the arguments."""
    import msgpack
    return msgpack.packb([size, checksum, seq, created, atime, meta, rows], use_bin_type=True)


def record_head(names: bytes, ns_len: int, chunk_idx: int, chunk_cnt: int, length: int, obj_size: int,
                chunk_off: int, seq: int, checksum: bytes, pad: int) -> bytes:
    """A record's header (kvfs.format.encode_header), its names, then ``pad`` zero bytes."""
    from .format import encode_header
    if pad < 0:
        raise ValueError("bad record header fields")
    return encode_header(names, ns_len, chunk_idx, chunk_cnt, length, obj_size, chunk_off, seq, checksum) + bytes(pad)


def dir_del(directory: Any, nslots: int, h: bytes) -> int:
    """The writer's removal (kvfs.directory.del_py): the slot freed or -1."""
    from .directory import del_py
    return del_py(directory, nslots, h)


def recv_spin(sock: Any, buf: Any, spin_ns: int) -> int:
    """native/socket_wait.c's twin: poll ``sock`` for up to ``spin_ns``,
    then block; returns the bytes received into ``buf`` (0: closed). Here
    the polling holds the GIL between its calls, so it is shorter."""
    until = time.perf_counter_ns() + spin_ns // 4
    while spin_ns > 0 and time.perf_counter_ns() < until:
        try:
            return int(sock.recv_into(buf, 0, socket.MSG_DONTWAIT))
        except BlockingIOError:
            continue
    return int(sock.recv_into(buf))


def send_held(fd: int, data: Any) -> int:
    """native/socket_wait.c's twin: a non-blocking send(2), 0 if the socket's buffer is full."""
    s = socket.socket(fileno=fd)  # the caller's socket: wrapped, not owned
    try:
        return s.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except BlockingIOError:
        return 0
    finally:
        s.detach()


@dataclass(slots=True)
class ChunkPlan:
    """One chunk's reservation of a put (kvfsd.segments): native/plans.c's twin."""

    stripe: int
    seg: int
    hdr_off: int
    payload_off: int
    end: int
    length: int
    chunk_off: int
    idx: int
    checksum: bytes = b""
    start: int = -1  # where the reservation begins (the segment's end before it)


@dataclass(slots=True)
class ObjPlan:
    """One object's put plan (kvfsd.segments): native/plans.c's twin."""

    key: str
    size: int
    meta: bytes | None
    seq: int
    chunks: list[ChunkPlan]
    ok: bytes = b""  # the object key (kvfsd.index.obj_key), encoded once per put
    hasher: Any = None  # running xxh3-128 of the whole value (multi-chunk)
    checksum: bytes = b""
    t0: int = -1  # arena extent the client fills (T0 put), -1: the client writes T1 itself
    via_t0: bool = False  # a T0 put item (stays True after t0 is handed to ``mem``)
    mem: MemEntry | None = None  # the dirty mirror entry publish_t0 made
    t0_stored: bool = False  # publish_t0's answer for this item

    def exts(self) -> tuple[tuple[Any, ...], ...]:
        """Its chunks as the mirror keeps them: (stripe, seg, payload_off, length, sum)."""
        cs = self.chunks
        if len(cs) == 1:  # most puts: no generator (twice per T0 put)
            c = cs[0]
            return ((c.stripe, c.seg, c.payload_off, c.length, c.checksum),)
        return tuple((c.stripe, c.seg, c.payload_off, c.length, c.checksum) for c in cs)

    def spans(self) -> tuple[tuple[int, int], ...]:
        """(segment, record bytes from header to aligned end) per chunk."""
        cs = self.chunks
        if len(cs) == 1:
            c = cs[0]
            return ((c.seg, c.end - c.hdr_off),)
        return tuple((c.seg, c.end - c.hdr_off) for c in cs)


class MemEntry:
    """The daemon's mirror entry (kvfsd.mirror): native/mirror.c's twin.
    Lookups answer ``wire``, made on its first read after the last
    ``rewire`` (the fields changed) and replaced, never mutated, so a reply
    being encoded on the event loop never sees a half-made change."""

    __slots__ = ("size", "checksum", "seq", "exts", "spans", "_wire", "t0", "dirty", "deleted", "hits", "meta",
                 "created", "_t0list")

    def __init__(self, size: int, checksum: bytes, seq: int, exts: tuple[tuple[Any, ...], ...],
                 spans: tuple[tuple[int, int], ...], *, t0: int = -1, dirty: bool = False):
        self.size = size
        self.checksum = checksum
        self.seq = seq
        self.exts = exts  # ((stripe, seg, payload_off, length, chunk_sum), ...)
        self.spans = spans  # ((seg, record bytes), ...); () while dirty: not yet counted live
        self.t0 = t0  # arena offset of the T0 copy, -1: none
        self.dirty = dirty  # in T0 only: write-back to T1 not committed yet
        self.deleted = False  # removed while dirty: the write-back must not publish it
        self.hits = 0  # T1 hits (promotion policy)
        self.meta: bytes | None = None  # kept only while dirty (LMDB has it after)
        self.created = 0.0  # for the mount's mtime
        self._wire: tuple[Any, ...] | None = None
        self._t0list: T0List | None = None  # the T0 list holding it, if any

    def rewire(self) -> None:
        """The fields changed: ``wire`` is made anew when next read."""
        self._wire = None

    @property
    def wire(self) -> tuple[Any, ...]:
        """(size, checksum, seq, extents, t0) where t0 is None or (arena
        offset, also in T1)."""
        if self._wire is None:
            self._wire = (self.size, self.checksum, self.seq, self.exts,
                          None if self.t0 < 0 else (self.t0, not self.dirty))
        return self._wire

    def __repr__(self) -> str:
        return f"MemEntry(size={self.size}, seq={self.seq}, t0={self.t0}, dirty={self.dirty})"


class T0List:
    """T0's LRU of clean entries, or its set of dirty ones (kvfsd.tier0):
    native/mirror.c's twin, where each entry is linked into the list that
    holds it. An entry is on at most one list; least recent first."""

    def __init__(self) -> None:
        self._d: dict[int, tuple[bytes, MemEntry]] = {}

    @staticmethod
    def _entry(m: Any) -> MemEntry:
        if not isinstance(m, MemEntry):
            raise TypeError("T0 lists hold MemEntry objects of this data plane")
        return m

    def append(self, ok: bytes, m: MemEntry) -> None:
        """``m`` (on no list) to the recent end, with its key ``ok``."""
        if not isinstance(ok, bytes):
            raise TypeError("object keys are bytes")
        if self._entry(m)._t0list is not None:
            raise ValueError("the entry is on a T0 list already")
        m._t0list = self
        self._d[id(m)] = (ok, m)

    def remove(self, m: MemEntry) -> bool:
        """Whether ``m`` was on this list (it is not now)."""
        if self._entry(m)._t0list is not self:
            return False
        del self._d[id(m)]
        m._t0list = None
        return True

    def move_to_end(self, m: MemEntry) -> bool:
        """Whether ``m`` is on this list (now at its recent end)."""
        if self._entry(m)._t0list is not self:
            return False
        self._d[id(m)] = self._d.pop(id(m))
        return True

    def _take(self, m: MemEntry, into: "T0List") -> None:
        """``m`` (on this list) to the recent end of ``into``."""
        ok, _m = self._d.pop(id(m))
        m._t0list = into
        into._d[id(m)] = (ok, m)

    def items(self) -> list[tuple[bytes, MemEntry]]:
        """(key, entry) pairs, least recent first."""
        return list(self._d.values())

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, m: object) -> bool:
        return isinstance(m, MemEntry) and m._t0list is self


_JOURNAL_HEAD = struct.Struct("<QQq")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


def journal_row(seq: int, size: int, off: int, checksum: bytes, chunk_sums: list[bytes], key: str,
                meta: bytes | None) -> bytes:
    """One put's row of a "PX" record of the T0 journal (kvfsd.t0journal
    reads them): <QQq seq, size, arena offset | object sum (16 bytes) | <I n
    | n chunk sums | <I key length | key (utf-8) | <i meta length (-1:
    none) | meta."""
    if len(checksum) != 16 or any(len(c) != 16 for c in chunk_sums):
        raise TypeError("checksums are 16 bytes")
    kb = key.encode()
    return b"".join([_JOURNAL_HEAD.pack(seq, size, off), checksum, _U32.pack(len(chunk_sums)), *chunk_sums,
                     _U32.pack(len(kb)), kb, _I32.pack(-1 if meta is None else len(meta)), meta or b""])


def t0_publish(ns: str, ops: list[Any], lru: dict[bytes, Any], dirty: T0List, now: float
               ) -> tuple[list[bytes], list[MemEntry], bytes, int, list[Any]]:
    """publish_t0's per-object loop (kvfsd.tiering): for each T0 item (op not
    None, op.t0 >= 0) whose object key is not in ``lru``, a dirty entry put
    in ``lru`` and the T0List ``dirty``, op.mem and op.t0_stored set, and its journal
    row (``journal_row``). Returns (keys, entries, the rows' bytes, new
    bytes, the items already stored)."""
    oks: list[bytes] = []
    ms: list[MemEntry] = []
    rows: list[bytes] = []
    existing: list[Any] = []
    new_bytes = 0
    for op in ops:
        if op is None or op.t0 < 0:
            continue
        ok = op.ok
        if ok in lru:
            existing.append(op)
            continue
        chunks = op.chunks
        m = MemEntry(op.size, op.checksum, op.seq, tuple((c.stripe, c.seg, c.payload_off, c.length, c.checksum)
                                                         for c in chunks), (), t0=op.t0, dirty=True)
        m.meta = op.meta
        m.created = now
        # the row first: an item it refuses (a bad sum, meta or key) is not published
        rows.append(journal_row(op.seq, op.size, op.t0, op.checksum, [c.checksum for c in chunks], op.key, op.meta))
        lru[ok] = m
        dirty.append(ok, m)
        oks.append(ok)
        ms.append(m)
        op.mem = m
        op.t0_stored = True
        new_bytes += op.size
    return oks, ms, b"".join(rows), new_bytes, existing


def t0_written_back(ns: str, done: list[tuple[Any, bool]], lru: dict[bytes, Any], t0_lru: T0List,
                    t0_dirty: T0List) -> tuple[list[bytes], list[MemEntry], bytes, int,
                                               dict[int, list[int]], list[tuple[Any, MemEntry]]]:
    """The write-back's mirror loop (kvfsd.tiering._written_back_many): for
    each (op, published) whose entry ``op.mem`` is still dirty, it is dirty
    no more, its seq goes to the journal's "done" bytes (<Q each) and its
    bytes count; if
    published, not deleted and still ``lru``'s entry for its key, it moves
    from ``t0_dirty`` (if there) to the end of ``t0_lru``, gets its spans (added to
    ``live`` {seg: [bytes, records]}) and is rewired; otherwise (op, entry)
    is returned in ``gone`` for the caller."""
    oks: list[bytes] = []
    ms: list[MemEntry] = []
    seqs: list[int] = []
    live: dict[int, list[int]] = {}
    gone: list[tuple[Any, MemEntry]] = []
    nbytes = 0
    for op, published in done:
        m: MemEntry = op.mem
        if not m.dirty:
            continue
        ok = op.ok
        seqs.append(m.seq)
        nbytes += m.size
        m.dirty = False
        m.meta = None
        if published and not m.deleted and lru.get(ok) is m:
            if m in t0_dirty:  # (not if its T0 copy was dropped meanwhile)
                t0_dirty._take(m, t0_lru)
            spans = tuple((c.seg, c.end - c.hdr_off) for c in op.chunks)
            for seg, span in spans:
                v = live.setdefault(seg, [0, 0])
                v[0] += span
                v[1] += 1
            m.spans = spans
            m.rewire()
            oks.append(ok)
            ms.append(m)
        else:
            gone.append((op, m))
    return oks, ms, struct.pack(f"<{len(seqs)}Q", *seqs), nbytes, live, gone


def t0_items(items: list[Any], nsp: bytes, lru: dict[bytes, Any], stripe_unit: int, span0: int,
             normalize_key: Callable[[Any], str], encode_meta: Callable[[Any], bytes | None],
             error: type[Exception]) -> tuple[list[tuple[Any, ...]], list[int], int]:
    """A put_t0 batch's items checked in one pass (native/put_items.c's
    twin): per new item (index, object key, key, size, meta, arena offset,
    object sum, [chunk sums]), every item's size, and the T1 bytes the new
    ones take at most. Repeated keys and stored ones are not new."""
    if stripe_unit < 1:
        raise ValueError("stripe_unit must be positive")
    fresh: list[tuple[Any, ...]] = []
    sizes: list[int] = []
    seen: set[bytes] = set()
    need = 0
    for i, it in enumerate(items):
        if type(it) is not list or len(it) != 5:
            raise error("put_t0 items are [key, size, meta, arena offset, sums]")
        key, size, meta, off, sums = it
        if type(off) is not int:  # (bool is not int here)
            raise error("arena offsets must be ints")
        if type(size) is not int or not 0 <= size < 1 << 63:
            raise error(f"size of {key!r} must be a non-negative int")
        sizes.append(size)
        k = normalize_key(key)
        kb = k.encode()
        ok = nsp + kb
        if ok in seen or ok in lru:
            continue
        nchunks = 1 if size <= stripe_unit else -(-size // stripe_unit)
        if not (type(sums) is list and len(sums) == 2 and type(sums[0]) is bytes and len(sums[0]) == 16
                and type(sums[1]) is list and len(sums[1]) == nchunks
                and all(type(c) is bytes and len(c) == 16 for c in sums[1])):
            raise error("a checksum entry is [16-byte object sum, [16-byte chunk sums]]")
        m = None if meta is None else encode_meta(meta)
        seen.add(ok)
        fresh.append((i, ok, k, size, m, off, sums[0], sums[1]))
        need += nchunks * (span0 + len(kb)) + size
    return fresh, sizes, need


# Coalesced record writes (t0_write_records): records reserved back to back
# in a segment go out in one pwritev, their padding written as zeros. Bounds
# of one call: iovecs under Linux's IOV_MAX (1024), and 1 MiB, what one
# record of a large value writes anyway. Not more: a buffered write holds
# the file's inode lock for its whole length, dirty-page throttling
# included, so one 64 MiB write stalled every other write to that segment
# (the writer thread's record headers among them) and with it the puts
# behind them, for 0.5-0.7 s at a time on a VM. Small records gain almost
# all there is to gain by 1 MiB (16 of 64 KiB, hundreds of 4 KiB).
RUN_IOVS = 1000
RUN_BYTES = 1 << 20
_ZEROS = memoryview(bytes(8192))  # padding between neighbouring records is under PAGE + RECORD_ALIGN


def record_writes(nsb: bytes, ops: list[Any], arena: Any) -> list[tuple[Any, list[Any], int]]:
    """The records a write-back writes for one plan's items (namespace
    ``nsb``), one by one: (chunk, [header, payload from the arena when the
    item has a T0 copy], bytes). Deleted items and items not published in
    T0 are skipped. What t0_write_records writes, and what the write-back
    writes again one record at a time to learn which write failed."""
    out: list[tuple[Any, list[Any], int]] = []
    view = memoryview(arena)
    nl = len(nsb)
    for op in ops:
        if op is None:
            continue
        m = op.mem
        if (m is not None and m.deleted) or (m is None and op.via_t0):
            continue
        names = nsb + op.key.encode()
        for ch in op.chunks:
            head = record_head(names, nl, ch.idx, len(op.chunks), ch.length, op.size, ch.chunk_off, op.seq,
                               ch.checksum, ch.payload_off - ch.hdr_off - 80 - len(names))
            if m is None:  # the client wrote the payload
                out.append((ch, [head], len(head)))
                continue
            if m.t0 < 0 or m.t0 + ch.chunk_off + ch.length > len(view):
                raise ValueError("a T0 copy outside the arena")
            out.append((ch, [head, view[m.t0 + ch.chunk_off:m.t0 + ch.chunk_off + ch.length]], len(head) + ch.length))
    return out


def t0_write_records(jobs: list[tuple[bytes, list[Any], int]], arena: Any, fds: dict[int, int]
                     ) -> tuple[list[int], list[int]]:
    """The write-back's record writes (native/write_back.c's twin): for each
    (namespace utf-8, plan items, tag) job, each item's records (header,
    then its payload from the arena when it has a T0 copy; deleted items
    and items not published in T0 are skipped), sorted by segment and
    offset, those reserved back to back written with one pwritev each (at
    most RUN_IOVS iovecs and RUN_BYTES bytes; the padding between them is
    theirs and written as zeros). A segment missing from ``fds`` fails
    its writes. Returns the tags of the writes in runs that failed, and
    the bytes of each pwritev."""
    recs = [(ch.seg, ch.hdr_off, ch.start, ch.end, fds.get(ch.seg, -1), bufs, n, tag)
            for nsb, ops, tag in jobs for ch, bufs, n in record_writes(nsb, ops, arena)]
    recs.sort(key=lambda r: (r[0], r[1]))
    failed: list[int] = []
    sizes: list[int] = []
    i = 0
    while i < len(recs):
        seg, off, _start, end, fd = recs[i][:5]
        at = off
        run: list[Any] = []
        tags: list[int] = []
        j = i
        while j < len(recs):
            s, hdr, start, e, _fd, bufs, n, tag = recs[j]
            pad = hdr - at
            nb = 1 + (1 if len(bufs) > 1 and n > len(bufs[0]) else 0)
            if j > i and (s != seg or start != end or len(run) + nb + 1 >= RUN_IOVS or at - off + n > RUN_BYTES
                          or not 0 <= pad <= len(_ZEROS)):
                break
            if j > i and pad:
                run.append(_ZEROS[:pad])
            run.extend(bufs[:nb])
            tags.append(tag)
            at = hdr + n
            end = e
            j += 1
        try:
            ok = os.pwritev(fd, run, off) == at - off
        except OSError:
            ok = False
        sizes.append(at - off)
        if not ok:
            failed += tags
        i = j
    return failed, sizes


def index_rows(ops: list[Any], live: list[bool], now: float
               ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[int]]:
    """The index rows of a batch's live items (native/records.c's twin):
    (object key, entry as kvfsd.index.encode_entry writes it) per item,
    (segobj key: >QQ segment and header offset, object key) per chunk, and
    per chunk row the index of its item's row."""
    if len(ops) != len(live):
        raise ValueError("one live flag per item")
    segoff = struct.Struct(">QQ")
    pairs: list[tuple[bytes, bytes]] = []
    segs: list[tuple[bytes, bytes]] = []
    owner: list[int] = []
    for op, on in zip(ops, live):
        if not on:
            continue
        rows = [[c.stripe, c.seg, c.payload_off, c.length, c.checksum, c.hdr_off, c.end - c.hdr_off]
                for c in op.chunks]
        pairs.append((op.ok, pack_entry(op.size, op.checksum, op.seq, now, now, op.meta, rows)))
        for c in op.chunks:
            segs.append((segoff.pack(c.seg, c.hdr_off), op.ok))
            owner.append(len(pairs) - 1)
    return pairs, segs, owner


def t0_evict_round(lru: T0List, leased: Any, need: int) -> tuple[list[bytes], list[Any], list[int], int]:
    """One eviction round of T0 (kvfsd.tier0.Tier0._evict_for; native/mirror.c's
    twin): the least recent entries of the T0List ``lru`` (clean entries)
    whose keys are not in ``leased``, until their sizes reach ``need`` (or
    all there are); leased ones passed over move to the recent end. The
    chosen ones leave ``lru`` and lose their T0 copy (t0 -1, rewired).
    Returns (keys, entries, arena offsets to free, bytes they held)."""
    oks: list[bytes] = []
    ms: list[Any] = []
    skipped: list[Any] = []
    freed = 0
    for ok, m in lru.items():
        if ok in leased:
            skipped.append(m)
            continue
        oks.append(ok)
        ms.append(m)
        freed += m.size
        if freed >= need:
            break
    for m in skipped:
        lru.move_to_end(m)  # being read: it counts as recent
    offs: list[int] = []
    nbytes = 0
    for m in ms:
        lru.remove(m)
        nbytes += m.size
        off, m.t0 = m.t0, -1
        m.rewire()
        if off >= 0:
            offs.append(off)
    return oks, ms, offs, nbytes


def release_chunks(ops: list[Any], segs: dict[int, Any]) -> tuple[list[int], list[int]]:
    """A plan's chunk reservations released (native/mirror.c's twin): each
    chunk leaves its segment's ``reserved`` map (a segment gone is skipped),
    each op's chunks become [] and its t0 -1. Returns the segments touched
    that exist (first-seen order) and the arena extents never published (op.mem None),
    for the caller to free."""
    touched: list[int] = []
    seen: set[int] = set()
    frees: list[int] = []
    for op in ops:
        if op is None:
            continue
        for c in op.chunks:
            s = segs.get(c.seg)
            if s is not None:
                s.reserved.pop(c.start, None)
                if c.seg not in seen:
                    seen.add(c.seg)
                    touched.append(c.seg)
        op.chunks = []  # released once only
        if op.t0 >= 0 and op.mem is None:
            frees.append(op.t0)
        op.t0 = -1
    return touched, frees


def place_chunk(seg: Any, stripe: int, nl: int, kl: int, i: int, length: int, stripe_unit: int) -> ChunkPlan:
    """Reserve chunk ``i`` of ``length`` bytes at the end of ``seg`` (a
    kvfsd.segments.SegState with room for it): its ChunkPlan, the segment's
    end moved past it and the reservation in its ``reserved``."""
    from .format import place_record
    start = seg.end
    hdr, pay, end = place_record(start, nl, kl, length)
    seg.end = end
    seg.reserved[start] = end
    return ChunkPlan(stripe, seg.seg, hdr, pay, end, length, i * stripe_unit, i, b"", start)


def place_items(items: list[Any], at: int, nl: int, stripe_unit: int, segment_size: int, nstripes: int,
                state: list[int], open_seg: dict[int, int], segs: dict[int, Any], touched: set[int],
                segment_for: Callable[[int, int], Any], new_hasher: Callable[[], Any], out: list[Any],
                carve: Callable[[int, int, int], int] | None = None, res: list[int] | None = None,
                error: type[Exception] = ValueError) -> None:
    """The placement layer's loop (kvfsd.placement; native/placement.c's
    twin). Per item of ``items`` (None: None appended to ``out``), its
    (object key, key, size, meta) at ``at``..``at``+3: the next sequence
    number (``state[0]``), its chunks striped from the next stripe round
    robin (``state[1]``), each reserved at the end of its stripe's open
    segment (``open_seg``: stripe -> segment, ``segs``: segment ->
    SegState), or of the one ``segment_for(stripe, span)`` opens when that
    has no room; the bytes reserved are added to ``state[2]``, the segments
    to ``touched``, and its ObjPlan (with ``new_hasher()`` if it has several
    chunks) appended to ``out`` once its chunks are reserved.

    With ``carve`` (a batch the client placed in its arena reservation
    ``res`` = [rest, end]): each item's (arena offset, object sum, [chunk
    sums]) follow at ``at``+4..+6, and its extent is carved out of the
    reservation after its plan is in ``out`` (``res[0]`` moves on); then
    it is a T0 item with those sums. ``error`` for a placement outside the
    reservation, or once it is used up. ``state`` and ``res`` hold what was
    done also when an error stops the loop."""
    from .format import record_span
    su = stripe_unit
    for it in items:
        if it is None:
            out.append(None)
            continue
        ok, key, size, meta = it[at:at + 4]
        kl = len(ok) - nl - 1
        seq, start = state[0], state[1]
        state[0], state[1] = seq + 1, (start + 1) % nstripes
        n = 1 if size <= su else -(-size // su)
        chunks = []
        for i in range(n):
            stripe = (start + i) % nstripes
            length = size if n == 1 else min(su, size - i * su)
            span = record_span(nl, kl, length)
            sid = open_seg.get(stripe)
            seg = None if sid is None else segs[sid]
            if seg is None or not (seg.end + span <= segment_size or seg.end == 0):
                seg = segment_for(stripe, span)
            before = seg.end
            chunks.append(place_chunk(seg, stripe, nl, kl, i, length, su))
            state[2] += seg.end - before
            touched.add(seg.seg)
        op = ObjPlan(key, size, meta, seq, chunks, ok, new_hasher() if n > 1 else None)
        out.append(op)
        if carve is None:
            continue
        assert res is not None
        off, whole, parts = it[at + 4:at + 7]
        if res[0] >= res[1]:
            raise error("the arena reservation is used up")
        try:
            res[0] = carve(res[0], off, size)
        except ValueError as e:
            raise error(f"bad arena placement: {e}") from None
        op.t0 = off
        op.via_t0 = True
        op.checksum = whole
        for ch, c in zip(chunks, parts):
            ch.checksum = c
