"""The arena allocator (pure): alignment, best fit, coalescing, exhaustion;
the C type (native/arena_alloc.c) and its Python twin alike."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from kvfs import native
from kvfsd.arena_alloc import LARGE_ALIGN, LARGE_MIN, SMALL_ALIGN, ArenaFull, PyArenaAllocator, new_allocator

KiB, MiB = 1024, 1 << 20


def _c(size):
    return native.backend.ArenaAllocator(size, ArenaFull)


IMPLS = [pytest.param(PyArenaAllocator, id="python"),
         pytest.param(_c, id="native", marks=pytest.mark.skipif(native.name != "native",
                                                                reason="the C data plane is not built"))]


@pytest.mark.skipif(native.name != "native", reason="the C data plane is not built")
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("aafcx"), st.integers(0, 600 * KiB), st.integers(0, 2**32)),
                min_size=1, max_size=400))
def test_the_c_allocator_answers_as_its_twin(ops):
    """Every operation, error or not, gives the same answer and leaves the
    same state in C and in Python (alloc, free, carve of reservations, bad
    offsets, bad placements)."""
    size = 4 * MiB + 192  # not a multiple of a page: the last extent is odd
    c, py = _c(size), PyArenaAllocator(size)
    live: list[int] = []
    rests: list[int] = []

    def both(f):
        out = []
        for a in (c, py):
            try:
                out.append(("ok", f(a)))
            except (ArenaFull, ValueError, KeyError) as e:
                out.append((type(e).__name__, str(e)))
        assert out[0] == out[1]
        return out[0]

    for kind, n, r in ops:
        if kind == "a" or not live:
            st_, off = both(lambda a: a.alloc(n))
            if st_ == "ok":
                (rests if r % 3 == 0 else live).append(off)
        elif kind == "f" and r % 4:
            off = live.pop(r % len(live))
            both(lambda a: a.free(off))
        elif kind == "f":  # free_many, with a bad offset in the middle now and then
            offs = [live.pop(r % len(live)) for _ in range(min(len(live), 1 + r % 5))]
            both(lambda a: a.free_many(offs[:1] + [r % size] + offs[1:] if r % 8 == 0 else offs))
        elif kind == "c" and rests:
            i = r % len(rests)
            rest = rests[i]
            off = rest + (r >> 8) % 3 * 64 * (1 if n < LARGE_MIN else 64)
            st_, new = both(lambda a: a.carve(rest, off, n))
            if st_ == "ok":
                live.append(off)
                rests[i] = new
        else:
            both(lambda a: a.free(r % size))  # mostly not an extent: the same error
            both(lambda a: a.extent_len(r % size))
        assert (c.used, c.free_bytes, c.largest_free, c.free_extents) == \
            (py.used, py.free_bytes, py.largest_free, py.free_extents)
        c.check()
        py.check()


@pytest.mark.parametrize("Alloc", IMPLS)
def test_many_small_extents_then_all_back(Alloc):
    """Thousands of extents handed out and freed in random order (the C
    type's table of extents grows and shrinks through them)."""
    a = Alloc(8 * MiB)
    offs = [a.alloc(100 + i % 7) for i in range(20000)]
    assert len(set(offs)) == len(offs) and a.used == 20000 * 128
    rnd = random.Random(5)
    rnd.shuffle(offs)
    for i, off in enumerate(offs):
        a.free(off)
        if i % 4000 == 0:
            a.check()
    a.check()
    assert a.used == 0 and a.free_extents == 1 and a.largest_free == a.size


def test_the_daemon_gets_the_data_planes_allocator():
    a = new_allocator(MiB)
    assert type(a).__name__ == ("ArenaAllocator" if native.name == "native" else "PyArenaAllocator")
    with pytest.raises(ArenaFull):
        a.alloc(2 * MiB)


@pytest.mark.parametrize("Alloc", IMPLS)
def test_alignment_small_and_large(Alloc):
    a = Alloc(16 * MiB)
    offs = [a.alloc(n) for n in (1, 100, 65 * KiB, 3, LARGE_MIN, 5 * MiB, 777)]
    for n, off in zip((1, 100, 65 * KiB, 3, LARGE_MIN, 5 * MiB, 777), offs):
        assert off % (LARGE_ALIGN if n >= LARGE_MIN else SMALL_ALIGN) == 0
        assert off + n <= a.size
    a.check()


@pytest.mark.parametrize("Alloc", IMPLS)
def test_extents_never_overlap(Alloc):
    a = Alloc(4 * MiB)
    got = []
    for n in [1, 5000, 64 * KiB, 100, 200 * KiB, 64, 65]:
        off = a.alloc(n)
        got.append((off, off + n))
    got.sort()
    assert all(e <= s for (_s0, e), (s, _e1) in zip(got, got[1:]))


@pytest.mark.parametrize("Alloc", IMPLS)
def test_exhaustion_is_a_clear_error(Alloc):
    a = Alloc(1 * MiB)
    a.alloc(700 * KiB)
    with pytest.raises(ArenaFull, match="no free extent of"):
        a.alloc(400 * KiB)
    with pytest.raises(ValueError, match="not allocated"):
        a.free(12345)


@pytest.mark.parametrize("Alloc", IMPLS)
def test_fragmentation_then_coalescing(Alloc):
    a = Alloc(64 * MiB)
    offs = [a.alloc(MiB) for _ in range(64)]
    with pytest.raises(ArenaFull):
        a.alloc(1)
    for off in offs[::2]:  # free every other one: 32 MiB free in 1 MiB holes
        a.free(off)
    assert a.free_bytes == 32 * MiB and a.largest_free == MiB
    with pytest.raises(ArenaFull):
        a.alloc(2 * MiB)  # no hole is big enough
    for off in offs[1::2]:
        a.free(off)
    a.check()
    assert a.free_extents == 1 and a.largest_free == a.size  # all merged back
    assert a.alloc(64 * MiB) == 0


@pytest.mark.parametrize("Alloc", IMPLS)
def test_best_fit_keeps_large_holes_for_large_values(Alloc):
    a = Alloc(16 * MiB)
    small_hole = a.alloc(128 * KiB)
    a.alloc(4 * KiB)  # separator
    big_hole = a.alloc(8 * MiB)
    a.alloc(4 * KiB)
    a.free(small_hole)
    a.free(big_hole)
    assert a.alloc(100 * KiB) == small_hole  # the tight hole, not the big one
    assert a.alloc(8 * MiB) == big_hole


@pytest.mark.parametrize("Alloc", IMPLS)
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * MiB)), min_size=1, max_size=300),
       st.integers(0, 2**32))
def test_random_alloc_free_keeps_invariants(Alloc, ops, seed):
    rnd = random.Random(seed)
    a = Alloc(32 * MiB)
    live: dict[int, int] = {}
    for do_alloc, n in ops:
        if do_alloc or not live:
            try:
                off = a.alloc(n)
            except ArenaFull:
                assert a.largest_free < Alloc.rounded(n)[0] + LARGE_ALIGN
                continue
            assert all(off + n <= o or o + l <= off for o, l in live.items())
            live[off] = n
        else:
            off = rnd.choice(list(live))
            del live[off]
            a.free(off)
        a.check()
    for off in list(live):
        a.free(off)
    a.check()
    assert a.used == 0 and a.free_extents == 1


@pytest.mark.parametrize("Alloc", IMPLS)
def test_a_reservation_is_carved_into_values_and_its_rest_given_back(Alloc):
    """What a client's arena reservation becomes: each value it placed is
    an extent of its own (freed alone later), skipped bytes are free at
    once, and the rest goes back when the reservation ends."""
    a = Alloc(1 << 20)
    other = a.alloc(100)
    res = a.alloc(256 * 1024)
    end = res + 256 * 1024
    rest = a.carve(res, res, 1000)  # a small value at the start
    assert rest == res + 1024 and a.extent_len(res) == 1024
    big = res + 64 * 1024  # a 64 KiB value on a page boundary, after a skipped gap
    rest = a.carve(rest, big, 64 * 1024)
    assert rest == big + 64 * 1024 and a.extent_len(big) == 64 * 1024
    with pytest.raises(ValueError):
        a.carve(rest, rest + 100, 64 * 1024)  # a large value must start on a page
    with pytest.raises(ValueError):
        a.carve(rest, res, 64)  # before the rest: already the client's or freed
    with pytest.raises(ValueError):
        a.carve(rest, end - 64, 128)  # past the reservation
    a.check()
    assert a.used == a.extent_len(other) + 256 * 1024 - (big - res - 1024)  # the gap went back; the rest is held
    a.free(rest)  # the reservation ends
    a.free(res)
    a.free(big)
    a.free(other)
    a.check()
    assert a.used == 0 and a.free_extents == 1


def test_the_arena_file_is_allocated_whole_or_refused(tmp_path):
    """The arena's pages are taken from tmpfs at start, so a /dev/shm that
    fills later cannot SIGBUS a write to it; an arena tmpfs cannot hold is a
    clear error that leaves no file behind. (A small tmpfs of our own stands
    for /dev/shm: mounting it needs root, which CI is.)"""
    import os
    import subprocess

    from kvfs.errors import InvalidArgument
    from kvfsd import arena
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(shm)], check=True)
    try:
        a = arena.Arena(tmp_path / "root", 4 << 20, shm_dir=shm)
        assert os.stat(a.path).st_blocks * 512 >= 4 << 20  # every page held, none left to a first touch
        with pytest.raises(InvalidArgument, match="cannot hold"):
            arena.Arena(tmp_path / "other", 6 << 20, shm_dir=shm)  # 4 + 6 > 8 MiB
        assert sorted(p.name for p in shm.iterdir()) == [a.path.name]
        a.close()
    finally:
        subprocess.run(["umount", str(shm)], check=True)


def test_a_huge_page_tmpfs_gives_the_arena_2mib_pages(tmp_path):
    """On a tmpfs mounted huge=advise (what the README's tuning section asks
    of /dev/shm, or of a tmpfs given with --shm-dir) the arena asks for and
    gets 2 MiB pages, and a client's mapping of it maps them as such; on a
    plain tmpfs it gets none. (Needs root to mount, which CI is, and a
    kernel with transparent huge pages.)"""
    import subprocess
    from pathlib import Path

    from kvfs.session import ArenaMapping
    from kvfsd import arena
    if not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        pytest.fail("this kernel has no transparent huge pages: the test cannot run here")
    for opt, huge in (("huge=advise", True), ("huge=never", False)):
        shm = tmp_path / opt.replace("=", "-")
        shm.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64m,{opt}", "tmpfs", str(shm)], check=True)
        try:
            a = arena.Arena(tmp_path / "root", 16 << 20, shm_dir=shm)
            try:
                assert (a.huge_bytes() >= 8 << 20) == huge, (opt, a.huge_bytes())
                a.view[:] = b"\x01" * len(a.view)  # every page touched
                m = ArenaMapping(str(a.path), a.size, writable=False)
                try:
                    assert sum(m.ro[(1 << 20) * i] for i in range(16)) == 16  # touch each MiB
                    assert (arena.huge_bytes(a.path) >= 2 * (8 << 20)) == huge  # the daemon's and the client's
                finally:
                    m.close()
            finally:
                a.close()
        finally:
            subprocess.run(["umount", "-l", str(shm)], check=True)  # lazily: a failed assertion may leave a mapping
