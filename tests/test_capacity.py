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
