"""Extents reserved for a put that a caller fills itself (``Store.reserve``).

The write protocol's alloc/commit, handed to callers that move the bytes
with something other than kvfs's own data plane (NIXL's backends): the
daemon reserves room (T1 extents in segment files, or an arena extent in
T0), the caller writes the payloads there, and ``commit`` publishes them
with the checksums of the bytes the caller meant to write.

Invariants:
- Nothing is visible to any reader before ``commit``: the index commit is
  what publishes (kvfs.format's commit rule); an ``abort`` (or a
  reservation dropped with its connection) gives the room back.
- The checksums are of the caller's source bytes, never of what landed: if
  a transfer wrote other bytes, readers fail the checksum and miss; they
  never get those bytes as valid.
- A reservation lives on the store's hold connection (the daemon keeps a
  pending put per connection), so any thread may commit or abort it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import protocol as P
from .errors import KvfsError

if TYPE_CHECKING:
    from .client_puts import Puts
    from .connection import Connection


class Reservation:
    """Where each value of a put is to be written, until ``commit`` or
    ``abort``. ``items[i]``: None if the key is already stored (nothing to
    write; ``commit`` reports False for it), else ``[seq, chunks, t0]``:
    ``chunks`` = ``[[stripe, segment, payload offset, length], ...]`` (the
    value cut at the stripe unit), ``t0`` = the arena offset to fill instead
    (-1: fill the T1 chunks)."""

    def __init__(self, store: "Puts", conn: "Connection", ns: str, keys: list[str], sizes: list[int],
                 res: dict[str, Any], gen: int) -> None:
        self.store, self._conn, self.ns, self.keys, self.sizes = store, conn, ns, keys, sizes
        self._res = res
        self._gen = gen
        self.items: list[list[Any] | None] = list(res["items"])
        self.open = True

    def commit(self, sums: list[Any], *, sync: bool = False) -> list[bool]:
        """Publish. ``sums``: per item ``[object sum, [chunk sums]]`` (xxh3-128,
        16 bytes each; None for items that need none). Returns per item
        whether it was stored (False: it was already there). ``sync``:
        return only once on disk and in the index."""
        if not self.open:
            raise KvfsError("this reservation was already committed or aborted")
        self.open = False
        items = [[k, n, None] for k, n in zip(self.keys, self.sizes)]
        return self.store._commit(self.ns, self._gen, self._res, items, lambda: sums, sync,
                                  call=self._call)

    def abort(self) -> None:
        """Give the room back (at most once; never raises)."""
        if self.open:
            self.open = False
            try:
                self._call(P.ABORT, {"put": self._res["put"]})
            except KvfsError:
                pass  # a lost connection: the daemon dropped the pending put with it

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        with self.store._hold_lock:
            return self._conn.call(op, args)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
