"""Extent allocator for the shared-memory arena (pure: no I/O, no threads;
the engine guards it with its lock).

Best fit over a size-ordered list of free extents, with coalescing of
neighbours on free, so a long mix of large and small values does not shred
the arena. Extents of values of 64 KiB and more start on a 4 KiB boundary
(page-aligned DMA from the arena to a GPU, and copies that do not straddle
pages needlessly); smaller ones on 64 bytes (a cache line). Sizes are rounded
up to the alignment, so every free extent starts 64-byte aligned.

Invariants: free extents never overlap or touch (touching ones are merged);
``used + free == size``; an offset handed out is never handed out again
until it is freed.

``new_allocator`` makes the C type of the data plane in use when it is
built (native/arena_alloc.c: a carve per T0 put and a free per eviction
cost about a microsecond each in Python); ``PyArenaAllocator`` is its twin
and its definition.
"""
from __future__ import annotations

from bisect import bisect_left, insort

from kvfs import native

from kvfs.format import ARENA_LARGE_ALIGN as LARGE_ALIGN
from kvfs.format import ARENA_LARGE_MIN as LARGE_MIN
from kvfs.format import ARENA_SMALL_ALIGN as SMALL_ALIGN
from kvfs.format import arena_rounded


def _up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class ArenaFull(Exception):
    """No free extent can hold the request (after any eviction the caller did)."""


class PyArenaAllocator:
    def __init__(self, size: int):
        if size < 0:
            raise ValueError("arena size must be >= 0")
        self.size = size - size % SMALL_ALIGN
        self._free_by_off: dict[int, int] = {}  # offset -> length
        self._offs: list[int] = []  # sorted offsets of free extents
        self._by_size: list[tuple[int, int]] = []  # sorted (length, offset)
        self._used: dict[int, int] = {}  # offset -> rounded length handed out
        self.used = 0
        if self.size:
            self._add_free(0, self.size)

    @staticmethod
    def rounded(n: int) -> tuple[int, int]:
        """(bytes taken, alignment) for a value of ``n`` bytes (kvfs.format:
        clients placing their own values follow the same rule)."""
        return arena_rounded(n)

    def _add_free(self, off: int, length: int) -> None:
        self._free_by_off[off] = length
        insort(self._offs, off)
        insort(self._by_size, (length, off))

    def _del_free(self, off: int) -> int:
        length = self._free_by_off.pop(off)
        del self._offs[bisect_left(self._offs, off)]
        del self._by_size[bisect_left(self._by_size, (length, off))]
        return length

    def alloc(self, n: int) -> int:
        """Offset of a new extent for ``n`` bytes; raises ArenaFull."""
        need, align = self.rounded(n)
        i = bisect_left(self._by_size, (need, -1))
        while i < len(self._by_size):
            length, off = self._by_size[i]
            start = _up(off, align)
            if start + need <= off + length:
                self._del_free(off)
                if start > off:
                    self._add_free(off, start - off)
                tail = off + length - (start + need)
                if tail:
                    self._add_free(start + need, tail)
                self._used[start] = need
                self.used += need
                return start
            i += 1
        raise ArenaFull(f"no free extent of {need} bytes (free {self.free_bytes} in "
                        f"{len(self._offs)} extents, largest {self.largest_free})")

    def free(self, off: int) -> None:
        length = self._used.pop(off, None)
        if length is None:
            raise ValueError(f"offset {off} is not allocated")
        self.used -= length
        # merge with the free neighbours on both sides
        i = bisect_left(self._offs, off)
        if i < len(self._offs) and self._offs[i] == off + length:
            length += self._del_free(off + length)
        if i > 0:
            prev = self._offs[i - 1]
            if prev + self._free_by_off[prev] == off:
                plen = self._del_free(prev)
                off, length = prev, plen + length
        self._add_free(off, length)

    def free_many(self, offs: list[int]) -> None:
        """``free`` of each, in order (one call for an eviction round)."""
        for off in offs:
            self.free(off)

    def carve(self, rest: int, off: int, n: int) -> int:
        """Inside the used extent at ``rest`` (what is left of a client's
        reservation), make ``[off, off + rounded(n))`` a used extent of its
        own, as if ``alloc`` had placed it there: the bytes between ``rest``
        and ``off`` are freed, those after it stay the reservation's rest.
        Returns the rest's new start (its end when nothing is left). Raises
        ValueError for a placement ``alloc`` would not make (misaligned,
        before the rest, past its end), changing nothing."""
        length = self._used.get(rest)
        if length is None:
            raise ValueError(f"no reservation rest at {rest}")
        end = rest + length
        align = LARGE_ALIGN if n >= LARGE_MIN else SMALL_ALIGN  # rounded(n), inline: once per T0 put
        need = (max(n, 1) + align - 1) & ~(align - 1)
        if off % align or off < rest or off + need > end:
            raise ValueError(f"{n} bytes at {off} are not inside the reservation [{rest}, {end}) "
                             f"on a {align}-byte boundary")
        del self._used[rest]
        self._used[off] = need
        if off > rest:
            self._used[rest] = off - rest
            self.free(rest)  # the gap the client skipped
        if off + need < end:
            self._used[off + need] = end - off - need
        return off + need

    def extent_len(self, off: int) -> int:
        return self._used[off]

    @property
    def free_bytes(self) -> int:
        return self.size - self.used

    @property
    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    @property
    def free_extents(self) -> int:
        return len(self._offs)

    def check(self) -> None:
        """Assert the invariants (tests)."""
        spans = sorted([(o, l, "f") for o, l in self._free_by_off.items()] +
                       [(o, l, "u") for o, l in self._used.items()])
        pos = 0
        prev_kind = ""
        for o, l, kind in spans:
            assert o >= pos, f"overlap at {o}"
            assert not (kind == prev_kind == "f" and o == pos), f"unmerged free extents at {o}"
            pos, prev_kind = o + l, kind
        assert pos <= self.size
        assert sum(self._free_by_off.values()) + self.used == self.size
        assert self._offs == sorted(self._free_by_off)
        assert self._by_size == sorted((l, o) for o, l in self._free_by_off.items())


def new_allocator(size: int) -> PyArenaAllocator:
    """The arena allocator of the data plane in use (raising ArenaFull when
    full): the C type, or its twin. Chosen per call: tests make both."""
    native_type = getattr(native.backend, "ArenaAllocator", None)
    if native_type is None:
        return PyArenaAllocator(size)
    alloc: PyArenaAllocator = native_type(size, ArenaFull)
    return alloc
