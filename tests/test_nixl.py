"""NIXL moves kvfs's bytes, against the real NIXL (nixl-cu13, its POSIX
backend for segment files and UCX for the arena) and a real daemon:
1000 blocks over three stripes and T0 into one registered buffer, every
POSIX queue mode, a compaction that waits for a transfer's lease, deleted
and corrupted blocks reported and never delivered, writes through NIXL
that other readers get back (and that a kill -9 keeps, when sync), and
descriptors that stay in step with segments and arenas."""
import os
import time

import pytest

from kvfsd.testing import DaemonProcess

np = pytest.importorskip("numpy")
pytest.importorskip("nixl", reason="NIXL is not installed (pip install 'kvfs[nixl]')")

from kvfs.errors import InvalidArgument, KvfsError  # noqa: E402
from kvfs.integrations.nixl import POSIX_MODES, KvfsNixl  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10


def blocks(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size), dtype=np.uint8)


def stripes_of(store, keys, ns):
    return {os.path.dirname(path) for k in keys for path, _off, _n in store.stat(k, ns=ns).extents}


@pytest.fixture
def kvd(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=3, capacity="2G", shm_size="64M",
                      extra=["--stripe-unit", "256K", "--compact-at", "0"])
    with d:
        yield d


@pytest.mark.parametrize("copies", ["kvfs", "nixl"])  # arena bytes by kvfs's data plane, or by UCX
def test_a_thousand_blocks_from_three_stripes_and_t0_into_one_registered_buffer(kvd, copies):
    n, size = 1000, 48 * KiB
    data = blocks(n, size)
    big = blocks(6, 700 * KiB, seed=1)  # three chunks each, striped
    keys = [f"b{i:04d}" for i in range(n)]
    bkeys = [f"big{i}" for i in range(len(big))]
    with kvd.connect() as s, KvfsNixl(s, copies=copies) as kn:
        # half written through NIXL straight to T1, half put the usual way (T0, written back)
        assert kn.put_many(keys[:500], list(data[:500]), ns="kv") == [True] * 500
        assert s.put_many(keys[500:], list(data[500:]), ns="kv") == [True] * 500
        assert kn.put_many(bkeys, list(big), ns="kv") == [True] * len(big)
        assert len(stripes_of(s, keys[:500] + bkeys, "kv")) == 3
        dest = np.zeros((n, size), np.uint8)
        region = kn.register(dest)
        assert kn.get_many_into(keys, list(dest), ns="kv") == [size] * n
        assert np.array_equal(dest, data)
        assert kn.counters["file_chunks"] >= 500 and kn.counters["dram_chunks"] >= 500
        assert kn.counters["temp_registrations"] == 2  # one per NIXL put (its sources: one array); never dest
        kn.deregister(region)
        bout = np.zeros_like(big)
        assert kn.get_many_into(bkeys + ["nope"], list(bout) + [bytearray(8)], ns="kv") == [700 * KiB] * 6 + [-1]
        assert np.array_equal(bout, big)
        assert kn.counters["verify_failed"] == 0 and kn.counters["xfer_failed"] == 0


@pytest.mark.parametrize("mode", sorted(POSIX_MODES))
def test_every_posix_queue_mode_reads_and_writes(tmp_path, mode):
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size=0)
    data = blocks(64, 256 * KiB, seed=3)
    keys = [f"q{i}" for i in range(len(data))]
    with d, d.connect() as s, KvfsNixl(s, params=POSIX_MODES[mode]) as kn:
        assert kn.put_many(keys, list(data), ns="q") == [True] * len(keys)
        out = np.zeros_like(data)
        assert kn.get_many_into(keys, list(out), ns="q") == [data.shape[1]] * len(keys)
        assert np.array_equal(out, data)
        assert kn.counters["dram_chunks"] == 0  # no T0 here: every byte came through POSIX


def test_descriptors_hold_a_lease_that_compaction_waits_for(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size=0,
                      extra=["--stripe-unit", "1M", "--segment-size", "4M", "--compact-at", "0"])
    with d, d.connect() as s, KvfsNixl(s) as kn:
        vals = {f"k{i:03d}": os.urandom(900_000 + i) for i in range(48)}
        s.put_many(list(vals), list(vals.values()), ns="c")
        gone = [k for i, k in enumerate(vals) if i % 4]
        s.delete(gone, ns="c")
        left = {k: v for k, v in vals.items() if k not in gone}
        keys = list(left)
        old = {s.stat(k, ns="c").extents[0][0] for k in keys}
        old_ids = {int(os.path.basename(p).split("-")[1].split(".")[0]) for p in old}
        out = [bytearray(len(left[k])) for k in keys]
        regions = [kn.register(b) for b in out]
        with kn.descriptors(keys, ns="c") as rd:
            assert rd.sizes == [len(left[k]) for k in keys] and len(rd.file) == len(keys)
            assert old_ids <= set(kn.registered_segments())
            r = s.compact(threshold=0.5)  # copies forward; the old segments wait for this lease
            assert r["segments"] >= 4 and r["segments_pending_lease"] >= 4
            time.sleep(0.2)
            assert all(os.path.exists(p) for p in old)
            got = kn.read(rd, [kn_addr(b) for b in out])
            assert got == rd.sizes and [bytes(b) for b in out] == list(left.values())
        deadline = time.monotonic() + 10
        while any(os.path.exists(p) for p in old) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(os.path.exists(p) for p in old)  # gone once the lease ended
        fresh = [bytearray(len(left[k])) for k in keys]
        assert kn.get_many_into(keys, fresh, ns="c") == [len(left[k]) for k in keys]  # the moved copies
        assert [bytes(b) for b in fresh] == list(left.values())
        # registration in step: the retired segments were deregistered and closed
        assert kn.counters["segments_retired"] >= len(old_ids)
        assert not old_ids & set(kn.registered_segments())
        for r_ in regions:
            kn.deregister(r_)


def kn_addr(buf):
    from kvfs.gpu import address_of
    return address_of(memoryview(buf))


def test_deleted_and_corrupted_blocks_are_reported_never_delivered(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size=0)
    data = blocks(8, 128 * KiB, seed=5)
    keys = [f"c{i}" for i in range(len(data))]
    with d, d.connect() as s, KvfsNixl(s) as kn:
        kn.put_many(keys, list(data), ns="x")
        s.delete(["c1"], ns="x")
        path, off, _n = s.stat("c2", ns="x").extents[0]
        with open(path, "r+b") as f:  # one bit of c2's payload flipped on disk
            f.seek(off + 1000)
            b = f.read(1)
            f.seek(off + 1000)
            f.write(bytes([b[0] ^ 1]))
        out = np.zeros_like(data)
        sizes = kn.get_many_into(keys, list(out), ns="x")
        assert sizes[1] == -1 and sizes[2] == -1
        assert all(sizes[i] == data.shape[1] for i in range(len(keys)) if i not in (1, 2))
        for i in (0, 3, 4, 5, 6, 7):
            assert np.array_equal(out[i], data[i])
        assert kn.counters["verify_failed"] >= 1
        assert not s.contains(["c2"], ns="x")[0]  # reported: the daemon re-checked and dropped it
        assert s.stats()["counters"]["corrupt_dropped"] >= 1


def test_a_corrupted_arena_copy_is_read_again_from_t1(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size="64M")
    data = blocks(4, 200 * KiB, seed=6)
    keys = [f"a{i}" for i in range(len(data))]
    with d, d.connect() as s, KvfsNixl(s) as kn:
        s.put_many(keys, list(data), ns="t")
        s.flush()  # written back: T1 has them too
        with s.hold(["a3"], ns="t") as h:
            t0 = h.items[0][4][0]
        s.arena.rw[t0 + 5] ^= 0xFF  # scribbled on in shared memory
        out = np.zeros_like(data)
        sizes = kn.get_many_into(keys, list(out), ns="t")
        assert kn.counters["verify_failed"] == 1
        # the bad copy was reported, dropped from T0, and the block read again from T1
        assert sizes == [data.shape[1]] * 4 and np.array_equal(out, data)
        assert kn.counters["file_chunks"] == 1
        assert "T0" not in s.stat("a3", ns="t").tier


def test_writes_through_nixl_are_invisible_until_commit_and_readers_get_them(kvd):
    data = blocks(3, 300 * KiB, seed=7)
    keys = ["w0", "w1", "w2"]
    with kvd.connect() as s, kvd.connect() as other, KvfsNixl(s) as kn:
        src = [kn.register(x) for x in data]
        with kn.reserve(keys, [x.nbytes for x in data], ns="w") as wd:
            assert len(wd.file) == 3 * 2  # 300 KiB at a 256 KiB stripe unit: two chunks each
            assert kn.write(wd, [x.ctypes.data for x in data])
            assert other.contains(keys, ns="w") == [False] * 3  # written, not committed: invisible
            assert kn.commit(wd, list(data)) == [True] * 3
        assert [other.get(k, ns="w") for k in keys] == [x.tobytes() for x in data]
        with kn.reserve(["gone"], [1000], ns="w") as wd:
            pass  # aborted
        assert not other.contains(["gone"], ns="w")[0]
        # through the arena too (kvfs's copy into it): the daemon writes those back to T1
        assert kn.put_many(["t0a", "t0b", "w0"], [data[0], data[1], data[2]], ns="w", t0=True) == [True, True, False]
        assert other.get("t0b", ns="w") == data[1].tobytes()
        assert other.flush()
        assert "T1" in other.stat("t0a", ns="w").tier
        assert other.get("w0", ns="w") == data[0].tobytes()  # the first put stands (immutable)
        for r in src:
            kn.deregister(r)


def test_sync_writes_through_nixl_survive_kill_9(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size=0)
    data = blocks(16, 512 * KiB, seed=8)
    keys = [f"s{i}" for i in range(len(data))]
    d.start()
    try:
        with d.connect() as s, KvfsNixl(s) as kn:
            assert kn.put_many(keys, list(data), ns="s", sync=True) == [True] * len(keys)
        d.kill()
        d.start()
        with d.connect() as s:
            assert [s.get(k, ns="s") for k in keys] == [x.tobytes() for x in data]
    finally:
        d.__exit__(None, None, None)


@pytest.mark.parametrize("copies", ["kvfs", "nixl"])
def test_a_restarted_daemon_gets_its_new_arena_registered(tmp_path, copies):
    d = DaemonProcess(tmp_path / "s", stripes=1, capacity="1G", shm_size="32M")
    data = blocks(4, 64 * KiB, seed=9)
    keys = [f"r{i}" for i in range(len(data))]
    with d, d.connect() as s, KvfsNixl(s, copies=copies) as kn:
        s.put_many(keys, list(data), ns="r")
        out = np.zeros_like(data)
        assert kn.get_many_into(keys, list(out), ns="r") == [data.shape[1]] * 4
        d.restart()
        s.put_many(["after"], [data[0]], ns="r")  # lands in the new daemon's arena
        out2 = np.zeros(data.shape[1], np.uint8)
        assert kn.get_many_into(["after"] + keys, [out2] + list(out), ns="r") == [data.shape[1]] * 5
        assert np.array_equal(out2, data[0]) and np.array_equal(out, data)
        assert kn.counters["dram_chunks"] >= 5


def test_bad_calls_are_clear_errors(kvd):
    with kvd.connect() as s, KvfsNixl(s) as kn:
        kn.put_many(["k"], [b"x" * 100_000], ns="e")  # in T1 only: NIXL's file backend moves it
        with pytest.raises(InvalidArgument):
            KvfsNixl(s, backend="NOPE")
        with kn.descriptors(["k"], ns="e") as rd:
            unregistered = bytearray(100_000)
            with pytest.raises(InvalidArgument, match="not registered"):
                kn.read(rd, [kn_addr(unregistered)])
        with pytest.raises(InvalidArgument, match="too small"):
            kn.get_many_into(["k"], [bytearray(10)], ns="e")
        with pytest.raises(InvalidArgument):
            kn.get_many_into(["k", "j"], [bytearray(10)], ns="e")
        kvd.stop()
        t = time.monotonic()
        with pytest.raises(KvfsError):  # a stopped daemon: a clear error, not a hang
            kn.get_many_into(["k"], [bytearray(100_000)], ns="e")
        with pytest.raises(KvfsError):
            kn.put_many(["j"], [b"y" * 100_000], ns="e")
        assert time.monotonic() - t < 5


@pytest.mark.parametrize("copies", ["kvfs", "nixl"])
def test_file_bytes_through_the_bounce_buffer_read_and_write_byte_exact(tmp_path, monkeypatch, copies):
    """What a GPU node without GDS does (POSIX cannot reach device memory:
    file -> registered stage -> UCX -> destination), forced here on host
    memory with a small stage so a batch takes several rounds."""
    from kvfs.integrations import nixl_registry
    monkeypatch.setattr(nixl_registry, "STAGE_BYTES", 1 * MiB)
    d = DaemonProcess(tmp_path / "s", stripes=3, capacity="1G", shm_size=0, extra=["--stripe-unit", "256K"])
    data = blocks(20, 600 * KiB, seed=11)
    keys = [f"st{i}" for i in range(len(data))]
    with d, d.connect() as s, KvfsNixl(s, stage=True, copies=copies) as kn:
        assert kn.put_many(keys, list(data), ns="st") == [True] * len(keys)
        assert [s.get(k, ns="st") for k in keys] == [x.tobytes() for x in data]  # written through the stage
        out = np.zeros_like(data)
        assert kn.get_many_into(keys, list(out), ns="st") == [data.shape[1]] * len(keys)
        assert np.array_equal(out, data)
        assert kn.counters["staged_chunks"] == 2 * len(keys) * 3  # 3 chunks a block, both ways
        assert kn.counters["xfer_failed"] == 0 and kn.counters["verify_failed"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("copies", ["kvfs", "nixl"])
def test_blocks_reach_device_memory_from_both_tiers_verified_on_the_gpu(tmp_path, copies):
    """On a GPU: T0 blocks go arena -> VRAM (copy engine, or UCX), T1 blocks
    file -> pinned stage -> VRAM (POSIX cannot reach device memory), and the GPU
    hasher checks what landed; a scribbled arena copy is caught there and
    the good T1 copy is read instead."""
    cp = pytest.importorskip("cupy")
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="2G", shm_size="256M")
    data = blocks(32, 1 * MiB, seed=12)
    keys = [f"g{i}" for i in range(len(data))]
    with d, d.connect() as s, KvfsNixl(s, copies=copies) as kn:
        s.put_many(keys[:16], list(data[:16]), ns="g")  # T0 (and written back)
        kn.put_many(keys[16:], list(data[16:]), ns="g")  # T1 only
        s.flush()
        dev = cp.zeros(data.shape, dtype=cp.uint8)
        reg = kn.register(dev)
        assert kn.get_many_into(keys, [dev[i] for i in range(len(keys))], ns="g") == [data.shape[1]] * len(keys)
        assert np.array_equal(cp.asnumpy(dev), data)
        assert kn.counters["dram_chunks"] >= 16 and kn.counters["staged_chunks"] >= 16
        with s.hold(["g3"], ns="g") as h:
            t0 = h.items[0][4][0]
        s.arena.rw[t0 + 77] ^= 0x10
        dev.fill(0)
        assert kn.get_many_into(keys[:8], [dev[i] for i in range(8)], ns="g") == [data.shape[1]] * 8
        assert kn.counters["verify_failed"] == 1  # caught in device memory by the GPU hasher
        assert np.array_equal(cp.asnumpy(dev[:8]), data[:8])  # the good copy, from T1
        kn.deregister(reg)


@pytest.mark.gpu
@pytest.mark.parametrize("copies", ["kvfs", "nixl"])
def test_device_sources_are_written_through_nixl_with_gpu_checksums(tmp_path, copies):
    cp = pytest.importorskip("cupy")
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="2G", shm_size="256M")
    data = blocks(8, 3 * MiB + 4096, seed=13)
    with d, d.connect() as s, KvfsNixl(s, copies=copies) as kn:
        src = cp.asarray(data)
        rows = [src[i] for i in range(len(data))]
        assert kn.put_many([f"t0-{i}" for i in range(8)], rows, ns="p", t0=True) == [True] * 8  # UCX into the arena
        assert kn.put_many([f"t1-{i}" for i in range(8)], rows, ns="p") == [True] * 8  # staged to POSIX
        with d.connect() as host:
            for i in range(8):
                assert host.get(f"t0-{i}", ns="p") == data[i].tobytes()
                assert host.get(f"t1-{i}", ns="p") == data[i].tobytes()
            assert host.flush()
            assert host.verify_store(deep=True)["broken_count"] == 0


def test_torch_cpu_tensors_are_buffers_too(tmp_path):
    """What engines hold (LMCache's and vLLM's CPU buffers are torch tensors,
    which have no buffer protocol): read into and written from by address."""
    torch = pytest.importorskip("torch")
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size="64M")
    src = torch.randint(0, 255, (6, 100_000), dtype=torch.uint8).to(torch.bfloat16)
    keys = [f"tt{i}" for i in range(6)]
    with d, d.connect() as s, KvfsNixl(s) as kn:
        assert kn.put_many(keys[:3], [src[i] for i in range(3)], ns="tt") == [True] * 3  # T1
        assert kn.put_many(keys[3:], [src[i] for i in range(3, 6)], ns="tt", t0=True) == [True] * 3  # T0
        out = torch.zeros_like(src)
        assert kn.get_many_into(keys, [out[i] for i in range(6)], ns="tt") == [200_000] * 6
        assert torch.equal(out, src)
        with pytest.raises(InvalidArgument, match="contiguous"):
            kn.get_many_into(keys[:1], [out[:, :10].t()], ns="tt")


def test_bench_nixl_quick(tmp_path):
    """kvfs bench --nixl runs every row on the same bytes (each checked in
    its first round inside the benchmark) and writes the table and JSON."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "kvfstools.cli", "bench", "--nixl", "--quick", "--dir", str(tmp_path),
                        "--json", str(tmp_path / "n.json")], capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    res = json.loads((tmp_path / "n.json").read_text())
    assert set(res["blocks"]) == {str(1 << 20), str(8 << 20)}
    for b in res["blocks"].values():
        groups = b["groups"]
        assert {"raw preadv", "get_many_into", "NIXL POSIX default", "NIXL POSIX uring"} <= set(groups["T1 warm"])
        assert {"memcpy", "KvfsNixl, kvfs copies", "KvfsNixl, NIXL UCX"} <= set(groups["T0"])
        assert all(v > 0 for g in groups.values() for v in g.values())
    assert b"NIXL POSIX" in r.stdout
