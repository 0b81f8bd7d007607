"""Hostile and broken clients: the daemon answers or closes, and keeps serving everyone else."""
import os
import signal
import socket
import struct
import subprocess
import sys

import msgpack
import pytest

import kvfs
from kvfs import protocol as P
from helpers import recv_reply


def _raw(daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    s.settimeout(10)
    return s


def _closed_or_error(s: socket.socket) -> bool:
    try:
        r = recv_reply(s)
    except (ConnectionError, socket.timeout):
        return True
    return r is None or r[1] == P.STATUS_ERR


def test_garbage_and_huge_frames_close_only_that_connection(daemon, store):
    store.put("keep", b"safe")
    for junk in [b"\x00" * 64, os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n" * 4,
                 struct.pack("<4sIQ", P.MAGIC, 0xFFFFFFFF, 0)]:
        s = _raw(daemon)
        s.sendall(junk)
        assert _closed_or_error(s)
        s.close()
    assert store.get("keep") == b"safe"


@pytest.mark.parametrize("msg", [
    b"\xc1\xc1\xc1",  # not msgpack
    msgpack.packb([1, "no_such_op", {}]),
    msgpack.packb([1, "lookup", {"ns": 5, "keys": ["a"]}]),
    msgpack.packb([1, "lookup", {"ns": "default", "keys": "notalist"}]),
    msgpack.packb([1, "lookup", {"ns": "default", "keys": [{"a": 1}]}]),
    msgpack.packb([1, "contains", {"ns": "default", "keys": ["../x"]}]),
    msgpack.packb([1, "put", {"ns": "default", "items": [["k", -5, None]]}]),
    msgpack.packb([1, "put", {"ns": "default", "items": [["k", 10, "not json"]]}]),
    msgpack.packb([1, "commit", {"put": 99, "sums": []}]),
    msgpack.packb([1, "keys", {"ns": "default", "limit": 10 ** 12}]),
    msgpack.packb({"not": "a list"}),
])
def test_malformed_request_gets_error_and_connection_survives(daemon, store, msg):
    s = _raw(daemon)
    s.sendall(struct.pack("<4sIQ", P.MAGIC, len(msg), 0) + msg)
    r = recv_reply(s)
    assert r is not None and r[1] == P.STATUS_ERR and isinstance(r[2][1], str)
    s.sendall(P.request(7, P.HELLO, {}))  # same connection still works
    r = recv_reply(s)
    assert r[0] == 7 and r[1] == P.STATUS_OK
    s.close()
    assert store.put("after", b"x") in (True, False) and store.get("after") == b"x"


def test_put_with_wrong_trailer_or_bad_item_keeps_stream_framed(daemon, store):
    s = _raw(daemon)
    # declares 10 bytes, sends 10 bytes, but the key is invalid: error, stream intact
    s.sendall(P.request(1, P.PUT, {"ns": "default", "items": [["a/b", 10, None]]}, 10) + b"0123456789")
    assert recv_reply(s)[1] == P.STATUS_ERR
    # trailer length disagrees with the items
    s.sendall(P.request(2, P.PUT, {"ns": "default", "items": [["ok", 3, None]]}, 5) + b"abcde")
    assert recv_reply(s)[1] == P.STATUS_ERR
    s.sendall(P.request(3, P.PUT, {"ns": "default", "items": [["ok", 3, None]]}, 3) + b"abc")
    assert recv_reply(s)[1:] == [P.STATUS_OK, [True]]
    s.close()
    assert store.get("ok") == b"abc"


def test_client_dying_mid_value_loses_nothing_else(daemon, store):
    store.put("before", b"b" * 100)
    s = _raw(daemon)
    s.sendall(P.request(1, P.PUT, {"ns": "default", "items": [["partial", 1 << 20, None]]}, 1 << 20) + b"x" * 1000)
    s.close()
    s = _raw(daemon)
    s.sendall(P.request(1, P.ALLOC, {"ns": "default", "items": [["alloced", 1 << 20, None]]}))
    assert recv_reply(s)[1] == P.STATUS_OK
    s.close()  # never commits
    store.put("after", b"a" * 100)
    assert store.contains(["partial", "alloced", "before", "after"]) == [False, False, True, True]


def test_client_killed_holding_leases(daemon, store):
    store.put_many([f"k{i}" for i in range(10)], [b"v" * 1000] * 10)
    code = (f"import kvfs, os; from kvfs import protocol as P; s = kvfs.connect({str(daemon.socket)!r}); "
            f"r = s._call(P.LOOKUP, {{'ns': 'default', 'keys': ['k1', 'k2']}}); print(r['lease'], flush=True); "
            f"os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL and int(p.stdout) > 0
    import time
    for _ in range(100):
        if store.stats()["leases"] == 0:
            break
        time.sleep(0.05)
    assert store.stats()["leases"] == 0
    assert store.get("k1") == b"v" * 1000


def test_invalid_arguments_from_client(store):
    with pytest.raises(kvfs.InvalidArgument):
        store.put_many(["a", "b"], [b"x"])
    with pytest.raises(kvfs.InvalidArgument):
        store.put("a", 12345)
    with pytest.raises(kvfs.InvalidKey):
        store.get("a", ns="bad/ns")
    with pytest.raises(kvfs.InvalidKey):
        store.contains("single-string-not-list")


def test_leases_expire_and_socket_mode(tmp_path):
    import stat as st_
    import time

    from kvfsd.testing import DaemonProcess

    with DaemonProcess(tmp_path / "s", extra=["--lease-timeout", "1"]) as d, d.connect() as s:
        assert st_.S_IMODE(os.stat(d.socket).st_mode) == 0o600  # the owner's alone without grants
        s.put("k", b"v")
        s._call(P.LOOKUP, {"ns": "default", "keys": ["k"]})  # never released
        assert s.stats()["leases"] == 1
        deadline = time.monotonic() + 10
        while s.stats()["leases"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.stats()["leases"] == 0
