"""Puts into a reservation of the arena: one message per batch.

A client with the arena (T0) mapped writable asks the daemon once for a
reservation (``reserve``: tens of MiB), places its values in it itself,
copies and hashes them, and sends the whole batch in one ``put_t0``
message: key, size, meta, where it put the bytes and their checksums. The
daemon carves each value out of the reservation, plans its write-back and
publishes it in T0. So a put costs one round trip (was two: alloc, then
commit), and a reservation round trip every tens of MiB.

Invariants:
- A connection has at most one reservation; values are placed in it at
  increasing offsets, following kvfs.format.arena_rounded (the daemon's
  allocator rules), and every put_t0 on it names it. Asking for a new one
  ends the old one (the daemon frees its rest), so a batch is sent before
  the next reservation is asked for.
- The reservation belongs to the connection: a client that dies, or a
  connection that breaks, gives it back with the connection.
- Checksums are of the caller's bytes (as for alloc/commit puts): another
  writer scribbling on the arena before the daemon publishes makes the
  object fail verification, never pass as good.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import protocol as P
from .device_puts import fill_device
from .format import arena_rounded
from .gpu import DeviceBuffer, address_of

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


@dataclass
class ArenaReservation:
    rid: int
    cursor: int  # where the next value may go
    end: int

    def place(self, n: int) -> int:
        """An offset for ``n`` bytes, -1 if they do not fit."""
        need, align = arena_rounded(n)
        off = (self.cursor + align - 1) & ~(align - 1)
        if off + need > self.end:
            return -1
        self.cursor = off + need
        return off


MADV_POPULATE_WRITE = 23  # Linux 5.14+: map (and fault in) a range's pages in one call
_libc: Any = None


def _populate(view: memoryview) -> None:
    """Fault in this process's pages of a new reservation at once: the first
    write to each arena page costs a page fault per process (about half of
    a 64 KiB put's copy), and one madvise over the range costs far less
    than the faults it saves. Nothing happens where the kernel has no such
    advice."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.madvise(ctypes.c_void_p(address_of(view)), ctypes.c_size_t(len(view)), MADV_POPULATE_WRITE)


def _reserve(conn: "Connection", arena: Any, n: int, batch_rest: int, populate: bool) -> ArenaReservation | None:
    """A new reservation for a value of ``n`` bytes and, room allowing, the
    ``batch_rest`` bytes of the batch that follow it. ``populate``: fault
    its pages in now (the CPU writes them; DMA into the registered arena
    needs no faults: registering pinned every page)."""
    need, _a = arena_rounded(n)
    want = max(conn.reserve_next, need + 4096, min(batch_rest, BATCH_MAX))
    conn.reserve_next = min(2 * conn.reserve_next, RESERVE_MAX)
    got = conn.call(P.RESERVE, {"bytes": want})
    if not got.get("res"):
        conn.reservation = None
        return None  # the arena is full of values not yet written back: the caller uses alloc/commit
    r = ArenaReservation(int(got["res"]), int(got["off"]), int(got["off"]) + int(got["size"]))
    conn.reservation = r
    if populate:
        lo = r.cursor & ~4095
        _populate(arena.rw[lo:r.end])
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
        send()
        if r is not None and r.end - r.cursor > RESERVE_MAX:
            conn.defer(P.RESERVE, {"bytes": 0}, lambda _res, _err: None)  # after the messages that carve from it
            conn.reservation = None
    finally:
        if wait:
            conn.drain()  # what was sent is answered, even when a later part failed
    if errors:
        raise errors[0]
    return out
