"""Waiting for answers without paying wake-ups: the client polls its socket
for a reply (recv_spin, both backends) before it sleeps, reads replies
through a buffer that may hold a piece of one or several at once, and the
daemon polls a connection briefly after answering it (--poll-us), while
its requests come that soon, without holding up any other connection or
burning CPU while idle."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from kvfs import protocol as P
from kvfs.connection import RECV_BUF, Connection
from kvfs.errors import DaemonUnavailable, NotFound, ProtocolError
from kvfsd.testing import DaemonProcess

from test_native import BACKENDS, mod


@pytest.mark.parametrize("name", BACKENDS)
def test_recv_spin_gets_what_arrives_during_the_poll_and_after_it(name):
    m = mod(name)
    a, b = socket.socketpair()
    try:
        buf = bytearray(16)
        b.send(b"now")  # already there: the first try takes it
        assert m.recv_spin(a, memoryview(buf), 10_000_000) == 3 and buf[:3] == b"now"
        # arrives long after a short poll ended: the wait blocks, then gets it
        threading.Timer(0.2, lambda: b.send(b"later")).start()
        t = time.perf_counter()
        assert m.recv_spin(a, memoryview(buf), 1000) == 5 and buf[:5] == b"later"
        assert time.perf_counter() - t >= 0.15
        # at most the buffer's length, the rest stays for the next call
        b.send(b"0123456789abcdefXYZ")
        assert m.recv_spin(a, memoryview(buf), 0) == 16
        assert m.recv_spin(a, memoryview(buf), 0) == 3 and buf[:3] == b"XYZ"
        b.close()
        assert m.recv_spin(a, memoryview(buf), 1000) == 0  # closed by the peer
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name", BACKENDS)
def test_recv_spin_errors_and_signals(name):
    m = mod(name)
    a, b = socket.socketpair()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unconnected, pytest.raises(OSError):
        m.recv_spin(unconnected, bytearray(4), 1000)
    with pytest.raises(TypeError):
        m.recv_spin(a, b"read-only", 1000)

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t = time.perf_counter()
        with pytest.raises(Stop):  # nothing ever arrives: a signal still ends the wait
            m.recv_spin(a, bytearray(4), 1_000_000)
        assert time.perf_counter() - t < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        a.close()
        b.close()


def test_native_recv_spin_lets_other_threads_run_while_it_polls():
    m = mod("native")
    a, b = socket.socketpair()
    counted = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counted[0] += 1

    th = threading.Thread(target=count)
    th.start()
    try:
        threading.Timer(0.3, lambda: b.send(b"x")).start()
        before = counted[0]
        assert m.recv_spin(a, bytearray(1), 250_000_000) == 1  # polls 250 ms, then blocks
        # a poll that held the GIL would leave the counter where it was
        assert counted[0] - before > 10_000
    finally:
        stop.set()
        th.join()
        a.close()
        b.close()


class _Scripted:
    """A Unix socket server that answers each request with bytes the test
    scripts: whole replies cut into pieces, or several replies at once."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.sock: socket.socket | None = None

    def accept(self) -> None:
        self.sock, _ = self.listener.accept()

    def read_request(self) -> int:
        assert self.sock is not None
        head = self._exact(P.PREFIX.size)
        mlen, _ = P.parse_prefix(head)
        req_id, _op, _args = P.parse_request(self._exact(mlen))
        return req_id

    def _exact(self, n: int) -> bytes:
        assert self.sock is not None
        out = b""
        while len(out) < n:
            part = self.sock.recv(n - len(out))
            assert part
            out += part
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


@pytest.fixture
def scripted(tmp_path):
    srv = _Scripted(str(tmp_path / "s.sock"))
    yield srv
    srv.close()


def _serve(srv: _Scripted, fn) -> threading.Thread:
    def run() -> None:
        srv.accept()
        fn(srv)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


@pytest.mark.parametrize("poll_ns", [0, 200_000])
def test_replies_in_pieces_and_together_are_each_read_whole(scripted, poll_ns):
    big = "x" * (3 * RECV_BUF)  # a reply larger than the buffer: it grows for it, then shrinks back

    def script(srv: _Scripted) -> None:
        rid = srv.read_request()
        frame = P.reply_ok(rid, "first")
        for i in range(len(frame)):  # one byte at a time
            srv.sock.send(frame[i:i + 1])
            time.sleep(0.0005)
        # two deferred requests, both answers in one send, then a third call
        r1, r2 = srv.read_request(), srv.read_request()
        srv.sock.sendall(P.reply_ok(r1, 1) + P.reply_ok(r2, 2))
        rid = srv.read_request()
        srv.sock.sendall(P.reply_ok(rid, big))
        rid = srv.read_request()
        srv.sock.sendall(P.reply_err(rid, NotFound("no such key")))
        rid = srv.read_request()
        srv.sock.sendall(P.reply_ok(rid, "after the error"))
        rid = srv.read_request()
        srv.sock.sendall(b"JUNK" + bytes(12))  # a bad prefix

    th = _serve(scripted, script)
    c = Connection(scripted.path)
    c.poll_ns = poll_ns
    try:
        assert c.call(P.STATS, {}) == "first"
        got = []
        c.defer(P.STATS, {}, lambda r, e: got.append((r, e)))
        c.defer(P.STATS, {}, lambda r, e: got.append((r, e)))
        c.drain()
        assert got == [(1, None), (2, None)]
        assert c.call(P.STATS, {}) == big
        assert len(c._rbuf) == RECV_BUF
        with pytest.raises(NotFound):
            c.call(P.STATS, {})
        assert c.call(P.STATS, {}) == "after the error"  # an error answer leaves the connection usable
        with pytest.raises(ProtocolError):
            c.call(P.STATS, {})
        assert c.broken
        with pytest.raises(DaemonUnavailable):
            c.call(P.STATS, {})
    finally:
        c.close()
        th.join(5)


def test_a_connection_cut_mid_reply_is_lost_not_misread(scripted):
    def script(srv: _Scripted) -> None:
        rid = srv.read_request()
        srv.sock.sendall(P.reply_ok(rid, "whole")[:-3])
        srv.sock.close()

    th = _serve(scripted, script)
    c = Connection(scripted.path)
    try:
        with pytest.raises(DaemonUnavailable):
            c.call(P.STATS, {})
        assert c.broken
    finally:
        c.close()
        th.join(5)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_polling_daemon_serves_every_connection_and_rests_when_idle(tmp_path):
    # the longest poll there is: a loop that waited on one connection's poll
    # would hold every other request up for 10 ms
    d = DaemonProcess(tmp_path / "store", stripes=1, capacity="1G", shm_size="64M", extra=["--poll-us", "10000"])
    with d:
        a, b = d.connect(), d.connect()
        try:
            a.put("k", b"v" * 1000)
            t = time.perf_counter()
            ca, cb = a._conn(), b._conn()
            ask = {"ns": "default", "keys": ["k", "absent"]}
            for i in range(50):  # each request lands while the other connection polls
                assert ca.call(P.CONTAINS, ask) == [True, False]
                assert cb.call(P.CONTAINS, ask) == [True, False]
            assert time.perf_counter() - t < 0.6  # 100 requests held up 10 ms each would take 1 s
            assert d.proc is not None
            time.sleep(0.1)
            cpu = _cpu_s(d.proc.pid)
            time.sleep(1.0)
            assert _cpu_s(d.proc.pid) - cpu < 0.2  # connections open, nothing asked: no polling
        finally:
            a.close()
            b.close()


@pytest.mark.parametrize("gap", [0.05, 0.015])
def test_a_client_that_pauses_longer_than_the_poll_is_not_polled_for(tmp_path, gap):
    # a request every 50 ms, or every 15 ms, against a 10 ms poll: polling
    # for each would spin the daemon's loop 10 ms per request (0.3 s here).
    # A wait that ends past the poll turns polling off and every later wait
    # ends past it too, so the loop spins once; at 15 ms this is what the
    # rule "poll again after a wait of up to twice the poll" got wrong
    d = DaemonProcess(tmp_path / "store", stripes=1, capacity="1G", shm_size="64M", extra=["--poll-us", "10000"])
    with d:
        c = d.connect()
        try:
            conn = c._conn()
            ask = {"ns": "default", "keys": ["k"]}
            assert conn.call(P.CONTAINS, ask) == [False]
            assert d.proc is not None
            cpu = _cpu_s(d.proc.pid)
            for _ in range(30):
                time.sleep(gap)
                assert conn.call(P.CONTAINS, ask) == [False]
            assert _cpu_s(d.proc.pid) - cpu < 0.15
        finally:
            c.close()


def test_poll_us_out_of_range_is_refused(tmp_path):
    d = DaemonProcess(tmp_path / "store", stripes=1, capacity="1G", shm_size=0, extra=["--poll-us", "-1"])
    with pytest.raises(RuntimeError, match="poll-us"):
        d.start(timeout=20)


def test_the_write_back_threads_leave_the_cores_to_a_spinning_pair(tmp_path):
    """The daemon's write-back pool runs at a lower priority (nice
    kvfsd.write_back.NICE), one thread per stripe, and nothing else does:
    on a machine whose cores all spin (a client and the event loop, each
    polling for the other's answer) a waking write-back thread must not
    take a core from them on equal terms (stop 42: one waited put in four
    took 400-600 us), while the event loop and the index writer keep the
    process's own priority. Every thread carries its name as an OS name."""
    from kvfsd.write_back import NICE, pool_size
    d = DaemonProcess(tmp_path / "s", stripes=3, shm_size="64M")
    with d, d.connect() as s:
        assert s.put("a", os.urandom(70_000)) and s.flush()
        assert d.proc is not None
        pid = d.proc.pid
        nice = {int(t): int(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[16])
                for t in os.listdir(f"/proc/{pid}/task")}
        names = {int(t): open(f"/proc/{pid}/task/{t}/comm").read().strip() for t in os.listdir(f"/proc/{pid}/task")}
    base = nice[pid]  # the event loop's thread: whatever the daemon was started with
    lowered = [t for t, n in nice.items() if n == min(19, base + NICE)]
    assert len(lowered) == pool_size(3) == 3, nice
    assert all(n == base for t, n in nice.items() if t not in lowered), nice
    # each thread says what it is to top -H and /proc (the benchmarks split the daemon's CPU by these)
    assert names[pid] == "kvfsd", names
    assert sorted(names[t] for t in lowered) == ["kvfs-wb0", "kvfs-wb1", "kvfs-wb2"], names
    assert {"kvfs-writer", "kvfs-index-sync"} <= set(names.values()), names
