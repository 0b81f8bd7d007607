"""A connection to the daemon's Unix socket: requests, answers in order,
answers read later (``defer``), and notifications that get none.

Invariants:
- answers come in request order; a connection whose answer did not match
  its request, or whose socket failed, is ``broken`` and never used again;
- at most MAX_DEFERRED answers wait to be read: past that the oldest is
  read first (backpressure on puts sent with ``wait=False``);
- a connection carries the arena reservation its puts are placed in
  (kvfs.arena_puts): it ends with the connection;
- bytes received but not yet parsed stay in its receive buffer, in order:
  a reply may arrive in pieces or together with the next one.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from . import native
from . import protocol as P
from .arena_puts import RESERVE_FIRST, ArenaReservation
from .errors import DaemonUnavailable, KvfsError, PermissionDenied, ProtocolError

log = logging.getLogger("kvfs")

# puts sent with wait=False whose answers a connection reads later, at most
# (each a batch): past that the oldest answer is waited for
MAX_DEFERRED = 64

# How long a caller polls for a reply before it sleeps (native/socket_wait.c
# says why): past that it blocks and costs no CPU. KVFS_POLL_US=0 turns
# polling off (a machine with fewer cores than busy threads).
POLL_NS = int(float(os.environ.get("KVFS_POLL_US", "200")) * 1000)
RECV_BUF = 64 << 10  # the receive buffer kept between replies; a larger reply grows it for itself


class Connection:
    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except PermissionError:
            self.sock.close()
            raise PermissionDenied(f"uid {os.getuid()} may not connect to {path}: a kvfs daemon admits only its "
                                   f"own user, root, and those its --allow-uid/--allow-gid name") from None
        except OSError as e:
            self.sock.close()
            raise DaemonUnavailable(path, e.strerror or str(e)) from None
        self.next_id = 1
        self.broken = False
        self.answered = 0  # replies received: a connection that worked, then broke, was cut (a restart)
        self.reservation: ArenaReservation | None = None  # arena space this connection places puts in
        self.owner = threading.current_thread()  # a connection is one thread's (kvfs.session: _new_conn)
        self.reserve_next = RESERVE_FIRST  # the size of its next reservation (kvfs.arena_puts)
        self.ahead: ArenaReservation | None = None  # the next reservation, asked ahead (kvfs.arena_puts)
        self.ahead_pending = False  # its answer is still to be read
        self.ahead_refused = False  # the last one asked ahead was refused (the arena was full)
        self.refused_until = 0.0  # monotonic time before which a refused connection does not ask (kvfs.arena_puts)
        self.res_epoch = 0  # bumped whenever every reservation of the connection ends
        self.refills = 0  # reservations it filled and moved on from
        self.deferred: deque[tuple[int, Callable[[Any, BaseException | None], None]]] = deque()
        self.poll_ns = POLL_NS
        self._rbuf = bytearray(RECV_BUF)
        self._rlo = self._rhi = 0  # the unparsed bytes are _rbuf[_rlo:_rhi]

    def _fill(self, need: int) -> None:
        """Receive until at least ``need`` unparsed bytes are buffered, as
        many per call as have arrived (usually a whole reply in one)."""
        if self._rlo + need > len(self._rbuf):  # move what is left to the front, growing for a large reply
            rest = self._rbuf[self._rlo:self._rhi]
            self._rbuf = bytearray(max(RECV_BUF, need))
            self._rbuf[:len(rest)] = rest
            self._rlo, self._rhi = 0, len(rest)
        view = memoryview(self._rbuf)
        while self._rhi - self._rlo < need:
            k = native.backend.recv_spin(self.sock, view[self._rhi:], self.poll_ns)
            if k == 0:
                raise ConnectionResetError("daemon closed the connection")
            self._rhi += k

    def _read_reply(self) -> bytes:
        """The next reply's message (msgpack), from the buffer or the socket."""
        self._fill(P.PREFIX.size)
        mlen, _ = P.parse_prefix(bytes(self._rbuf[self._rlo:self._rlo + P.PREFIX.size]))
        self._fill(P.PREFIX.size + mlen)
        start = self._rlo + P.PREFIX.size
        body = bytes(self._rbuf[start:start + mlen])
        self._rlo = start + mlen
        if self._rlo == self._rhi:
            self._rlo = self._rhi = 0
            if len(self._rbuf) > RECV_BUF:
                self._rbuf = bytearray(RECV_BUF)  # a large reply does not keep its buffer
        return body

    def call(self, op: str, args: dict[str, Any], trailer: Sequence[memoryview] = ()) -> Any:
        if self.deferred:
            self.drain()  # answers come in order: theirs first
        if self.broken:
            raise DaemonUnavailable(self.path, "connection lost")
        req_id = self.next_id
        self.next_id += 1
        tlen = sum(len(t) for t in trailer)
        frame = P.request(req_id, op, args, tlen)
        try:
            if tlen and tlen < 65536:
                self.sock.sendall(frame + b"".join(bytes(t) for t in trailer))
            else:
                self.sock.sendall(frame)
                for t in trailer:
                    if len(t):
                        self.sock.sendall(t)
            body = self._read_reply()
        except OSError as e:
            self.broken = True
            raise DaemonUnavailable(self.path, f"connection lost: {e}") from None
        except ProtocolError:
            self.broken = True  # a bad frame prefix: nothing after it can be trusted
            raise
        rid, result = P.parse_reply(body)
        if rid != req_id:
            self.broken = True
            raise ProtocolError(f"reply to request {rid}, expected {req_id}")
        self.answered += 1
        return result

    def defer(self, op: str, args: dict[str, Any], on_reply: Callable[[Any, BaseException | None], None]) -> None:
        """Send a request and go on: its answer is read by the next call on
        this connection (or ``drain``) and handed to ``on_reply(result,
        error)``. At most MAX_DEFERRED wait: past that the oldest is read
        first (backpressure)."""
        if self.broken:
            raise DaemonUnavailable(self.path, "connection lost")
        while len(self.deferred) >= MAX_DEFERRED:
            self.drain(1)
        req_id = self.next_id
        self.next_id += 1
        try:
            self.sock.sendall(P.request(req_id, op, args))
        except OSError as e:
            self.broken = True
            raise DaemonUnavailable(self.path, f"connection lost: {e}") from None
        self.deferred.append((req_id, on_reply))

    def drain(self, n: int | None = None) -> None:
        """Read the answers of deferred requests (all, or the ``n`` oldest)
        and hand them over. A lost connection fails every one still waiting."""
        while self.deferred and (n is None or n > 0):
            req_id, on_reply = self.deferred.popleft()
            if n is not None:
                n -= 1
            try:
                if self.broken:
                    raise DaemonUnavailable(self.path, "connection lost")
                body = self._read_reply()
            except (OSError, DaemonUnavailable, ProtocolError) as e:
                self.broken = True
                on_reply(None, e if isinstance(e, KvfsError) else DaemonUnavailable(self.path, str(e)))
                continue
            try:
                rid, result = P.parse_reply(body)
            except KvfsError as e:
                on_reply(None, e)
                continue
            if rid != req_id:
                self.broken = True
                on_reply(None, ProtocolError(f"reply to request {rid}, expected {req_id}"))
                continue
            self.answered += 1
            on_reply(result, None)

    def notify(self, op: str, args: dict[str, Any]) -> None:
        """A request with id 0: no reply (lease releases)."""
        if self.broken:
            return
        try:
            self.sock.sendall(P.request(0, op, args))
        except OSError:
            self.broken = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def default_socket_path() -> str:
    env = os.environ.get("KVFS_SOCKET")
    if env:
        return env
    root = os.environ.get("KVFS_ROOT") or str(Path.home() / ".kvfs")
    return str(Path(root) / "kvfs.sock")
