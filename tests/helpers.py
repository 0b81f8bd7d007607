"""Helpers shared by the tests: deterministic values (the bytes of key i can
be recomputed anywhere), call counting, raw replies, on-disk corruption."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import sys
import threading


def value_for(i: int, max_size: int = 300_000) -> bytes:
    size = int.from_bytes(hashlib.sha256(b"size%d" % i).digest()[:4], "little") % max_size
    seed = hashlib.sha256(b"val%d" % i).digest()
    reps = size // len(seed) + 1
    # vary every 32-byte block so a misplaced block cannot compare equal
    return b"".join(hashlib.sha256(seed + b"%d" % j).digest() for j in range(reps))[:size]


def count_calls(obj, method: str = "_call"):
    """Record the ops a Store sends to the daemon (in a list it returns);
    with ``method="call"`` on a Connection, the ops it waits for an answer
    to (``call``, not ``defer``)."""
    calls = []
    orig = getattr(obj, method)

    def counting(op, args, trailer=()):
        calls.append(op)
        return orig(op, args, trailer)
    setattr(obj, method, counting)
    return calls


def recv_reply(s):
    """Read one reply frame from a raw socket; None if the daemon closed it."""
    import msgpack

    from kvfs import protocol as P

    hdr = b""
    while len(hdr) < 16:
        chunk = s.recv(16 - len(hdr))
        if not chunk:
            return None
        hdr += chunk
    mlen, _ = P.parse_prefix(hdr)
    body = b""
    while len(body) < mlen:
        body += s.recv(mlen - len(body))
    return msgpack.unpackb(body, raw=False)


def put_and_corrupt(s, key: str, ns: str, size: int, at: int) -> bytes:
    """Store ``size`` random bytes under ``key``, then flip one byte of the
    stored record at payload offset ``at`` (on disk, as bit rot would)."""
    data = os.urandom(size)
    s.put(key, data, ns=ns)
    path, off, _n = s.stat(key, ns=ns).extents[0]
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, off + at)[0] ^ 0xFF]), off + at)
    finally:
        os.close(fd)
    return data


@contextlib.contextmanager
def churning(d, step):
    """Run ``step(client, i)`` for i = 0, 1, ... on a thread with its own
    client of daemon ``d`` while the block runs; its first error is raised
    at the end of the block."""
    stop = threading.Event()
    errors = []

    def loop():
        try:
            with d.connect() as w:
                i = 0
                while not stop.is_set():
                    step(w, i)
                    i += 1
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    t = threading.Thread(target=loop)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
    if errors:
        raise errors[0]


class FakeDeviceArray:
    """Host memory that presents itself as device memory
    (``__cuda_array_interface__``), like a CuPy array would."""

    def __init__(self, n: int, fill: bytes | None = None):
        self.buf = (ctypes.c_char * max(n, 1))()
        self.n = n
        if fill is not None:
            ctypes.memmove(self.buf, fill, n)

    @property
    def __cuda_array_interface__(self):
        return {"shape": (self.n,), "typestr": "|u1", "data": (ctypes.addressof(self.buf), False),
                "version": 3, "strides": None}

    def bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self.buf), self.n)


# Runs `kvfs ARGS...` with the modules named in argv[1] unimportable.
HIDDEN_CLI = r"""
import sys
hidden = set(sys.argv[1].split(","))
def is_hidden(name):
    return any(name == h or name.startswith(h + ".") for h in hidden)
for name in list(sys.modules):
    if is_hidden(name):
        del sys.modules[name]
class Hide:
    def find_spec(self, name, path=None, target=None):
        if is_hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
from kvfstools.cli import main
sys.exit(main(sys.argv[2:]))
"""


def kvfs_without(modules, *argv, timeout=120, env=None):
    return subprocess.run([sys.executable, "-c", HIDDEN_CLI, ",".join(modules), *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)


BOTH_MOUNTS = ["pyfuse3", "kvfsd._cfuse"]  # the pyfuse3 mount's module, and the C mount's
