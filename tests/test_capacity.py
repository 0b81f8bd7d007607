"""Capacity: LRU eviction by whole segments, leased objects survive, the disk stays under the cap."""
import os

import pytest

import kvfs
from kvfs import protocol as P
from kvfsd.testing import DaemonProcess

MiB = 1 << 20


def _disk_bytes(d: DaemonProcess) -> int:
    return sum(os.path.getsize(os.path.join(s, f)) for s in d.stripes for f in os.listdir(s))


def test_fill_past_capacity_evicts_lru_keeps_leased(tmp_path):
    cap = 64 * MiB
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity=cap, extra=["--stripe-unit", "1M"])
    with d:
        s = d.connect()
        s.put("leased", os.urandom(MiB))
        lease = s._call(P.LOOKUP, {"ns": "default", "keys": ["leased"]})["lease"]  # hold it
        assert lease
        s.put("hot", b"h" * 1000)
        peak = 0
        for i in range(200):  # 200 MiB through a 64 MiB store
            s.put(f"k{i}", os.urandom(MiB))
            if i % 10 == 0:
                s.get("hot")  # keep it recently used
            peak = max(peak, _disk_bytes(d))
        assert peak <= cap, f"disk use {peak} exceeded the capacity {cap}"
        st = s.stats()
        assert st["counters"]["evictions"] > 100
        assert s.contains(["leased", "hot", "k0", "k199"]) == [True, True, False, True]
        assert s.get("k199") and len(s.get("leased")) == MiB
        s.close()


def test_value_larger_than_capacity(tmp_path):
    with DaemonProcess(tmp_path / "s", capacity=16 * MiB) as d, d.connect() as s:
        with pytest.raises(kvfs.CapacityError) as ei:
            s.put("huge", bytes(17 * MiB))
        assert ei.value.capacity == 16 * MiB and ei.value.needed > 16 * MiB
        with pytest.raises(kvfs.CapacityError):
            s.put_many(["a", "b"], [bytes(100), bytes(20 * MiB)])
        s.put("ok", b"still serving")
        assert s.get("ok") == b"still serving"


def test_everything_leased_gives_capacity_error(tmp_path):
    with DaemonProcess(tmp_path / "s", capacity=32 * MiB, extra=["--stripe-unit", "1M"]) as d, d.connect() as s:
        keys = [f"k{i}" for i in range(20)]
        s.put_many(keys, [bytes(MiB)] * 20)
        s._call(P.LOOKUP, {"ns": "default", "keys": keys})  # lease them all, never release
        for i in range(40):  # unleased newcomers can only evict each other
            s.put(f"more{i}", bytes(MiB))
        assert all(s.contains(keys))
        with pytest.raises(kvfs.CapacityError) as ei:
            s.put("wide", bytes(14 * MiB))  # cannot fit beside 20 MiB that is leased
        assert "leased" in str(ei.value)
        assert all(s.contains(keys)) and s.get("more39") == bytes(MiB)


def test_evict_to_size_lru_first_keeps_what_is_in_use(tmp_path):
    """`evict`: least recently used first, within a namespace or the whole
    store, down to the target; an object a reader holds stays; disk space
    comes back as segments die."""
    d = DaemonProcess(tmp_path / "s", capacity="512M", extra=["--stripe-unit", "1M", "--segment-size", "4M"])
    with d, d.connect() as s:
        vals = {f"k{i}": os.urandom(MiB) for i in range(20)}
        s.put_many(list(vals), list(vals.values()), ns="a")
        s.put_many([f"b{i}" for i in range(5)], [os.urandom(MiB)] * 5, ns="b")
        s.flush()
        assert s.get("k0", ns="a") == vals["k0"]  # now the most recently used of "a"
        r = s.evict(5 * MiB, ns="a")
        left = [k for k, there in zip(vals, s.contains(list(vals), ns="a")) if there]
        assert left == ["k0", "k16", "k17", "k18", "k19"]  # the most recent ones
        assert r["reached"] and r["bytes_before"] == 20 * MiB and r["bytes_after"] == 5 * MiB
        assert r["objects"] == 15 and r["skipped_in_use"] == 0
        assert r["disk_after"] < r["disk_before"]
        assert s.contains([f"b{i}" for i in range(5)], ns="b") == [True] * 5  # another namespace: untouched
        for k in left:
            assert s.get(k, ns="a") == vals[k]
        with s.get_view("k17", ns="a") as held:  # leased while the eviction runs
            r = s.evict(0, ns="a")
            assert bytes(held) == vals["k17"]
        assert not r["reached"] and r["skipped_in_use"] == 1 and r["bytes_after"] == MiB
        assert s.contains(left, ns="a") == [k == "k17" for k in left]
        everything = s.evict(0)
        assert everything["reached"] and everything["bytes_after"] == 0
        assert s.stats()["objects"] == 0
        with pytest.raises(kvfs.InvalidArgument):
            s.evict(-1)


def test_a_reclaimed_segment_frees_its_space_while_a_client_holds_it_open(tmp_path):
    """Clients cache segment descriptors (their data plane writes and reads
    segments directly); an unlinked file keeps its blocks while any
    descriptor does, so the daemon empties a segment before unlinking it."""
    d = DaemonProcess(tmp_path / "s", capacity="512M", shm_size=0, extra=["--segment-size", "8M"])
    with d, d.connect() as s:
        keys = [f"k{i}" for i in range(12)]
        vals = [os.urandom(MiB) for _ in keys]
        s.put_many(keys, vals)  # direct: this client writes the payloads itself
        assert s.get_many_into(keys, [bytearray(MiB) for _ in keys]) == [MiB] * 12
        assert s.delete(keys) == 12
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if "seg-" in target and target.endswith("(deleted)"):
                held.append(os.fstat(int(fd)).st_size)
        assert held and all(n == 0 for n in held), held
