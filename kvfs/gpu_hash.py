"""Checksums of device memory computed on the GPU.

A put from device memory needs the XXH3-128 of every chunk and of the
whole value. Hashing them on the host after the device-to-host copy costs
one more pass over every byte by the CPU (and a 64 MiB value's whole-value
sum is one thread's sequential pass), which held device puts well under the
copy's bandwidth. Here the GPU hashes the source while the copy engine moves
the same bytes to the arena, on another stream: ``xxh3_lanes.h`` (shared
with the C extension, where the same code is tested against xxHash on the
CPU) explains the cut that makes XXH3 parallel:

1. ``kv_block_sums``: one thread per 1 KiB block and lane pair, over every
   value of the batch (memory-bound, ~1/16 of the input written back);
2. ``kv_ranges``: 8 threads (one per lane) per hashed range - a value's
   chunks, and the value itself when it has several - chain the block sums
   and merge, one warp shuffle per range.

Ranges of at most 240 bytes (XXH3's short-input paths; only a value's last
chunk can be one) are left to the caller, who hashes those few bytes on the
host.

``HostHasher`` runs the same split on the CPU (the C extension's
``lanes_hash``; the pure-Python data plane's twin just calls xxHash) over
host memory: the stand-in for the GPU in tests, as
``HostCopier`` is for copies.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

MIDSIZE_MAX = 240  # longer ranges take XXH3's long path, the one computed here
BLOCK = 1024
GROUP_BYTES = 1 << 30  # bytes hashed per kernel pair (block sums: 1/16 of it)

_KERNELS = r"""
#define KV_HD static __device__ __forceinline__
#define KV_SECRET_QUAL __device__ const
%(header)s

/* thread -> (block, lane pair) over the batch's values; vfirst[v] is the
 * first block of value v in bs, vfirst[nvals] the total */
extern "C" __global__ void kv_block_sums(const kv_u64 *vptr, const kv_u64 *vfirst, int nvals,
                                         kv_u64 *bs) {
    kv_u64 g = blockIdx.x * (kv_u64)blockDim.x + threadIdx.x;
    kv_u64 blk = g >> 2;
    if (blk >= vfirst[nvals]) return;
    int lo = 0, hi = nvals;  /* vfirst[lo] <= blk < vfirst[hi] */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (vfirst[mid] <= blk) lo = mid; else hi = mid;
    }
    kv_block_pair((const kv_u8 *)vptr[lo], blk - vfirst[lo], (int)(g & 3), bs + KV_LANES * blk);
}

/* 8 threads per range: jobs[3j] = address, jobs[3j+1] = its first block
 * in bs, jobs[3j+2] = length. No thread returns early: all of a warp take
 * part in the shuffles. */
extern "C" __global__ void kv_ranges(const kv_u64 *jobs, int njobs, const kv_u64 *bs, kv_u8 *out) {
    kv_u64 t = blockIdx.x * (kv_u64)blockDim.x + threadIdx.x;
    int job = (int)(t >> 3), lane = (int)(t & 7);
    bool live = job < njobs;
    kv_u64 acc = 0;
    if (live) acc = kv_range_lane(bs + KV_LANES * jobs[3 * job + 1], (const kv_u8 *)jobs[3 * job],
                                  jobs[3 * job + 2], lane);
    kv_u64 all[KV_LANES];
    for (int i = 0; i < KV_LANES; i++) all[i] = __shfl_sync(0xffffffffu, acc, (threadIdx.x & ~7u) + i);
    if (live && lane == 0) kv_finish128(all, jobs[3 * job + 2], out + 16 * job);
}
"""


def header_source() -> str:
    return (Path(__file__).with_name("xxh3_lanes.h")).read_text()


def plan_ranges(sizes: Sequence[int], chunk: int) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """The ranges to hash for values of ``sizes`` cut in ``chunk``-byte
    chunks: (value, offset, length) with length > 240, and per value the
    indices of [whole, chunk 0, chunk 1, ...] in that list (-1: a range of at
    most 240 bytes, hashed by the caller; a one-chunk value's whole sum is
    its chunk sum, one range)."""
    ranges: list[tuple[int, int, int]] = []
    index: list[list[int]] = []
    for v, n in enumerate(sizes):
        idx: list[int] = []
        if n > chunk:
            ranges.append((v, 0, n))
            idx.append(len(ranges) - 1)
        for off in range(0, max(n, 1), chunk):
            length = min(chunk, n - off)
            if length > MIDSIZE_MAX:
                ranges.append((v, off, length))
                idx.append(len(ranges) - 1)
            else:
                idx.append(-1)
        if n <= chunk:
            idx.insert(0, idx[0])
        index.append(idx)
    return ranges, index


class HashJob:
    """Sums being computed; ``result()`` waits for them."""

    def __init__(self, index: list[list[int]], wait: Any, digests: Any) -> None:
        self.index = index
        self._wait = wait
        self._digests = digests

    def result(self) -> list[tuple[bytes | None, list[bytes | None]]]:
        """Per value: (whole sum, [chunk sums]); None where a range was too
        short for the GPU (the caller hashes it)."""
        self._wait()
        raw = self._digests()
        out = []
        for idx in self.index:
            sums = [None if i < 0 else bytes(raw[16 * i:16 * i + 16]) for i in idx]
            out.append((sums[0], sums[1:]))
        return out


class CudaHasher:
    """Hashes device memory on its own CUDA stream (CuPy RawModule)."""
    name = "cuda"

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.mod = cp.RawModule(code=_KERNELS % {"header": header_source()}, options=("-std=c++14",))
        self.block_sums = self.mod.get_function("kv_block_sums")
        self.ranges = self.mod.get_function("kv_ranges")
        self.stream = cp.cuda.Stream(non_blocking=True)

    @staticmethod
    def usable(ptr: int, n: int) -> bool:
        return ptr % 8 == 0 and n > MIDSIZE_MAX  # phase 1 loads 8 aligned bytes

    def start(self, values: Sequence[tuple[int, int]], chunk: int, after: Sequence[Any] = ()) -> HashJob:
        """Hash ``values`` ((address, length), each ``usable``) once the
        events ``after`` have happened; returns at once (nothing here waits
        for the GPU: the tables go over in one asynchronous copy from pinned
        memory)."""
        import numpy as np
        cp = self.cp
        ranges, index = plan_ranges([n for _p, n in values], chunk)
        # groups of ~GROUP_BYTES of values: each group's block sums fill one
        # buffer, reused by the next group in stream order
        groups: list[tuple[int, int, int, int]] = []  # values [v0, v1), ranges [r0, r1)
        v0 = r0 = 0
        while v0 < len(values):
            v1, size = v0, 0
            while v1 < len(values) and (v1 == v0 or size + values[v1][1] <= GROUP_BYTES):
                size += values[v1][1]
                v1 += 1
            r1 = r0
            while r1 < len(ranges) and ranges[r1][0] < v1:
                r1 += 1
            groups.append((v0, v1, r0, r1))
            v0, r0 = v1, r1
        # one table: per group [value addresses | first blocks (n+1) | ranges (3 each)]
        parts: list[Any] = []
        layout: list[tuple[int, int, int, int]] = []  # offsets (in u64) of ptrs, first, jobs; blocks
        at = 0
        max_blocks = 1
        for v0, v1, r0, r1 in groups:
            first = np.zeros(v1 - v0 + 1, dtype=np.uint64)
            first[1:] = np.cumsum([values[v][1] // BLOCK for v in range(v0, v1)])
            ptrs = np.fromiter((values[v][0] for v in range(v0, v1)), dtype=np.uint64, count=v1 - v0)
            jobs = np.array([(values[v][0] + off, int(first[v - v0]) + off // BLOCK, n)
                             for v, off, n in ranges[r0:r1]], dtype=np.uint64).reshape(-1)
            layout.append((at, at + len(ptrs), at + len(ptrs) + len(first), int(first[-1])))
            parts += [ptrs, first, jobs]
            at += len(ptrs) + len(first) + len(jobs)
            max_blocks = max(max_blocks, int(first[-1]))
        nout = max(16, 16 * len(ranges))
        pinned = cp.cuda.alloc_pinned_memory(8 * max(at, 1) + nout)  # the table, then the sums
        tab = np.frombuffer(pinned, dtype=np.uint64, count=max(at, 1))
        if at:
            tab[:at] = np.concatenate(parts)
        keep: list[Any] = []  # device buffers in use until the job is done
        with self.stream:
            for ev in after:
                self.stream.wait_event(ev)
            dtab = cp.empty(max(at, 1), dtype=cp.uint64)
            bs = cp.empty(max_blocks * 8, dtype=cp.uint64)
            keep += [dtab, bs]
            rt = cp.cuda.runtime
            rt.memcpyAsync(dtab.data.ptr, pinned.ptr, 8 * at, 1, self.stream.ptr)
            base = dtab.data.ptr
            # the sums are written by the kernel straight into pinned host
            # memory (mapped at the same address: unified addressing), not
            # copied back: a device-to-host copy would queue behind the put's
            # own large copies on the copy engine, so these sums would land
            # only after the next sub-batch's bytes
            sums = pinned.ptr + 8 * max(at, 1)
            for (v0, v1, r0, r1), (p_at, f_at, j_at, blocks) in zip(groups, layout):
                if blocks:
                    self.block_sums(((blocks * 4 + 255) // 256,), (256,),
                                    (np.uint64(base + 8 * p_at), np.uint64(base + 8 * f_at), np.int32(v1 - v0), bs))
                if r1 > r0:
                    self.ranges((((r1 - r0) * 8 + 255) // 256,), (256,),
                                (np.uint64(base + 8 * j_at), np.int32(r1 - r0), bs, np.uint64(sums + 16 * r0)))
            done = self.stream.record()

        def wait() -> None:
            done.synchronize()
            keep.clear()

        def digests() -> bytes:
            # ``pinned`` lives as long as this closure: the sums land in it
            return ctypes.string_at(pinned.ptr + 8 * max(at, 1), 16 * len(ranges))

        return HashJob(index, wait, digests)


class HostHasher:
    """The same split run by the CPU over host memory (``ptr``s are host
    addresses, as with HostCopier): tests of the device put path on
    machines without a GPU."""
    name = "host"

    @staticmethod
    def usable(ptr: int, n: int) -> bool:
        return ptr % 8 == 0 and n > MIDSIZE_MAX

    def start(self, values: Sequence[tuple[int, int]], chunk: int, after: Sequence[Any] = ()) -> HashJob:
        from . import native
        ranges, index = plan_ranges([n for _p, n in values], chunk)
        per_value: list[list[tuple[int, int]]] = [[] for _ in values]
        for v, off, length in ranges:  # in value order, as plan_ranges lists them
            per_value[v].append((off, length))
        raw = bytearray()
        for (ptr, n), mine in zip(values, per_value):
            for s in native.backend.lanes_hash(bytes((ctypes.c_char * n).from_address(ptr)), mine):
                raw += s
        return HashJob(index, lambda: None, lambda: bytes(raw))
