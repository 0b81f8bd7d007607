"""The GPU path's logic on the CPU: kvfs.gpu with HostCopier standing in
for CUDA (device pointers are host addresses). The same planning, header
checks, staging, lease handling and put path run as on a GPU; the real
CUDA + kvikio runs are in tests/test_gpu.py (pytest -m gpu, on the GPU
machine)."""
import ctypes
import dataclasses
import os

import pytest
import xxhash

from kvfs.errors import InvalidArgument
from kvfs.gpu import GpuPlane, HostCopier, device_buffer
from helpers import FakeDeviceArray, churning, put_and_corrupt
from kvfsd.testing import DaemonProcess

MiB = 1 << 20


class _Done:
    def __init__(self, n):
        self.n = n

    def get(self):
        return self.n


class FakeKvikio:
    """kvikio's CuFile on host memory: preads straight into the
    destination, as kvikio does into device memory."""

    class CuFile:
        def __init__(self, path, mode):
            self.fd = os.open(path, os.O_RDONLY)

        def pread(self, buf, size, offset):
            return _Done(os.preadv(self.fd, [memoryview(buf).cast("B")[:size]], offset))

        def close(self):
            os.close(self.fd)


def host_gpu(s, direct=False):
    """CUDA played by host memory; T1 read directly (kvikio's way) or staged."""
    s._gpu = GpuPlane(s.reader, HostCopier(), kvikio=FakeKvikio() if direct else None, use_kvikio=False)
    return s._gpu


@pytest.fixture(params=["t0", "t1-direct", "t1-staging"])
def store(request, tmp_path):
    shm = "64M" if request.param == "t0" else 0
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="512M", shm_size=shm)
    with d:
        yield d, request.param


SIZES = [0, 1, 4095, 64 * 1024, 4 * MiB + 7, 9 * MiB]


@pytest.mark.parametrize("verify", [True, "full"])
def test_round_trip_device_buffers_both_tiers(store, verify, monkeypatch):
    d, tier = store
    from kvfs import gpu
    monkeypatch.setattr(gpu, "VERIFY_PART", MiB)  # verify="full": T0 copies hashed in several parts
    with d.connect(verify=verify) as s:
        host_gpu(s, tier == "t1-direct")
        vals = {f"k{n}": os.urandom(n) for n in SIZES}
        srcs = [FakeDeviceArray(len(v), v) for v in vals.values()]
        assert s.put_many(list(vals), srcs, ns="g") == [True] * len(vals)
        s.flush()
        outs = [FakeDeviceArray(len(v)) for v in vals.values()]
        assert s.get_many_into(list(vals), outs, ns="g") == [len(v) for v in vals.values()]
        for o, v in zip(outs, vals.values()):
            assert o.bytes() == v
        st = s._gpu.counters
        if tier == "t0":
            assert st["t0_chunks"] > 0
        else:
            assert st["t1_chunks"] > 0
            # reads check every record header, or, with verify="full", hash every byte: where it
            # landed (the device hasher) or, when staged (no kvikio), in staging
            assert (st["header_checks"] > 0) == (verify != "full")
            assert (st["staged_bytes"] > 0) == (tier == "t1-staging")
        assert (st["device_verified_chunks"] > 0) == (verify == "full" and tier != "t1-staging")
        one = FakeDeviceArray(9 * MiB)
        assert s.get_into("k9437184", one, ns="g") == 9 * MiB and one.bytes() == vals["k9437184"]


def test_device_put_checksums_whoever_computes_them(tmp_path):
    """Device sources 8-byte aligned and over 240 bytes are hashed the
    GPU's way (gpu_hash, played here by the CPU); others (unaligned, short)
    by the host after the copy; a short last chunk by the host too. Every
    object's sums are those of its bytes: the whole-value sum (stat) and
    each chunk's (a verified read)."""
    d = DaemonProcess(tmp_path / "s", capacity="512M", shm_size="64M")
    with d, d.connect(verify="full") as s:
        plane = host_gpu(s)
        big = FakeDeviceArray(9 * MiB + 8, os.urandom(9 * MiB + 8))
        vals = {
            "aligned": FakeDeviceArray(3 * MiB, os.urandom(3 * MiB)),
            "short-tail": FakeDeviceArray(4 * MiB + 100, os.urandom(4 * MiB + 100)),  # 2nd chunk: 100 bytes
            "exact": FakeDeviceArray(8 * MiB, os.urandom(8 * MiB)),
            "tiny": FakeDeviceArray(240, os.urandom(240)),
        }
        db = device_buffer(big)
        vals["unaligned"] = dataclasses.replace(db, ptr=db.ptr + 3, nbytes=9 * MiB)
        want = {k: (v.bytes() if hasattr(v, "bytes") else big.bytes()[3:3 + 9 * MiB]) for k, v in vals.items()}
        assert s.put_many(list(vals), list(vals.values()), ns="h") == [True] * len(vals)
        assert plane.counters["device_hashed_values"] == 3  # aligned, short-tail, exact
        for k, v in want.items():
            assert s.stat(k, ns="h").checksum == xxhash.xxh3_128_hexdigest(v), k
        s.flush()
        outs = [FakeDeviceArray(len(v)) for v in want.values()]
        assert s.get_many_into(list(want), outs, ns="h") == [len(v) for v in want.values()]
        assert [o.bytes() for o in outs] == list(want.values())


class LazyCopier(HostCopier):
    """Device-to-host copies land only once waited for (an event or a sync),
    as DMA does: a put that sent a value to the daemon before waiting for
    its copy would publish arena bytes that are not there yet."""

    def __init__(self):
        self.queue, self.landed = [], 0

    def d2h(self, dst, src, n):
        self.queue.append((dst, src, n))

    def record(self):
        return len(self.queue)

    def wait(self, ev):
        while ev is not None and self.landed < ev:
            ctypes.memmove(*self.queue[self.landed])
            self.landed += 1

    def sync(self):
        self.wait(len(self.queue))


def _slices(vals):
    """Device slices of one buffer, one per value, in order."""
    whole = FakeDeviceArray(sum(map(len, vals)), b"".join(vals))
    db = device_buffer(whole)
    offs = [sum(map(len, vals[:i])) for i in range(len(vals))]
    return whole, [dataclasses.replace(db, ptr=db.ptr + o, nbytes=len(v)) for o, v in zip(offs, vals)]


def test_device_puts_into_the_arena_send_each_sub_batch_as_its_copies_land(tmp_path, monkeypatch):
    """With the arena, a device batch needs no alloc or commit: every copy is
    queued at once into the connection's reservation, and each sub-batch's
    put_t0 goes out once its own copies have landed (not before: the bytes
    would not be there; not after the last: the daemon publishes one while
    later ones are still copying). Everything is stored once and right."""
    from kvfs import device_puts
    monkeypatch.setattr(device_puts, "SUB_ITEMS", 2)
    d = DaemonProcess(tmp_path / "s", capacity="512M", shm_size="64M")
    with d, d.connect(verify="full") as s:
        plane = host_gpu(s)
        plane.copier = copier = LazyCopier()
        vals = [os.urandom(700 * 1024 + 8 * i) for i in range(12)]
        _whole, srcs = _slices(vals)
        calls, sends = [], []
        real_call = s._call
        monkeypatch.setattr(s, "_call", lambda op, a, t=(): calls.append(op) or real_call(op, a, t))
        conn = s._conn()
        real_defer = conn.defer
        monkeypatch.setattr(conn, "defer", lambda op, a, cb: sends.append(
            (op, len(a["items"]), copier.landed, len(copier.queue))) or real_defer(op, a, cb))
        keys = [f"p{i}" for i in range(12)]
        assert s.put_many(keys, srcs, ns="p") == [True] * 12
        assert "alloc" not in calls and "commit" not in calls
        assert [(op, n) for op, n, _l, _q in sends] == [("put_t0", 2)] * 6
        queued = sends[0][3]
        assert all(q == queued for _op, _n, _l, q in sends)  # every copy queued before the first send
        landed = [l for _op, _n, l, _q in sends]
        assert landed == sorted(landed) and 0 < landed[0] and landed[-2] < queued  # a sub-batch at a time
        assert s.put_many(keys[:3], srcs[:3], ns="p") == [False] * 3  # stored once
        outs = [FakeDeviceArray(len(v)) for v in vals]
        assert s.get_many_into(keys, outs, ns="p") == [len(v) for v in vals]
        assert [o.bytes() for o in outs] == vals
        s.flush()
        assert [s.get(k, ns="p") for k in keys] == vals


def test_a_failed_device_put_publishes_only_what_it_sent_and_leaks_no_arena(tmp_path, monkeypatch):
    """A failure in a later sub-batch: the sub-batches sent before it are
    stored and right, nothing after is visible, the copies still queued are
    waited for before the error goes up, and the arena space comes back
    once the connection's reservation ends."""
    from kvfs import device_puts, gpu_hash
    monkeypatch.setattr(device_puts, "SUB_ITEMS", 2)
    d = DaemonProcess(tmp_path / "s", capacity="512M", shm_size="64M")
    with d:
        with d.connect() as probe:
            before = probe.stats()["tiers"]["T0"]["allocated_bytes"]
        vals = [os.urandom(300 * 1024 + 8 * i) for i in range(12)]
        with d.connect(verify="full") as s:
            plane = host_gpu(s)
            plane.copier = copier = LazyCopier()
            _whole, srcs = _slices(vals)
            n = {"jobs": 0}
            start = gpu_hash.HostHasher.start

            def third_fails(self, *a, **k):
                job = start(self, *a, **k)
                n["jobs"] += 1
                if n["jobs"] == 3:
                    job._digests = lambda: (_ for _ in ()).throw(RuntimeError("hashing failed"))
                return job
            monkeypatch.setattr(gpu_hash.HostHasher, "start", third_fails)
            keys = [f"q{i}" for i in range(12)]
            with pytest.raises(RuntimeError, match="hashing failed"):
                s.put_many(keys, srcs, ns="p")
            assert copier.landed == len(copier.queue)  # nothing left to land in space given back
            assert s.contains(keys, ns="p") == [True] * 4 + [False] * 8
            assert [s.get(k, ns="p") for k in keys[:4]] == vals[:4]
            s.flush()
            assert s.delete(keys[:4], ns="p") == 4
        with d.connect() as probe:  # the reservation ended with its connection
            assert probe.stats()["tiers"]["T0"]["allocated_bytes"] == before


def test_device_puts_without_the_arena_run_as_pipelined_sub_batches(tmp_path, monkeypatch):
    """Without T0, a large device batch is staged to the host and written to
    T1 in sub-batches, each committed while the next one is allocated and
    copied: everything is stored once and right; a failure in a later
    sub-batch gives back the space of every sub-batch not yet committed,
    and what was committed stays readable."""
    from kvfs import client_puts
    monkeypatch.setattr(client_puts, "DEVICE_SUB_BATCH", 2 * MiB)
    d = DaemonProcess(tmp_path / "s", capacity="512M", shm_size=0)
    with d, d.connect(verify="full") as s:
        host_gpu(s)
        vals = [os.urandom(700 * 1024 + 8 * i) for i in range(12)]  # 2 per sub-batch: 6 sub-batches
        _whole, srcs = _slices(vals)
        calls = []
        real = s._call
        monkeypatch.setattr(s, "_call", lambda op, a, t=(): calls.append(op) or real(op, a, t))
        keys = [f"p{i}" for i in range(12)]
        assert s.put_many(keys, srcs, ns="p") == [True] * 12
        assert calls.count("alloc") == 6 and calls.count("commit") == 6
        # pipelined: the second alloc comes before the first commit
        assert calls.index("commit") > [i for i, c in enumerate(calls) if c == "alloc"][1]
        assert s.put_many(keys[:3], srcs[:3], ns="p") == [False] * 3  # stored once
        outs = [FakeDeviceArray(len(v)) for v in vals]
        assert s.get_many_into(keys, outs, ns="p") == [len(v) for v in vals]
        assert [o.bytes() for o in outs] == vals

        n = {"calls": 0}
        to_host = GpuPlane.to_host

        def fail_fifth(self, *a, **k):
            n["calls"] += 1
            if n["calls"] == 5:
                raise RuntimeError("copy failed")
            return to_host(self, *a, **k)
        monkeypatch.setattr(GpuPlane, "to_host", fail_fifth)
        more = [f"q{i}" for i in range(12)]
        with pytest.raises(RuntimeError, match="copy failed"):
            s.put_many(more, srcs, ns="p")
        # sub-batch 1 was committed before sub-batch 3 failed; 2 and 3 were aborted
        assert s.contains(more, ns="p") == [True] * 2 + [False] * 10
        assert s.get("q1", ns="p") == vals[1]
        # what was aborted holds nothing: the same puts again store the rest
        assert s.put_many(more, srcs, ns="p") == [False] * 2 + [True] * 10
        assert [s.get(k, ns="p") for k in more] == vals


def test_batched_gets_into_slices_of_one_device_buffer(store):
    d, tier = store
    with d.connect() as s:
        host_gpu(s, tier == "t1-direct")
        block = 256 * 1024
        vals = [os.urandom(block) for _ in range(32)]
        s.put_many([f"b{i}" for i in range(32)], vals, ns="slab")
        big = FakeDeviceArray(32 * block)
        base = ctypes.addressof(big.buf)
        from kvfs.gpu import DeviceBuffer
        outs = [DeviceBuffer(base + i * block, block, False, big) for i in range(32)]
        assert s.get_many_into([f"b{i}" for i in range(32)], outs, ns="slab") == [block] * 32
        assert big.bytes() == b"".join(vals)


def test_a_corrupted_record_is_never_delivered(tmp_path):
    """A payload flip is caught by full verification (in staging, or on
    the device where a direct read landed); a header that no longer names
    the record is caught by direct reads' header check."""
    from kvfs.errors import NotFound
    for direct in (False, True):
        d = DaemonProcess(tmp_path / f"s{direct}", capacity="256M", shm_size=0)
        with d, d.connect(verify="full") as s:
            host_gpu(s, direct=direct)
            put_and_corrupt(s, "bad", "c", 2 * MiB, 999)
            s.put("good", b"g" * (3 * MiB), ns="c")
            outs = [FakeDeviceArray(2 * MiB), FakeDeviceArray(3 * MiB)]
            assert s.get_many_into(["bad", "good"], outs, ns="c") == [-1, 3 * MiB]
            assert outs[1].bytes() == b"g" * (3 * MiB)
            assert s.contains(["bad"], ns="c") == [False]  # reported and dropped
            assert (s._gpu.counters["device_verified_chunks"] > 0) == direct
    d2 = DaemonProcess(tmp_path / "s2", capacity="256M", shm_size=0)
    with d2, d2.connect() as s:
        host_gpu(s, direct=True)
        s.put("hdr", os.urandom(2 * MiB), ns="c")
        path, off, _n = s.stat("hdr", ns="c").extents[0]
        from kvfs import format as fmt
        hdr_off = (off - (fmt.HEADER_SIZE + len("c") + len("hdr"))) // 8 * 8
        fd = os.open(path, os.O_RDWR)
        assert os.pread(fd, 3, hdr_off + fmt.HEADER_SIZE + 1) == b"hdr"
        os.pwrite(fd, b"X", hdr_off + fmt.HEADER_SIZE + 1)  # the header no longer names this record
        os.close(fd)
        from kvfs.errors import NotFound
        with pytest.raises(NotFound):
            s.get_into("hdr", FakeDeviceArray(2 * MiB), ns="c")
        assert s._gpu.counters["header_mismatches"] >= 1


def test_lease_is_held_until_the_copies_complete(tmp_path):
    """The lease of a device read ends only after its copies: a copier that
    checks, at each copy, that the object is still leased."""
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="64M")
    with d, d.connect(cache_locations=False) as s:  # every read asks the daemon, under a lease
        plane = host_gpu(s)
        s.put_many(["a", "b"], [os.urandom(3 * MiB), os.urandom(3 * MiB)], ns="l")
        leased = []
        real_sync = plane.copier.sync

        def sync():
            leased.append(s.stats()["leases"])
            real_sync()
        plane.copier.sync = sync
        outs = [FakeDeviceArray(3 * MiB), FakeDeviceArray(3 * MiB)]
        s.get_many_into(["a", "b"], outs, ns="l")
        assert leased and leased[0] >= 1  # still leased when the copies were waited for
        s.flush()
        assert s.stats()["leases"] == 0


def test_bad_device_buffers_are_refused(store):
    d, tier = store
    with d.connect() as s:
        host_gpu(s, tier == "t1-direct")
        s.put("x", b"y" * 5000, ns="e")
        with pytest.raises(InvalidArgument):
            s.get_into("x", FakeDeviceArray(10), ns="e")  # too small
        with pytest.raises(InvalidArgument):
            s.get_many_into(["x", "x"], [FakeDeviceArray(5000), bytearray(5000)], ns="e")  # mixed

    class Strided(FakeDeviceArray):
        @property
        def __cuda_array_interface__(self):
            return {"shape": (4, 4), "typestr": "<f4", "data": (ctypes.addressof(self.buf), False),
                    "version": 3, "strides": (4, 16)}
    with pytest.raises(InvalidArgument):
        device_buffer(Strided(64))
    assert device_buffer(bytearray(3)) is None


def test_async_reads_land_group_by_group_and_hold_the_lease(store):
    """get_many_into_async: wait(g) gives group g's sizes once its bytes are
    in place; the lease lasts until result(); a missing key reads -1. (No
    location cache: every key is looked up, under a lease.)"""
    d, tier = store
    with d.connect(cache_locations=False) as s:
        host_gpu(s, tier == "t1-direct")
        block = 300 * 1024
        vals = {f"a{i}": os.urandom(block) for i in range(12)}
        s.put_many(list(vals), list(vals.values()), ns="as")
        s.flush()
        keys = list(vals) + ["missing"]
        outs = [FakeDeviceArray(block) for _ in keys]
        with s.get_many_into_async(keys, outs, ns="as", group_size=4) as reads:
            assert s.stats()["leases"] >= 1  # held while the copies may be in flight
            for g in (2, 0, 1):  # any order
                sizes = reads.wait(g)
                for i, n in zip(range(4 * g, 4 * g + 4), sizes):
                    if keys[i] == "missing":
                        assert n == -1
                    else:
                        assert n == block and outs[i].bytes() == vals[keys[i]]
            assert reads.wait(3) == [-1]
        assert reads.result()[:12] == [block] * 12
        assert s.stats()["leases"] == 0
        with pytest.raises(InvalidArgument):
            s.get_many_into_async(["a0"], [bytearray(block)], ns="as")  # host buffers: use get_many_into


class FakeDeviceRows(FakeDeviceArray):
    """A 2-D FakeDeviceArray: ``rows`` rows of ``width`` bytes."""

    def __init__(self, rows: int, width: int):
        super().__init__(rows * width)
        self.rows, self.width = rows, width

    @property
    def __cuda_array_interface__(self):
        return {**super().__cuda_array_interface__, "shape": (self.rows, self.width)}

    def row(self, i: int) -> bytes:
        return self.bytes()[i * self.width:(i + 1) * self.width]


def test_device_rows_split_a_device_array_into_blocks(tmp_path):
    """kvfs.gpu.device_rows: a DeviceBuffer per row, at the row's address,
    owned by the array; host memory is refused. A layer-wise load into the
    rows of one array, with T0 values of several chunks, values side by
    side in the arena (merged copies) and known locations mixed with looked
    up ones, lands every value in its own row."""
    from kvfs.gpu import device_rows
    arr = FakeDeviceRows(5, 4096)
    rows = device_rows(arr)
    base = device_buffer(arr).ptr
    assert [(r.ptr - base, r.nbytes, r.owner is arr, r.readonly) for r in rows] == \
        [(i * 4096, 4096, True, False) for i in range(5)]
    with pytest.raises(InvalidArgument):
        device_rows(bytearray(10))
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="512M", shm_size="64M",
                      extra=["--stripe-unit", "64K"])
    with d, d.connect() as s:
        plane = host_gpu(s)
        width = 200 * 1024  # 4 chunks of 64 KiB
        layers, per = 3, 10
        keys = [f"L{layer}b{b}" for layer in range(layers) for b in range(per)]
        vals = [os.urandom(width - (i % 3) * 70000) for i in range(len(keys))]
        s.put_many(keys, vals, ns="rows")
        s.flush()
        s.get_many_into(keys[::4], [bytearray(width) for _ in keys[::4]], ns="rows")  # some locations known
        dst = FakeDeviceRows(len(keys), width)
        with s.get_many_into_async(keys, device_rows(dst), ns="rows", group_size=per) as reads:
            for layer in reversed(range(layers)):
                got = reads.wait(layer)
                assert got == [len(v) for v in vals[layer * per:(layer + 1) * per]]
                for i in range(layer * per, (layer + 1) * per):
                    assert dst.row(i)[:len(vals[i])] == vals[i], i
        assert plane.counters["t0_chunks"] > len(keys) > plane.counters["t0_copies"]


def _stored_with_a_missing_key(s, ns, n, base):
    """n values of base + i random bytes stored (and flushed) in ns: the
    values by key, the keys with a missing one last, a device buffer each."""
    vals = {f"{ns}{i}": os.urandom(base + i) for i in range(n)}
    s.put_many(list(vals), list(vals.values()), ns=ns)
    s.flush()
    keys = list(vals) + ["missing"]
    return vals, keys, [FakeDeviceArray(base + n) for _ in keys]


@pytest.mark.parametrize("verify", [True, "full"])
def test_async_reads_start_copying_before_the_last_lookup(store, verify):
    """A large get_many_into_async works in waves: the first copies are
    issued before the last keys are looked up (the copy engine is not left
    waiting for the whole batch's control work), groups that straddle a
    wave boundary wait for every part, a missing key in a late wave reads
    -1, every byte lands right, and no lease outlives result(). (No location
    cache: every key is looked up.)"""
    from kvfs import device_reads
    d, tier = store
    with d.connect(verify=verify, cache_locations=False) as s:
        plane = host_gpu(s, tier == "t1-direct")
        n = 3 * device_reads.FIRST_WAVE + 20  # waves of 64, 128 and the last 21 keys
        vals, keys, outs = _stored_with_a_missing_key(s, "wv", n, 1000)
        events: list[str] = []
        h2d, call = plane.copier.h2d, s._call

        def logged_h2d(dst, src, size):
            events.append("copy")
            h2d(dst, src, size)

        def logged_call(op, args, *rest):
            if op == "lookup":
                events.append(f"lookup {args['keys'][-1]}")
            return call(op, args, *rest)
        plane.copier.h2d, s._call = logged_h2d, logged_call
        gs = 50  # groups straddle the wave boundaries (64, 192)
        with s.get_many_into_async(keys, outs, ns="wv", group_size=gs) as reads:
            # returned after the first groups' waves: the last keys are not looked up yet
            assert "lookup missing" not in events and events.count("copy" if tier == "t0" else "lookup wv191")
            assert reads.wait(0) == [len(vals[k]) for k in keys[:gs]]
            assert all(outs[i].bytes()[:len(vals[keys[i]])] == vals[keys[i]] for i in range(gs))
            assert "lookup missing" not in events
            for g in reversed(range(-(-len(keys) // gs))):
                for i, size in zip(range(g * gs, min(len(keys), (g + 1) * gs)), reads.wait(g)):
                    if keys[i] == "missing":
                        assert size == -1
                    else:
                        assert size == len(vals[keys[i]]) and outs[i].bytes()[:size] == vals[keys[i]], i
        assert s.stats()["leases"] == 0
        lookups = [e for e in events if e.startswith("lookup")]
        assert len(lookups) == 3 and lookups[-1] == "lookup missing"
        if tier == "t0":  # T0 copies are issued as each wave starts (T1 ones go to kvikio or staging)
            assert events.index("copy") < events.index(lookups[-1])


class DeferredCopier(HostCopier):
    """A copy engine that runs its copies only when waited for, as CUDA's
    runs them some time after they are queued."""

    def __init__(self):
        self.queued = []

    def h2d(self, dst, src, n):
        self.queued.append((dst, src, n))

    def _run(self):
        for dst, src, n in self.queued:
            ctypes.memmove(dst, src, n)
        self.queued.clear()

    def wait(self, ev):
        self._run()

    def sync(self):
        self._run()


def _log_lookups(s):
    """The keys ``s`` looks up from now on, in order (a list that grows)."""
    looked_up: list[str] = []
    call = s._call

    def logged_call(op, args, *rest):
        if op == "lookup":
            looked_up.extend(args["keys"])
        return call(op, args, *rest)
    s._call = logged_call
    return looked_up


def test_a_plan_whose_items_come_out_of_order_copies_every_one(tmp_path):
    """GpuPlane.start queues T0 copies group by group; a wave's plan lists
    the items it found through the directory first and those it looked up
    after, so its items need not come in order. Every item is copied, in
    whatever order the plan holds them, and each group's wait covers its
    own items (on the old code item 0, listed last, was never copied)."""
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="64M")
    with d, d.connect() as s:
        plane = host_gpu(s)
        plane.copier = DeferredCopier()
        keys = [f"o{i}" for i in range(6)]
        vals = [bytes([i + 1]) * 70_000 for i in range(6)]
        s.put_many(keys, vals, ns="o")
        s.flush()
        known = s._dir.lookup_many("o", keys, list(range(6)))
        found = {i: known[i] for i in (1, 2, 3, 4, 5, 0)}  # item 0 last, as a looked-up one is
        outs = [device_buffer(FakeDeviceArray(70_000)) for _ in keys]
        sizes = [-1] * 6
        plan = plane.plan("o", keys, found, outs, s.arena, s._path, sizes)
        pending = plane.start("o", keys, found, plan, False, 2)
        assert pending.wait(0) == set() and sizes == [70_000] * 6
        for i in (0, 1):
            assert bytes((ctypes.c_char * 70_000).from_address(outs[i].ptr)) == vals[i]
        assert pending.finish() == set()
        for i in range(6):
            assert bytes((ctypes.c_char * 70_000).from_address(outs[i].ptr)) == vals[i]


def test_async_reads_take_known_locations_without_a_round_trip(store):
    """With the location cache (the default), a wave copies every key whose
    location the process knows (its cache, the shared directory) with no
    lookup and no lease: only a key nobody knows is looked up. The bytes
    and sizes are those of a lookup's read."""
    d, tier = store
    with d.connect() as s:
        host_gpu(s, tier == "t1-direct")
        vals, keys, outs = _stored_with_a_missing_key(s, "kn", 200, 700)  # waves of 64 and 128, then the rest
        looked_up = _log_lookups(s)
        with s.get_many_into_async(keys, outs, ns="kn", group_size=30) as reads:
            for g in range(-(-len(keys) // 30)):
                for i, size in zip(range(g * 30, min(len(keys), (g + 1) * 30)), reads.wait(g)):
                    want = vals.get(keys[i])
                    assert size == (-1 if want is None else len(want)), i
                    if want is not None:
                        assert outs[i].bytes()[:size] == want
        assert looked_up == ["missing"]
        assert s.stats()["leases"] == 0


def test_async_reads_from_known_locations_read_again_after_a_removal(tmp_path):
    """A copy from a known location takes no lease, so the object can be
    deleted and its arena extent handed to another value before the copy
    engine gets to it. The removal generation catches it: such an item is
    read again under a lease (here: not found, -1) and never reported with
    another value's bytes; the other items keep their copies."""
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="64M")
    with d, d.connect() as s, d.connect(cache_locations=False) as other:
        plane = host_gpu(s)
        plane.copier = DeferredCopier()
        size = 64 * 1024
        keys = [f"r{i}" for i in range(8)]
        vals = [bytes([i + 1]) * size for i in range(8)]
        s.put_many(keys, vals, ns="rm")
        s.flush()
        outs = [FakeDeviceArray(size) for _ in keys]
        reads = s.get_many_into_async(keys, outs, ns="rm", group_size=4)
        assert plane.copier.queued  # the copies are queued, none has run
        assert other.delete("r1", ns="rm")
        other.put_many([f"x{i}" for i in range(8)], [b"\xee" * size] * 8, ns="rm")  # reuses freed extents
        got = reads.wait(0)
        assert got[1] == -1 and got[0] == got[2] == got[3] == size
        for i in (0, 2, 3):
            assert outs[i].bytes() == vals[i]
        assert reads.result()[4:] == [size] * 4
        assert all(outs[i].bytes() == vals[i] for i in range(4, 8))
        assert s.stats()["leases"] == 0


def test_async_reads_from_known_locations_under_eviction_and_deletes_serve_no_wrong_byte(tmp_path):
    """Async reads without leases while another client fills a small arena
    (evicting T0 copies and handing their extents to new values) and
    deletes and puts back the keys being read: each read's copies run
    only when waited for, so extents change under them. Every size given
    out comes with exactly its key's bytes (a key deleted meanwhile may
    read -1); the generation catches the rest, and some reads do go again."""
    d = DaemonProcess(tmp_path / "s", capacity="512M", shm_size="8M")
    size = 256 * 1024
    keys = [f"r{i}" for i in range(12)]
    vals = {k: os.urandom(size) for k in keys}
    with d, d.connect() as s:
        plane = host_gpu(s)
        plane.copier = DeferredCopier()
        s.put_many(keys, list(vals.values()), ns="ev")
        s.flush()
        again = []
        read_device = s._read_device

        def counted(ns, ks, outs):
            again.extend(ks)
            return read_device(ns, ks, outs)
        s._read_device = counted

        def step(w, i):
            w.put_many([f"x{i}-{j}" for j in range(4)], [os.urandom(size) for _ in range(4)], ns="ev")
            k = keys[i % len(keys)]
            w.delete([k], ns="ev")
            w.put(k, vals[k], ns="ev")  # the same bytes: keys name content
        served = 0
        with churning(d, step):
            for _ in range(60):
                outs = [FakeDeviceArray(size) for _ in keys]
                with s.get_many_into_async(keys, outs, ns="ev", group_size=4) as reads:
                    for g in range(3):
                        for i, n in zip(range(4 * g, 4 * g + 4), reads.wait(g)):
                            assert n in (-1, size), n
                            if n == size:
                                assert outs[i].bytes() == vals[keys[i]], keys[i]
                                served += 1
        assert served > 300 and again  # mostly served, and the generation sent some back
        assert s.stats()["leases"] == 0


def test_async_reads_never_deliver_a_corrupted_copy_from_a_known_location(tmp_path):
    """A T0 copy found through the directory fails full verification (one
    byte flipped in the arena): it is read again under a lease, fails again
    and is reported; the daemon drops the bad T0 copy, and the second
    lookup reads the good one in T1. No wrong byte is delivered, and only
    that key ever goes to the daemon."""
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="64M")
    with d, d.connect(verify="full") as s:
        host_gpu(s)
        keys = [f"c{i}" for i in range(6)]
        vals = [os.urandom(MiB) for _ in keys]
        s.put_many(keys, vals, ns="cr")
        s.flush()
        item = s._dir.lookup_many("cr", keys, [2])[2]
        t0 = item[4][0]
        s.arena.rw[t0 + 777] ^= 0xFF  # the arena copy rots (T1 keeps the good one)
        looked_up = _log_lookups(s)
        outs = [FakeDeviceArray(MiB) for _ in keys]
        with s.get_many_into_async(keys, outs, ns="cr", group_size=3) as reads:
            assert reads.wait(0) == [MiB] * 3
            assert outs[2].bytes() == vals[2]
            assert reads.wait(1) == [MiB] * 3
        assert reads.result() == [MiB] * 6
        assert all(o.bytes() == v for o, v in zip(outs, vals))
        assert looked_up and set(looked_up) == {"c2"}  # only the failed one went to the daemon
        assert s.stat("c2", ns="cr").tier == "T1"  # its T0 copy reported and dropped
        assert s.stats()["leases"] == 0


def test_an_error_in_a_later_wave_is_raised_where_it_starts_and_leaks_nothing(tmp_path):
    """A bad destination among the last keys of an async read is found when
    its wave starts (at a wait or at result): that call raises a clear
    error, what had started lands, and no lease is left behind."""
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="64M")
    with d, d.connect() as s:
        host_gpu(s)
        keys = [f"e{i}" for i in range(300)]
        s.put_many(keys, [bytes([i % 256]) * 512 for i in range(300)], ns="e")
        outs = [FakeDeviceArray(512) for _ in keys[:-1]] + [bytearray(512)]  # the last one is host memory
        reads = s.get_many_into_async(keys, outs, ns="e", group_size=10)
        assert reads.wait(0) == [512] * 10 and outs[3].bytes() == bytes([3]) * 512
        with pytest.raises(InvalidArgument, match="device buffers only"):
            for g in range(30):
                reads.wait(g)
        reads.result()  # lands what started, raises nothing more
        assert s.stats()["leases"] == 0


def test_host_only_use_imports_no_cuda_library(tmp_path):
    """A client that never touches device memory loads neither CuPy nor
    kvikio (nor torch), even where they are installed; capabilities() says
    what is there without pinning anything."""
    import subprocess
    import sys
    d = DaemonProcess(tmp_path / "s", capacity="64M", shm_size="16M")
    with d:
        code = (
            "import sys, kvfs\n"
            f"s = kvfs.connect({str(d.socket)!r})\n"
            "s.put('k', b'v' * 100000); assert s.get('k') == b'v' * 100000\n"
            "assert not {'cupy', 'kvikio', 'torch'} & set(sys.modules), sorted(sys.modules)\n"
            "caps = s.capabilities(); assert caps['arena'] and caps['native'] in ('native', 'python')\n"
            "assert caps.get('arena_pinned') in (None, False)\n"
            "print('ok')\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_threads_sharing_a_store_stage_through_their_own_buffers(tmp_path):
    """A Store is shared by threads: concurrent staged device reads (T1, no
    kvikio) each get their own staging slabs and the right bytes."""
    import threading
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="512M", shm_size=0)
    with d, d.connect(verify="full") as s:
        host_gpu(s)
        vals = {f"t{i}": os.urandom(3 * MiB + i) for i in range(12)}
        s.put_many(list(vals), list(vals.values()), ns="th")
        errors = []

        def reader(keys):
            try:
                for _ in range(5):
                    outs = [FakeDeviceArray(len(vals[k])) for k in keys]
                    assert s.get_many_into(keys, outs, ns="th") == [len(vals[k]) for k in keys]
                    assert all(o.bytes() == vals[k] for o, k in zip(outs, keys))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        ts = [threading.Thread(target=reader, args=(list(vals)[i::3],)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors


def test_cached_t0_locations_are_read_without_a_round_trip_and_never_stale(tmp_path):
    """Device reads use known locations as host reads do: no lookup for a
    repeat read, and a location whose object was deleted and whose extent
    was reused by another value is never read as that value."""
    from helpers import count_calls
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="32M")
    with d, d.connect() as s:
        host_gpu(s)
        a = os.urandom(2 * MiB)
        s.put("a", a, ns="c")
        out = FakeDeviceArray(2 * MiB)
        assert s.get_into("a", out, ns="c") == 2 * MiB and out.bytes() == a
        calls = count_calls(s)
        assert s.get_into("a", out, ns="c") == 2 * MiB and out.bytes() == a
        assert "lookup" not in calls, calls
        s.delete(["a"], ns="c")
        s.put("b", os.urandom(2 * MiB), ns="c")  # may take a's extent
        out2 = FakeDeviceArray(2 * MiB)
        from kvfs.errors import NotFound
        with pytest.raises(NotFound):
            s.get_into("a", out2, ns="c")


def test_a_readers_read_only_arena_is_copied_from_right(tmp_path):
    """A client with the read right maps the arena read-only (its ACL grants
    no more): device reads take the mapping's address all the same."""
    from kvfs.session import ArenaMapping as _Arena
    with DaemonProcess(tmp_path / "s", shm_size="64M") as d, d.connect() as s:
        vals = {f"r{n}": os.urandom(n) for n in (1, 70_000, 5 * MiB)}
        s.put_many(list(vals), list(vals.values()), ns="ro")
        s.arena = _Arena(s.arena.path, s.arena.size, writable=False)
        assert s.arena.ro.readonly and s.arena.rw.readonly
        gpu = host_gpu(s)
        outs = [FakeDeviceArray(len(v)) for v in vals.values()]
        assert s.get_many_into(list(vals), outs, ns="ro") == [len(v) for v in vals.values()]
        assert [o.bytes() for o in outs] == list(vals.values()) and gpu.counters["t0_chunks"] > 0


class SplitCopier(HostCopier):
    """HostCopier whose "device" memory is several allocations side by side,
    refusing a copy across two as CUDA does (cudaErrorInvalidValue)."""

    def __init__(self, splits):
        self.splits = tuple(sorted(splits))
        self.copies = 0

    def _one_allocation(self, ptr, n):
        if ptr + n > self.allocation(ptr)[1]:
            raise RuntimeError("cudaErrorInvalidValue: a copy across two device allocations")
        self.copies += 1

    def h2d(self, dst, src, n):
        self._one_allocation(dst, n)
        super().h2d(dst, src, n)

    def d2h(self, dst, src, n):
        self._one_allocation(src, n)
        super().d2h(dst, src, n)


@pytest.mark.parametrize("separate", [True, False])
def test_copies_never_span_two_device_allocations_however_adjacent(tmp_path, separate):
    """Separate tensors can lie back to back in device memory (torch's
    allocator hands out neighbouring segments). Puts from them and T0 reads
    into them (batched and async) merge adjacent copies only inside one
    allocation: 32 adjacent blocks of separate allocations are 32 copies
    each way and arrive right; of one allocation, fewer."""
    from kvfs.gpu import DeviceBuffer
    block, n = 256 * 1024, 32
    d = DaemonProcess(tmp_path / "s", capacity="512M", shm_size="64M")
    with d, d.connect() as s:
        plane = host_gpu(s)
        vals = [os.urandom(block) for _ in range(n)]
        src = FakeDeviceArray(n * block, b"".join(vals))
        dst = FakeDeviceArray(n * block)
        sb, db = ctypes.addressof(src.buf), ctypes.addressof(dst.buf)
        splits = [b + i * block for b in (sb, db) for i in range(1, n)] if separate else []
        plane.copier = copier = SplitCopier(splits)
        keys = [f"k{i}" for i in range(n)]
        assert s.put_many(keys, [DeviceBuffer(sb + i * block, block, True, src) for i in range(n)],
                          ns="a") == [True] * n
        put_copies, copier.copies = copier.copies, 0
        outs = [DeviceBuffer(db + i * block, block, False, dst) for i in range(n)]
        assert s.get_many_into(keys, outs, ns="a") == [block] * n
        assert dst.bytes() == b"".join(vals)
        read_copies, copier.copies = copier.copies, 0
        ctypes.memset(db, 0, n * block)
        with s.get_many_into_async(keys, outs, ns="a") as r:
            assert r.result() == [block] * n
        assert dst.bytes() == b"".join(vals)
        async_copies = copier.copies
        if separate:
            assert put_copies == read_copies == async_copies == n
        else:
            assert max(put_copies, read_copies, async_copies) < n
