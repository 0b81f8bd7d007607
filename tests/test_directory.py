"""The location directory as the answer to contains and prefix_match: the
daemon's writer and the readers (C and its Python twin) agree, a full
table keeps the newest keys and says it is incomplete, and a client answers
from it with no round trip, exactly, idle or full."""
import os
import time
from types import SimpleNamespace

import pytest

import kvfs
from helpers import count_calls
from kvfs import native
from kvfs._native_py import dir_contains as dir_contains_py
from kvfs._native_py import dir_probe as dir_probe_py
from kvfs.directory import ABSENT, PRESENT, SLOW, DirectoryReader
from kvfsd.directory import DirectoryWriter
from kvfsd.testing import DaemonProcess


def entry(i, chunks=1):
    return SimpleNamespace(size=100 + i, seq=i, checksum=bytes(16), t0=-1, dirty=False,
                           exts=[[0, 7, 4096 * j, 100, bytes(16)] for j in range(chunks)])


def ok(ns, key):
    return ns.encode() + b"\x00" + key.encode()


@pytest.fixture
def table(tmp_path):
    w = DirectoryWriter(tmp_path, 1 << 10, lambda: w.entries)  # every resident key has a slot here
    r = DirectoryReader(str(w.path), 1 << 10)
    yield w, r
    r.close()
    w.close()


def test_readers_find_every_key_and_agree(table):
    w, r = table
    keys = [f"{i:064x}" for i in range(600)]
    for i, k in enumerate(keys[:400]):
        w.enter(ok("ns", k), entry(i, chunks=1 + i % 5))  # more than 3 chunks: present, no location
    bad_long = ["a" * 20 + "/" + "b" * 10, "x" * 16 + "\x7f", "\t" + "y" * 30, "z" * 8 + "\x1f" + "z" * 7, "w" * 201]
    probes = keys + ["é-key", "bad/key", ".", "", b"raw"] + bad_long
    fast = native.backend.dir_probe(r.mm, r.nslots, b"ns", probes)
    twin = dir_probe_py(r.mm, r.nslots, b"ns", probes)
    assert fast == twin
    bools, seen = native.backend.dir_contains(r.mm, r.nslots, b"ns", probes)
    assert (bools, seen) == dir_contains_py(r.mm, r.nslots, b"ns", probes)
    assert bools == [st == PRESENT for st in fast] and seen == (1 << ABSENT) | (1 << SLOW)
    assert list(fast[:600]) == [PRESENT] * 400 + [ABSENT] * 200
    assert list(fast[600:]) == [SLOW] * 10  # left to kvfs.keys' rules (which refuse all but the first)
    assert native.backend.dir_probe(r.mm, r.nslots, b"other", keys[:10]) == bytes([ABSENT]) * 10
    assert native.backend.dir_probe(r.mm, r.nslots, b"ns", keys[398:], True) == bytes([PRESENT, PRESENT, ABSENT])
    assert r.complete() is not None and w.stats()["entries"] == 400
    found = r.lookup_many("ns", keys, list(range(10)))
    assert sorted(found) == [0, 1, 2, 5, 6, 7]  # 4 and 5 chunks: looked up from the daemon
    for k in keys[:200]:
        w.remove(ok("ns", k))
    assert list(native.backend.dir_probe(r.mm, r.nslots, b"ns", keys[:400])) == [ABSENT] * 200 + [PRESENT] * 200
    assert r.holds("ns", keys[300]) == PRESENT and r.holds("ns", "é-key") == ABSENT


def test_a_full_table_keeps_the_newest_keys_and_says_it_is_incomplete(tmp_path):
    resident: dict[str, SimpleNamespace] = {}  # the engine's mirror, as the writer counts it
    w = DirectoryWriter(tmp_path, 32, lambda: len(resident))  # one probe window: 32 slots for every key
    r = DirectoryReader(str(w.path), 32)
    keys = [f"k{i}" for i in range(40)]
    for i, k in enumerate(keys):
        m = entry(i)
        if i < 4:
            m.t0 = 4096 * i  # in T0: T1-only keys leave first
        resident[k] = m
        w.enter(ok("n", k), m)
    st = w.stats()
    assert (st["entries"], st["outside"], st["displaced"], st["complete"]) == (32, 8, 8, False)
    assert r.complete() is None
    states = native.backend.dir_probe(r.mm, 32, b"n", keys)
    outside = keys[4:12]  # the oldest T1-only puts
    assert [k for k, st in zip(keys, states) if st != PRESENT] == outside
    # an update of a key outside takes no other key's slot
    w.put(ok("n", outside[0]), entry(100))
    assert (w.entries, w.displaced, w.stats()["outside"]) == (32, 8, 8)
    del resident[outside[1]]  # a key outside removed: nothing freed
    w.remove(ok("n", outside[1]))
    assert (w.entries, w.stats()["outside"]) == (32, 7)
    del resident[keys[20]]  # a slot freed: the next update of a key outside takes it
    w.remove(ok("n", keys[20]))
    assert (w.entries, w.stats()["outside"]) == (31, 7)
    w.put(ok("n", outside[2]), entry(102))
    assert (w.entries, w.stats()["outside"]) == (32, 6)
    for k in outside[3:]:
        del resident[k]
        w.remove(ok("n", k))
    for k in (outside[0], keys[21]):  # outside, then one with a slot
        del resident[k]
        w.remove(ok("n", k))
    assert (w.entries, w.stats()["outside"]) == (31, 0)
    token = r.complete()
    assert token is not None and r.still_complete(token) and w.stats()["complete"]
    gone = {outside[0], outside[1], keys[20], keys[21], *outside[3:]}
    assert list(native.backend.dir_probe(r.mm, 32, b"n", keys)) == [ABSENT if k in gone else PRESENT for k in keys]
    # the reader's rule: a displacement during a probe makes its misses unsure
    resident["late"] = entry(200)
    w.enter(ok("n", "late"), resident["late"])
    assert r.still_complete(token)  # a free slot was left: nobody displaced
    resident["later"] = entry(201)
    w.enter(ok("n", "later"), resident["later"])
    assert not r.still_complete(token) and r.complete() is None
    r.close()
    w.close()


def test_contains_and_prefix_match_need_no_round_trip(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size="64M")
    with d, d.connect() as s, d.connect() as other:
        keys = [f"{i:032x}" for i in range(300)]
        s.put_many(keys[:200], [os.urandom(1000)] * 200, ns="p")
        s.put_many(keys[200:210], [os.urandom(300_000)] * 10, ns="p", sync=True)  # T1 too
        calls = count_calls(other)
        assert other.contains(keys, ns="p") == [True] * 210 + [False] * 90
        assert other.prefix_match(keys, ns="p") == 210
        assert other.prefix_match(keys[:5] + ["nope"] + keys[5:], ns="p") == 5
        assert other.contains([bytes.fromhex(keys[0]), b"\x00\x01"], ns="p") == [True, False]  # bytes: hex form
        s.delete(keys[:3], ns="p")
        assert other.contains(keys[:4], ns="p") == [False, False, False, True]  # removals seen at once
        assert other.prefix_match(keys[3:], ns="p") == 207
        with pytest.raises(kvfs.InvalidKey):
            other.contains(["fine", "bad/key"], ns="p")
        with pytest.raises(kvfs.InvalidKey):
            other.prefix_match("not a list", ns="p")
        assert calls == []


def test_a_full_directory_still_answers_exactly(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=1, capacity="1G", shm_size="64M", extra=["--dir-slots", "32"])
    with d, d.connect() as s, d.connect() as other:
        keys = [f"f{i}" for i in range(100)]
        vals = [os.urandom(100) for _ in keys]
        s.put_many(keys[:60], vals[:60], ns="f")
        assert s.flush()  # written back: no generation bump races the reads below
        st = s.stats()["directory"]
        assert st["outside"] == 60 - 32 and st["displaced"] == 28 and not st["complete"]
        calls = count_calls(s)
        assert s.contains(keys, ns="f") == [True] * 60 + [False] * 40
        assert s.prefix_match(keys, ns="f") == 60
        assert calls.count("contains") == 1 and calls.count("prefix_match") == 1  # for the keys not found only
        # the newest keys kept their slots: another client reads them with no lookup
        theirs = count_calls(other)
        assert [other.get(k, ns="f") for k in keys[28:60]] == vals[28:60]
        assert theirs == []
        assert [other.get(k, ns="f") for k in keys[:2]] == vals[:2]  # the oldest are outside: asked
        assert theirs.count("lookup") == 2
        with d.connect() as third:  # read once, they took the coldest slots: a new reader finds them there
            calls = count_calls(third)
            assert [third.get(k, ns="f") for k in keys[:2]] == vals[:2]
            assert calls == []
        assert s.stats()["directory"]["displaced"] == 30
        s.delete(keys[:50], ns="f")
        st = s.stats()["directory"]
        assert st["outside"] == 0 and st["complete"] and st["entries"] == 10  # the newest kept their slots
        calls.clear()
        assert s.contains(keys, ns="f") == [False] * 50 + [True] * 10 + [False] * 40
        assert calls == []


@pytest.mark.parametrize("data_plane", ["native", "python"])
def test_a_shrunk_store_refills_its_directory_and_misses_need_no_lookup(tmp_path, monkeypatch, data_plane):
    """Keys left outside an over-full directory come back into the slots
    that removals free (the daemon's refill, once a second), so a store
    that shrank answers misses from shared memory again; the same with the
    daemon on either data plane (the C writer or its twin)."""
    monkeypatch.setenv("KVFS_NATIVE", "1" if data_plane == "native" else "0")
    d = DaemonProcess(tmp_path / "s", stripes=1, capacity="1G", shm_size="64M", extra=["--dir-slots", "32"])
    with d, d.connect() as s:
        assert s.stats()["data_plane"] == data_plane
        keys = [f"r{i}" for i in range(70)]
        vals = [os.urandom(100) for _ in keys]
        s.put_many(keys, vals, ns="r")
        assert s.flush()
        st = s.stats()["directory"]
        assert st["outside"] == 38 and st["entries"] == 32  # the oldest 38 are outside
        s.delete(keys[50:], ns="r")  # 20 of the newest: their slots are free, 38 keys still outside

        def settled(outside):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                st = s.stats()["directory"]
                if st["outside"] == outside:
                    return st
                time.sleep(0.2)
            raise AssertionError(f"outside stayed {st['outside']}, wanted {outside}")
        st = settled(18)  # 20 of them entered
        assert st["entries"] == 32 and st["refilled"] == 20 and not st["complete"]
        time.sleep(1.5)  # no slot is free, nothing was removed since: no pass walks the mirror again
        assert s.stats()["directory"]["refill_passes"] == st["refill_passes"]
        s.delete(keys[:18], ns="r")  # the oldest: the refill, most recent first, left them outside
        st = settled(0)
        assert st["complete"] and st["entries"] == 32
        with d.connect() as other:
            calls = count_calls(other)
            assert other.contains(keys, ns="r") == [False] * 18 + [True] * 32 + [False] * 20
            assert [other.get(k, ns="r") for k in keys[18:50]] == vals[18:50]
            assert calls == []  # hits and misses alike answered from shared memory


def test_a_directory_size_it_cannot_use_is_a_one_line_error(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "kvfstools.cli", "daemon", "--root", str(tmp_path), "--dir-slots", "16"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "a power of two >= 32" in r.stderr and "Traceback" not in r.stderr


def test_the_c_writer_and_its_python_twin_write_the_same_bytes(tmp_path):
    """The daemon's slot writes (dir_put / dir_del) in C and in Python leave
    byte-identical tables, header included, through puts, updates,
    displacements, refusals and removals."""
    import random

    from kvfs import _native_py
    from kvfs.directory import file_size
    if native.name != "native":
        pytest.skip("the C data plane is not built")
    nslots = 64  # small: buckets fill, puts are refused, removals clear hop bits
    a, b = bytearray(file_size(nslots)), bytearray(file_size(nslots))
    rng = random.Random(7)
    import xxhash
    live: list[bytes] = []
    from kvfs.directory import CLOCK_AT, DISPLACE, FILL, U64, UPDATE
    clock = (1 << 31) - 1500  # the stamps wrap around during the run
    for step in range(3000):
        clock += rng.choice([0, 1, 1, 2])
        U64.pack_into(a, CLOCK_AT, clock)
        U64.pack_into(b, CLOCK_AT, clock)
        if live and rng.random() < 0.4:
            h = live.pop(rng.randrange(len(live)))
            assert native.backend.dir_del(a, nslots, h) == _native_py.dir_del(b, nslots, h) >= 0
        else:
            h = xxhash.xxh3_128_digest(str(rng.randrange(200)).encode())
            exts = [[rng.randrange(4), rng.randrange(1 << 40), 4096 * step, 1 << 16, bytes([step % 256]) * 16]
                    for _ in range(rng.choice([1, 2, 3, 4]))]
            args = (h, rng.randrange(1 << 40), step, bytes([1]) * 16, rng.choice([-1, 4096 * step]),
                    rng.choice([0, 1]), exts, rng.choice([UPDATE, UPDATE, DISPLACE, FILL]))
            before = bytes(a)
            r = native.backend.dir_put(a, nslots, *args)
            assert r == _native_py.dir_put(b, nslots, *args)
            if r == 2:  # the coldest key of its window left: find which, the twins agree on the bytes
                live = [x for x in live if native.backend.dir_del(bytearray(a), nslots, x) >= 0]
            if r in (1, 2):
                live.append(h)
            if args[-1] == FILL and r == 0:  # it had a slot: a refill leaves it as it was
                assert a == before
        assert a == b, f"tables differ after step {step}"
    absent = xxhash.xxh3_128_digest(b"never put")
    assert native.backend.dir_del(a, nslots, absent) == _native_py.dir_del(b, nslots, absent) == -1
    from kvfs.directory import DISPLACED_AT
    assert U64.unpack_from(a, DISPLACED_AT)[0] > 0, "some puts should have displaced a key"
    with pytest.raises(ValueError):
        native.backend.dir_put(a, 48, *args)  # not a power of two


def test_entry_writes_match_field_writes_in_c_and_python(tmp_path):
    """dir_put_entry / dir_put_entries (the daemon's batched writes of
    mirror entries) write what dir_put of the same fields under the object
    key's hash writes, in C and in Python, and count full buckets (left out,
    or displacing their coldest key)."""
    import random

    import xxhash

    from kvfs import _native_py
    from kvfs.directory import IN_T1, file_size
    if native.name != "native":
        pytest.skip("the C data plane is not built")
    nslots = 64
    rng = random.Random(3)
    oks = [ok("ns", f"k{i}") for i in range(400)]  # more than fit: some buckets fill
    ms = [SimpleNamespace(size=rng.randrange(1 << 30), seq=i, checksum=bytes([i % 256]) * 16,
                          t0=rng.choice([-1, 4096 * i]), dirty=rng.random() < 0.5,
                          exts=tuple((rng.randrange(4), 9, 4096 * i, 100, bytes(16)) for _ in range(rng.choice([1, 4]))))
          for i in range(400)]
    want = bytearray(file_size(nslots))
    refused = []
    for i, (k, m) in enumerate(zip(oks, ms)):
        r = _native_py.dir_put(want, nslots, xxhash.xxh3_128_digest(k), m.size, m.seq, m.checksum, m.t0,
                               0 if m.dirty else IN_T1, list(m.exts))
        if r < 0:
            refused.append(i)
    assert refused, "the table should fill"
    # the C writer reads a C mirror entry's struct directly, any other object's attributes
    c_ms = [native.backend.MemEntry(m.size, m.checksum, m.seq, m.exts, (), t0=m.t0, dirty=m.dirty) for m in ms]
    for impl, ms in ((native.backend, ms), (native.backend, c_ms), (_native_py, ms), (_native_py, c_ms)):
        one, many = bytearray(file_size(nslots)), bytearray(file_size(nslots))
        rs = [impl.dir_put_entry(one, nslots, k, m) for k, m in zip(oks, ms)]
        assert [i for i, r in enumerate(rs) if r < 0] == refused
        assert impl.dir_put_entries(many, nslots, oks, ms) == (rs.count(1), 0, len(refused))
        assert one == many == want
        # displacing: every entry gets a slot, the refused ones by taking another's
        one, many = bytearray(file_size(nslots)), bytearray(file_size(nslots))
        rs = [impl.dir_put_entry(one, nslots, k, m, True) for k, m in zip(oks, ms)]
        assert [i for i, r in enumerate(rs) if r == 2] == refused
        assert impl.dir_put_entries(many, nslots, oks, ms, True) == (rs.count(1), len(refused), 0)
        assert one == many
        held = bytearray(file_size(nslots))  # placed holding the GIL (the event loop's batches): the same slots
        assert impl.dir_put_entries(held, nslots, oks, ms, True, None, False) == (rs.count(1), len(refused), 0)
        assert held == many
        with pytest.raises(ValueError):
            impl.dir_put_entries(many, nslots, oks, ms[:-1])
        # with the mirror: only the entries still current for their key
        current = {k: m for i, (k, m) in enumerate(zip(oks, ms)) if i % 3}
        current[oks[3]] = "replaced meanwhile"
        keep = [i for i in range(len(oks)) if i % 3 and i != 3]
        one, many = bytearray(file_size(nslots)), bytearray(file_size(nslots))
        rs = [impl.dir_put_entry(one, nslots, oks[i], ms[i]) for i in keep]
        assert impl.dir_put_entries(many, nslots, oks, ms, False, current) == (rs.count(1), 0, rs.count(-1))
        assert one == many
        with pytest.raises(TypeError):
            impl.dir_put_entries(many, nslots, oks, ms, False, [])
        # a bad entry mid-batch: an error, and the entries before it are written, as one by one
        bad = list(ms[:20])
        m12 = ms[12]
        bad[12] = (SimpleNamespace(**{**vars(m12), "exts": ((1, 2, 3),)}) if isinstance(m12, SimpleNamespace)
                   else type(m12)(m12.size, m12.checksum, m12.seq, ((1, 2, 3),), (), t0=m12.t0, dirty=m12.dirty))
        one, many = bytearray(file_size(nslots)), bytearray(file_size(nslots))
        for k, m in zip(oks[:12], bad[:12]):
            impl.dir_put_entry(one, nslots, k, m)
        with pytest.raises(ValueError):
            impl.dir_put_entries(many, nslots, oks[:20], bad)
        assert one == many and any(one)


@pytest.mark.parametrize("impl", ["native", "python"])
def test_dir_read_copies_verified_bytes_or_declines(impl, tmp_path):
    """dir_read and dir_read_many (get_into from the directory and the
    arena, C and its Python twin): the bytes when the slot places them in the arena and they
    verify; -1 whenever it cannot vouch for them (absent, not in the arena,
    a location not kept, a buffer too small, the generation moved, a key
    the Python rules must see); -2 when a chunk fails verification."""
    import struct

    import xxhash

    from kvfs import _native_py
    from kvfs.directory import fd_id, file_size, key_hash
    if impl == "native" and native.name != "native":
        pytest.skip("the C data plane is not built")
    be = native.backend if impl == "native" else _native_py
    nslots = 64
    d = bytearray(file_size(nslots))
    arena = bytearray(os.urandom(1 << 20))
    gen = bytearray(struct.pack("<Q", 77))
    lens = [40_000, 70_000, 3]  # three chunks, each with its own sum
    base = 8192
    pos, exts = 0, []
    for n in lens:
        exts.append([0, 9, 4096 + pos, n, xxhash.xxh3_128_digest(bytes(arena[base + pos:base + pos + n]))])
        pos += n
    size = sum(lens)
    whole = xxhash.xxh3_128_digest(bytes(arena[base:base + size]))
    _native_py.dir_put(d, nslots, key_hash("ns", "k"), size, 1, whole, base, 1, exts)
    _native_py.dir_put(d, nslots, key_hash("ns", "t1only"), size, 2, whole, -1, 1, exts)
    _native_py.dir_put(d, nslots, key_hash("ns", "many"), size, 3, whole, base, 1, exts + exts[:1])
    out = bytearray(size + 10)

    def read(key, dest=out, g=77, verify=True, ns=b"ns"):
        return be.dir_read(d, nslots, ns, key, arena, dest, gen, g, verify, 2)

    assert read("k") == size and out[:size] == arena[base:base + size]
    for key in ("absent", "t1only", "bad/key", "é", b"k"):
        assert read(key) == -1, key
    # more chunks than a slot keeps: from the arena as one copy, checked by
    # the object's own sum; from T1 only the daemon can place them
    _native_py.dir_put(d, nslots, key_hash("ns", "many-t1"), size, 4, whole, -1, 1, exts + exts[:1])
    _native_py.dir_put(d, nslots, key_hash("ns", "many-bad"), size, 5, bytes(16), base, 1, exts + exts[:1])
    out[:] = bytes(len(out))
    assert read("many") == size and out[:size] == arena[base:base + size]
    assert read("many-t1") == -1
    assert read("many-bad") == -2 and read("many-bad", verify=False) == size
    assert read("many", dest=bytearray(size - 1)) == -1
    # T1: read through the fds the caller has open, by fd_id(seg, stripe)
    seg_file = tmp_path / "seg"
    seg_file.write_bytes(bytes(4096) + bytes(arena[base:base + size]))
    fd = os.open(seg_file, os.O_RDONLY)
    try:
        fds = {fd_id(9, 0): fd}
        out[:] = bytes(len(out))
        assert be.dir_read(d, nslots, b"ns", "t1only", None, out, gen, 77, True, 2, fds) == size
        assert out[:size] == arena[base:base + size]
        assert be.dir_read(d, nslots, b"ns", "t1only", arena, out, gen, 77, True, 2, {fd_id(9, 1): fd}) == -1
        assert be.dir_read(d, nslots, b"ns", "k", None, out, gen, 77, True, 2, fds) == -1  # T0 only, no arena
        assert be.dir_read_many(d, nslots, b"ns", ["t1only", "k"], arena, [bytearray(size), bytearray(size)], gen,
                                77, True, 2, fds) == [size, size]
        with open(seg_file, "r+b") as f:
            f.seek(4096 + 100)
            f.write(b"\xff" * 8)
        assert be.dir_read(d, nslots, b"ns", "t1only", None, out, gen, 77, True, 2, fds) == -2
        os.truncate(seg_file, 4096 + 1000)
        assert be.dir_read(d, nslots, b"ns", "t1only", None, out, gen, 77, False, 2, fds) == -1  # short
        with pytest.raises(TypeError):
            be.dir_read(d, nslots, b"ns", "t1only", None, out, gen, 77, True, 2, [fd])
    finally:
        os.close(fd)
    assert read("k", ns=b"other") == -1
    assert read("k", dest=bytearray(size - 1)) == -1  # the lookup path raises the size error
    assert read("k", g=76) == -1  # a removal since: the bytes may be another object's
    arena[base + 50_000] ^= 1
    out[:] = bytes(len(out))
    assert read("k") == -2 and read("many") == -2
    assert read("k", verify=False) == size and out[:size] == arena[base:base + size]
    with pytest.raises((TypeError, BufferError)):
        read("k", dest=bytes(size))  # read-only destination
    arena[base + 50_000] ^= 1
    outs = [bytearray(size) for _ in range(4)]
    got = be.dir_read_many(d, nslots, b"ns", ["k", "absent", "many", "t1only"], arena, outs, gen, 77, True, 2)
    assert got == [size, -1, size, -1] and outs[0] == outs[2] == arena[base:base + size]
    arena[base + 3] ^= 1
    assert be.dir_read_many(d, nslots, b"ns", ["k", "absent"], arena, outs[:2], gen, 77, True, 2) == [-2, -1]
    assert be.dir_read_many(d, nslots, b"ns", ["k", "k"], arena, outs[:2], gen, 76, False, 2) == [-1, -1]
    with pytest.raises(ValueError):
        be.dir_read_many(d, nslots, b"ns", ["k"], arena, outs[:2], gen, 77, True, 2)
