"""LMCache uses kvfs through its remote storage plugin, against the real
LMCache (its own plugin loader, its CPU backend's buffers and ownership
rules) and a real daemon: chunks stored and read back byte-exact, the
leading run of a batch, partial chunks, misses and corruption, a daemon
that is down; no buffer leaked, none freed twice."""
import asyncio
import logging
import os
import threading
import time

import pytest

from kvfsd.testing import DaemonProcess

lmcache = pytest.importorskip("lmcache", reason="lmcache is not installed (pip install 'kvfs[lmcache]')")
import torch  # noqa: E402 - LMCache brings it

from kvfs.integrations.lmcache import kvfs_key  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

CHUNK = 256
SHAPE = (2, 2, CHUNK, 2, 32)  # (layers, K/V, chunk tokens, kv heads, head size)


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def configured(d, model):
    """LMCache's config with kvfs as its remote tier (and no local CPU
    tier: every hit is kvfs's), and one worker's metadata."""
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.1, remote_storage_plugins=["kvfs"],
        extra_config={"remote_storage_plugin.kvfs.module_path": "kvfs.integrations.lmcache",
                      "remote_storage_plugin.kvfs.class_name": "KvfsConnector",
                      "remote_storage_plugin.kvfs.socket": str(d.socket)})
    md = LMCacheMetadata(model_name=model, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                         kv_dtype=torch.bfloat16, kv_shape=SHAPE)
    return cfg, md


@pytest.fixture
def lm(tmp_path):
    """A daemon, LMCache's CPU backend and the kvfs plugin made by LMCache."""
    d = DaemonProcess(tmp_path / "s", shm_size="64M")
    d.start()
    cfg, md = configured(d, "org/tiny")
    cpu = LocalCPUBackend(cfg, md)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    conn = CreateConnector("plugin://kvfs", loop, cpu, cfg, md, plugin_name="kvfs")
    warn = Warnings()
    logging.getLogger().addHandler(warn)
    # LMCache's loggers do not propagate: listen on each of them
    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith(("lmcache", "kvfs"))]:
        logging.getLogger(name).addHandler(warn)

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    yield d, cpu, conn, run, warn
    run(conn.close())
    loop.call_soon_threadsafe(loop.stop)
    if d.alive():
        d.stop()
    d.remove_shm()


def key(i, model="org/tiny"):
    return CacheEngineKey(model, 1, 0, i, torch.bfloat16)


def chunk(cpu, conn, seed, tokens=CHUNK):
    conn = conn._connector  # under LMCache's InstrumentedRemoteConnector
    obj = cpu.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt)
    g = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g).to(obj.tensor.dtype))
    if tokens < CHUNK:
        obj = conn.reshape_partial_chunk(obj, tokens * conn.single_token_size)
    return obj


def free_chunks(cpu, conn):
    """How many chunk buffers LMCache's CPU backend can still hand out."""
    conn = conn._connector
    got = []
    while (o := cpu.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt, eviction=False,
                             busy_loop=False)) is not None:
        got.append(o)
    for o in got:
        o.ref_count_down()
    return len(got)


def test_chunks_go_to_kvfs_and_come_back_into_lmcaches_buffers(lm):
    d, cpu, conn, run, warn = lm
    free0 = free_chunks(cpu, conn)
    objs = [chunk(cpu, conn, i) for i in range(4)]
    want = [bytes(o.byte_array) for o in objs]
    run(conn._connector.batched_put([key(i) for i in range(2)], objs[:2]))
    assert all(o.get_ref_count() == 1 for o in objs[:2])  # our put keeps the caller's reference...
    for o in objs[:2]:
        o.ref_count_down()
    run(conn.batched_put([key(i) for i in range(2, 4)], objs[2:]))  # ...LMCache's wrapper drops it
    assert conn.batched_contains([key(i) for i in range(6)]) == 4  # one prefix_match
    assert run(conn.batched_async_contains("l1", [key(0), key(1), key(9), key(2)])) == 2
    assert conn.exists_sync(key(3)) and not conn.exists_sync(key(7))

    got = run(conn.batched_get_non_blocking("l2", [key(0), key(1), key(9), key(2)]))  # the leading run
    assert [bytes(o.byte_array) for o in got] == want[:2]
    for o in got:
        o.ref_count_down()
    one = run(conn.get(key(3)))
    assert bytes(one.byte_array) == want[3] and tuple(one.get_shape()) == tuple(conn._connector.meta_shapes[0])
    one.ref_count_down()
    assert run(conn.get(key(8))) is None
    both = run(conn.batched_get([key(2), key(8)]))
    assert bytes(both[0].byte_array) == want[2] and both[1] is None
    both[0].ref_count_down()

    part = chunk(cpu, conn, 99, tokens=100)  # the last, partial chunk of a prompt
    pbytes = bytes(part.byte_array)
    run(conn.put(key(50), part))
    back = run(conn.get(key(50)))
    assert bytes(back.byte_array) == pbytes and back.get_shape()[2] == 100
    back.ref_count_down()

    with d.connect() as s:
        [ns] = [n for n in s.namespaces() if n.startswith("lmcache.")]
        assert kvfs_key(key(0)).startswith("h.")  # "org/tiny@...": a '/' no kvfs key may hold, so hashed
        assert kvfs_key(key(0, "tiny")) == key(0, "tiny").to_string()  # kept as it is where it may be
        info = s.stat(kvfs_key(key(0)), ns=ns)
        assert info.meta["shapes"] == [list(conn._connector.meta_shapes[0])] and info.meta["dtypes"] == ["torch.bfloat16"]
    assert sorted(run(conn.list())) == sorted(kvfs_key(k) for k in [key(0), key(1), key(2), key(3), key(50)])
    assert conn.remove_sync(key(1)) and not conn.exists_sync(key(1))
    assert free_chunks(cpu, conn) == free0  # nothing leaked
    assert any("Failed to allocate" in w for w in warn.lines)  # LMCache's warnings do reach us (free_chunks)...
    assert not [w for w in warn.lines if "negative" in w or "Double free" in w]  # ...and none is a double free


def test_corruption_and_a_stopped_daemon_are_misses_never_errors_into_lmcache(lm):
    d, cpu, conn, run, warn = lm
    free0 = free_chunks(cpu, conn)
    objs = [chunk(cpu, conn, i) for i in range(3)]
    run(conn.batched_put([key(i) for i in range(3)], objs))
    d.restart()  # T0 empty: reads come from the segment files
    with d.connect() as s:
        [ns] = [n for n in s.namespaces() if n.startswith("lmcache.")]
        path, off, n = s.stat(kvfs_key(key(1)), ns=ns).extents[0]
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, bytes([os.pread(fd, 1, off + n // 2)[0] ^ 0xFF]), off + n // 2)
        os.close(fd)
    got = run(conn.batched_get_non_blocking("l", [key(0), key(1), key(2)]))
    assert len(got) == 1  # chunk 1 fails its checksum: the run stops there
    got[0].ref_count_down()
    d.stop()
    assert conn.batched_contains([key(0)]) == 0 and run(conn.get(key(0))) is None
    assert run(conn.batched_get_non_blocking("l", [key(0)])) == []
    obj = chunk(cpu, conn, 5)
    run(conn.put(key(5), obj))  # no exception
    assert free_chunks(cpu, conn) == free0
    assert not [w for w in warn.lines if "negative" in w or "Double free" in w]


def test_a_whole_lmcache_engine_stores_and_retrieves_through_kvfs_alone(tmp_path):
    """LMCacheEngine with local_cpu False: every retrieved byte comes from
    kvfs. CPU tensors stand in for the GPU's KV cache (a GPU connector that
    copies; LMCache's mock one copies nothing)."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector

    class CopyingConnector(MockGPUConnector):
        """[layers, K/V, tokens, kv heads, head size] on the host."""

        def __init__(self, kv):
            super().__init__(tuple(kv.shape))
            self.kv = kv

        def from_gpu(self, obj, start, end, **kw):
            obj.tensor.view(-1).copy_(self.kv[:, :, start:end].reshape(-1))

        def to_gpu(self, obj, start, end, **kw):
            self.kv[:, :, start:end].copy_(obj.tensor.reshape(self.kv[:, :, start:end].shape))

        def batched_from_gpu(self, objs, starts, ends, **kw):
            for o, s, e in zip(objs, starts, ends):
                self.from_gpu(o, s, e)

        def batched_to_gpu(self, objs, starts, ends, **kw):
            for o, s, e in zip(objs, starts, ends):
                if o is not None:
                    self.to_gpu(o, s, e)

    d = DaemonProcess(tmp_path / "s", shm_size="64M")
    d.start()
    cfg, md = configured(d, "tiny")
    n = 1000
    src = torch.randn(SHAPE[0], SHAPE[1], n, SHAPE[3], SHAPE[4]).to(torch.bfloat16)
    gpu = CopyingConnector(src)
    eng = LMCacheEngineBuilder.get_or_create("kvfs-test", cfg, md, gpu, lambda t, r: None, lambda o, r: o)
    try:
        eng.post_init()
        tokens = torch.arange(n)
        eng.store(tokens)
        with d.connect() as s:
            deadline = time.time() + 30
            while s.stats()["objects"] < n // CHUNK and time.time() < deadline:  # LMCache puts in the background
                time.sleep(0.05)
        full = (n // CHUNK) * CHUNK
        assert eng.lookup(tokens) == full
        gpu.kv = torch.zeros_like(src)
        got = eng.retrieve(tokens)
        assert int(got.sum()) == full and torch.equal(gpu.kv[:, :, :full], src[:, :, :full])
        assert not gpu.kv[:, :, full:].any()
        time.sleep(1.5)  # the plugin's counters reach the daemon at most once a second
        with d.connect() as s:
            [c] = [r["counters"] for ns, r in s.stats()["connectors"].items() if ns.startswith("lmcache.tiny.")]
            assert c["chunks_loaded"] >= n // CHUNK and c["chunks_saved"] == n // CHUNK  # it came from kvfs
        # a prompt that diverges in its third chunk: a hit of the two it shares
        other = torch.cat([tokens[:600], tokens[600:] + 7])
        assert eng.lookup(other) == 2 * CHUNK
        gpu.kv = torch.zeros_like(src)
        assert int(eng.retrieve(other).sum()) == 2 * CHUNK
        assert torch.equal(gpu.kv[:, :, :2 * CHUNK], src[:, :, :2 * CHUNK])
        d.stop()  # gone: misses, no exception into LMCache
        assert eng.lookup(tokens) == 0 and int(eng.retrieve(tokens).sum()) == 0
    finally:
        LMCacheEngineBuilder.destroy("kvfs-test")
        if d.alive():
            d.stop()
        d.remove_shm()


# --------------------------------------------------------------------------
# LMCache's multi-process server: its StorageManager with kvfs as its L2
def mp_manager(d):
    """The MP server's StorageManager, configured as `lmcache server` is,
    with the kvfs L2 adapter loaded by LMCache's plugin loader."""
    import json

    from lmcache.v1.distributed.config import parse_args
    from lmcache.v1.distributed.storage_manager import StorageManager

    spec = {"type": "plugin", "module_path": "kvfs.integrations.lmcache", "class_name": "KvfsL2Adapter",
            "adapter_params": {"socket": str(d.socket)}}
    sm = StorageManager(parse_args(["--l1-size-gb", "0.05", "--eviction-policy", "LRU",
                                    "--l2-adapter", json.dumps(spec)]))
    [(_, adapter)] = sm.l2_adapters()
    return sm, adapter


def mp_keys(n, model="org/tiny", salt=""):
    from lmcache.v1.distributed.api import ObjectKey

    return [ObjectKey(chunk_hash=bytes([i]) * 32, model_name=model, kv_rank=ObjectKey.ComputeKVRank(1, 0, 1, 0),
                      cache_salt=salt) for i in range(n)]


def mp_prefetch(sm, keys, layout):
    """Prefetch into L1; the hits from L2, and their bytes (read, then let go)."""
    from lmcache.v1.distributed.api import GroupedObjectKeys, PrefetchTaskSpec

    h = sm.submit_prefetch_task(PrefetchTaskSpec(key_groups=[GroupedObjectKeys(keys, 0, layout)]))
    assert sm.wait_prefetch_status(h, 30)
    r = sm.query_prefetch_status(h)
    hit = r.hit_cells[0].get_indices_list()
    got = []
    if hit:
        with sm.read_prefetched_results([keys[i] for i in hit], r.l1_owners) as objs:
            got = [bytes(o.byte_array) for o in objs]
        sm.finish_read_prefetched([keys[i] for i in hit], l1_owners=r.l1_owners)
    return r.l2_hit_count, got


def wait_for(pred, what, timeout=30.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, what
        time.sleep(0.02)


def test_lmcache_mp_server_keeps_its_l2_in_kvfs(tmp_path):
    """Store through L1 -> the store controller puts into kvfs -> L1
    cleared -> prefetch loads back from kvfs, byte-exact. Locks pin chunks
    against eviction until unlocked; another layout (dtype) never reads
    them; listing pages give the ObjectKeys back; corruption and a stopped
    daemon are misses."""
    from kvfs.integrations.lmcache_l2 import layout_of, object_ns
    from lmcache.v1.distributed.api import MemoryLayoutDesc

    d = DaemonProcess(tmp_path / "s", shm_size="64M")
    d.start()
    sm = None
    try:
        sm, ad = mp_manager(d)
        layout = MemoryLayoutDesc(shapes=[torch.Size([2, CHUNK, 64])], dtypes=[torch.bfloat16])
        keys = mp_keys(6)
        objs = sm.reserve_write(keys, layout)
        want = {}
        for i, k in enumerate(keys):
            objs[k].tensor.copy_(torch.randn(objs[k].tensor.shape, generator=torch.Generator().manual_seed(i)))
            want[k] = bytes(objs[k].byte_array)
        sm.finish_write(keys)
        s = d.connect()
        wait_for(lambda: ad.report_status().get("chunks_saved", 0) == len(keys), "the L2 store")
        ns = object_ns(keys[0], layout_of(layout.shapes, layout.dtypes))
        assert [n for n in s.namespaces() if n.startswith("lmcache-mp.")] == [ns]
        assert s.stat(f"0.{keys[0].chunk_hash.hex()}", ns=ns).meta["model"] == "org/tiny"

        sm.delete_l1_keys(keys)  # L1 forgets: what comes back is kvfs's
        assert mp_prefetch(sm, keys, layout) == (len(keys), [want[k] for k in keys])
        wait_for(lambda: ad.report_status()["locked_keys"] == 0, "LMCache to unlock all it locked")

        # the same keys in another layout (fp16: the same size) are other chunks
        sm.delete_l1_keys(keys)
        fp16 = MemoryLayoutDesc(shapes=[torch.Size([2, CHUNK, 64])], dtypes=[torch.float16])
        assert mp_prefetch(sm, keys, fp16) == (0, [])

        # a lock is a lease: eviction passes over locked chunks until unlocked
        sm.delete_l1_keys(keys)
        s.flush()
        tid = ad.submit_lookup_and_lock_task(keys[:2] + mp_keys(8)[7:], {0: layout})
        results = []
        wait_for(lambda: results.append(ad.query_lookup_and_lock_result(tid)) or results[-1] is not None,
                 "the lookup")
        assert results[-1].get_indices_list() == [0, 1] and ad.query_lookup_and_lock_result(tid) is None
        report = s.evict(0, ns=ns)
        assert report["objects"] == len(keys) - 2 and report["skipped_in_use"] == 2
        ad.submit_unlock(keys[:2])
        wait_for(lambda: ad.report_status()["locked_keys"] == 0, "the unlock")
        assert s.evict(0, ns=ns)["objects"] == 2

        # listing, in pages, gives the ObjectKeys back
        keys = mp_keys(5, salt="alice")
        objs = sm.reserve_write(keys, layout)
        sm.finish_write(keys)
        wait_for(lambda: ad.report_status()["chunks_saved"] == 6 + 5, "the second store")
        page = ad.list_l2_keys(page_size=3)
        rest = ad.list_l2_keys(page_size=3, cursor=page.next_page_token)
        assert rest.next_page_token is None
        listed = [e.key.to_object_key() for e in page.entries + rest.entries]
        assert sorted(listed, key=lambda k: k.chunk_hash) == keys
        assert all(e.size_bytes == len(want[mp_keys(1)[0]]) for e in page.entries + rest.entries)
        assert ad.list_l2_keys(model_name="other/model").entries == ()
        with pytest.raises(ValueError):
            ad.list_l2_keys(cursor="not a cursor")
        size = len(want[mp_keys(1)[0]])
        assert ad.get_usage().total_bytes_used == 11 * size  # what this server stored (kvfs's evictions aside)
        ad.delete(keys[:1])
        assert len(ad.list_l2_keys().entries) == 4 and ad.get_usage().total_bytes_used == 10 * size

        # corruption on disk: that chunk is a miss, the ones before it hit
        sm.delete_l1_keys(keys)
        s.flush()
        d.restart()  # T0 empty: reads come from the segment files
        s = d.connect()
        ns = object_ns(keys[3], layout_of(layout.shapes, layout.dtypes))
        path, off, n = s.stat(f"0.{keys[3].chunk_hash.hex()}", ns=ns).extents[0]
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, bytes([os.pread(fd, 1, off + n // 2)[0] ^ 0xFF]), off + n // 2)
        os.close(fd)
        hits, _ = mp_prefetch(sm, keys[1:], layout)
        assert hits == 2, str(ad.report_status())  # keys 1 and 2; key 3 fails its checksum, the prefix stops there

        d.stop()  # gone: misses and failed stores, no exception into the server
        assert mp_prefetch(sm, keys[1:], layout) == (0, [])
        more = mp_keys(12)[10:]
        sm.reserve_write(more, layout)
        sm.finish_write(more)
        wait_for(lambda: ad.report_status().get("puts_failed", 0) >= 2, "the failed store")
        assert ad.report_status()["is_healthy"] is False
    finally:
        if sm is not None:
            sm.close()
        if d.alive():
            d.stop()
        d.remove_shm()


def test_bench_lmcache_quick(tmp_path):
    """`kvfs bench --lmcache` runs kvfs and LMCache's own tiers on the same
    chunks (each retrieved chunk is checked against the source inside it)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kvfstools.cli", "bench", "--lmcache", "--quick", "--dir",
                        str(tmp_path), "--json", str(tmp_path / "l.json")], capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads((tmp_path / "l.json").read_text())
    assert set(res["tiers"]) == {"kvfs", "kvfs, T1 only", "local_disk", "fs://"}
    assert all(t["store"] > 0 and t["warm"] > 0 for t in res["tiers"].values())
    assert res["geometry"]["chunk_tokens"] == 256 and res["commit"]
    assert b"vs local_disk" in r.stdout
