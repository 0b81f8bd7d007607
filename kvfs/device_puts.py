"""Device values into an arena reservation: DMA queued at once, sent as they land.

A put_many of device buffers, with the arena mapped writable, places every
value in the connection's reservation (kvfs.arena_puts) without asking the
daemon, queues all their device-to-host copies on the copy stream straight
into the (registered) arena, and has the GPU hash the sources on another
stream. It then walks the batch in sub-batches: wait for one's copies, send
its put_t0, go on while the daemon publishes it. So the daemon's per-object
work runs under the DMA of the values behind it, and a batch costs the
copy plus one sub-batch's publish (was: an alloc and a commit round trip
per sub-batch, the daemon's allocation work in series with the copies).

Invariants:
- a value's put_t0 is sent only after its copy has landed (the daemon's
  write-back reads the arena from the moment it publishes);
- checksums are of the source bytes where the GPU hashes them, and of the
  landed copy only for values it cannot hash (unaligned or tiny), as in
  kvfs.client_puts;
- on any failure, this thread's copy stream is drained before the error
  goes up: no DMA can land in arena space the daemon later hands to
  someone else.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

import xxhash

from .errors import ProtocolError
from .gpu import SRC, DeviceBuffer, merge_copies

if TYPE_CHECKING:
    from .client_puts import Puts

# a sub-batch (one put_t0) holds at most this many bytes and values: the
# last sub-batch's publish is what a batch adds to its copies, and the GPU
# hashes a sub-batch per job (several large values at once: a value's
# whole-value sum is one sequential chain)
SUB_BYTES = 256 << 20
SUB_ITEMS = 32
# values the GPU does not hash are hashed on the host by the pool in groups
# of about this many bytes (one thread each; a value is one pass)
HOST_HASH_GROUP = 8 << 20


def sub_batches(sizes: Sequence[int], max_bytes: int, max_items: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of at most ``max_bytes`` and ``max_items``
    (at least one item each)."""
    out: list[tuple[int, int]] = []
    a, acc = 0, 0
    for i, n in enumerate(sizes):
        if i > a and (acc + n > max_bytes or i - a >= max_items):
            out.append((a, i))
            a, acc = i, 0
        acc += n
    if a < len(sizes):
        out.append((a, len(sizes)))
    return out


def _hash_landed(store: "Puts", copier: Any, ev: Any, views: list[memoryview]) -> list[tuple[bytes, list[bytes]]]:
    copier.wait(ev)
    return store.reader.hash_chunked(views, store.stripe_unit, 1)


def fill_device(store: "Puts", arena: Any, views: Sequence[DeviceBuffer], offs: Sequence[int]
                ) -> Iterator[tuple[int, int, list[tuple[bytes, list[bytes]]]]]:
    """Copy ``views`` to their arena offsets ``offs``; yields (a, b, sums)
    for each sub-batch [a, b) once its bytes are in the arena, sums as
    [(object sum, [chunk sums])]."""
    gpu = store._gpu_plane()
    unit = store.stripe_unit
    base = gpu.arena_address(arena)  # registered with CUDA on first use
    after = gpu.producer_events(list(views))
    copier = gpu.copier
    hasher = gpu.hasher()
    subs = sub_batches([len(v) for v in views], SUB_BYTES, SUB_ITEMS)
    try:
        copier.wait_on_stream(after)  # no copy of a tensor its kernel is still writing
        landed: list[Any] = []
        jobs: list[tuple[list[int], Any, Any]] = []
        for a, b in subs:
            for dst, src, n in merge_copies([(base + offs[i], views[i].ptr, len(views[i])) for i in range(a, b)],
                                             copier.allocation, SRC):
                copier.d2h(dst, src, n)
            ev = copier.record()
            landed.append(ev)
            on_gpu = [i for i in range(a, b) if hasher is not None and hasher.usable(views[i].ptr, len(views[i]))]
            job = hasher.start([(views[i].ptr, len(views[i])) for i in on_gpu], unit, after) if on_gpu else None
            gpu.counters["device_hashed_values"] += len(on_gpu)
            # what the GPU cannot hash (unaligned or tiny): the landed copies,
            # by the pool, each sub-batch as soon as it has landed
            hashed = set(on_gpu)
            rest = [i for i in range(a, b) if i not in hashed]
            host = [(rest[c:d], gpu.pool().submit(_hash_landed, store, copier, ev, [
                arena.rw[offs[i]:offs[i] + len(views[i])] for i in rest[c:d]]))
                for c, d in sub_batches([len(views[i]) for i in rest], HOST_HASH_GROUP, len(rest))]
            jobs.append((on_gpu, job, host))
        for (a, b), ev, (on_gpu, job, host) in zip(subs, landed, jobs):
            copier.wait(ev)
            sums: dict[int, tuple[bytes, list[bytes]]] = {}
            if job is not None:
                for i, (w, cs) in zip(on_gpu, job.result()):
                    for ci, c in enumerate(cs):
                        if c is None:  # a last chunk of <= 240 bytes: XXH3's short path, the host's
                            off = offs[i] + ci * unit
                            cs[ci] = xxhash.xxh3_128_digest(arena.rw[off:min(off + unit, offs[i] + len(views[i]))])
                    sums[i] = (w, cs)
            for group, fut in host:
                for i, s in zip(group, fut.result()):
                    sums[i] = s
            out = [sums[i] for i in range(a, b)]
            for i, (_w, cs) in zip(range(a, b), out):
                if len(cs) != -(-len(views[i]) // unit):
                    raise ProtocolError("device checksums are not per stripe unit")
            yield a, b, out
    except BaseException:
        try:
            copier.sync()  # nothing may still land in space given back
        except Exception:  # noqa: BLE001 - a failed device: its copies are over
            pass
        raise
