"""Pure pieces of the daemon: lease table, eviction choice, protocol framing."""
import msgpack
import pytest

from kvfs import protocol as P
from kvfs.errors import CapacityError, NotFound, ProtocolError
from kvfs.sizes import parse_size
from kvfsd.eviction import choose_victims
from kvfsd.leases import LeaseTable


def test_lease_table_counts_segments_and_owners():
    t = LeaseTable(timeout=10)
    a = t.grant("c1", [1, 2], [b"x"], now=0)
    b = t.grant("c2", [2, 3], [b"y"], now=5)
    assert a != b and len(t) == 2
    assert t.seg_leased(2) and t.obj_leased(b"x")
    assert t.release(a, owner="c2") == []  # not c2's lease
    assert sorted(t.release(a, owner="c1")) == [1]  # 2 still held by b
    assert not t.obj_leased(b"x") and t.seg_leased(2)
    assert sorted(t.expire(now=15)) == [2, 3] and len(t) == 0
    t.grant("c3", [4], [], now=0)
    t.grant("c3", [4, 5], [], now=0)
    assert sorted(t.release_owner("c3")) == [4, 5]


def test_eviction_frees_whole_segments_lru_first():
    # seg 1 holds a, b; seg 2 holds c; usage 200, target 100
    lru = [(b"a", [(1, 50)]), (b"c", [(2, 100)]), (b"b", [(1, 50)])]
    v = choose_victims(lru, {1: 100, 2: 100}, {1: 100, 2: 100}, 200, 100,
                       evictable=lambda o: True, seg_reclaimable=lambda s: True)
    assert v.objects == [b"a", b"c"] and v.segments == [2] and v.freed == 100


def test_eviction_skips_leased_and_gives_up_rather_than_waste():
    lru = [(b"a", [(1, 100)]), (b"b", [(2, 100)])]
    v = choose_victims(lru, {1: 100, 2: 100}, {1: 100, 2: 100}, 200, 100,
                       evictable=lambda o: o != b"a", seg_reclaimable=lambda s: True)
    assert v.objects == [b"b"] and v.segments == [2]
    v = choose_victims(lru, {1: 100, 2: 100}, {1: 100, 2: 100}, 200, 0,
                       evictable=lambda o: o != b"a", seg_reclaimable=lambda s: True)
    assert v.objects == []  # target unreachable: evict nothing


def test_frames_round_trip_and_reject_garbage():
    frame = P.request(3, P.LOOKUP, {"ns": "n", "keys": ["a"]}, trailer_len=0)
    mlen, tlen = P.parse_prefix(frame[:16])
    assert (mlen, tlen) == (len(frame) - 16, 0)
    assert P.parse_request(frame[16:]) == (3, "lookup", {"ns": "n", "keys": ["a"]})
    with pytest.raises(ProtocolError):
        P.parse_prefix(b"GARBAGE!" * 2)
    with pytest.raises(ProtocolError):
        P.parse_prefix(P.PREFIX.pack(P.MAGIC, P.MAX_MESSAGE + 1, 0))
    for bad in [b"\xc1", msgpack.packb([1, "nope", {}]), msgpack.packb([1, "lookup"]),
                msgpack.packb([-1, "lookup", {}]), msgpack.packb(["x", "lookup", {}]), msgpack.packb([1, "lookup", []])]:
        with pytest.raises(ProtocolError):
            P.parse_request(bad)


def test_errors_cross_the_wire_as_the_same_class():
    err = CapacityError("full", needed=10, capacity=5, used=4)
    with pytest.raises(CapacityError) as ei:
        P.parse_reply(P.reply_err(9, err)[16:])
    assert (ei.value.needed, ei.value.capacity, ei.value.used) == (10, 5, 4)
    with pytest.raises(NotFound):
        P.parse_reply(P.reply_err(1, NotFound("gone"))[16:])
    assert P.parse_reply(P.reply_ok(4, [1, 2])[16:]) == (4, [1, 2])


def test_parse_size():
    assert parse_size("4096") == 4096 and parse_size("64M") == 64 << 20
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("2g") == 2 << 30
    with pytest.raises(ValueError):
        parse_size("lots")


def test_gc_policy_freezes_survivors_and_collects_fully_on_schedule(monkeypatch):
    """The daemon's collector policy (kvfsd.gc_policy): what exists at start
    is frozen, a tick past FREEZE_S freezes what survived since, a tick
    past FULL_S unfreezes, collects everything (a frozen cycle that became
    garbage is reclaimed) and freezes again, and stats say so."""
    import gc
    import weakref

    from kvfsd import gc_policy

    class Node:
        pass
    old = gc.get_threshold()
    try:
        pol = gc_policy.GcPolicy()
        assert gc.get_threshold()[0] == gc_policy.YOUNG
        pol.started()
        assert gc.get_freeze_count() > 0 and pol.stats()["freezes"] == 1
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle that survives a freeze, then becomes garbage
        gone = weakref.ref(a)
        pol._last_freeze -= gc_policy.FREEZE_S
        pol.tick()
        assert pol.stats()["freezes"] == 2 and pol.stats()["full_runs"] == 0
        del a, b
        gc.collect()  # a frozen cycle is out of the collector's reach
        assert gone() is not None
        pol._last_full -= gc_policy.FULL_S
        pol.tick()
        st = pol.stats()
        assert gone() is None and st["full_runs"] == 1 and st["last_full_ms"] >= 0
        assert st["frozen"] == gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)


def _tier0(size: int, leased=frozenset()):
    from types import SimpleNamespace
    from kvfsd.tier0 import Tier0
    changes: list[list[bytes]] = []
    bumps: list[int] = []
    t0 = Tier0(SimpleNamespace(size=size, path="arena", huge_bytes=lambda: 0), size, leased,
               lambda: bumps.append(1), lambda oks, ms: changes.append(list(oks)))
    return t0, changes, bumps


def _put(t0, ok: bytes, size: int, dirty: bool):
    from kvfs import native
    m = native.backend.MemEntry(size, b"", 0, (), (), t0=t0.alloc.alloc(size), dirty=dirty)
    if dirty:  # as a T0 put's publication does (kvfsd.mirror.t0_publish)
        t0.dirty.append(ok, m)
        t0.bytes += size
    else:
        t0.add(ok, m)
    return m


def test_t0_eviction_takes_the_least_recent_clean_ones_in_one_round():
    KiB = 1024
    t0, changes, bumps = _tier0(64 * KiB, leased={b"c1"})
    ms = {}
    for i in range(16):  # 16 x 4 KiB fill it: c0..c7 clean, d8..d15 dirty (just put)
        ok = (b"c%d" if i < 8 else b"d%d") % i
        ms[ok] = _put(t0, ok, 4 * KiB, dirty=i >= 8)
    changes.clear()
    t0.touch(ms[b"c0"])  # c0 read: now the most recent
    off = t0.reserve(12 * KiB)  # c2, c3, c4 (c1 is leased, c0 recent): one round, one directory update
    assert off >= 0 and bumps == [1]
    assert changes == [[b"c2", b"c3", b"c4"]]
    assert all(ms[k].t0 == -1 for k in (b"c2", b"c3", b"c4")) and ms[b"c1"].t0 >= 0 and ms[b"c0"].t0 >= 0
    assert t0.counters["evictions"] == 3
    # dirty ones are never evicted; once cleaned they are the most recent
    assert t0.dirty.remove(ms[b"d8"])  # as the write-back's end does (kvfsd.mirror.t0_written_back)
    t0.lru.append(b"d8", ms[b"d8"])
    ms[b"d8"].dirty = False
    assert t0.reserve(64 * KiB) == -1 and t0.counters["full"] == 1
    assert all(ms[b"d%d" % i].t0 >= 0 for i in range(9, 16))
    assert t0.stats()["objects"] == 8  # c1 (leased) and d9..d15: the rest went, d8 included
    assert ms[b"d8"].t0 == -1 and ms[b"c1"].t0 >= 0


def test_a_finished_job_waits_for_its_client_however_many_jobs_follow():
    """The daemon's own compactions (never fetched) must not push out a
    verify its client has not polled yet; a status poll answers the same
    twice (a client resends it on a new connection); fetched jobs go."""
    from kvfsd.jobs import KEEP, Jobs
    jobs = Jobs()
    mine = jobs.new("verify")
    jobs.run(mine, lambda progress: {"broken_count": 0})
    for _ in range(3 * KEEP):
        j = jobs.new("compact")
        jobs.run(j, lambda progress: {})
    assert jobs.status(mine.id)["result"] == {"broken_count": 0}
    assert jobs.status(mine.id)["state"] == "done"  # asked again: the same answer
    for _ in range(KEEP):
        jobs.run(jobs.new("compact"), lambda progress: {})
    assert mine.id not in jobs.jobs  # fetched, then pushed out
