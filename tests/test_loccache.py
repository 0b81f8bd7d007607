"""Client-side location cache: repeated gets skip the daemon, removals are
seen at once, bad cached locations fall back to the daemon."""
import os

import pytest

import kvfs
from kvfs.loccache import LocationCache
from helpers import count_calls


class _Gen:
    def __init__(self):
        self.value = 1


def test_cache_empties_when_generation_moves():
    g = _Gen()
    c = LocationCache(g, limit=3)  # type: ignore[arg-type]
    c.put_many("ns", [("a", [1]), ("b", [2])], gen_before=1)
    assert c.get_many("ns", ["a", "x", "b"]) == {0: [1], 2: [2]}
    g.value = 2
    assert c.get_many("ns", ["a"]) == {}
    c.put_many("ns", [("a", [1])], gen_before=1)  # looked up before the removal: not kept
    assert c.get_many("ns", ["a"]) == {}
    c.put_many("ns", [(k, [k]) for k in "pqrs"], gen_before=2)
    assert len(c) == 3 and c.get_many("ns", ["p"]) == {}  # bounded, oldest out


def test_repeated_get_needs_no_round_trip_and_still_counts_as_hit(store):
    store.put("k", b"v" * 5000)
    assert store.get("k") == b"v" * 5000
    calls = count_calls(store)
    buf = bytearray(5000)
    for _ in range(3):
        assert store.get_into("k", buf) == 5000 and bytes(buf) == b"v" * 5000
    assert calls == []
    st = store.stats()  # touches go out before this call
    assert st["counters"]["cached_hits"] == 4  # the first get found it in the shared directory


def test_another_process_finds_objects_without_a_round_trip(daemon, store):
    """The shared location directory: a fresh client reads what another one
    put, T0 or T1, with no lookup; removals are seen at once."""
    vals = {f"d{i}": os.urandom(n) for i, n in enumerate([10, 5000, 300_000, 3 << 20, 13 << 20])}
    store.put_many(list(vals), list(vals.values()))
    store.flush()
    with daemon.connect() as other:
        calls = count_calls(other)
        for k, v in vals.items():
            if len(v) > (12 << 20):
                continue  # more chunks than a directory slot holds: looked up
            assert other.get(k) == v
        assert calls == []
        store.delete(["d2"])
        with pytest.raises(kvfs.NotFound):
            other.get("d2")
        assert other.get("d4") == vals["d4"]
        assert calls.count("lookup") == 2
        assert other.contains(list(vals)) == [True, True, False, True, True]  # d4: present, no location
        assert other.prefix_match(list(vals)) == 2 and len(calls) == 2  # no round trip for either
        st = other.stats()["directory"]
        assert st["entries"] == 4 and st["slots"] > 0 and st["complete"]  # d0, d1, d3 and d4


def test_delete_by_another_client_is_seen_at_once(daemon, store):
    store.put_many(["a", "b"], [b"A" * 100, b"B" * 100])
    assert store.get_many_into(["a", "b"], [bytearray(100), bytearray(100)]) == [100, 100]
    with daemon.connect() as other:
        assert other.delete(["a"]) == 1
    with pytest.raises(kvfs.NotFound):
        store.get("a")
    assert store.get("b") == b"B" * 100


def test_corruption_under_a_cached_location_is_a_miss(t1_store):
    store = t1_store
    data = os.urandom(200_000)
    store.put("c", data)
    assert store.get("c") == data  # location now cached
    path, off, length = store.stat("c").extents[0]
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, bytes([os.pread(fd, 1, off + 7)[0] ^ 0xFF]), off + 7)
    os.close(fd)
    with pytest.raises(kvfs.NotFound):
        store.get("c")
    assert store.contains(["c"]) == [False]


def test_cache_survives_daemon_restart_correctly(daemon, store):
    store.put("r", b"r" * 10)
    assert store.get("r") == b"r" * 10
    daemon.stop()
    daemon.start()
    # the old connection was cut: a read is sent again on a new one, no error
    assert store.stats()["objects"] == 1
    assert store.get("r") == b"r" * 10
    assert store.get("r") == b"r" * 10


def test_cache_can_be_turned_off(daemon):
    with daemon.connect(cache_locations=False) as s:
        s.put("k", b"x")
        s.get("k")
        calls = count_calls(s)
        s.get("k")
        assert calls == ["lookup"]


def test_client_does_not_pin_deleted_segments(tmp_path):
    from kvfsd.testing import DaemonProcess

    MiB = 1 << 20
    with DaemonProcess(tmp_path / "s", capacity=64 * MiB, extra=["--stripe-unit", "1M"]) as d, \
            d.connect() as s, d.connect() as other:
        keys = [f"k{i}" for i in range(6)]
        s.put_many(keys, [os.urandom(MiB)] * 6)
        s.put("survivor", b"x")
        for k in keys:
            s.get(k)  # the client now holds fds of these segments
        paths = {p for k in keys for p, _o, _l in s.stat(k).extents}
        other.delete(keys + ["survivor"])
        assert not any(os.path.exists(p) for p in paths)  # fully dead segments are unlinked
        s.contains(["nothing"])
        with pytest.raises(kvfs.NotFound):
            s.get("survivor")  # any read after the removal drops idle fds
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [h for h in held if "(deleted)" in h and "seg-" in h]
