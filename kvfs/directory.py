"""The location directory: where every resident object is, in shared memory
the daemon keeps and clients read without a round trip.

It answers two questions with no message to the daemon:
- *Is it stored?* ``contains`` and ``prefix_match`` of a batch (an engine's
  scheduler asks this for every request). The directory holds every
  resident object while it has room, so a miss here is a miss (see Full).
- *Where is it?* A client's first get of a key, even one another process
  put, then costs microseconds instead of a lookup round trip. Objects of
  more than MAX_CHUNKS chunks are present without their chunks' places
  (nchunks 0): from T0 a get copies the whole value from the slot's arena
  offset and checks it against the object's own sum (``read_py``, C
  ``dir_read``); a T1 get of one asks the daemon.

Layout: a HEADER-byte header, then ``nslots`` slots of SLOT bytes in
buckets of BUCKET slots, then the hop map (one byte per bucket). A key's
home bucket is picked by the low bits of ``key_hash(ns, key)`` (xxh3-128
of ``ns NUL key``, as the index names objects); it lives in the first slot
free in its home bucket or the PROBE-1 buckets after it (wrapping). Bit i
of its home bucket's hop byte says that some key of that home may be in
the i-th of those buckets, so a reader looks only there (mostly one
bucket: an absent key costs four slots, not thirty-two). A removal just
empties its slot; no tombstones. Header (little-endian)::

    4s magic b"KVD2" | u32 layout version | u32 PROBE | u32 0 | u64 nslots |
    u64 outside | u64 entries | u64 displaced | u64 writer's clock

Slot::

    u64 version | 16s key hash | u64 size | u64 seq | 16s checksum |
    i64 T0 offset (-1: none) | u32 flags (bit 0: also in T1; bits 1-31: the
    writer's clock at its last write) | u32 nchunks |
    MAX_CHUNKS x (u32 stripe | u32 length | u64 segment | u64 offset | 16s chunk sum)

**Full.** A new object whose PROBE buckets are full takes the slot of the
coldest key there: an object only in T1 before one in T0, then the one
whose slot was written longest ago (a put, an update, or a daemon lookup,
which enters a key read from outside the table), then the oldest put. The
directory then works as a cache of the newest and most recently read
locations, and never costs the daemon memory per key it leaves out. The
header's ``outside`` counts resident objects in no slot (an update of one,
such as its write-back or eviction, takes a free slot in its buckets if
there is one, never another key's), and ``displaced`` counts every time a
key took another's slot. While ``outside`` is not 0 the table is
incomplete: a key found is stored, a key not found must be asked of the
daemon (one round trip for the misses only). A reader's "not found" means
"not stored" only if ``outside`` was 0 when it began and ``displaced`` did
not move until it ended (the writer counts a key outside, then displaced,
before it leaves its slot). Size it with ``kvfs daemon --dir-slots``
(``kvfs stats`` shows entries and the keys outside).

Concurrency: one writer (the daemon, under its engine lock) and any number
of lock-free readers. The writer makes a slot's version odd, changes the
slot, and makes it even again (a seqlock); a reader keeps what it read only
if the version was even and unchanged around the read. The writer sets a
hop bit before it puts a key in that bucket and clears it only after the
last key of that home left the bucket, so a reader never skips a bucket
that held a key of its home before the probe began.

Invariants (kept by the daemon):
- an object enters the directory before the put that stores it is
  acknowledged, and leaves it before the removal that ends it is
  acknowledged; so a client's ``contains`` after its own put (or delete)
  always sees it;
- a location leaves the directory *before* the removal generation is bumped
  for the removal that ends it, and T0 bytes are reused only after such a
  bump; so a reader that read the generation before probing, copied the
  bytes, and finds the generation unchanged, read bytes of a live location
  (kvfs.loccache relies on the same rule). Everything read is verified by
  its checksum as well, unless verification is off.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Sequence

import xxhash

from . import native

HEADER = 4096
MAGIC = b"KVD2"
LAYOUT = 3  # 3: full buckets displace their coldest key (2 spilled the new one)
HEAD_STRUCT = struct.Struct("<4sIIIQQQQQ")  # magic, layout, probe, 0, nslots, outside, entries, displaced, clock
OUTSIDE_AT = 24
ENTRIES_AT = 32
DISPLACED_AT = 40
CLOCK_AT = 48  # the writer's clock, one tick per write call; each slot write stamps it into the slot's flags
STAMP_SHIFT = 1
STAMP_MASK = 0x7FFFFFFF
SLOT = 192
BUCKET = 4
PROBE = 8  # buckets a key may live in
MAX_CHUNKS = 3
HEAD = struct.Struct("<Q16sQQ16sqII")
CHUNK = struct.Struct("<IIQQ16s")
VERSION = struct.Struct("<Q")
U64 = struct.Struct("<Q")
assert HEAD.size + MAX_CHUNKS * CHUNK.size == SLOT
assert HEAD_STRUCT.size <= HEADER
IN_T1 = 1
# put modes (put_py, dir_put...): update or take a free slot; also take the
# coldest key's; only enter a key in no slot, into a free one (a refill)
UPDATE, DISPLACE, FILL = 0, 1, 2
_EMPTY = bytes(16)
ABSENT, PRESENT, SLOW, UNKNOWN = 0, 1, 2, 3  # dir_probe's states


def key_hash(ns: str, key: str) -> bytes:
    return xxhash.xxh3_128_digest(ns.encode() + b"\x00" + key.encode())


def bucket_of(h: bytes, nslots: int) -> int:
    """The first slot of ``h``'s home bucket."""
    return (int.from_bytes(h[:8], "little") & (nslots // BUCKET - 1)) * BUCKET


def home_of(h: bytes, nslots: int) -> int:
    return int.from_bytes(h[:8], "little") & (nslots // BUCKET - 1)


def hops_at(nslots: int) -> int:
    """Where the hop map starts (one byte per bucket)."""
    return HEADER + nslots * SLOT


def file_size(nslots: int) -> int:
    return hops_at(nslots) + nslots // BUCKET


def slot_offsets(h: bytes, nslots: int, hops: int = (1 << PROBE) - 1) -> list[int]:
    """Byte offsets (from the file's start) of the slots ``h`` may occupy,
    in order: in every bucket of its window, or those ``hops`` names."""
    nb = nslots // BUCKET
    home = int.from_bytes(h[:8], "little") & (nb - 1)
    return [HEADER + (((home + i) & (nb - 1)) * BUCKET + j) * SLOT
            for i in range(PROBE) if hops >> i & 1 for j in range(BUCKET)]


def _candidates(mm: Any, h: bytes, nslots: int) -> list[int]:
    """The slots a reader looks in for ``h``: its home's hop byte says which buckets."""
    return slot_offsets(h, nslots, mm[hops_at(nslots) + home_of(h, nslots)])


def check_slots(nslots: int) -> None:
    if nslots < BUCKET * PROBE or nslots & (nslots - 1):
        raise ValueError(f"directory slots must be a power of two >= {BUCKET * PROBE}")


def _stable(mm: Any, off: int, h: bytes) -> tuple[int, bytes | None]:
    """(1 holds ``h``, 0 not, -1 kept changing; the slot's bytes when 1)."""
    for _ in range(16):
        v1 = VERSION.unpack_from(mm, off)[0]
        if v1 & 1:
            continue
        raw = mm[off:off + SLOT]
        if VERSION.unpack_from(mm, off)[0] != v1:
            continue
        return (1, raw) if raw[8:24] == h else (0, None)
    return -1, None


def _plain(k: Any) -> bool:
    """A plain ASCII str key by kvfs.keys' rules (what the C reader takes;
    anything else is left to the Python path)."""
    return isinstance(k, str) and k.isascii() and 1 <= len(k) <= 200 and k not in (".", "..") \
        and "/" not in k and k.isprintable()


def _slot_of(mm: Any, nslots: int, h: bytes) -> bytes | None:
    """A stable copy of the slot holding ``h`` (None: absent, or it kept
    changing). A key lives in one slot, so the first whose hash matches is it."""
    for off in _candidates(mm, h, nslots):
        if mm[off + 8:off + 24] == h:
            r, raw = _stable(mm, off, h)
            return raw if r == 1 else None
    return None


def item_of(raw: bytes) -> list[Any] | None:
    """A slot's location in lookup's wire form ([size, sum, seq, [[stripe,
    seg, offset, length, chunk sum], ...], [T0 offset, also in T1] or
    None]); None when the slot keeps no location (more than MAX_CHUNKS)."""
    _v, _kh, size, seq, csum, t0, flags, n = HEAD.unpack_from(raw, 0)
    if not n or n > MAX_CHUNKS:
        return None
    exts = []
    for i in range(n):
        stripe, length, seg, coff, ccs = CHUNK.unpack_from(raw, HEAD.size + i * CHUNK.size)
        exts.append([stripe, seg, coff, length, ccs])
    return [size, csum, seq, exts, None if t0 < 0 else [t0, bool(flags & IN_T1)]]


def probe_py(mm: Any, nslots: int, ns: bytes, keys: Sequence[Any], prefix: bool = False) -> bytes:
    """What the C ``dir_probe`` answers (kvfs._native_py's twin): per key
    ABSENT, PRESENT, SLOW (not a plain ASCII str key: the caller checks it
    with kvfs.keys' rules and probes its normalized form) or UNKNOWN."""
    out = bytearray()
    for k in keys:
        st = SLOW
        if _plain(k):
            h = xxhash.xxh3_128_digest(ns + b"\x00" + k.encode())
            st = ABSENT
            for off in _candidates(mm, h, nslots):
                r, _raw = _stable(mm, off, h)
                if r == 1:
                    st = PRESENT
                    break
                if r < 0:
                    st = UNKNOWN
        out.append(st)
        if prefix and st != PRESENT:
            break
    return bytes(out)


def fd_id(seg: int, stripe: int) -> int:
    """A segment file's key in the fd map ``dir_read`` reads through
    (kvfs.dataplane.FdCache.by_id)."""
    return (seg << 16) | stripe


def read_py(mm: Any, nslots: int, ns: bytes, key: Any, arena: Any, dest: Any, gen: Any, gen_before: int,
            verify: bool, fds: dict[int, int] | None = None) -> int:
    """What the C ``dir_read`` answers (kvfs._native_py's twin): the object
    of ``key`` read where the directory places it, into ``dest``, verified
    chunk by chunk: copied from the arena, or read from a segment file whose
    fd ``fds`` holds. Its size; -1 when it cannot be read that way (absent,
    a location not kept, a file not open, a short read, or the generation
    moved: see the module's invariants); -2 when a chunk fails
    verification. (Unlike the C one it does not dup the fds it reads
    through, so a caller must keep them open meanwhile: kvfs.host_reads
    gives fds to the C one only.)"""
    raw = _slot_of(mm, nslots, xxhash.xxh3_128_digest(ns + b"\x00" + key.encode())) if _plain(key) else None
    if raw is None:
        return -1
    item = item_of(raw)
    dv = memoryview(dest).cast("B")
    if item is None:  # more chunks than a slot keeps: from the arena, one copy checked by the object's sum
        _v, _kh, size, _seq, csum, off0, _flags, _n = HEAD.unpack_from(raw, 0)
        if off0 < 0 or not 0 < size <= len(dv) or arena is None or off0 + size > len(arena):
            return -1
        dv[:size] = arena[off0:off0 + size]
        bad = verify and xxhash.xxh3_128_digest(dv[:size]) != csum
        if U64.unpack_from(gen, 0)[0] != gen_before:
            return -1
        return -2 if bad else size
    if item[0] > len(dv):
        return -1
    size, _csum, _seq, exts, t0 = item
    off0 = t0[0] if t0 is not None else -1
    if (arena is None or off0 + size > len(arena)) if t0 is not None else fds is None:
        return -1
    if sum(x[3] for x in exts) != size:
        return -1
    pos, bad = 0, False
    for stripe, seg, coff, length, ccs in exts:
        part = dv[pos:pos + length]
        if t0 is not None:
            part[:] = arena[off0 + pos:off0 + pos + length]
        else:
            assert fds is not None
            fd = fds.get(fd_id(seg, stripe))
            if fd is None or os.preadv(fd, [part], coff) != length:
                return -1
        bad = bad or (verify and xxhash.xxh3_128_digest(part) != ccs)
        pos += length
    if U64.unpack_from(gen, 0)[0] != gen_before:
        return -1
    return -2 if bad else size


# ---- the writer's slot operations (the daemon's, under its engine lock):
# C dir_put / dir_del in native/directory.c; these are their twins.

def _find(mm: Any, nslots: int, h: bytes) -> tuple[int, int]:
    """(the slot holding ``h`` or -1, the first free slot of its buckets or -1)."""
    for off in _candidates(mm, h, nslots):
        if mm[off + 8:off + 24] == h:
            return off, -1
    for off in slot_offsets(h, nslots):
        if mm[off + 8:off + 24] == _EMPTY:
            return -1, off
    return -1, -1


def _write(mm: Any, off: int, body: bytes | memoryview) -> None:
    v = VERSION.unpack_from(mm, off)[0]
    VERSION.pack_into(mm, off, v + 1)  # odd: readers retry or miss
    mm[off + 8:off + 8 + len(body)] = body
    VERSION.pack_into(mm, off, v + 2)


def _hop(mm: Any, nslots: int, h: bytes, off: int, placed: bool) -> None:
    """Keep the hop bit of ``h``'s home for the bucket of slot ``off``: set
    it (a key of that home goes there), or clear it if no key of that home
    is left in that bucket."""
    nb = nslots // BUCKET
    home = home_of(h, nslots)
    bucket = (off - HEADER) // SLOT // BUCKET
    bit = 1 << ((bucket - home) % nb)
    at = hops_at(nslots) + home
    if placed:
        mm[at] |= bit
        return
    first = HEADER + bucket * BUCKET * SLOT
    for o in range(first, first + BUCKET * SLOT, SLOT):
        kh = mm[o + 8:o + 24]
        if kh != _EMPTY and home_of(kh, nslots) == home:
            return  # another key of that home is still there
    mm[at] &= ~bit & 0xFF


def _victim(mm: Any, nslots: int, h: bytes, now: int) -> int:
    """The slot a new key takes from its full buckets: the coldest of its
    window, T1-only objects before T0 ones, then the longest unwritten (the
    age of its stamp, modulo 31 bits), then the lowest seq (first wins)."""
    best, rank = -1, (2, 0, 0)
    for off in slot_offsets(h, nslots):
        _v, _kh, _size, seq, _sum, t0, fl, _n = HEAD.unpack_from(mm, off)
        r = (int(t0 >= 0), -((now - (fl >> STAMP_SHIFT)) & STAMP_MASK), seq)
        if r < rank:
            best, rank = off, r
    return best


def _add(mm: Any, at: int, n: int) -> None:
    U64.pack_into(mm, at, U64.unpack_from(mm, at)[0] + n)


def put_py(mm: Any, nslots: int, h: bytes, size: int, seq: int, checksum: bytes, t0: int, flags: int,
           exts: list[Any], displace: int = 0) -> int:
    """Publish where the object of key hash ``h`` lives: 1 it took a free
    slot, 0 its slot was updated, 2 its buckets were full and it took the
    coldest key's slot (``displace`` DISPLACE: that key is counted
    outside), -1 its buckets are full (not written). With ``displace``
    FILL only a key in no slot is written, into a free one (0: it has a
    slot, left as it is)."""
    off, free = _find(mm, nslots, h)
    if off >= 0 and displace == FILL:
        return 0
    new = 0
    gone = b""
    now = U64.unpack_from(mm, CLOCK_AT)[0] & STAMP_MASK
    flags = (flags & ((1 << STAMP_SHIFT) - 1)) | now << STAMP_SHIFT  # stamped: its last write
    if off < 0 and free < 0:
        if displace != DISPLACE:
            return -1
        off, new = _victim(mm, nslots, h, now), 2
        gone = bytes(mm[off + 8:off + 24])
        _add(mm, OUTSIDE_AT, 1)  # counted outside, then displaced, then it leaves
        _add(mm, DISPLACED_AT, 1)
        _hop(mm, nslots, h, off, True)
    elif off < 0:
        off, new = free, 1
        _hop(mm, nslots, h, off, True)  # before the key is there
    body = bytearray(SLOT)
    exts = exts if len(exts) <= MAX_CHUNKS else []  # more: present, location asked of the daemon
    HEAD.pack_into(body, 0, 0, h, size, seq, checksum, t0 if t0 >= 0 else -1, flags, len(exts))
    for i, (stripe, seg, coff, length, ccs) in enumerate(exts):
        CHUNK.pack_into(body, HEAD.size + i * CHUNK.size, stripe, length, seg, coff, ccs)
    _write(mm, off, memoryview(body)[8:])
    if gone:
        _hop(mm, nslots, gone, off, False)  # after it left
    return new


def del_py(mm: Any, nslots: int, h: bytes) -> int:
    """Take key hash ``h`` out: the slot it freed, -1 if it was in none."""
    off, _free = _find(mm, nslots, h)
    if off < 0:
        return -1
    _write(mm, off, bytes(SLOT - 8))
    _hop(mm, nslots, h, off, False)  # after it left
    return off


class DirectoryReader:
    def __init__(self, path: str, nslots: int, pid: int = 0):
        check_slots(nslots)
        self.pid = pid  # the daemon's: its answers hold while it lives
        # the fd stays open: its link count says whether the daemon that
        # made this directory still keeps it (a stopped or restarted daemon
        # unlinks it; a new one makes a new file)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.mm = mmap.mmap(self.fd, file_size(nslots), mmap.MAP_SHARED, mmap.PROT_READ)
            magic, layout, probe, _z, n, _o, _e, _d, _c = HEAD_STRUCT.unpack_from(self.mm, 0)
            if magic != MAGIC or layout != LAYOUT or probe != PROBE or n != nslots:
                self.mm.close()
                raise ValueError("the daemon's directory has another layout")
        except BaseException:
            os.close(self.fd)
            raise
        self.nslots = nslots

    def kept(self) -> bool:
        """The daemon that made this directory still keeps it (it was not
        stopped, killed, nor replaced by a restart): its answers are
        current. Two syscalls, no round trip."""
        try:
            if self.fd < 0 or os.fstat(self.fd).st_nlink == 0:
                return False
            if self.pid:
                os.kill(self.pid, 0)
            return True
        except PermissionError:
            return True  # alive, another user's (a shared daemon)
        except OSError:
            return False

    def complete(self) -> int | None:
        """Read before a probe: a token if every resident object is in the
        table, None if some are outside. A key the probe does not find is
        not stored if ``still_complete(token)`` holds after it."""
        displaced = U64.unpack_from(self.mm, DISPLACED_AT)[0]  # first: the writer counts outside, then this
        return displaced if U64.unpack_from(self.mm, OUTSIDE_AT)[0] == 0 else None

    def still_complete(self, token: int | None) -> bool:
        """No key left its slot for another since ``complete()`` gave ``token``."""
        return token is not None and U64.unpack_from(self.mm, DISPLACED_AT)[0] == token

    def probe(self, ns: str, keys: Sequence[Any], prefix: bool = False) -> bytes:
        """``dir_probe`` of the data plane in use (kvfs.native)."""
        return native.backend.dir_probe(self.mm, self.nslots, ns.encode(), keys if isinstance(keys, list)
                                        else list(keys), prefix)

    def holds(self, ns: str, key: str) -> int:
        """PRESENT, ABSENT or UNKNOWN for one (valid) key of any characters."""
        h = key_hash(ns, key)
        st = ABSENT
        for off in _candidates(self.mm, h, self.nslots):
            r, _raw = _stable(self.mm, off, h)
            if r == 1:
                return PRESENT
            if r < 0:
                st = UNKNOWN
        return st

    def contains(self, ns: str, keys: list[Any]) -> tuple[list[bool], int]:
        """``dir_contains`` of the data plane in use: (present?, bitmask of
        the other states met, ``1 << state``)."""
        return native.backend.dir_contains(self.mm, self.nslots, ns.encode(), keys)

    def lookup_many(self, ns: str, keys: list[str], idx: list[int]) -> dict[int, list[Any]]:
        """Locations (lookup's wire form) of ``keys[i]`` for i in ``idx`` that
        the directory holds."""
        out: dict[int, list[Any]] = {}
        nsb = ns.encode() + b"\x00"
        digest = xxhash.xxh3_128_digest
        for i in idx:
            raw = _slot_of(self.mm, self.nslots, digest(nsb + keys[i].encode()))
            item = item_of(raw) if raw is not None else None
            if item is not None:
                out[i] = item
        return out

    def close(self) -> None:
        """Drop the mapping (at most once; a probe still running elsewhere
        keeps it until it ends)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            try:
                self.mm.close()
            except BufferError:
                pass  # in use by a probe on another thread: freed with the object
