"""The GPU path for real: CuPy arrays and torch CUDA tensors, CUDA copies
from the pinned arena, kvikio reads from T1 (and the staging path without
it). Run on the GPU machine: pytest -m gpu tests/test_gpu.py"""
import os

import pytest

from kvfs.errors import NotFound
from helpers import put_and_corrupt
from kvfsd.testing import DaemonProcess

# deselected by default (-m 'not gpu'); CuPy is imported only when they run
pytestmark = pytest.mark.gpu
cupy = None


@pytest.fixture(autouse=True)
def _cupy():
    global cupy
    cupy = pytest.importorskip("cupy")

MiB = 1 << 20
SIZES = [0, 1, 4095, 64 * 1024, 4 * MiB + 7, 64 * MiB, 256 * MiB]


def _cuda_or_skip():
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")


@pytest.fixture(params=["t0", "t1-kvikio", "t1-staging"])
def gpu_store(request, tmp_path, monkeypatch):
    _cuda_or_skip()
    if request.param == "t1-staging":
        monkeypatch.setenv("KVFS_KVIKIO", "0")
    shm = "1G" if request.param == "t0" else 0
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="4G", shm_size=shm)
    with d:
        yield d, request.param


@pytest.mark.parametrize("verify", [True, "full"])
def test_cupy_round_trip_both_tiers(gpu_store, verify):
    d, mode = gpu_store
    with d.connect(verify=verify) as s:
        rng = cupy.random.default_rng(1)
        srcs = [rng.integers(0, 256, n, dtype=cupy.uint8) for n in SIZES]
        keys = [f"k{n}" for n in SIZES]
        assert s.put_many(keys, srcs, ns="g") == [True] * len(keys)
        s.flush()
        outs = [cupy.empty(n, dtype=cupy.uint8) for n in SIZES]
        assert s.get_many_into(keys, outs, ns="g") == SIZES
        for a, b in zip(srcs, outs):
            assert bool((a == b).all())
        # the host path sees the same bytes
        assert s.get("k4095", ns="g") == cupy.asnumpy(srcs[2]).tobytes()
        caps = s.capabilities()
        assert caps["cuda"] is True
        if mode == "t1-kvikio" and verify is True:
            assert caps["kvikio"] is True and s._gpu.counters["header_checks"] > 0
        if mode == "t0":
            assert s._gpu.counters["t0_chunks"] > 0 and caps["arena_pinned"]
            assert caps["device_hashing"] == "cuda (xxh3 lanes)"
            assert s._gpu.counters["device_hashed_values"] > 0  # put checksums taken on the GPU
        # verify="full": hashed on the GPU where they landed, unless staged (no kvikio)
        assert (s._gpu.counters["device_verified_chunks"] > 0) == (verify == "full" and mode != "t1-staging")


def test_torch_tensors_and_slices_of_one_buffer(gpu_store):
    torch = pytest.importorskip("torch")
    d, _mode = gpu_store
    with d.connect() as s:
        block = 2 * MiB
        src = torch.randint(0, 256, (16, block), dtype=torch.uint8, device="cuda")
        keys = [f"t{i}" for i in range(16)]
        s.put_many(keys, [src[i] for i in range(16)], ns="tt")
        s.flush()
        dst = torch.empty((16, block), dtype=torch.uint8, device="cuda")
        assert s.get_many_into(keys, [dst[i] for i in range(16)], ns="tt") == [block] * 16
        torch.cuda.synchronize()
        assert torch.equal(src, dst)
        bf = torch.randn(1024, 128, dtype=torch.bfloat16, device="cuda")
        s.put("bf16", bf, ns="tt")
        out = torch.empty_like(bf)
        assert s.get_into("bf16", out, ns="tt") == bf.numel() * 2 and torch.equal(bf, out)


def test_device_rows_of_a_torch_kv_space_take_layer_wise_loads(gpu_store):
    """kvfs.gpu.device_rows: one DeviceBuffer per block of a torch KV space
    (bfloat16, as KV caches are), made once; a layer-wise load into them
    lands every block in its own row, and the rows also serve as put sources."""
    torch = pytest.importorskip("torch")
    from kvfs.gpu import device_rows
    d, _mode = gpu_store
    with d.connect() as s:
        layers, blocks = 4, 24
        space = torch.empty((layers, blocks, 2, 8, 16, 128), dtype=torch.bfloat16, device="cuda")
        rows = device_rows(space.flatten(0, 1))
        assert len(rows) == layers * blocks and rows[1].ptr - rows[0].ptr == space[0, 0].numel() * 2
        src = torch.randn_like(space)
        keys = [f"L{layer}b{b}" for layer in range(layers) for b in range(blocks)]
        assert s.put_many(keys, device_rows(src.flatten(0, 1)), ns="dr") == [True] * len(keys)
        s.flush()
        with s.get_many_into_async(keys, rows, ns="dr", group_size=blocks) as reads:
            for layer in range(layers):
                assert reads.wait(layer) == [rows[0].nbytes] * blocks
                assert torch.equal(space[layer], src[layer])


def test_a_concurrent_writer_filling_t0_does_not_corrupt_a_read(tmp_path):
    """Small arena: another client's puts evict and reuse T0 while large
    device reads are in flight; every read is right or a miss, never wrong."""
    _cuda_or_skip()
    import threading
    d = DaemonProcess(tmp_path / "s", capacity="4G", shm_size="256M")
    with d, d.connect() as r, d.connect() as w:
        vals = {f"v{i}": cupy.random.default_rng(i).integers(0, 256, 32 * MiB, dtype=cupy.uint8) for i in range(6)}
        r.put_many(list(vals), list(vals.values()), ns="c")
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                w.put(f"fill{i}", os.urandom(24 * MiB), ns="c")
                i += 1
        t = threading.Thread(target=writer)
        t.start()
        try:
            out = cupy.empty(32 * MiB, dtype=cupy.uint8)
            for _ in range(20):
                for k, v in vals.items():
                    try:
                        r.get_into(k, out, ns="c")
                    except NotFound:
                        continue
                    assert bool((out == v).all()), k
        finally:
            stop.set()
            t.join()


def test_a_corrupted_record_is_never_delivered_to_the_gpu(tmp_path):
    _cuda_or_skip()
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size=0)
    with d, d.connect(verify="full") as s:
        put_and_corrupt(s, "bad", "c", 8 * MiB, 5)
        with pytest.raises(NotFound):
            s.get_into("bad", cupy.empty(8 * MiB, dtype=cupy.uint8), ns="c")


def test_async_reads_group_by_group(gpu_store):
    """get_many_into_async into slices of one device buffer: each group's
    bytes are right once wait(g) returns, before later groups are waited for."""
    d, _mode = gpu_store
    with d.connect() as s:
        block, groups, per = 1 * MiB, 8, 16
        src = cupy.random.default_rng(3).integers(0, 256, groups * per * block, dtype=cupy.uint8)
        keys = [f"g{i}" for i in range(groups * per)]
        s.put_many(keys, [src[i * block:(i + 1) * block] for i in range(len(keys))], ns="as")
        s.flush()
        dst = cupy.zeros_like(src)
        with s.get_many_into_async(keys, [dst[i * block:(i + 1) * block] for i in range(len(keys))], ns="as",
                                   group_size=per) as reads:
            for g in range(groups):
                assert reads.wait(g) == [block] * per
                lo, hi = g * per * block, (g + 1) * per * block
                assert bool((dst[lo:hi] == src[lo:hi]).all())
        assert reads.result() == [block] * len(keys)
        assert s.stats()["leases"] == 0


def test_gpu_checksums_are_xxh3_128():
    """The kernels (kvfs/gpu_hash.py over kvfs/xxh3_lanes.h) against xxHash:
    every length class of the long path, chunk ranges of one value sharing
    its block sums, values in separate kernel groups."""
    import xxhash
    from kvfs import gpu_hash
    _cuda_or_skip()
    h = gpu_hash.CudaHasher(cupy)
    rng = cupy.random.default_rng(7)
    sizes = [241, 1024, 1025, 1089, 4097, MiB + 8, 4 * MiB, 4 * MiB + 100, 9 * MiB + 3 * 1024 + 8, 64 * MiB]
    arrs = [rng.integers(0, 256, n, dtype=cupy.uint8) for n in sizes]
    cupy.cuda.Device().synchronize()  # the hasher's stream does not wait for CuPy's
    got = h.start([(a.data.ptr, a.nbytes) for a in arrs], 4 * MiB).result()
    for a, (whole, chunks) in zip(arrs, got):
        b = cupy.asnumpy(a).tobytes()
        assert whole == xxhash.xxh3_128_digest(b), len(b)
        want = [xxhash.xxh3_128_digest(b[o:o + 4 * MiB]) for o in range(0, len(b), 4 * MiB)]
        assert chunks == [w if len(b) - o > 240 else None for o, w in zip(range(0, len(b), 4 * MiB), want)]
    old = gpu_hash.GROUP_BYTES
    gpu_hash.GROUP_BYTES = 8 * MiB  # several kernel groups, one buffer of block sums reused
    try:
        again = h.start([(a.data.ptr, a.nbytes) for a in arrs], 4 * MiB).result()
    finally:
        gpu_hash.GROUP_BYTES = old
    assert again == got


def test_device_put_waits_for_the_producer_stream_and_reads_for_the_consumer(tmp_path):
    """A tensor still being written on the caller's stream is stored as it
    ends up, not as it was when put() was called; a destination a kernel
    is still reading is not overwritten under it."""
    torch = pytest.importorskip("torch")
    _cuda_or_skip()
    d = DaemonProcess(tmp_path / "s", capacity="2G", shm_size="512M")
    with d, d.connect() as s:
        side = torch.cuda.Stream()
        x = torch.zeros(64 * MiB, dtype=torch.uint8, device="cuda")
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the fill
            x.fill_(7)
            assert s.put("late", x, ns="o")
        side.synchronize()
        assert s.get("late", ns="o") == b"\x07" * (64 * MiB)
        y = torch.full((64 * MiB,), 3, dtype=torch.uint8, device="cuda")
        s.put("new", torch.full((64 * MiB,), 9, dtype=torch.uint8, device="cuda"), ns="o")
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
            seen = y.clone()  # reads y after the sleep
            assert s.get_into("new", y, ns="o") == 64 * MiB
        side.synchronize()
        assert bool((seen == 3).all()) and bool((y == 9).all())


def test_a_readers_read_only_arena_is_registered_and_copied_from(tmp_path):
    """The read right maps the arena read-only: it is pinned read-only
    (cudaHostRegisterReadOnly) and T0 copies into device memory are right."""
    _cuda_or_skip()
    from kvfs.session import ArenaMapping as _Arena
    with DaemonProcess(tmp_path / "s", shm_size="256M") as d, d.connect() as s:
        rng = cupy.random.default_rng(3)
        srcs = [rng.integers(0, 256, n, dtype=cupy.uint8) for n in (4095, 8 * MiB, 64 * MiB)]
        keys = [f"ro{i}" for i in range(len(srcs))]
        s.put_many(keys, srcs, ns="ro")
        s.flush()
        with d.connect() as r:
            r.arena = _Arena(r.arena.path, r.arena.size, writable=False)
            assert r.pin_arena() and r.capabilities()["arena_pinned"]
            outs = [cupy.empty_like(x) for x in srcs]
            assert r.get_many_into(keys, outs, ns="ro") == [int(x.size) for x in srcs]
            assert all(bool((a == b).all()) for a, b in zip(srcs, outs)) and r._gpu.counters["t0_chunks"] > 0


@pytest.mark.parametrize("layout", ["flash", "cpu-like"])
def test_paged_cache_blocks_saved_and_loaded_on_the_device(tmp_path, layout):
    """The vLLM connector's device path without vLLM (which cannot come to
    this machine): CUDA caches laid out like vLLM's, scattered block ids
    gathered on a side stream (as an engine's step would), saved from
    device memory on the background saver thread, then loaded as the
    connector's async loads are: on the loader thread, through a staging
    buffer smaller than the load (chunks), on the loader's own stream, into
    another cache's other blocks; a missing block is reported, not loaded."""
    _cuda_or_skip()
    import torch

    from kvfs.integrations import kvblocks
    from kvfs.integrations.paged import BlockCodec, SideStream, Staging, buffers, load_blocks, ready_after
    nblocks = 64
    shape = (2, nblocks, 16, 8, 128) if layout == "flash" else (nblocks, 8, 16, 256)
    src = {f"model.layers.{i}.attn": torch.randn(shape, device="cuda", dtype=torch.bfloat16) for i in range(4)}
    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    a, b = BlockCodec(src, nblocks), BlockCodec(dst, nblocks)
    ids, into = [5, 17, 3, 60, 41], [0, 1, 2, 62, 63]
    with DaemonProcess(tmp_path / "s", shm_size="256M") as d:
        counters = kvblocks.Counter()
        kv = kvblocks.Guarded(str(d.socket), counters)
        saves = kvblocks.SaveQueue(kv, "paged", counters)
        side = torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(500_000_000)  # the gather lands late: the saver must wait for it
            rows = a.gather(ids)
            assert saves.offer([f"b{i}" for i in ids], buffers(rows), rows.numel(), ready_after(rows))
        assert saves.drain(60) and counters["blocks_saved"] == len(ids), counters
        loads = kvblocks.LoadQueue(counters)
        staging, stream = Staging(b.block_bytes, b.device, 2 * b.block_bytes), SideStream(b.device)
        keys = [f"b{i}" for i in ids] + ["missing"]
        loads.submit("r", into + [30], lambda: load_blocks(kv, "paged", b, staging, stream, keys, into + [30]))
        assert loads.drain(60) and loads.take_finished() == {"r"} and loads.take_errors() == {30}
        # no synchronize here: a finished load is complete on every stream
        for n in src:
            d_ = a.dims[0]
            for i, j in zip(ids, into):
                assert torch.equal(src[n].select(d_, i), dst[n].select(d_, j))
            assert not dst[n].select(d_, 30).any()
        loads.close()
        saves.close()
        kv.close()


def test_separate_tensors_side_by_side_in_device_memory(gpu_store):
    """torch hands out 1 MiB tensors from 20 MiB segments that can lie back
    to back: a put and a read of many separate tensors must not merge copies
    across two allocations (that failed with cudaErrorInvalidValue in the
    TTFT demo's warm-up, stop 48). Both ends of every copy stay in one."""
    torch = pytest.importorskip("torch")
    d, _mode = gpu_store
    with d.connect() as s:
        srcs = [torch.full((MiB,), i % 251, dtype=torch.uint8, device="cuda") for i in range(64)]
        keys = [f"s{i}" for i in range(64)]
        assert s.put_many(keys, srcs, ns="sep") == [True] * 64
        s.flush()
        copier = s._gpu.copier
        ranges = {copier.allocation(t.data_ptr()) for t in srcs}
        for t in srcs:
            lo, hi = copier.allocation(t.data_ptr())
            assert lo <= t.data_ptr() and t.data_ptr() + MiB <= hi
        assert len(ranges) > 1  # 64 MiB of 1 MiB tensors span several segments
        outs = [torch.empty(MiB, dtype=torch.uint8, device="cuda") for _ in range(64)]
        assert s.get_many_into(keys, outs, ns="sep") == [MiB] * 64
        with s.get_many_into_async(keys, outs[::-1], ns="sep") as r:
            assert r.result() == [MiB] * 64
        torch.cuda.synchronize()
        assert all(bool((o == i % 251).all()) for i, o in enumerate(outs[::-1]))
