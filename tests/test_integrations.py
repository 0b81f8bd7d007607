"""What the engine adapters share, without an engine: namespace
fingerprints, a paged cache's blocks as kvfs values in any layout, bounded
background saves, and a client whose failures are misses (with a real
daemon that goes away and comes back)."""
import time

import pytest

from kvfs.integrations import kvblocks
from kvfs.integrations.kvblocks import Guarded, SaveQueue, namespace
from kvfs.keys import normalize_ns
from kvfsd.testing import DaemonProcess

torch = pytest.importorskip("torch")


def test_namespaces_differ_exactly_when_the_bytes_would():
    base = {"dtype": "bfloat16", "block_size": 128, "tp_rank": 0, "tp_size": 1, "layout": "NHD"}
    ns = namespace("vllm", "/models/Llama-3.1-8B-Instruct", base)
    assert ns == namespace("vllm", "/models/Llama-3.1-8B-Instruct", dict(base))
    assert ns.startswith("vllm.Llama-3.1-8B-Instruct.") and normalize_ns(ns) == ns and len(ns) <= 100
    for k, v in (("dtype", "float16"), ("block_size", 64), ("tp_rank", 1), ("layout", "HND")):
        assert namespace("vllm", "/models/Llama-3.1-8B-Instruct", dict(base, **{k: v})) != ns, k
    assert namespace("vllm", "/other/Llama-3.1-8B-Instruct", base) != ns
    assert namespace("lmcache", "/models/Llama-3.1-8B-Instruct", base) != ns
    weird = namespace("vllm", "org/model with spaces:v1/" + "x" * 300, base)
    assert normalize_ns(weird) == weird and len(weird) <= 100


@pytest.mark.parametrize("shape,dtype", [((40, 2, 16, 64), torch.bfloat16),   # vLLM CPU: [blocks, heads, bs, 2*hd]
                                         ((2, 40, 16, 2, 32), torch.float16),   # flash: [2, blocks, bs, heads, hd]
                                         ((40, 2, 16, 2, 32), torch.float32)])
def test_block_codec_moves_blocks_of_every_layer_in_any_layout(shape, dtype):
    from kvfs.integrations.paged import BlockCodec, buffers
    src = {f"layer.{i}": torch.randn(shape).to(dtype) for i in range(3)}
    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    a, b = BlockCodec(src, 40), BlockCodec(dst, 40)
    ids = [7, 3, 39, 0]
    rows = a.gather(ids)
    per_layer = src["layer.0"][(slice(None),) * a.dims[0] + (0,)].numel() * src["layer.0"].element_size()
    assert rows.shape == (4, 3 * per_layer) and rows.dtype == torch.uint8 and a.block_bytes == 3 * per_layer
    assert len(buffers(rows)) == 4 and buffers(rows)[0].nbytes == a.block_bytes
    b.scatter([1, 2, 5, 6], rows)  # into other block ids of another cache
    d = a.dims[0]
    for n in src:
        for s_id, d_id in zip(ids, [1, 2, 5, 6]):
            assert torch.equal(src[n].select(d, s_id), dst[n].select(d, d_id))
        untouched = [i for i in range(40) if i not in (1, 2, 5, 6)]
        assert not dst[n].index_select(d, torch.tensor(untouched)).any()
    with pytest.raises(ValueError):
        BlockCodec({"l": torch.zeros(3, 4)}, 40)  # no dimension of 40 blocks


def test_saves_are_bounded_and_never_wait(tmp_path):
    with DaemonProcess(tmp_path / "s", shm_size="64M") as d:
        counters = kvblocks.Counter()
        kv = Guarded(str(d.socket), counters)
        q = SaveQueue(kv, "ns", counters, max_bytes=3 << 20)
        vals = [bytes([i]) * (1 << 20) for i in range(8)]
        t = time.perf_counter()
        took = [q.offer([f"k{i}"], [v], len(v)) for i, v in enumerate(vals)]
        assert time.perf_counter() - t < 1.0  # offering never waits for the store
        assert q.drain(30)
        assert counters["saves_dropped"] == took.count(False) and took.count(True) >= 3
        with d.connect() as s:
            stored = [i for i in range(8) if s.contains([f"k{i}"], ns="ns")[0]]
            assert [i for i, t_ in enumerate(took) if t_] == stored
            assert all(s.get(f"k{i}", ns="ns") == vals[i] for i in stored)
        assert counters["blocks_saved"] == len(stored)
        q.close()
        kv.close()


def test_a_daemon_that_is_down_is_a_miss_and_one_that_comes_back_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(kvblocks, "RETRY_S", 0.2)
    d = DaemonProcess(tmp_path / "s", shm_size="16M")
    counters = kvblocks.Counter()
    kv = Guarded(str(d.socket), counters)
    assert kv.call(lambda s: s.prefix_match(["a"], ns="n"), -7) == -7 and counters["unavailable"] == 1
    with d:
        with d.connect() as s:
            s.put("a", b"1", ns="n")
        time.sleep(0.3)
        assert kv.call(lambda s: s.prefix_match(["a", "b"], ns="n"), -7) == 1
        d.kill()  # gone mid-use: a miss, then back after a restart
        assert kv.call(lambda s: s.prefix_match(["a"], ns="n"), -7) == -7 and counters["errors"] >= 1
        d.start()
        time.sleep(0.3)
        assert kv.call(lambda s: s.prefix_match(["a"], ns="n"), -7) == 1
    kv.close()


def test_loads_run_in_the_background_and_their_failures_come_no_later_than_they_do():
    from kvfs.integrations.kvblocks import LoadQueue
    import threading
    counters = kvblocks.Counter()
    q = LoadQueue(counters)
    gate = threading.Event()
    t = time.perf_counter()
    q.submit("r1", [4, 5, 6], lambda: (gate.wait(10), [6])[1])  # block 6 fails
    q.submit("r2", [7], lambda: 1 / 0)  # a load that breaks: all its blocks failed
    assert time.perf_counter() - t < 0.5 and q.in_flight() == 2  # submitting never waits
    time.sleep(0.2)
    assert q.take_finished() == set() and q.take_errors() == set()  # r1 holds the thread
    gate.set()
    assert q.drain(10) and q.in_flight() == 0
    assert q.take_finished() == {"r1", "r2"}
    assert q.take_errors() == {6, 7} and q.take_errors() == set()  # handed over once
    assert counters["errors"] == 1
    q.close()


def test_adapter_counters_reach_kvfs_stats_per_namespace(tmp_path, monkeypatch):
    import json
    from kvfs.errors import InvalidArgument
    from kvfs.integrations.kvblocks import Reporter
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "kvfstools.cli", *args], capture_output=True, text=True,
                              check=True)
    with DaemonProcess(tmp_path / "s", shm_size="16M") as d:
        counters = kvblocks.Counter(lookups=3, hit_tokens=384, bytes_loaded=1 << 20)
        kv = Guarded(str(d.socket), counters)
        rep = Reporter(kv, "vllm.tiny.abc", counters)
        rep.maybe_report(force=True)
        counters["lookups"] += 2
        rep.maybe_report()  # within a second of the last: not sent
        rep.maybe_report(force=True)  # only the growth goes: nothing counted twice
        rep.maybe_report(force=True)
        other = Reporter(kv, "lmcache.tiny.def", kvblocks.Counter(saves_dropped=1))
        other.maybe_report(force=True)
        monkeypatch.setattr(kvblocks, "REPORT_S", 0.3)
        other.counters["saves_dropped"] += 1
        other.maybe_report(force=True)
        other.counters["saves_dropped"] += 1
        other.maybe_report()  # too soon: sent when the time is up, with no further call
        time.sleep(0.8)
        out = cli("stats", "--json", "--socket", str(d.socket))
        st = json.loads(out.stdout)["connectors"]
        assert st["vllm.tiny.abc"]["counters"] == {"lookups": 5, "hit_tokens": 384, "bytes_loaded": 1 << 20}
        assert st["lmcache.tiny.def"]["counters"] == {"saves_dropped": 3}
        table = cli("stats", "--socket", str(d.socket)).stdout
        assert "engine adapter (namespace)" in table and "vllm.tiny.abc" in table and "1.0 MiB" in table
        with d.connect() as s:
            for bad in ({"Bad-Name": 1}, {"x": -1}, {"x": "1"}, {f"c{i}": 1 for i in range(40)}):
                with pytest.raises(InvalidArgument):
                    s.report("vllm.tiny.abc", bad)
            assert s.report("vllm.tiny.abc", {"lookups": 1})  # still serving
            assert s.stats()["connectors"]["vllm.tiny.abc"]["counters"]["lookups"] == 6
        rep.close()
        other.close()
        kv.close()


def test_what_the_daemon_keeps_of_reports_is_bounded():
    from kvfsd import connector_stats as cs
    t = cs.ConnectorStats()
    for i in range(cs.MAX_NAMESPACES + 10):
        t.add(f"ns{i}", {"lookups": 1})
    snap = t.snapshot()
    assert len(snap) == cs.MAX_NAMESPACES and "ns0" not in snap and f"ns{cs.MAX_NAMESPACES + 9}" in snap
    t.add("ns20", {"lookups": cs.MAX_VALUE - 1})
    t.add("ns20", {"lookups": cs.MAX_VALUE - 1})
    assert t.snapshot()["ns20"]["counters"]["lookups"] == cs.MAX_VALUE  # saturates, never overflows


def test_loads_go_through_a_small_staging_buffer_in_chunks_and_report_what_is_missing(tmp_path):
    from kvfs.integrations.paged import BlockCodec, SideStream, Staging, buffers, load_blocks
    src = {f"layer.{i}": torch.randn(16, 2, 8, 32).to(torch.bfloat16) for i in range(3)}
    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    a, b = BlockCodec(src, 16), BlockCodec(dst, 16)
    ids, into = [3, 9, 0, 15, 7], [1, 2, 4, 5, 6]
    with DaemonProcess(tmp_path / "s", shm_size="64M") as d:
        counters = kvblocks.Counter()
        kv = Guarded(str(d.socket), counters)
        with d.connect() as s:
            s.put_many([f"b{i}" for i in ids], buffers(a.gather(ids)), ns="paged")
        staging = Staging(b.block_bytes, b.device, 2 * b.block_bytes)  # 2 blocks: three chunks
        keys = [f"b{i}" for i in ids[:3]] + ["missing"] + [f"b{i}" for i in ids[3:]]
        bad = load_blocks(kv, "paged", b, staging, SideStream(b.device), keys, into[:3] + [10] + into[3:])
        assert bad == [10] and staging.per == 2
        for n in src:
            for i, j in zip(ids, into):
                assert torch.equal(src[n][i], dst[n][j])
            assert not dst[n][10].any()
        kv.close()


def test_nixl_descriptors_follow_the_blocks_tiers_and_chunks():
    """The pure half of the NIXL adapter (no NIXL needed): a hold's
    locations become FILE descriptors per T1 chunk and DRAM descriptors per
    T0 chunk, each with the checksum its destination must have; a T0-only
    block without the arena is a miss; destinations line up piece by piece."""
    from kvfs.integrations.nixl_plan import local, merge_spans, plan_reads, plan_writes
    fds = {(0, 7): 70, (1, 8): 80}
    items = [
        [10, b"c" * 16, 1, [[0, 7, 4096, 6, b"a" * 16], [1, 8, 8192, 4, b"b" * 16]], None],  # T1, two chunks
        None,  # a miss
        [5, b"d" * 16, 2, [[1, 8, 0, 5, b"e" * 16]], [1000, False]],  # T0 only
        [3, b"f" * 16, 3, [[0, 7, 64, 3, b"g" * 16]], [2000, True]],  # T0, written back
    ]
    with_arena = plan_reads(items, lambda st, sg: fds[(st, sg)], arena=1 << 20)
    assert with_arena.sizes == [10, -1, 5, 3]
    assert with_arena.file == [(4096, 6, 70), (8192, 4, 80)] and with_arena.segments == {7, 8}
    assert with_arena.dram == [((1 << 20) + 1000, 5, 0), ((1 << 20) + 2000, 3, 0)]
    assert [p.checksum for p in with_arena.pieces()] == [b"a" * 16, b"b" * 16, b"e" * 16, b"g" * 16]
    assert local(with_arena.file_pieces, [100, 0, 200, 300]) == [(100, 6, 0), (106, 4, 0)]
    assert local(with_arena.dram_pieces, [100, 0, 200, 300], dev=3) == [(200, 5, 3), (300, 3, 3)]
    no_arena = plan_reads(items, lambda st, sg: fds[(st, sg)], arena=None)
    assert no_arena.sizes == [10, -1, -1, 3]  # T0 only and no arena: a miss; written back: from T1
    assert no_arena.file == [(4096, 6, 70), (8192, 4, 80), (64, 3, 70)] and not no_arena.dram
    res = [[1, [[0, 7, 128, 6], [1, 8, 256, 4]], -1], None, [3, [[0, 7, 0, 5]], 512]]
    w = plan_writes(res, [10, 7, 5], lambda st, sg: fds[(st, sg)], arena=4096)
    assert w.sizes == [10, -1, 5] and w.file == [(128, 6, 70), (256, 4, 80)] and w.dram == [(4608, 5, 0)]
    with pytest.raises(ValueError):
        plan_writes(res, [10, 7, 5], lambda st, sg: fds[(st, sg)], arena=None)
    assert merge_spans([(100, 10), (0, 50), (110, 5), (40, 20), (200, 0)]) == [(0, 60), (100, 15)]
