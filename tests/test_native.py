"""The data-plane backends: the C extension kvfs._native and its pure-Python
twin kvfs._native_py give identical results, and the client gives identical
bytes on either."""
import ctypes
import os
import struct
import sys

import numpy as np
import pytest
import xxhash

from kvfs import _native_py, native

try:
    from kvfs import _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - CI builds it; this names the failure
    _native = None

BACKENDS = ["native", "python"]
MiB = 1 << 20


def mod(name):
    if name == "native":
        assert _native is not None, "kvfs._native was not built (pip install -e . needs a C compiler)"
        return _native
    return _native_py


@pytest.fixture(params=BACKENDS)
def backend(request):
    old = native.name
    native.use(request.param)
    yield request.param
    native.use(old)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("threads", [1, 4])
def test_read_many_statuses_and_bytes(tmp_path, name, threads):
    b = mod(name)
    data = os.urandom(5 * MiB + 123)
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        spans = [(0, 4096), (4096, 3 * MiB), (3 * MiB + 4096, 2 * MiB - 4096 + 123), (100, 0)]
        dests = [bytearray(n) for _o, n in spans]
        sums = [xxhash.xxh3_128_digest(data[o:o + n]) for o, n in spans]
        sums[1] = None  # unverified
        assert b.read_many([fd] * 4, [o for o, _ in spans], dests, sums, threads) == [0, 0, 0, 0]
        assert all(bytes(d) == data[o:o + n] for d, (o, n) in zip(dests, spans))
        # a mismatch, a short read past the end, a bad fd
        bad = [bytearray(100), bytearray(200), bytearray(10)]
        st = b.read_many([fd, fd, 987654], [0, len(data) - 100, 0], bad,
                         [b"\0" * 16, None, None], threads)
        assert st[0] == 2 and st[1] == 1 and st[2] < 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("size", [2 * MiB + 123, 9 * MiB])
def test_one_large_verified_task_on_many_threads(tmp_path, name, size):
    """Fewer tasks than threads: each large one is read or copied in pieces
    by several threads and hashed in order as they land (the C backend's
    chase_hash). The same answers as one thread: bytes, mismatch anywhere
    (first, middle, last piece), short read."""
    b = mod(name)
    data = bytearray(os.urandom(size))
    want = xxhash.xxh3_128_digest(bytes(data))
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        for threads in (1, 4, 8):
            d = bytearray(size)
            assert b.read_many([fd], [0], [d], [want], threads) == [0] and d == data
            d = bytearray(size)
            assert b.copy_many([d], [bytes(data)], [want], threads) == [0] and d == data
            assert b.read_many([fd], [0], [bytearray(size)], [b"\0" * 16], threads) == [2]
            assert b.copy_many([bytearray(size)], [bytes(data)], [b"\0" * 16], threads) == [2]
            assert b.read_many([fd], [4096], [bytearray(size)], [want], threads) == [1]  # past the end
            for at in (0, size // 2, size - 1):
                bad = bytearray(data)
                bad[at] ^= 0xFF
                os.pwrite(fd, bytes(bad[at:at + 1]), at)
                assert b.read_many([fd], [0], [bytearray(size)], [want], threads) == [2], (threads, at)
                assert b.copy_many([bytearray(size)], [bytes(bad)], [want], threads) == [2], (threads, at)
                os.pwrite(fd, bytes(data[at:at + 1]), at)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", BACKENDS)
def test_hash_chunked_gives_chunk_and_whole_sums_in_one_pass(name):
    b = mod(name)
    chunk = 4 * MiB
    vals = [os.urandom(n) for n in (0, 1, chunk, chunk + 1, 9 * MiB, 16 * MiB)]
    got = b.hash_chunked(vals, chunk, 4)
    for v, (whole, parts) in zip(vals, got):
        assert whole == xxhash.xxh3_128_digest(v)
        want = [xxhash.xxh3_128_digest(v[p:p + chunk]) for p in range(0, max(len(v), 1), chunk)]
        assert parts == want
    with pytest.raises(ValueError):
        b.hash_chunked([b"x"], 0, 1)


@pytest.mark.parametrize("name", BACKENDS)
def test_copy_hash_chunked_copies_and_gives_the_sums_of_hash_chunked(name):
    """A put's one pass: each value copied (plain and non-temporal sizes,
    one and several chunks, empty) and its sums those of hash_chunked."""
    b = mod(name)
    chunk = 1 * MiB
    vals = [os.urandom(n) for n in (0, 1, 100, 32 * 1024 + 3, chunk, chunk + 1, 3 * MiB + 5)]
    dsts = [bytearray(len(v)) for v in vals]
    got = b.copy_hash_chunked(dsts, vals, chunk, 3)
    assert got == b.hash_chunked(vals, chunk, 1)
    assert [bytes(d) for d in dsts] == vals
    with pytest.raises(ValueError):
        b.copy_hash_chunked([bytearray(2)], [b"abc"], chunk, 1)  # sizes differ
    with pytest.raises(ValueError):
        b.copy_hash_chunked([bytearray(3)], [b"abc", b"d"], chunk, 1)
    with pytest.raises(TypeError):
        b.copy_hash_chunked([b"abc"], [b"abc"], chunk, 1)  # not writable


@pytest.mark.parametrize("name", BACKENDS)
def test_lanes_hash_is_xxh3_128_of_each_range(name):
    """The GPU's way of hashing (kvfs/xxh3_lanes.h, run here by the C
    extension on the CPU): every length class of XXH3's long path (one
    stripe, partial and exact blocks, many blocks, odd tails), and ranges
    inside one buffer sharing its block sums (a value's chunks)."""
    b = mod(name)
    for n in (241, 255, 256, 1023, 1024, 1025, 1088, 1089, 2047, 2048, 4097, 65536 + 3, MiB, MiB + 7):
        v = os.urandom(n)
        assert b.lanes_hash(v, [(0, n)]) == [xxhash.xxh3_128_digest(v)], n
    v = os.urandom(9 * MiB + 333)
    ranges = [(0, len(v))] + [(o, min(4 * MiB, len(v) - o)) for o in range(0, len(v), 4 * MiB)] + [
        (7 * 1024, 5000), (2048, 241), (len(v) - 333 - 1024, 1024 + 333)]
    assert b.lanes_hash(v, ranges) == [xxhash.xxh3_128_digest(v[o:o + m]) for o, m in ranges]
    for bad in ((1, 1000), (0, 240), (len(v) - 1023, 2048)):
        with pytest.raises(ValueError):
            b.lanes_hash(v, [bad])


@pytest.mark.parametrize("name", BACKENDS)
def test_copy_write_hash_agree_with_xxhash(tmp_path, name):
    b = mod(name)
    srcs = [os.urandom(n) for n in (0, 1, 4096, 3 * MiB + 5, 9 * MiB)]
    dests = [bytearray(len(s)) for s in srcs]
    sums = [xxhash.xxh3_128_digest(s) for s in srcs]
    assert b.copy_many(dests, srcs, sums, 4) == [0] * 5
    assert [bytes(d) for d in dests] == srcs
    assert b.copy_many([bytearray(4)], [b"abcd"], [b"x" * 16], 1) == [2]
    assert b.hash_many(srcs, 4) == sums
    fd = os.open(tmp_path / "w", os.O_RDWR | os.O_CREAT)
    try:
        offs = [0, 10, 4096, 8 * MiB, 20 * MiB]
        assert b.write_many([fd] * 5, offs, srcs, 4) == sums
        for s, o in zip(srcs, offs):
            assert os.pread(fd, len(s), o) == s
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        b.write_many([987654], [0], [b"x"], 1)
    with pytest.raises(ValueError):
        b.copy_many([bytearray(3)], [b"abcd"], [None], 1)


@pytest.mark.parametrize("name", BACKENDS)
def test_aligned_buffer(name):
    buf = mod(name).aligned_buffer(3 * 4096 + 5, 4096)
    arr = np.frombuffer(buf, dtype=np.uint8)
    assert arr.nbytes == 3 * 4096 + 5 and not arr.any()
    assert arr.ctypes.data % 4096 == 0
    arr[:] = 7  # writable
    assert bytes(memoryview(buf)[:3]) == b"\x07\x07\x07"
    ctypes.memset(arr.ctypes.data, 0, 1)


def test_index_entries_and_record_heads_are_the_definitions_bytes():
    """pack_entry is msgpack.packb of its arguments' list and record_head is
    encode_header plus padding, byte for byte (recovery and older daemons
    read what either writes), over the values they meet: large and small
    ints, floats, None or bytes meta, rows of up to 20 chunks."""
    import random

    import msgpack

    from kvfs import format as fmt
    assert _native is not None, "kvfs._native was not built"
    rng = random.Random(5)
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, -1, -32, -33, -129,
            -40000, -(1 << 40)]
    for _ in range(3000):
        def num():
            return rng.choice(ints) if rng.random() < 0.5 else rng.randrange(1 << rng.choice([7, 15, 31, 50]))
        rows = [[num(), num(), num(), num(), rng.randbytes(16), num(), num()] for _ in range(rng.choice([1, 2, 16, 20]))]
        meta = rng.choice([None, b"{}", rng.randbytes(rng.choice([10, 300, 70000]))])
        args = (num(), rng.randbytes(16), num(), rng.random() * 2e9, float(rng.randrange(1 << 31)), meta, rows)
        want = msgpack.packb(list(args), use_bin_type=True)
        assert _native.pack_entry(*args) == _native_py.pack_entry(*args) == want
    with pytest.raises(TypeError):
        _native.pack_entry(1, b"", 2, 0.0, 0.0, None, [object()])
    for _ in range(2000):
        ns, key = rng.randbytes(rng.randrange(1, 40)), rng.randbytes(rng.randrange(1, 1100))
        f = (ns + key, len(ns), rng.randrange(1 << 20), rng.randrange(1, 1 << 20), rng.randrange(1 << 40),
             rng.randrange(1 << 50), rng.randrange(1 << 50), rng.randrange(1 << 63), rng.randbytes(16))
        pad = rng.randrange(8)
        want = fmt.encode_header(*f) + bytes(pad)
        assert _native.record_head(*f, pad) == _native_py.record_head(*f, pad) == want
    with pytest.raises(ValueError):
        _native.record_head(b"nskey", 2, 0, 1, 0, 0, 0, 0, bytes(16), -1)
    with pytest.raises(ValueError):
        _native.record_head(b"nskey", 9, 0, 1, 0, 0, 0, 0, bytes(16), 0)  # namespace longer than the names


@pytest.mark.parametrize("plans", BACKENDS)
@pytest.mark.parametrize("name", BACKENDS)
def test_mirror_entries_and_t0_publish_behave_alike(name, plans):
    """The daemon's mirror entry and publish_t0's loop: the same fields,
    wire and results on both backends; the C entry is never tracked by the
    cyclic collector (a store of millions of objects walks none of them)."""
    import gc
    from collections import OrderedDict

    ChunkPlan, ObjPlan = mod(plans).ChunkPlan, mod(plans).ObjPlan  # the C types or their twins
    b = mod(name)
    ext = ((0, 3, 4096, 10, b"c" * 16),)
    m = b.MemEntry(10, b"s" * 16, 7, ext, (), t0=8192, dirty=True)
    assert (m.size, m.checksum, m.seq, m.exts, m.spans, m.t0, m.dirty) == (10, b"s" * 16, 7, ext, (), 8192, True)
    assert (m.deleted, m.hits, m.meta, m.created) == (False, 0, None, 0.0)
    assert m.wire == (10, b"s" * 16, 7, ext, (8192, False))
    m.dirty = False
    assert m.wire == (10, b"s" * 16, 7, ext, (8192, False))  # replaced only by rewire
    held = m.wire
    assert m.wire is held  # made once, on its first read
    m.rewire()
    assert m.wire == (10, b"s" * 16, 7, ext, (8192, True))
    assert held == (10, b"s" * 16, 7, ext, (8192, False))  # a reply holding the old one keeps it whole
    m.t0, m.hits, m.meta, m.created, m.spans = -1, m.hits + 1, b"{}", 1.5, ((3, 4200),)
    m.rewire()
    assert m.wire == (10, b"s" * 16, 7, ext, None) and (m.hits, m.meta, m.created, m.spans) == (1, b"{}", 1.5, ((3, 4200),))
    assert b.MemEntry(1, b"", 2, (), ()).wire == (1, b"", 2, (), None)
    if name == "native":
        assert not gc.is_tracked(m)
    with pytest.raises(TypeError):
        b.MemEntry(1, b"", 2, (), (), 5)  # t0 and dirty are keywords

    def plan(i, ok, nchunks=1, t0=4096):
        chunks = [ChunkPlan(i % 2, 9, 64 * j, 64 * j + 40, 64 * j + 60, 5, 5 * j, j, bytes([j]) * 16, 64 * j)
                  for j in range(nchunks)]
        return ObjPlan(f"k{i}", 5 * nchunks, None if i % 2 else b'{"a":1}', 100 + i, chunks, ok, None,
                       bytes([i]) * 16, t0 * (i + 1))
    lru = OrderedDict([(b"ns\x00old", "old"), (b"ns\x00k2", "there")])
    dirty = b.T0List()
    ops = [plan(0, b"ns\x00k0"), None, plan(2, b"ns\x00k2"), plan(3, b"ns\x00k3", nchunks=3), plan(4, b"ns\x00k4", t0=-1)]
    oks, ms, rows, nbytes, existing = b.t0_publish("ns", ops, lru, dirty, 12.5)
    assert oks == [b"ns\x00k0", b"ns\x00k3"] and nbytes == 5 + 15 and existing == [ops[2]]
    assert list(lru) == [b"ns\x00old", b"ns\x00k2", b"ns\x00k0", b"ns\x00k3"]  # order kept: appended
    assert dirty.items() == list(zip(oks, ms)) and all(lru[k] is m and m in dirty for k, m in zip(oks, ms))
    for op, m in zip((ops[0], ops[3]), ms):
        assert op.mem is m and op.t0_stored and m.dirty and m.t0 == op.t0 and m.spans == () and m.created == 12.5
        assert m.meta == op.meta and (m.size, m.checksum, m.seq) == (op.size, op.checksum, op.seq)
        assert m.exts == tuple((c.stripe, c.seg, c.payload_off, c.length, c.checksum) for c in op.chunks)
        assert m.wire == (op.size, op.checksum, op.seq, m.exts, (op.t0, False))
    assert not ops[2].t0_stored and ops[2].mem is None and ops[4].mem is None
    from kvfs._native_py import journal_row
    assert rows == b"".join(journal_row(op.seq, op.size, op.t0, op.checksum, [c.checksum for c in op.chunks], op.key,
                                        op.meta) for op in (ops[0], ops[3]))
    from kvfsd.t0journal import Pending, _px_rows  # what a restart reads back
    assert _px_rows("ns", rows) == [Pending("ns", op.key, op.seq, op.size, op.t0, op.checksum,
                                            [c.checksum for c in op.chunks], op.meta) for op in (ops[0], ops[3])]
    # an item whose journal row cannot be made (a sum that is not 16 bytes) is refused before it is published
    bad = plan(5, b"ns\x00k5")
    bad.checksum = b"short"
    with pytest.raises(TypeError):
        b.t0_publish("ns", [bad], lru, dirty, 13.0)
    assert b"ns\x00k5" not in lru and len(dirty) == 2 and bad.mem is None and not bad.t0_stored
    if name == "native":  # what a published item keeps until its write-back ends is out of the collector's sight
        for op, m in zip((ops[0], ops[3]), ms):
            held = [op, op.chunks, *op.chunks, m.exts, *m.exts, m.wire, m.wire[4]]
            assert not any(gc.is_tracked(x) for x in held)
        assert gc.is_tracked(ops[2]) == (plans == "python")  # not published: left as it was (a C plan never is)


@pytest.mark.parametrize("plans", BACKENDS)
@pytest.mark.parametrize("name", BACKENDS)
def test_t0_written_back_cleans_moves_and_counts_alike(name, plans):
    """The write-back's mirror loop: published entries become clean, move
    from the dirty list to the recent end of the T0 LRU, get their spans
    (counted live per segment) and a fresh wire; deleted, failed or replaced
    ones come back as gone; entries already clean are skipped."""
    import gc
    from collections import OrderedDict

    ChunkPlan, ObjPlan = mod(plans).ChunkPlan, mod(plans).ObjPlan  # the C types or their twins
    b = mod(name)
    ops, lru, t0_lru, t0_dirty = [], OrderedDict(), b.T0List(), b.T0List()
    t0_lru.append(b"ns\x00x", b.MemEntry(1, b"", 1, (), ()))
    for i in range(6):
        ok = b"ns\x00k%d" % i
        chunks = [ChunkPlan(0, 4 + j, 100 * j, 100 * j + 50, 100 * j + 90, 8, 8 * j, j, b"c" * 16, 100 * j)
                  for j in range(1 + i % 2)]
        op = ObjPlan(f"k{i}", 8 * len(chunks), b"{}", 50 + i, chunks, ok, None, b"s" * 16, 4096 * (i + 1))
        m = b.MemEntry(op.size, op.checksum, op.seq, (), (), t0=op.t0, dirty=True)
        m.meta = op.meta
        op.mem = m
        lru[ok] = m
        t0_dirty.append(ok, m)
        ops.append(op)
    ops[2].mem.deleted = True  # deleted while dirty
    lru[ops[3].ok] = "a newer entry"  # replaced meanwhile
    ops[4].mem.dirty = False  # settled already: skipped
    assert t0_dirty.remove(ops[4].mem) and not t0_dirty.remove(ops[4].mem)
    t0_lru.append(ops[4].ok, ops[4].mem)
    assert t0_dirty.remove(ops[5].mem)  # its T0 copy dropped meanwhile: cleaned, on no T0 list
    done = [(ops[0], True), (ops[1], True), (ops[2], True), (ops[3], True), (ops[4], True), (ops[5], True)]
    failed = b.MemEntry(1, b"", 99, (), (), t0=0, dirty=True)
    fop = ObjPlan("f", 1, None, 99, [], b"ns\x00f", None, b"", 0)
    fop.mem = failed
    lru[fop.ok] = failed
    t0_dirty.append(fop.ok, failed)
    oks, ms, rows, nbytes, live, gone = b.t0_written_back("ns", done + [(fop, False)], lru, t0_lru, t0_dirty)
    assert oks == [ops[0].ok, ops[1].ok, ops[5].ok] and ms == [ops[0].mem, ops[1].mem, ops[5].mem]
    assert rows == struct.pack("<6Q", *(50 + i for i in (0, 1, 2, 3, 5)), 99)  # the journal's "done" seqs
    assert nbytes == 8 + 16 + 8 + 16 + 16 + 1
    assert gone == [(ops[2], ops[2].mem), (ops[3], ops[3].mem), (fop, failed)]
    assert [k for k, _ in t0_lru.items()] == [b"ns\x00x", ops[4].ok, ops[0].ok, ops[1].ok]
    assert t0_dirty.items() == [(ops[2].ok, ops[2].mem), (ops[3].ok, ops[3].mem), (fop.ok, failed)]
    assert live == {4: [90 * 3, 3], 5: [90 * 2, 2]}  # k0, k1, k5 have chunk 0 in seg 4; k1, k5 chunk 1 in 5
    for op in (ops[0], ops[1], ops[5]):
        m = op.mem
        assert not m.dirty and m.meta is None
        assert m.spans == tuple((c.seg, c.end - c.hdr_off) for c in op.chunks)
        assert m.wire == (op.size, op.checksum, op.seq, (), (op.t0, True))
        if name == "native":  # kept as long as the object: out of the collector's sight
            assert not any(gc.is_tracked(x) for x in (m.spans, *m.spans, m.wire))
    assert all(not m.dirty and m.meta is None for m in (ops[2].mem, ops[3].mem, failed))


@pytest.mark.parametrize("name", BACKENDS)
def test_t0_evict_round_alike(name):
    """One eviction round: the least recent unleased entries until the need
    is met (the one that meets it included), leased ones moved to the recent
    end, the chosen out of the LRU with no T0 copy and a fresh wire; with a
    need of 0 still one; none when all are leased."""
    from collections import Counter
    b = mod(name)

    def state():
        lru = b.T0List()
        for i in range(8):
            lru.append(b"ns\x00k%d" % i, b.MemEntry(100 + i, b"s" * 16, i, (), (), t0=4096 * i))
        return lru

    lru = state()
    ms0 = [m for _, m in lru.items()]
    leased = Counter({b"ns\x00k1": 1, b"ns\x00k4": 2})
    oks, ms, offs, nbytes = b.t0_evict_round(lru, leased, 100 + 102 + 1)
    assert oks == [b"ns\x00k0", b"ns\x00k2", b"ns\x00k3"] and ms == [ms0[0], ms0[2], ms0[3]]
    assert offs == [0, 8192, 12288] and nbytes == 100 + 102 + 103
    assert [k for k, _ in lru.items()] == [b"ns\x00k4", b"ns\x00k5", b"ns\x00k6", b"ns\x00k7",
                                           b"ns\x00k1"]  # k1 passed over: recent
    assert all(m.t0 == -1 and m.wire[4] is None and m not in lru for m in ms)
    lru = state()
    assert b.t0_evict_round(lru, set(), 0)[0] == [b"ns\x00k0"]
    lru = state()
    keys = [k for k, _ in lru.items()]
    assert b.t0_evict_round(lru, set(keys), 10**9)[:3] == ([], [], []) and len(lru) == 8
    lru = state()
    got = b.t0_evict_round(lru, {}, 10**9)
    assert len(got[0]) == 8 and len(lru) == 0 and got[3] == sum(100 + i for i in range(8))


@pytest.mark.parametrize("name", BACKENDS)
def test_t0_lists_hold_each_entry_once_in_order(name):
    """T0's lists (kvfsd.tier0): append to the recent end, remove and
    move_to_end of an entry that is there (False if not), items least
    recent first; an entry is on one list at most; what a list drops or
    hands over is not freed while someone holds it."""
    import gc
    import weakref
    b = mod(name)
    a, c = b.T0List(), b.T0List()
    ms = [b.MemEntry(i, b"", i, (), ()) for i in range(4)]
    for i, m in enumerate(ms):
        a.append(b"k%d" % i, m)
    assert len(a) == 4 and a.items() == [(b"k%d" % i, m) for i, m in enumerate(ms)]
    assert ms[0] in a and ms[0] not in c and "k0" not in a
    assert a.move_to_end(ms[1]) and not c.move_to_end(ms[1])
    assert [k for k, _ in a.items()] == [b"k0", b"k2", b"k3", b"k1"]
    with pytest.raises(ValueError):
        c.append(b"k0", ms[0])  # on a already
    with pytest.raises(TypeError):
        a.append(b"x", object())  # entries only
    with pytest.raises(TypeError):
        a.append("k9", b.MemEntry(9, b"", 9, (), ()))  # keys are bytes
    assert a.remove(ms[2]) and not a.remove(ms[2]) and not c.remove(ms[0])
    c.append(b"k2", ms[2])
    assert c.items() == [(b"k2", ms[2])] and len(a) == 3
    assert a.remove(ms[3]) and a.remove(ms[0]) and a.items() == [(b"k1", ms[1])]
    assert a.remove(ms[1]) and len(a) == 0 and a.items() == []
    a.append(b"again", ms[1])  # off every list: it may go on one again
    assert a.items() == [(b"again", ms[1])]
    if name == "native":  # a list's own references: nothing leaks, nothing is freed early
        sole = b.MemEntry(5, b"x" * 16, 5, (), ())
        key = b"only-the-list-holds-me" + bytes(8)
        before = sys.getrefcount(sole), sys.getrefcount(key)
        c.append(key, sole)
        assert (sys.getrefcount(sole), sys.getrefcount(key)) == (before[0] + 1, before[1] + 1)
        assert c.remove(sole) and (sys.getrefcount(sole), sys.getrefcount(key)) == before
        del a, c
        gc.collect()
        assert sys.getrefcount(ms[1]) == sys.getrefcount(ms[0])  # the lists' references went with them


def test_t0_items_check_a_batch_alike_on_both_backends():
    """A put_t0 batch's items in one pass: the new ones with their object
    keys and sums (repeated and stored keys are not new; bytes and non-ASCII
    keys go through normalize_key), every size, the T1 bytes needed; and for
    every malformed item the same error class and message from C and Python."""
    from kvfs.errors import InvalidArgument
    from kvfs.keys import normalize_key
    from kvfs.meta import encode_meta
    assert _native is not None, "kvfs._native was not built"
    s = b"s" * 16
    su = 4 << 20
    items = [["a", 10, None, 0, [s, [s]]], ["a", 11, None, 4096, [s, [s]]], [b"\x01\x02", 5, {"x": 1}, 8192, [s, [s]]],
             ["é", 9 * 1024 * 1024, None, 0, [s, [s, s, s]]], ["old", 1, None, 0, None], ["z" * 200, 0, "{}", 1, [s, [s]]]]
    lru = {b"ns\x00old": 1}
    args = (b"ns\x00", lru, su, 100, normalize_key, encode_meta, InvalidArgument)
    fresh, sizes, need = _native.t0_items(items, *args)
    assert (fresh, sizes, need) == _native_py.t0_items(items, *args)
    assert [f[:6] for f in fresh] == [(0, b"ns\x00a", "a", 10, None, 0), (2, b"ns\x000102", "0102", 5, b'{"x":1}', 8192),
                                      (3, "ns\x00é".encode(), "é", 9 * MiB, None, 0),
                                      (5, b"ns\x00" + b"z" * 200, "z" * 200, 0, b"{}", 1)]
    assert sizes == [10, 11, 5, 9 * MiB, 1, 0]
    assert need == (100 + 1 + 10) + (100 + 4 + 5) + 3 * (100 + 2) + 9 * MiB + (100 + 200)
    bad = [[["a", -1, None, 0, [s, [s]]]], [["a", True, None, 0, [s, [s]]]], [["a", 1 << 64, None, 0, [s, [s]]]],
           [["a", 1, None, True, [s, [s]]]], [["a", 1, None, 0, [s, [s, s]]]], [["a", 1, None, 0, [s[:8], [s]]]],
           [["a", 1, None, 0, (s, [s])]], [["a/b", 1, None, 0, [s, [s]]]], [["..", 1, None, 0, [s, [s]]]],
           [["", 1, None, 0, [s, [s]]]], [["z" * 201, 1, None, 0, [s, [s]]]], [["a\x00", 1, None, 0, [s, [s]]]],
           [["a", 1, "[]", 0, [s, [s]]]], [("a", 1, None, 0, [s, [s]])], [["a", 1, None, 0]], [7]]
    for b in bad:
        errs = []
        for impl in (_native, _native_py):
            with pytest.raises(ValueError) as e:  # InvalidArgument and InvalidKey are ValueErrors
                impl.t0_items(b, *args)
            errs.append((type(e.value), str(e.value)))
        assert errs[0] == errs[1], b


@pytest.mark.parametrize("plans", BACKENDS)
def test_t0_write_records_write_the_same_files_on_both_backends(tmp_path, plans):
    """The write-back's record writes: headers as record_head builds them,
    payloads from the arena, back-to-back records coalesced with their
    padding zeroed, a gap or another segment starting a new pwritev, items
    deleted or never published skipped, a client-written payload given only
    its header, and a segment without a file failing its writes' tags."""
    from kvfs import format as fmt
    ChunkPlan, ObjPlan = mod(plans).ChunkPlan, mod(plans).ObjPlan  # the C types or their twins
    assert _native is not None, "kvfs._native was not built"
    rng = np.random.default_rng(4)
    arena = bytearray(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    nsb = b"ns"

    def plan(key, sizes, seg, at, t0, mem=True, via_t0=True, deleted=False):
        chunks, end = [], at
        for j, n in enumerate(sizes):
            hdr, pay, new_end = fmt.place_record(end, 2, len(key), n)
            chunks.append(ChunkPlan(0, seg, hdr, pay, new_end, n, sum(sizes[:j]), j, bytes([j + 1]) * 16, end))
            end = new_end
        op = ObjPlan(key, sum(sizes), None, 7, chunks, b"ns\x00" + key.encode(), None, b"s" * 16, t0, via_t0)
        if mem:
            op.mem = _native_py.MemEntry(op.size, op.checksum, 7, (), (), t0=t0, dirty=True)
            op.mem.deleted = deleted
        return op, end

    ops, at = [], 0
    for i, sizes in enumerate([[100], [5000], [70000], [0], [3, 9]]):  # back to back in segment 1
        op, at = plan(f"k{i}", sizes, 1, at, 4096 * (i + 1) * 20)
        ops.append(op)
    gap, _ = plan("gap", [200], 1, at + 8192, 900000)  # not where the last one ended: a new run
    other, _ = plan("o", [300], 2, 0, 0)  # another segment
    client, _ = plan("c", [400], 1, 200000, -1, mem=False, via_t0=False)  # the client wrote its payload
    dead, _ = plan("d", [50], 1, 300000, 0, deleted=True)
    unpublished, _ = plan("u", [50], 1, 310000, -1, mem=False)
    lost, _ = plan("l", [60], 3, 0, 0)  # segment 3 has no file
    jobs = [(nsb, ops + [None, gap], 0), (nsb, [other, client, dead, unpublished], 1), (nsb, [lost], 2)]
    results, files = [], []
    for name, impl in (("c", _native), ("py", _native_py)):
        paths = {seg: tmp_path / f"{name}-{seg}" for seg in (1, 2)}
        fds = {seg: os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for seg, p in paths.items()}
        for fd in fds.values():
            os.pwrite(fd, b"\xee" * 400000, 0)  # padding must come out as zeros
        try:
            results.append(impl.t0_write_records(jobs, arena, fds))
        finally:
            for fd in fds.values():
                os.close(fd)
        files.append({seg: p.read_bytes() for seg, p in paths.items()})
    assert results[0] == results[1] and files[0] == files[1]
    failed, runs = results[0]
    assert failed == [2] and len(runs) == 5  # segment 1: the run, the gap, the client's; segment 2; segment 3
    seg1 = files[0][1]
    for op in ops + [gap]:
        for ch in op.chunks:
            assert seg1[ch.payload_off:ch.payload_off + ch.length] == arena[op.t0 + ch.chunk_off:
                                                                          op.t0 + ch.chunk_off + ch.length]
            names = nsb + op.key.encode()
            assert seg1[ch.hdr_off:ch.payload_off] == _native_py.record_head(
                names, 2, ch.idx, len(op.chunks), ch.length, op.size, ch.chunk_off, 7, ch.checksum,
                ch.payload_off - ch.hdr_off - 80 - len(names))
    run = [ch for op in ops for ch in op.chunks]
    for a, b in zip(run, run[1:]):  # the padding between neighbours is written, as zeros
        assert seg1[a.payload_off + a.length:b.hdr_off] == bytes(b.hdr_off - a.payload_off - a.length)
    c = client.chunks[0]
    assert seg1[c.payload_off:c.payload_off + c.length] == b"\xee" * c.length  # only its header written
    assert seg1[dead.chunks[0].hdr_off:unpublished.chunks[0].end] == b"\xee" * (unpublished.chunks[0].end -
                                                                                 dead.chunks[0].hdr_off)


@pytest.mark.parametrize("plans", BACKENDS)
@pytest.mark.parametrize("name", BACKENDS)
def test_index_rows_are_the_entries_encode_entry_writes(name, plans):
    """A write-back batch's index rows: per live item its object key and the
    entry kvfsd.index.encode_entry writes, per chunk its segobj key (the
    segment and header offset, big-endian) and the item it belongs to."""
    import random

    from kvfsd.index import encode_entry, segobj_key
    ChunkPlan, ObjPlan = mod(plans).ChunkPlan, mod(plans).ObjPlan  # the C types or their twins
    rng = random.Random(6)
    ops = []
    for i in range(300):
        n = rng.choice([1, 1, 2, 17])
        chunks = []
        for j in range(n):
            hdr = rng.randrange(1 << rng.choice([10, 33, 40]))
            chunks.append(ChunkPlan(rng.randrange(8), rng.randrange(1 << rng.choice([4, 20, 34])), hdr + 96,
                                    hdr + 96 + 4096, hdr + rng.randrange(200, 1 << 21), rng.randrange(1 << 22),
                                    j << 22, j, rng.randbytes(16), hdr))
        ops.append(ObjPlan(f"k{i}", rng.randrange(1 << rng.choice([7, 20, 40])), rng.choice([None, b"{}", b"x" * 300]),
                           rng.randrange(1 << 50), chunks, f"ns\x00k{i}".encode(), None, rng.randbytes(16)))
    live = [rng.random() < 0.8 for _ in ops]
    now = 1.7e9 + rng.random()
    pairs, segs, owner = mod(name).index_rows(ops, live, now)
    kept = [op for op, on in zip(ops, live) if on]
    assert pairs == [(op.ok, encode_entry(op.size, op.checksum, op.seq, now, now, op.meta,
                                          [[c.stripe, c.seg, c.payload_off, c.length, c.checksum, c.hdr_off,
                                            c.end - c.hdr_off] for c in op.chunks])) for op in kept]
    assert segs == [(segobj_key(c.seg, c.hdr_off), op.ok) for op in kept for c in op.chunks]
    assert owner == [i for i, op in enumerate(kept) for _ in op.chunks]
    with pytest.raises(ValueError):
        mod(name).index_rows(ops, live[:-1], now)


@pytest.mark.parametrize("plans", BACKENDS)
@pytest.mark.parametrize("name", BACKENDS)
def test_release_chunks_releases_each_reservation_once(name, plans):
    """A plan's reservations: each chunk leaves its segment's reserved map
    (a segment gone is skipped and not reported), chunks become [] and t0
    -1, and an arena extent never published is handed back to be freed."""
    from types import SimpleNamespace

    ChunkPlan, ObjPlan = mod(plans).ChunkPlan, mod(plans).ObjPlan  # the C types or their twins
    segs = {1: SimpleNamespace(reserved={0: 100, 100: 200, 500: 600}), 2: SimpleNamespace(reserved={0: 50})}

    def op(chunks, t0, mem):
        o = ObjPlan("k", 1, None, 1, [ChunkPlan(0, seg, st, st, st + 1, 1, 0, 0, b"", st) for seg, st in chunks], b"k")
        o.t0, o.mem = t0, mem
        return o
    ops = [op([(1, 0), (2, 0)], 4096, None), None, op([(1, 100), (9, 0)], 8192, "published"), op([(1, 300)], -1, None)]
    touched, frees = mod(name).release_chunks(ops, segs)
    assert touched == [1, 2] and frees == [4096]
    assert segs[1].reserved == {500: 600} and segs[2].reserved == {}
    assert all(o is None or (o.chunks == [] and o.t0 == -1) for o in ops)
    assert mod(name).release_chunks(ops, segs) == ([], [])  # once only


def test_backends_fail_alike_on_bad_arguments():
    for b in (mod("native"), mod("python")):
        with pytest.raises(ValueError):
            b.read_many([1, 2], [0], [bytearray(1)], [None])
        with pytest.raises(TypeError):
            b.read_many([0], [0], [b"readonly"], [None])


@pytest.mark.parametrize("t0", [True, False], ids=["T0", "T1"])
def test_client_bytes_identical_on_both_backends(daemon, t1_daemon, backend, t0):
    d = daemon if t0 else t1_daemon
    with d.connect() as s:
        sizes = [0, 1, 4095, 65536, MiB + 3, 4 * MiB, 9 * MiB + 1]
        vals = [os.urandom(n) for n in sizes]
        keys = [f"{backend}-{n}" for n in sizes]
        assert s.put_many(keys, vals) == [True] * len(vals)
        big = np.zeros(sum(sizes) + 7, dtype=np.uint8)
        outs, pos = [], 0
        for n in sizes:
            outs.append(big[pos:pos + n])
            pos += n
        assert s.get_many_into(keys, outs) == sizes
        assert [o.tobytes() for o in outs] == vals
        for k, v in zip(keys, vals):
            assert s.get(k) == v
            with s.get_view(k) as view:
                assert bytes(view) == v


def test_env_var_forces_the_fallback():
    import subprocess
    import sys
    code = "import kvfs.native as n; print(n.name)"
    env = dict(os.environ, KVFS_NATIVE="0")
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True).stdout.strip() == "python"
    env["KVFS_NATIVE"] = "1"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True).stdout.strip() == "native"


def _plan_fields(op):
    if op is None:
        return None
    chunks = [(c.stripe, c.seg, c.hdr_off, c.payload_off, c.end, c.length, c.chunk_off, c.idx, c.checksum, c.start)
              for c in op.chunks]
    return (op.key, op.size, op.meta, op.seq, chunks, op.ok, op.hasher is not None, op.checksum, op.t0, op.via_t0,
            op.mem, op.t0_stored)


def test_plan_types_are_their_twins():
    """The C plans (native/plans.c) take the twins' arguments and defaults,
    hold what they are given, answer exts() and spans() alike and are
    never seen by the cyclic collector."""
    import gc
    c, p = mod("native"), mod("python")
    args = ("k", 10, b"{}", 7, [], b"ns\x00k")
    for b in (c, p):
        ch = b.ChunkPlan(1, 9, 100, 4096, 4200, 10, 0, 0)
        assert (ch.checksum, ch.start) == (b"", -1)
        ch2 = b.ChunkPlan(stripe=0, seg=3, hdr_off=0, payload_off=80, end=96, length=5, chunk_off=10, idx=1,
                          checksum=b"s" * 16, start=0)
        op = b.ObjPlan(*args[:4], [ch, ch2], args[5])
        assert (op.hasher, op.checksum, op.t0, op.via_t0, op.mem, op.t0_stored) == (None, b"", -1, False, None, False)
        assert op.exts() == ((1, 9, 4096, 10, b""), (0, 3, 80, 5, b"s" * 16))
        assert op.spans() == ((9, 4100), (3, 96))
        op.t0, op.via_t0, op.mem, op.chunks = 4096, True, "m", []
        assert (op.t0, op.via_t0, op.mem, op.exts(), op.spans()) == (4096, True, "m", (), ())
        with pytest.raises(TypeError):
            b.ChunkPlan(1, 2, 3)
    assert _plan_fields(c.ObjPlan(*args, None, b"x", 5, True, None, True)) == \
        _plan_fields(p.ObjPlan(*args, None, b"x", 5, True, None, True))
    op = c.ObjPlan(*args)
    assert not gc.is_tracked(op) and not gc.is_tracked(c.ChunkPlan(0, 0, 0, 0, 0, 0, 0, 0))
    with pytest.raises(TypeError):
        op.size = "ten"
    del op.meta
    with pytest.raises(AttributeError):
        c.index_rows([op], [True], 1.0)  # a deleted field is an error, not a crash


@pytest.mark.parametrize("carving", [False, True], ids=["reserve", "carve"])
def test_place_items_places_alike_on_both_backends(carving):
    """The placement loop: the same plans (sequence numbers, stripes round
    robin, chunk offsets as kvfs.format.place_record puts them), the same
    segment ends, reservations and new segments when one is full, the same
    state, and with a carve the same extents, sums and errors."""
    import random
    from types import SimpleNamespace

    import xxhash
    rng = random.Random(11)
    su, segsize, nstripes, nl = 1 << 20, 8 << 20, 3, 2
    runs = []
    for b in (mod("native"), mod("python")):
        rng.seed(11)
        segs, open_seg = {}, {0: 0}
        segs[0] = SimpleNamespace(seg=0, end=12345, reserved={})

        def segment_for(stripe, span, segs=segs, open_seg=open_seg):
            sid = open_seg.get(stripe)
            if sid is not None and (segs[sid].end + span <= segsize or segs[sid].end == 0):
                return segs[sid]
            sid = len(segs)
            segs[sid] = SimpleNamespace(seg=sid, end=0, reserved={})
            open_seg[stripe] = sid
            return segs[sid]

        def carve(rest, off, size):
            if off < rest or off % 64:
                raise ValueError(f"offset {off} before {rest} or unaligned")
            return off + size

        state, touched, out, res, errors = [100, 2, 0], set(), [], [0, 1 << 40], []
        pos = 0
        for batch in range(40):
            items = []
            for i in range(rng.randrange(1, 12)):
                if rng.random() < 0.1:
                    items.append(None)
                    continue
                key = "k" * rng.randrange(1, 40) + str(batch * 100 + i)
                size = rng.choice([0, 1, 100, 65535, 65536, 70000, su, su + 1, 3 * su + 7])
                ok = b"ns\x00" + key.encode()
                sums = [bytes([i]) * 16, [bytes([j]) * 16 for j in range(max(1, -(-size // su)))]]
                off = pos + (3 if rng.random() < 0.02 else rng.choice([0, 64]))  # 3: a bad placement
                pos = off + size
                items.append((i, ok, key, size, None if i % 2 else b"{}", off, *sums) if carving
                             else (ok, key, size, b"{}"))
            if carving:
                items = [it for it in items if it is not None]
                if batch == 30:
                    res[1] = res[0]  # used up
            try:
                b.place_items(items, 1 if carving else 0, nl, su, segsize, nstripes, state, open_seg, segs, touched,
                              segment_for, xxhash.xxh3_128, out, carve if carving else None, res if carving else None,
                              KeyError)
            except KeyError as e:
                errors.append(str(e))
        runs.append(([_plan_fields(op) for op in out], {k: (s.end, s.reserved) for k, s in segs.items()},
                     open_seg, state, touched, res, errors))
    assert runs[0] == runs[1]
    plans, segs_seen, _, state, touched, _, errors = runs[0]
    assert len(segs_seen) > nstripes + 1 and touched == set(segs_seen)  # full segments were replaced
    assert state[0] == 100 + sum(p is not None for p in plans)
    if carving:
        assert any("bad arena placement" in e for e in errors) and any("used up" in e for e in errors)


@pytest.mark.parametrize("name", BACKENDS)
def test_held_sends_send_what_they_say(name):
    """send_held (the daemon's replies, the GIL kept in C): bytes sent, 0
    when the socket's buffer is full, OSError when the peer is gone."""
    import socket
    b = mod(name)
    a, c = socket.socketpair()
    try:
        assert b.send_held(a.fileno(), b"hello") == 5 and c.recv(16) == b"hello"
        total = 0
        while (k := b.send_held(a.fileno(), bytes(65536))) > 0:
            total += k
        assert k == 0 and total > 0  # full: nothing sent, nothing raised
        c.close()
        with pytest.raises(OSError):
            b.send_held(a.fileno(), b"x")
        assert a.fileno() >= 0  # the caller's socket stays open
    finally:
        a.close()
        c.close()
