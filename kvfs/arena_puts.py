"""Puts into a reservation of the arena: one message per batch.

A client with the arena (T0) mapped writable asks the daemon once for a
reservation (``reserve``: tens of MiB), places its values in it itself,
copies and hashes them, and sends the whole batch in one ``put_t0``
message: key, size, meta, where it put the bytes and their checksums. The
daemon carves each value out of the reservation, plans its write-back and
publishes it in T0. So a put costs one round trip (was two: alloc, then
commit), and a reservation round trip every tens of MiB.

The next reservation is asked for ahead (``keep``: the daemon keeps the
current one too) once the current one is half used, by a connection that
filled one before or a batch the current one will not hold, and its
answer is read with the put answers that come before it: a put that fills
one reservation goes on in the next without waiting for the daemon. (A
one-off batch asks nothing ahead: it would only pin arena space.)

Invariants:
- A connection fills one reservation (``Connection.reservation``) and holds
  at most one more, asked ahead (``Connection.ahead``, or its answer still
  to come). Values are placed at increasing offsets, following
  kvfs.format.arena_rounded (the daemon's allocator rules), and every
  put_t0 names the reservation it carves from. A reservation is given
  back (``release``) only after every put_t0 placed in it was sent; a
  ``reserve`` without ``keep`` ends all of the connection's reservations,
  and an answer asked ahead before it is then dropped unread
  (``Connection.res_epoch``).
- A refused ``reserve`` makes the connection put the other way (small host
  values inline, the rest into T1 extents) for ``REFUSED_BACKOFF_S``
  before it asks again (``Connection.refused_until``).
- The reservation belongs to the connection: a client that dies, or a
  connection that breaks, gives it back with the connection.
- Checksums are of the caller's bytes (as for alloc/commit puts): another
  writer scribbling on the arena before the daemon publishes makes the
  object fail verification, never pass as good.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import protocol as P
from .device_puts import fill_device
from .format import arena_rounded
from .gpu import DeviceBuffer

if TYPE_CHECKING:
    from .client_puts import Puts
    from .connection import Connection

log = logging.getLogger("kvfs")

# Reservation sizes: a connection's first is RESERVE_FIRST and each next one
# twice its last, up to RESERVE_MAX, or what the rest of the batch being put
# needs if that is more, up to BATCH_MAX (the daemon caps any reservation at
# half its arena): an idle thread pins little of the arena, a busy one asks
# rarely, and a large batch goes in few messages. What a batch leaves of a
# reservation past RESERVE_MAX goes back at its end (a reserve of 0 bytes,
# not waited for): else every connection that once put a large batch would
# keep up to half the arena from everyone else for as long as it lives.
RESERVE_FIRST = 4 << 20
RESERVE_MAX = 32 << 20
BATCH_MAX = 1 << 30
# After a refused reserve (the arena full of values not yet written back, or
# leased) a connection puts the other way without asking again for this
# long: the write-back frees room at disk speed, and each refusal is a round
# trip in front of a put that then still goes the other way.
REFUSED_BACKOFF_S = 0.005


@dataclass
class ArenaReservation:
    rid: int
    cursor: int  # where the next value may go
    end: int
    start: int  # where it began (its first value's offset at the earliest)

    @classmethod
    def of(cls, got: dict[str, Any]) -> "ArenaReservation":
        """The reservation a ``reserve`` answer grants."""
        off = int(got["off"])
        return cls(int(got["res"]), off, off + int(got["size"]), off)

    def half_used(self) -> bool:
        return 2 * (self.cursor - self.start) >= self.end - self.start

    def place(self, n: int) -> int:
        """An offset for ``n`` bytes, -1 if they do not fit."""
        need, align = arena_rounded(n)
        off = (self.cursor + align - 1) & ~(align - 1)
        if off + need > self.end:
            return -1
        self.cursor = off + need
        return off


def _ignore(_res: Any, _err: BaseException | None) -> None:
    pass


def _release(conn: "Connection", r: ArenaReservation) -> None:
    """Give ``r``'s rest back, not waited for (after the put_t0 messages that
    carve from it, which were sent first)."""
    conn.defer(P.RESERVE, {"bytes": 0, "release": [r.rid]}, _ignore)


def _want(conn: "Connection", need: int, batch_rest: int) -> int:
    want = max(conn.reserve_next, need + 4096, min(batch_rest, BATCH_MAX))
    conn.reserve_next = min(2 * conn.reserve_next, RESERVE_MAX)
    return want


def _ask_ahead(conn: "Connection", batch_rest: int) -> None:
    """Ask for the next reservation now; its answer is read later, with the
    put answers before it (``_take_ahead``). Not again after a refusal
    until a waited ``reserve`` succeeds: a full arena is not asked on
    every batch."""
    if conn.ahead is not None or conn.ahead_pending or conn.ahead_refused:
        return
    epoch = conn.res_epoch

    def on_reply(got: Any, err: BaseException | None) -> None:
        conn.ahead_pending = False
        if epoch != conn.res_epoch:
            return  # every reservation of the connection was ended since: this one too
        if err is None and isinstance(got, dict) and got.get("res"):
            conn.ahead = ArenaReservation.of(got)
        else:
            conn.ahead_refused = True
    conn.ahead_pending = True
    conn.defer(P.RESERVE, {"bytes": _want(conn, 0, batch_rest), "keep": True}, on_reply)


def _take_ahead(conn: "Connection") -> ArenaReservation | None:
    """The reservation asked ahead, its answer read if it is still to come
    (None: refused, or none was asked)."""
    while conn.ahead_pending and conn.deferred:
        conn.drain(1)
    r, conn.ahead = conn.ahead, None
    return r


def end_reservations(conn: "Connection") -> None:
    """Give back every reservation of the connection (a reserve of 0 bytes,
    not waited for), the one asked ahead included."""
    conn.defer(P.RESERVE, {"bytes": 0}, _ignore)
    conn.res_epoch += 1
    conn.reservation = conn.ahead = None
    conn.ahead_pending = False


def _reserve(conn: "Connection", arena: Any, n: int, batch_rest: int, populate: bool) -> ArenaReservation | None:
    """The next reservation, for a value of ``n`` bytes and, room allowing,
    the ``batch_rest`` bytes of the batch that follow it: the one asked
    ahead if it holds the value, else one asked for now (waited for).
    ``populate``: fault its pages in now (the CPU writes them; DMA into the
    registered arena needs no faults: registering pinned every page).
    None, with no round trip, while a refusal is recent (``REFUSED_BACKOFF_S``)."""
    if time.monotonic() < conn.refused_until:
        return None
    need, _a = arena_rounded(n)
    old = conn.reservation
    if old is not None:
        conn.refills += 1
    r = _take_ahead(conn)
    if r is not None and r.end - r.cursor >= need + 4096:
        if old is not None:
            _release(conn, old)
    else:
        conn.res_epoch += 1  # this reserve ends every reservation of the connection, r and old too
        conn.ahead_pending = False
        got = conn.call(P.RESERVE, {"bytes": _want(conn, need, batch_rest)})
        if not got.get("res"):
            conn.reservation = None
            conn.refused_until = time.monotonic() + REFUSED_BACKOFF_S
            return None  # the arena is full of values not yet written back: the caller puts the other way
        r = ArenaReservation.of(got)
        conn.ahead_refused = False
    conn.reservation = r
    if populate:
        arena.populate(r.cursor, r.end)
    return r


def put_reserved(store: "Puts", conn: "Connection", ns: str, items: list[list[Any]], views: list[Any],
                 sync: bool, wait: bool = True) -> list[bool | None]:
    """Put values through ``conn``'s reservation: host values a batch per
    message, device ones (all of ``views`` are, or none) pipelined by
    kvfs.device_puts. Returns per item stored (True), already there (False)
    or not taken (None: larger than a reservation, or the arena had no
    room: the caller puts those the other way). With ``wait`` False the
    answers are read later (``Connection.defer``): True then means sent,
    keys the directory already holds are not sent at all (False), and a
    refusal is logged and counted in ``put_errors``."""
    arena = store.arena
    assert arena is not None and arena.writable
    device = bool(views) and isinstance(views[0], DeviceBuffer)
    out: list[bool | None] = [None] * len(items)
    batch: list[int] = []
    offs: dict[int, int] = {}
    errors: list[BaseException] = []
    r: ArenaReservation | None = conn.reservation

    def message(sub: list[int], sums: list[tuple[bytes, list[bytes]]]) -> None:
        """One put_t0, its answer read later: a waiting put reads them all at
        its end, so the daemon publishes one message while the next one is
        being filled."""
        assert r is not None
        gen = store._locs.generation() if store._locs is not None else 0  # before the daemon publishes
        msg = [[items[i][0], items[i][1], items[i][2], offs[i], [w, cs]] for i, (w, cs) in zip(sub, sums)]
        sent = [(items[i][0], items[i][1], offs[i], w, cs) for i, (w, cs) in zip(sub, sums)]

        def on_reply(seqs: Any, err: BaseException | None) -> None:
            if err is not None:
                if wait:
                    errors.append(err)
                else:
                    store.put_errors += len(sent)
                    log.warning("kvfs: a put of %d values sent without waiting failed: %s", len(sent), err)
                return
            if wait:
                for i, seq in zip(sub, seqs):
                    out[i] = seq >= 0  # -1: already there
            store._remember_t0(ns, [(k, n, seq, off, w, cs) for (k, n, off, w, cs), seq in zip(sent, seqs)
                                    if seq >= 0], gen)
        conn.defer(P.PUT_T0, {"ns": ns, "res": r.rid, "items": msg, "sync": sync}, on_reply)
        if not wait:
            for i in sub:
                out[i] = True

    def send() -> None:
        if not batch or r is None:
            return
        if device:
            for a, b, sums in fill_device(store, arena, [views[i] for i in batch], [offs[i] for i in batch]):
                message(batch[a:b], sums)
        else:  # checksums of the caller's bytes, not of the copies
            dests = [arena.rw[offs[i]:offs[i] + len(views[i])] for i in batch]
            message(list(batch), store.reader.copy_hash_chunked(dests, [views[i] for i in batch], store.stripe_unit))
        batch.clear()

    skip: set[int] = set()
    if not wait and store._dir is not None:
        try:  # keys already stored are not copied, nor sent
            there, _seen = store._dir.contains(ns, [it[0] for it in items])
            skip = {i for i, hit in enumerate(there) if hit}
        except ValueError:
            pass
    full = False
    rest = sum(arena_rounded(len(v))[0] + 4096 for i, v in enumerate(views) if i not in skip)  # with alignment slack
    try:
        for i, v in enumerate(views):
            if i in skip:
                out[i] = False
                continue
            off = r.place(len(v)) if r is not None else -1
            if off < 0 and not full:
                send()
                r = _reserve(conn, arena, len(v), rest, not device)
                full = r is None
                off = r.place(len(v)) if r is not None else -1
            rest -= arena_rounded(len(v))[0] + 4096
            if off < 0:
                continue  # too large for a reservation, or no room: the other way
            offs[i] = off
            batch.append(i)
            if r is not None and r.half_used() and (conn.refills or rest > r.end - r.cursor):
                _ask_ahead(conn, rest)  # a connection that keeps putting, or a batch this one will not hold
        send()
        if r is not None and r.end - r.cursor > RESERVE_MAX:
            end_reservations(conn)  # after the messages that carve from it
    finally:
        if wait:
            conn.drain()  # what was sent is answered, even when a later part failed
    if errors:
        raise errors[0]
    return out


def put_one(store: "Puts", conn: "Connection", ns: str, key: str, view: memoryview, meta: bytes | None,
            sync: bool, wait: bool) -> bool | None:
    """``put_reserved`` of one non-empty host value that fits the rest of
    ``conn``'s reservation, without its batch bookkeeping (a lone waited
    put spent 40-50 us of client Python there on the 2-core VM, as much
    as the daemon's answer). None: not taken (no reservation, or no room
    in it): the caller puts it through ``put_reserved``, which asks for
    one. The same rules as ``put_reserved``: the same placement, message,
    asking ahead, and handling of answers."""
    r = conn.reservation
    if r is None:
        return None
    if not wait and store._dir is not None:
        try:  # a key already stored is not copied, nor sent
            if store._dir.contains(ns, [key])[0][0]:
                return False
        except ValueError:
            pass
    n = len(view)
    off = r.place(n)
    if off < 0:
        return None
    if r.half_used() and conn.refills:
        _ask_ahead(conn, 0)  # a connection that keeps putting
    arena = store.arena
    assert arena is not None and arena.writable
    # the checksums are of the caller's bytes, not of the copy
    w, cs = store.reader.copy_hash_chunked([arena.rw[off:off + n]], [view], store.stripe_unit)[0]
    locs = store._locs
    gen = locs.generation() if locs is not None else 0  # before the daemon publishes
    args = {"ns": ns, "res": r.rid, "items": [[key, n, meta, off, [w, cs]]], "sync": sync}
    if wait:
        seq = conn.call(P.PUT_T0, args)[0]
        if seq >= 0:
            store._remember_t0(ns, [(key, n, seq, off, w, cs)], gen)
        return seq >= 0

    def on_reply(seqs: Any, err: BaseException | None) -> None:
        if err is not None:
            store.put_errors += 1
            log.warning("kvfs: a put of 1 value sent without waiting failed: %s", err)
        elif seqs[0] >= 0:
            store._remember_t0(ns, [(key, n, seqs[0], off, w, cs)], gen)
    conn.defer(P.PUT_T0, args, on_reply)
    return True
