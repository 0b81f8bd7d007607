"""Puts placed by the client in its arena reservation (kvfs.arena_puts):
one message a batch, values carved out of the reservation, a dead client's
reservation given back, bad placements refused and nothing published."""
import os
import subprocess
import sys

import pytest

import kvfs
from kvfs import arena_puts, client_puts
from kvfs import protocol as P
from kvfsd.testing import DaemonProcess

from helpers import count_calls

KiB, MiB = 1 << 10, 1 << 20


def requests(s):
    return {op: h["count"] for op, h in s.stats()["requests"].items()}


def test_a_batch_is_one_message_and_reads_back_everywhere(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size="64M")
    vals = [os.urandom(n) for n in (100 * KiB, 65 * KiB, 3000, 1 * MiB, 70 * KiB)]
    keys = [f"v{i}" for i in range(len(vals))]
    with d, d.connect() as s, d.connect() as other:
        assert s.put_many(keys, vals) == [True] * 5
        assert s.put_many(keys[:2] + ["w"], vals[:2] + [b"x" * 100_000]) == [False, False, True]
        for i in range(20):
            assert s.put(f"one{i}", vals[0]) is True
        n = requests(s)
        # one reservation: a one-off writer asks nothing ahead
        assert n.get("put_t0") == 22 and n.get("reserve") == 1 and not n.get("alloc") and not n.get("commit")
        assert [other.get(k) for k in keys] == vals  # from T0, by another client
        assert s.get("v3") == vals[3]  # the writer's own get: from its cache, no lookup
        assert other.flush() and "T1" in other.stat("v3").tier
        t0 = s.stats()["tiers"]["T0"]
        assert t0["writeback_objects"] == 0 and t0["objects"] == 26


def test_a_client_that_dies_gives_its_reservation_back(tmp_path):
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size="64M")
    child = ("import kvfs, os, sys, time\n"
             "s = kvfs.connect(sys.argv[1])\n"
             "s.put_many([f'c{i}' for i in range(10)], [os.urandom(64 * 1024)] * 10)\n"
             "print('ok', flush=True)\n"
             "time.sleep(60)\n")
    with d, d.connect() as s:
        p = subprocess.Popen([sys.executable, "-c", child, str(d.socket)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ok"
        held = s.stats()["tiers"]["T0"]["allocated_bytes"]
        assert held >= 4 * MiB  # its reservation (4 MiB first), not yet given back
        p.kill()
        p.wait()
        for _ in range(100):
            t0 = s.stats()["tiers"]["T0"]
            if t0["allocated_bytes"] == 10 * 64 * KiB:
                break
        assert t0["allocated_bytes"] == 10 * 64 * KiB and t0["objects"] == 10  # the values stay, the rest went
        assert all(s.contains([f"c{i}" for i in range(10)]))


def test_placements_outside_the_reservation_are_refused_and_publish_nothing(tmp_path):
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size="64M")
    with d, d.connect() as s:
        c = s._conn()
        got = c.call(P.RESERVE, {"bytes": 1 * MiB})
        rid, off, size = got["res"], got["off"], got["size"]
        s_ = [b"\x00" * 16, [b"\x00" * 16]]
        for bad in ([["a", 100, None, off + size, s_]],  # past the end
                    [["a", 100, None, off + 1, s_]],  # not on a cache line
                    [["a", 100 * KiB, None, off + 64, s_]],  # a large value not on a page
                    [["a", 100, None, off, s_], ["b", 100, None, off, s_]]):  # twice the same place
            with pytest.raises(kvfs.InvalidArgument):
                c.call(P.PUT_T0, {"ns": "p", "res": rid, "items": bad})
        with pytest.raises(kvfs.InvalidArgument, match="no such arena reservation"):
            c.call(P.PUT_T0, {"ns": "p", "res": rid + 7, "items": []})
        page = off + 4096  # a large value on a page, to the reservation's end; then one more
        whole = [["c", off + size - page, None, page, s_], ["d", 100, None, off + size, s_]]
        with pytest.raises(kvfs.InvalidArgument, match="used up"):  # a value past one that fills it
            c.call(P.PUT_T0, {"ns": "p", "res": rid, "items": whole})
        assert s.contains(["a", "b", "c", "d"], ns="p") == [False] * 4
        assert s.stats()["objects"] == 0
        s.put("fine", b"y" * 100_000, ns="p")  # the connection and the daemon go on
        assert s.get("fine", ns="p") == b"y" * 100_000


def test_puts_that_do_not_wait_are_seen_by_their_thread_and_others_and_refusals_counted(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=1, capacity="12M", shm_size="64M")
    vals = [os.urandom(100 * KiB) for _ in range(30)]
    keys = [f"n{i}" for i in range(30)]
    with d, d.connect() as s, d.connect() as other:
        assert s.put_many(keys[:10], vals[:10], wait=False) == [True] * 10
        assert s.contains(keys[:10]) == [True] * 10  # its own writes: the answers are read first
        assert [s.get(k) for k in keys[:10]] == vals[:10]
        for k, v in zip(keys[10:], vals[10:]):
            assert s.put(k, v, wait=False)
        assert s.put_many(keys[:2] + ["new"], vals[:2] + [b"z" * 70_000], wait=False) == [False, False, True]
        assert s.flush()  # a call: every answer read, every put written back
        assert all(other.contains(keys + ["new"])) and other.get("n29") == vals[29]
        assert s.put_errors == 0
        assert s.put("huge", os.urandom(13 * MiB), wait=False)  # sent; the daemon cannot hold it (capacity)
        assert not s.contains(["huge"])[0]
        assert s.put_errors == 1  # refused, logged and counted, never an exception later
        assert s.get("n0") == vals[0]  # the connection goes on
        n = requests(s)
        assert n.get("put_t0") == 1 + 20 + 1 + 1 and not n.get("commit")  # a message a batch; known keys not sent


def test_a_reservation_is_what_the_batch_asks_up_to_half_the_arena_or_what_fits(tmp_path):
    """A large batch gets one reservation of up to half the arena (its copies
    need not stop for another); where other holders leave no such run free,
    it gets the largest T0 value's size (a quarter)."""
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size="64M")
    with d, d.connect() as s, d.connect() as w, d.connect() as x, d.connect() as y:
        c = s._conn()
        got = c.call(P.RESERVE, {"bytes": 48 * MiB})
        assert got["res"] and got["size"] == 32 * MiB
        got = c.call(P.RESERVE, {"bytes": 20 * MiB})  # ends the one before
        assert got["res"] and got["size"] == 20 * MiB
        # others hold 4 MiB after it and 4 MiB further on: no 32 MiB run is free
        at = {}
        for h, n in ((w, 4), (x, 20), (y, 4)):
            r = h._conn().call(P.RESERVE, {"bytes": n * MiB})
            at[h] = (r["off"], r["off"] + r["size"])
        x._conn().call(P.RESERVE, {"bytes": 1 * MiB})  # x gives back its 20 MiB
        got = c.call(P.RESERVE, {"bytes": 48 * MiB})
        assert got["res"] and got["size"] == 16 * MiB, (got, at)


def test_a_large_batch_gives_back_what_it_left_of_its_reservation(tmp_path):
    """A batch that took a large reservation (up to half the arena) gives
    back what it did not use at its end, so writers that once put a large
    batch do not keep the arena from the others: a second writer's batch
    then goes to T0 too."""
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size="256M")
    vals = [os.urandom(MiB) for _ in range(40)]
    with d, d.connect() as a, d.connect() as b:
        assert a.put_many([f"a{i}" for i in range(40)], vals) == [True] * 40
        t0 = a.stats()["tiers"]["T0"]
        assert t0["allocated_bytes"] - t0["bytes"] <= 32 * MiB, t0  # not the rest of a 128 MiB reservation
        assert b.put_many([f"b{i}" for i in range(100)], [vals[i % 40] for i in range(100)]) == [True] * 100
        assert not b._conn().call(P.RESERVE, {"bytes": 0})["res"]  # b gives its rest back too
        t0 = a.stats()["tiers"]["T0"]
        assert t0["objects"] == 140 and t0["allocated_bytes"] - 140 * MiB < MiB, t0  # no rest kept (alignment aside)
        assert requests(a).get("alloc", 0) == 0  # nothing had to go to T1 directly


def test_threads_that_come_and_go_do_not_pile_up_connections_or_reservations(tmp_path):
    """Each thread of a Store has its own connection, and with it an arena
    reservation. A pool whose threads come and go (an engine's executor)
    must not leave one behind per ended thread: they close when a thread
    next connects, and the daemon takes their reservations back, so the
    arena stays free for T0 puts (before, 20 ended threads kept 20
    reservations and the later puts went to T1)."""
    import threading
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size="128M")
    val = os.urandom(MiB)
    with d, d.connect() as s:
        for t in range(20):
            th = threading.Thread(target=lambda t=t: s.put_many([f"t{t}-{i}" for i in range(4)], [val] * 4))
            th.start()
            th.join()
        assert s.flush()  # written back: a delete of a value still dirty drops its T0 copy only after that
        s.delete([f"t{t}-{i}" for t in range(20) for i in range(4)])
        st = s.stats()
        assert st["connections"] <= 3, st["connections"]  # this thread's, the last ended one's, at most
        t0 = st["tiers"]["T0"]
        assert t0["objects"] == 0 and t0["allocated_bytes"] <= 8 * MiB, t0


def test_a_writer_that_keeps_putting_gets_its_next_reservation_ahead(tmp_path):
    """Once a connection has filled a reservation, it asks for the next one
    when the current is half used, not waiting for the answer: the puts
    that fill reservation after reservation wait for none of them."""
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="2G", shm_size="256M")
    vals = [os.urandom(256 * KiB) for _ in range(8)]
    with d, d.connect() as other:
        s = d.connect()
        waited = count_calls(s._conn(), "call")
        for b in range(60):  # 120 MiB: the reservations grow 4, 8, 16, 32 MiB, then stay at 32
            assert s.put_many([f"b{b}-{i}" for i in range(8)], vals, wait=b % 2 == 0) == [True] * 8
        s.flush()
        n = requests(s)
        assert n["reserve"] >= 5 and waited.count(P.RESERVE) <= 2, (n, waited.count(P.RESERVE))
        assert n.get("alloc", 0) == 0  # everything went through the arena
        assert all(other.get(f"b{b}-{i}") == vals[i] for b in range(60) for i in range(8))
        t0 = s.stats()["tiers"]["T0"]
        held = t0["allocated_bytes"] - t0["bytes"]
        assert held <= 2 * 32 * MiB + MiB, t0  # the one it fills and the next, at most
        s.close()  # its connection ends: both go back
        for _ in range(100):
            t0 = other.stats()["tiers"]["T0"]
            if t0["allocated_bytes"] - t0["bytes"] < MiB:
                break
        assert t0["allocated_bytes"] - t0["bytes"] < MiB, t0


def test_lone_puts_fill_reservation_after_reservation_a_message_each(tmp_path, monkeypatch):
    """``put`` of one host value goes straight into the current reservation
    (kvfs.arena_puts.put_one): one message a put, the next reservation
    asked ahead as for batches, and the same answers as ``put_many``."""
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="2G", shm_size="256M")
    vals = [os.urandom(n) for n in (64 * KiB, 4 * KiB, 300 * KiB, 1000)]
    keys = [f"one{i}" for i in range(400)]  # 34 MiB: reservations of 4, 8, 16, then 32 MiB
    taken = []

    def put_one(*a):
        got = arena_puts.put_one(*a)
        taken.append(got is not None)
        return got
    monkeypatch.setattr(client_puts, "put_one", put_one)
    with d, d.connect() as s, d.connect() as other:
        waited = count_calls(s._conn(), "call")
        for i, k in enumerate(keys):
            assert s.put(k, vals[i % 4], meta={"i": i} if i % 50 == 0 else None, wait=i % 3 != 0) is True
        assert s.put(keys[1], b"other bytes") is False  # already there: its bytes stay
        assert s.put(keys[2], b"other bytes", wait=False) is False  # known from the directory: not sent
        assert s.put("synced", vals[0], sync=True) is True
        s.flush()
        n = requests(s)
        assert n["put_t0"] == 400 + 1 + 1 and n["reserve"] >= 4 and not n.get("alloc"), n
        assert waited.count(P.RESERVE) <= 2, waited.count(P.RESERVE)  # the rest asked ahead
        # all but the first put of each reservation (put_many asks for one) took the short way
        assert len(taken) == 403 and taken.count(False) <= 8, taken.count(False)
        assert all(other.get(k) == vals[i % 4] for i, k in enumerate(keys))
        assert all(s.get(k) == vals[i % 4] for i, k in enumerate(keys))  # the writer's own, from its cache
        assert other.stat("one50").meta == {"i": 50} and other.stat("one51").meta is None
        assert "T1" in other.stat("synced").tier and s.put_errors == 0


def test_two_reservations_at_most_and_each_released_alone(tmp_path):
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size="64M")
    with d, d.connect() as s:
        c = s._conn()
        held = lambda: s.stats()["tiers"]["T0"]["allocated_bytes"]  # noqa: E731
        a = c.call(P.RESERVE, {"bytes": 4 * MiB})
        b = c.call(P.RESERVE, {"bytes": 2 * MiB, "keep": True})
        assert a["res"] and b["res"] and a["res"] != b["res"] and held() >= 6 * MiB
        with pytest.raises(kvfs.InvalidArgument, match="at most 2"):
            c.call(P.RESERVE, {"bytes": MiB, "keep": True})
        val = os.urandom(100 * KiB)
        import xxhash
        w = xxhash.xxh3_128_digest(val)
        for r, key in ((a, "in-a"), (b, "in-b")):  # a value placed in either is carved from it
            s.arena.rw[r["off"]:r["off"] + len(val)] = val
            assert c.call(P.PUT_T0, {"ns": "default", "res": r["res"],
                                     "items": [[key, len(val), None, r["off"], [w, [w]]]]}) != [-1]
        assert s.get("in-a") == val and s.get("in-b") == val
        before = held()
        assert c.call(P.RESERVE, {"bytes": 0, "release": [a["res"]]}) == {"res": 0}
        assert before - held() >= 3 * MiB  # a's rest, and only a's
        assert c.call(P.RESERVE, {"bytes": 0, "release": [a["res"], 999]}) == {"res": 0}  # unknown: nothing happens
        c.call(P.RESERVE, {"bytes": MiB, "keep": True})  # b and this one
        c.call(P.RESERVE, {"bytes": 0})  # without keep: every one ends
        assert held() == 2 * 100 * KiB


def test_an_answer_asked_ahead_is_dropped_once_every_reservation_ended(tmp_path):
    from kvfs.arena_puts import _ask_ahead, _take_ahead, end_reservations
    d = DaemonProcess(tmp_path / "s", capacity="1G", shm_size="64M")
    with d, d.connect() as s:
        s.put("first", os.urandom(100 * KiB))
        c = s._conn()
        _ask_ahead(c, 0)
        assert c.ahead_pending
        end_reservations(c)  # sent after the ask: the daemon ends the one it just made too
        assert _take_ahead(c) is None and c.ahead is None
        c.drain()
        assert c.ahead is None
        t0 = s.stats()["tiers"]["T0"]
        assert t0["allocated_bytes"] == t0["bytes"], t0  # nothing held for this connection
        s.put("second", b"x" * (300 * KiB))  # a fresh reservation, waited for
        assert s.get("second") == b"x" * (300 * KiB)
