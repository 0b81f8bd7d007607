"""The client against a real daemon: round trips, batches, immutability,
metadata, restart persistence."""
import os
from pathlib import Path

import numpy as np
import pytest

import kvfs
from kvfs import InvalidArgument, InvalidKey, NotFound

MiB = 1 << 20
SIZES = [0, 1, 4095, 4096, 64 * 1024, 4 * MiB - 1, 4 * MiB, 4 * MiB + 1, 24 * MiB]


@pytest.mark.parametrize("size", SIZES)
def test_put_get_sizes(store, size):
    data = os.urandom(size)
    assert store.put(f"k{size}", data) is True
    assert store.get(f"k{size}") == data
    buf = bytearray(size + 10)
    assert store.get_into(f"k{size}", buf) == size
    assert bytes(buf[:size]) == data


def test_large_value_is_striped_over_all_stripes(store, daemon):
    data = os.urandom(24 * MiB)
    store.put("big", data)
    info = store.stat("big")
    assert info.size == len(data) and len(info.extents) == 6
    used = {os.path.dirname(p) for p, _off, _len in info.extents}
    assert used == set(daemon.stripes)
    for path, off, length in info.extents:
        if length >= 64 * 1024:
            assert off % 4096 == 0  # O_DIRECT / GDS alignment
    # the object checksum is xxh3-128 of the whole value
    import xxhash
    assert info.checksum == xxhash.xxh3_128_hexdigest(data)


def test_get_into_numpy_and_put_from_numpy(store):
    arr = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float16)
    assert store.put("arr", arr, meta={"dtype": "float16", "shape": [64, 128]})
    out = np.empty_like(arr)
    assert store.get_into("arr", out) == arr.nbytes
    assert np.array_equal(out, arr)
    assert store.stat("arr").meta == {"dtype": "float16", "shape": [64, 128]}
    with pytest.raises(InvalidArgument):
        store.get_into("arr", np.empty(10, np.uint8))  # too small
    with pytest.raises(InvalidArgument):
        store.get_into("arr", bytes(arr.nbytes))  # read-only
    with pytest.raises(InvalidArgument):
        store.put("strided", arr[:, ::2])


def test_batched_ops_into_one_buffer(store):
    n, bs = 64, 64 * 1024
    blocks = [os.urandom(bs) for _ in range(n)]
    keys = kvfs.keys.block_hashes(list(range(n * 16)), 16)
    assert store.put_many(keys, blocks, ns="model.a") == [True] * n
    assert store.put_many(keys[:3], blocks[:3], ns="model.a") == [False] * 3
    big = np.zeros(n * bs + bs, dtype=np.uint8)
    outs = [big[i * bs:(i + 1) * bs] for i in range(n)] + [big[n * bs:]]
    got = store.get_many_into(keys + ["missing"], outs, ns="model.a")
    assert got == [bs] * n + [-1]
    assert big[:n * bs].tobytes() == b"".join(blocks)
    assert store.contains(keys[:2] + ["nope"], ns="model.a") == [True, True, False]
    assert store.prefix_match(keys, ns="model.a") == n
    assert store.prefix_match(keys[:10] + ["gap"] + keys[10:], ns="model.a") == 10
    assert store.prefix_match(keys, ns="other") == 0


def test_immutability_keeps_first_bytes(store):
    assert store.put("k", b"first") is True
    assert store.put("k", b"second, different") is False
    assert store.get("k") == b"first"


def test_delete_and_namespaces(store):
    store.put("a", b"1", ns="n1")
    store.put("b", b"2", ns="n1")
    store.put("c", b"3", ns="n2")
    assert set(store.namespaces()) >= {"n1", "n2"}
    assert sorted(store.keys("n1")) == ["a", "b"]
    assert store.delete(["a", "zz"], ns="n1") == 1
    with pytest.raises(NotFound):
        store.get("a", ns="n1")
    assert store.get_many_into(["a", "b"], [bytearray(1), bytearray(1)], ns="n1") == [-1, 1]
    assert store.put("a", b"again", ns="n1") is True
    assert store.get("a", ns="n1") == b"again"


def test_bytes_keys_are_hex(store):
    store.put(b"\x01\x02", b"v")
    assert store.get("0102") == b"v" and store.contains([b"\x01\x02"]) == [True]


def test_keys_paging(store):
    keys = [f"key{i:05d}" for i in range(250)]
    store.put_many(keys, [b"x"] * 250, ns="pg")
    assert list(store.keys("pg", page=7)) == keys


def test_invalid_keys_rejected(store):
    for bad in ["", "..", "a/b", "x" * 201]:
        with pytest.raises(InvalidKey):
            store.put(bad, b"x")
    with pytest.raises(InvalidArgument):
        store.put("m", b"x", meta={"big": "x" * 5000})
    with pytest.raises(InvalidArgument):
        store.put("m", b"x", meta={"bad": object()})
    assert store.contains(["m"]) == [False]


def test_restart_persists_everything(daemon):
    data = {f"k{i}": os.urandom(i * 9973) for i in range(40)}
    data["big"] = os.urandom(9 * MiB)
    with daemon.connect() as s:
        s.put_many(list(data), list(data.values()), metas=[{"i": i} for i in range(len(data))])
        s.delete(["k3"])
    del data["k3"]
    assert daemon.stop() == 0
    daemon.start()
    with daemon.connect() as s:
        assert sorted(s.keys()) == sorted(data)
        for k, v in data.items():
            assert s.get(k) == v
        assert s.stat("k5").meta == {"i": 5}
        st = s.stats()
        assert st["objects"] == len(data) and st["recovery"]["objects_dropped"] == 0


def test_daemon_unavailable_names_socket(tmp_path):
    with pytest.raises(kvfs.DaemonUnavailable) as ei:
        kvfs.connect(tmp_path / "nope.sock")
    assert "nope.sock" in str(ei.value) and "kvfs daemon" in str(ei.value)


def test_stats_shape(store):
    store.put("x", b"abc")
    store.get("x")
    with pytest.raises(NotFound):
        store.get("y")
    st = store.stats()
    assert st["objects"] == 1 and st["counters"]["hits"] >= 1 and st["counters"]["misses"] >= 1
    assert len(st["stripes"]) == 3 and st["disk_bytes"] >= 3
    # the index: the put's publication was committed, and LMDB holds pages for it
    assert st["index"]["commits"] >= 1 and st["index"]["used_bytes"] >= 4096


def test_a_hold_pins_keys_until_released_from_any_thread(daemon, store):
    import threading

    store.put_many(["a", "b", "c"], [b"A" * 5000, b"B" * 6000, b"C" * 7000], ns="h")
    store.flush()
    hold = store.hold(["a", "nope", "b"], ns="h")
    assert hold.found == [True, False, True]
    assert hold.items[0][0] == 5000 and hold.items[2][0] == 6000  # sizes, then where the bytes are
    report = store.evict(0, ns="h")
    assert report["objects"] == 1 and report["skipped_in_use"] == 2  # only "c" could go
    t = threading.Thread(target=hold.release)  # a lease taken on one thread, ended on another
    t.start()
    t.join()
    hold.release()  # at most once: a second release is nothing
    assert store.evict(0, ns="h")["objects"] == 2
    with store.hold(["a"], ns="h") as gone:
        assert gone.found == [False] and gone.lease == 0


def test_a_hold_and_a_read_after_a_restart_need_no_retry_by_the_caller(daemon, store):
    store.put("r", b"r" * 100, sync=True)
    store.hold(["r"]).release()
    daemon.stop()
    daemon.start()
    with store.hold(["r"]) as h:  # its connection was cut: taken again on a new one
        assert h.found == [True]
    assert store.contains(["r", "s"]) == [True, False]
    daemon.stop()
    with pytest.raises(kvfs.DaemonUnavailable):
        store.hold(["r"])  # no daemon: a clear error, not a hang
    with pytest.raises(kvfs.DaemonUnavailable):
        store.contains(["r"])


def test_reserved_extents_filled_by_the_caller_are_invisible_until_commit(daemon, store):
    """Store.reserve: the daemon gives T1 extents (the value cut at the
    stripe unit), the caller writes them itself, a commit with the sums of
    what it meant to write publishes; an abort publishes nothing, and a
    commit whose sums do not match what landed is a miss for readers."""
    import os

    import xxhash

    unit = store.stripe_unit
    vals = [os.urandom(unit + 1000), os.urandom(3000)]
    res = store.reserve(["r1", "r2", "r1x"], [len(vals[0]), len(vals[1]), 10], ns="res")
    assert res.items[0][2] == -1 and len(res.items[0][1]) == 2  # T1 chunks: two for a value past the unit
    for item, v in zip(res.items[:2], vals):
        pos = 0
        for stripe, seg, off, length in item[1]:
            fd = os.open(os.path.join(store.stripes[stripe], kvfs.format.segment_name(seg)), os.O_WRONLY)
            os.pwrite(fd, v[pos:pos + length], off)
            os.close(fd)
            pos += length
    with daemon.connect() as other:
        assert other.contains(["r1", "r2"], ns="res") == [False, False]  # written, not committed
        sums = [[xxhash.xxh3_128_digest(v), [xxhash.xxh3_128_digest(v[p:p + unit]) for p in range(0, len(v), unit)]]
                for v in vals]
        bad = xxhash.xxh3_128_digest(b"not what was written")
        assert res.commit(sums + [[bad, [bad]]]) == [True, True, True]
        with pytest.raises(kvfs.KvfsError):
            res.commit(sums + [[bad, [bad]]])  # once
        assert [other.get("r1", ns="res"), other.get("r2", ns="res")] == vals
        with pytest.raises(kvfs.NotFound):
            other.get("r1x", ns="res")  # its sums are not of what landed (zeros): a miss, never those bytes
        with store.reserve(["gone"], [100], ns="res"):
            pass  # aborted on leaving
        assert other.contains(["gone"], ns="res") == [False]
        with pytest.raises(kvfs.InvalidArgument):
            store.reserve(["z"], [0], ns="res")


def test_t1_reads_go_through_open_segment_files_with_no_round_trip(t1_daemon):
    """Once a client has a segment file open, get_into and get_many_into of
    what the directory places there are one native call each (no lookup, no
    Python per chunk); a deletion, a compaction that moves the bytes, or a
    scribbled record is seen by the next read, which then takes the other
    paths."""
    import kvfs
    from helpers import count_calls
    with t1_daemon.connect() as w, t1_daemon.connect() as r:
        vals = {f"t{i}": os.urandom(200_000 + i) for i in range(6)}
        w.put_many(list(vals), list(vals.values()), sync=True)
        calls = count_calls(r)
        located: list[str] = []
        orig = r._read_located
        r._read_located = lambda ns, ks, *a: (located.extend(ks), orig(ns, ks, *a))[1]
        buf = bytearray(1 << 20)
        for k, v in vals.items():  # the first read of each file opens it the slow way
            assert r.get_into(k, buf) == len(v) and buf[:len(v)] == v
        assert r.reader.fds.by_id  # the files, by fd_id
        located.clear()
        for k, v in vals.items():
            assert r.get_into(k, buf) == len(v) and buf[:len(v)] == v
        outs = [bytearray(len(v)) for v in vals.values()]
        assert r.get_many_into(list(vals), outs) == [len(v) for v in vals.values()]
        assert outs == list(vals.values())
        from kvfs import native
        # only the C data plane reads through open files (kvfs.host_reads.HostReads._direct)
        assert calls == [] and (located == [] if native.name == "native" else located)
        w.delete(["t0"])
        with pytest.raises(kvfs.NotFound):
            r.get_into("t0", buf)
        # a scribble over every segment file's payload: never served
        for path in [p for st in t1_daemon.stripes for p in Path(st).rglob("*") if p.is_file()]:
            with open(path, "r+b") as f:
                f.seek(8192)
                f.write(b"\xee" * 64)
        bad = 0
        for k, v in list(vals.items())[1:]:
            try:
                n = r.get_into(k, buf)
                assert buf[:n] == v
            except kvfs.KvfsError:
                bad += 1
        assert bad >= 1  # the scribble hit at least one record, and it was refused


def test_write_back_coalesces_neighbours_in_bounded_writes(tmp_path):
    """The write-back writes records reserved back to back with one pwritev
    per run, each run at most RUN_BYTES (a larger buffered write holds the
    segment's inode lock long enough to stall every other write to it),
    and every record reads back: the daemon's engine, in process, with real
    segment files and LMDB."""
    from kvfs._native_py import RUN_BYTES
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    eng = Engine(Config(root=tmp_path / "e", capacity=1 << 30, shm_size=64 << 20).resolve())
    try:
        vals = [os.urandom(65536) for _ in range(48)] + [os.urandom(1000) for _ in range(200)]
        plan = eng.prepare_put("n", [(f"k{i}", len(v), None) for i, v in enumerate(vals)], t0=True)
        assert all(op is not None and op.t0 >= 0 for op in plan.items)
        arena = eng.t0.arena.view
        for op, v in zip(plan.items, vals):
            arena[op.t0:op.t0 + len(v)] = v
        from kvfs import format as fmt
        eng.set_client_sums(plan, [[fmt.checksum(v), [fmt.checksum(v)]] for v in vals])
        eng.publish_t0(plan)
        assert eng.write_back(plan, False) == [True] * len(vals)
        assert 1 < eng.counters["writeback_pwritevs"] < len(vals) / 4  # coalesced
        assert eng.counters["writeback_pwritev_max"] <= RUN_BYTES <= 1 << 20  # 64 MiB runs stalled puts 0.5-0.7 s
        for i, v in enumerate(vals):
            e = eng.stat("n", f"k{i}")
            assert e["size"] == len(v)
        r = eng.verify_store(deep=True)
        assert r["objects"] == len(vals) and r["broken_count"] == 0 and r["orphan_count"] == 0
    finally:
        eng.close()


def test_index_batch_add_keeps_a_stored_key_and_its_rows(tmp_path):
    """The write-back's batched index insert: new objects and their segobj
    rows go in; an object whose key was stored meanwhile (a concurrent put
    won) keeps its entry, gets no segobj rows of ours, and reads False."""
    from kvfs import native
    from kvfsd.index import Index, segobj_key
    from kvfsd.segments import ChunkPlan, ObjPlan
    idx = Index(tmp_path, 1 << 26)
    try:
        def op(key, seg, seq):
            return ObjPlan(key, 10, None, seq, [ChunkPlan(0, seg, 4096, 4200, 4300, 10, 0, 0, b"c" * 16, 4096)],
                           f"ns\x00{key}".encode(), None, b"s" * 16)
        ops = [op("a", 1, 1), op("b", 2, 2), op("c", 3, 3)]
        with idx.env.begin(write=True) as txn:
            txn.put(b"ns\x00b", b"the winner", db=idx.objects)
            stored = idx.add_objects(txn, *native.backend.index_rows(ops, [True] * 3, 5.0))
        assert stored == [True, False, True]
        with idx.env.begin() as txn:
            assert txn.get(b"ns\x00b", db=idx.objects) == b"the winner"
            assert txn.get(segobj_key(1, 4096), db=idx.segobj) == b"ns\x00a"
            assert txn.get(segobj_key(2, 4096), db=idx.segobj) is None
            assert txn.get(segobj_key(3, 4096), db=idx.segobj) == b"ns\x00c"
            assert idx.get(txn, "ns", "a").seq == 1 and idx.get(txn, "ns", "c").seq == 3
        with idx.env.begin(write=True) as txn:  # all new: the fast path
            assert idx.add_objects(txn, *native.backend.index_rows([op("d", 4, 4)], [True], 6.0)) == [True]
            assert idx.add_objects(txn, [], [], []) == []
    finally:
        idx.close()
