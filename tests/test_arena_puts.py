"""Puts placed by the client in its arena reservation (kvfs.arena_puts):
one message a batch, values carved out of the reservation, a dead client's
reservation given back, bad placements refused and nothing published."""
import os
import subprocess
import sys

import pytest

import kvfs
from kvfs import protocol as P
from kvfsd.testing import DaemonProcess

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
        assert s.contains(["a", "b"], ns="p") == [False, False]
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
