"""The GPU path of the client: device buffers (CuPy arrays, CUDA torch
tensors, anything with ``__cuda_array_interface__``) as destinations of
gets and sources of puts.

Reads, per chunk of a batch, all in flight at once:
- T0 hit: an asynchronous host-to-device copy straight from the arena,
  which is registered (pinned) with CUDA once per process.
- T1 hit: kvikio ``CuFile.pread`` from the segment file into the device
  buffer; without kvikio (or with ``gpu_reader="staging"``), reads into
  pinned staging by the native data plane and asynchronous copies,
  double-buffered.

Verification (``Store(verify=...)``):
- ``True`` / ``"header"`` (default): every T1 chunk's record header is read
  and must name this namespace, key, chunk, length, sequence number and
  checksum, so a stale or wrong location is never delivered; T0 copies run
  under the batch's lease. Payload bit-rot in T1 is not caught in this mode
  (the payload goes to the device unhashed, by kvikio or through staging).
- ``"full"``: every byte delivered was hashed: on the GPU where it landed
  (gpu_hash, right after each group's copies; no header reads needed), or,
  without a device hasher, in pinned staging by the native data plane before
  it goes to the device.
- ``False``: header checks only (they are cheap and guard against
  misdirected reads).

The lease of a batch is released only after its copies completed. Nothing
here imports CUDA libraries until a device buffer is actually used, so
host-only processes never load them. ``HostCopier`` stands in for CUDA on
machines without a GPU: the same planning, staging, header checks and lease
handling then run against host memory (the CPU tests use it; the GPU tests
use CUDA).
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Sequence

import xxhash

from . import format as fmt
from .dataplane import DataPlane, ReadTask
from .errors import InvalidArgument

STAGING_SLAB = 64 << 20  # bytes per staging buffer (two of them: double-buffered)
VERIFY_PART = 128 << 20  # verify="full": T0 copies hashed on the GPU in parts of this many bytes
H2D, D2H = 1, 2  # cudaMemcpyKind


TORCH_STREAM = -1  # DeviceBuffer.stream: torch's current stream (asked once per batch)


@dataclass(frozen=True)
class DeviceBuffer:
    """A contiguous span of device memory and the object that owns it.
    ``stream``: the CUDA stream whose work on the buffer must be complete
    before kvfs touches it (``__cuda_array_interface__``'s "stream", or
    TORCH_STREAM); None: nothing to wait for."""
    ptr: int
    nbytes: int
    readonly: bool
    owner: Any
    stream: int | None = None

    def __len__(self) -> int:
        return self.nbytes


# Types whose instances are never device memory: their class has no
# __cuda_array_interface__ and they are not torch's. Asking an object for
# the attribute and catching the AttributeError costs a put several
# microseconds; a host buffer's type is then known at once.
_HOST_TYPES: set[type] = {bytes, bytearray, memoryview}


def device_buffer(obj: Any) -> DeviceBuffer | None:
    """The device span of ``obj``, or None if it is not device memory."""
    t = type(obj)
    if t in _HOST_TYPES:
        return None
    if isinstance(obj, DeviceBuffer):
        return obj
    if t.__module__.startswith("torch") and hasattr(obj, "data_ptr"):
        # torch tensors: asked directly (its __cuda_array_interface__ has no
        # typestr for bfloat16, the usual KV-cache dtype)
        if not obj.is_cuda:
            return None
        if not obj.is_contiguous():
            raise InvalidArgument("device tensor must be contiguous")
        return DeviceBuffer(int(obj.data_ptr()), obj.numel() * obj.element_size(), False, obj, TORCH_STREAM)
    if not hasattr(t, "__cuda_array_interface__"):
        _HOST_TYPES.add(t)  # (the attribute is a property of the class wherever it is defined)
        return None
    try:
        cai = obj.__cuda_array_interface__
    except AttributeError:
        return None
    except RuntimeError as e:  # e.g. a torch tensor that requires grad
        raise InvalidArgument(f"device buffer not usable: {e}") from None
    shape = tuple(cai["shape"])
    itemsize = int(cai["typestr"][2:])
    n = itemsize
    for d in shape:
        n *= d
    strides = cai.get("strides")
    if strides is not None and n:
        expect = itemsize
        for d, s in zip(reversed(shape), reversed(strides)):
            if d > 1 and s != expect:
                raise InvalidArgument("device buffer must be C-contiguous")
            expect *= d
    ptr, ro = cai["data"]
    stream = cai.get("stream")  # v3: the producer's stream, to be waited on before use
    return DeviceBuffer(int(ptr), n, bool(ro), obj, int(stream) if stream else None)


def is_device(obj: Any) -> bool:
    return isinstance(obj, DeviceBuffer) or hasattr(type(obj), "__cuda_array_interface__") or (
        hasattr(obj, "__cuda_array_interface__"))


def address_of(view: memoryview) -> int:
    """The address of a buffer's first byte (read-only ones too: a reader's
    arena mapping)."""
    if not len(view):
        return 0
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    buf = _PyBuffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(view), ctypes.byref(buf), 0)  # PyBUF_SIMPLE
    try:
        return int(buf.buf or 0)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(buf))


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (stable layout), for the address of a read-only buffer."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def device_rows(obj: Any) -> list[DeviceBuffer]:
    """One DeviceBuffer per row (first dimension) of a contiguous device
    tensor or array: a destination or source per block, made with one call
    into the tensor instead of one per block. A serving engine allocates its
    KV cache once: made once too, they save a read or put the per-buffer
    conversion (several torch calls, ~1-3 us each buffer, which was the
    largest share of a layer-wise load's per-key control work)."""
    d = device_buffer(obj)
    if d is None:
        raise InvalidArgument("device_rows takes device memory only")
    cai = getattr(obj, "__cuda_array_interface__", None) if d.stream != TORCH_STREAM else None
    shape = tuple(cai["shape"] if cai is not None else getattr(obj, "shape", ()))
    if not shape:
        return [d]
    rows = int(shape[0])
    per = d.nbytes // rows if rows else 0
    return [DeviceBuffer(d.ptr + i * per, per, d.readonly, d.owner, d.stream) for i in range(rows)]


# --------------------------------------------------------------------- copiers
class HostCopier:
    """CUDA's role played by host memory: ``ptr``s are host addresses and
    copies are memmoves. Used where there is no GPU (tests, CI)."""
    name = "host"
    gds = False

    def register(self, addr: int, size: int, writable: bool = True) -> bool:
        return False

    def unregister(self, addr: int) -> None:
        pass

    # where the "device" allocations end: none by default (host memory is one
    # address space to memmove); tests set it to split adjacent buffers
    splits: tuple[int, ...] = ()

    def allocation(self, ptr: int) -> tuple[int, int]:
        """[start, end) of the allocation holding ``ptr`` (CudaCopier.allocation)."""
        lo = max((s for s in self.splits if s <= ptr), default=0)
        return lo, min((s for s in self.splits if s > ptr), default=1 << 64)

    def h2d(self, dst: int, src: int, n: int) -> None:
        ctypes.memmove(dst, src, n)

    def d2h(self, dst: int, src: int, n: int) -> None:
        ctypes.memmove(dst, src, n)

    def record(self) -> Any:
        return None

    def record_on(self, stream: int) -> Any:
        return None

    def wait_on_stream(self, events: list[Any]) -> None:
        pass

    def wait(self, ev: Any) -> None:
        pass

    def sync(self) -> None:
        pass

    def pinned(self, n: int) -> memoryview:
        return memoryview(bytearray(n))

    def device_view(self, ptr: int, n: int) -> Any:
        return (ctypes.c_char * n).from_address(ptr)


class CudaCopier:
    """Asynchronous copies on one CUDA stream per thread (CuPy's runtime)."""
    name = "cuda"

    def __init__(self) -> None:
        import cupy  # noqa: F401 - imported only once a device buffer is used
        self.cp = cupy
        self.rt = cupy.cuda.runtime
        self._local = threading.local()
        self._pinned: list[Any] = []  # keeps pinned allocations alive
        self.gds = False

    @property
    def stream(self) -> Any:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = self.cp.cuda.Stream(non_blocking=True)
        return s

    def register(self, addr: int, size: int, writable: bool = True) -> bool:
        """Pin a host range (the arena) so copies from it are DMA at full speed."""
        # portable (every context); read-only only for a reader's mapping
        # (a writer's puts from the device DMA into their arena extents)
        try:
            self.rt.hostRegister(addr, size, 0x1 if writable else 0x1 | 0x8)
            return True
        except self.rt.CUDARuntimeError:
            return False

    def unregister(self, addr: int) -> None:
        """Before the range is unmapped: a registration outliving its mapping
        makes later allocations at that address fail (cudaErrorAlreadyMapped)."""
        try:
            self.rt.hostUnregister(addr)
        except self.rt.CUDARuntimeError:
            pass

    def allocation(self, ptr: int) -> tuple[int, int]:
        """[start, end) of the device allocation holding ``ptr`` (the driver's
        cuMemGetAddressRange); (ptr, ptr) where it cannot say. One copy may
        not span two allocations (cudaErrorInvalidValue), however adjacent
        their addresses: torch's allocator hands out neighbouring blocks of
        separate segments."""
        fn = _address_range()
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        if fn is None or fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0:
            return ptr, ptr
        return base.value, base.value + size.value

    def h2d(self, dst: int, src: int, n: int) -> None:
        self.rt.memcpyAsync(dst, src, n, H2D, self.stream.ptr)

    def d2h(self, dst: int, src: int, n: int) -> None:
        self.rt.memcpyAsync(dst, src, n, D2H, self.stream.ptr)

    def record(self) -> Any:
        return self.stream.record()

    def record_on(self, stream: int) -> Any:
        """An event after the work queued so far on another stream (a raw
        handle: the caller's producer stream)."""
        ev = self.cp.cuda.Event(block=False, disable_timing=True)
        self.rt.eventRecord(ev.ptr, stream)
        return ev

    def wait_on_stream(self, events: list[Any]) -> None:
        """This thread's stream runs nothing queued after this until the events happened."""
        for ev in events:
            self.stream.wait_event(ev)

    def wait(self, ev: Any) -> None:
        if ev is not None:
            ev.synchronize()

    def sync(self) -> None:
        self.stream.synchronize()

    def pinned(self, n: int) -> memoryview:
        mem = self.cp.cuda.alloc_pinned_memory(n)
        self._pinned.append(mem)
        return memoryview((ctypes.c_char * n).from_address(mem.ptr)).cast("B")

    def device_view(self, ptr: int, n: int) -> Any:
        cp = self.cp
        mem = cp.cuda.UnownedMemory(ptr, n, None, cp.cuda.runtime.getDevice())
        return cp.ndarray((n,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))


_RANGE: list[Any] = []


def _address_range() -> Any:
    """The driver's cuMemGetAddressRange_v2, loaded once (None without libcuda)."""
    if not _RANGE:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuMemGetAddressRange_v2
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
            fn.restype = ctypes.c_int
            _RANGE.append(fn)
        except (OSError, AttributeError):
            _RANGE.append(None)
    return _RANGE[0]


def _kvikio() -> Any:
    if os.environ.get("KVFS_KVIKIO", "1") == "0":
        return None
    try:
        import kvikio  # noqa: F401
        import kvikio.defaults
    except Exception:  # noqa: BLE001 - missing, or its CUDA libraries are
        return None
    return kvikio


class PendingRead:
    """A device read in flight (GpuPlane.start). Not thread-safe: one
    consumer waits for the groups, in any order."""

    def __init__(self, plane: "GpuPlane", group_size: int, ngroups: int, *, events: dict[int, Any] | None = None,
                 futs: list[tuple[_Chunk, Any]] | None = None, bad: set[int] | None = None,
                 done_bad: set[int] | None = None, headers: Callable[[], set[int]] | None = None,
                 verify: Callable[[int], set[int]] | None = None, groups: range | None = None) -> None:
        self.plane = plane
        self.group_size = group_size
        self.events = events or {}
        self.futs: dict[int, list[tuple[_Chunk, Any]]] = {}
        for ch, f in futs or []:
            self.futs.setdefault(ch.item // group_size, []).append((ch, f))
        self.bad: set[int] = set(bad or ()) | set(done_bad or ())
        # groups not in ``groups`` (another wave's) have nothing here to wait for
        self.waited = [done_bad is not None or (groups is not None and g not in groups) for g in range(ngroups)]
        self._headers = headers  # joins the header checks (once)
        self._verify = verify  # verify="full": hashes group g on the device once landed

    def wait(self, g: int) -> set[int]:
        """Block until group g has landed; returns the failed items so far."""
        if not self.waited[g]:
            self.plane.copier.wait(self.events.get(g))
            self.bad |= self.plane._kvikio_wait(self.futs.pop(g, []))
            if self._verify is not None:
                self.bad |= self._verify(g)
            self.waited[g] = True
        if self._headers is not None:
            self.bad |= self._headers()
            self._headers = None
        return self.bad

    def finish(self) -> set[int]:
        """Every group landed (and every copy of this thread's stream done)."""
        for g in range(len(self.waited)):
            self.wait(g)
        self.plane.copier.sync()
        return self.bad


DST, SRC = 0, 1  # which end of a copy is device memory (merge_copies)


def merge_copies(copies: Sequence[tuple[int, int, int]], allocation: Callable[[int], tuple[int, int]],
                 device: int) -> list[tuple[int, int, int]]:
    """(dst, src, length) copies, those adjacent at both ends merged: the
    chunks of an object, and objects a batch put placed side by side, are
    contiguous in the arena and usually in the device buffer too, and one
    large copy costs far less than many calls. Invariant: a merged copy
    stays inside one allocation of its device end (``device``: DST or SRC;
    ``allocation``: the copier's), since CUDA refuses a copy across two
    however adjacent; the last allocation's bounds are kept, so a run of
    one buffer's pieces asks once."""
    out: list[tuple[int, int, int]] = []
    lo = hi = 0
    for dst, src, n in copies:
        if out:
            d, s_, m = out[-1]
            if d + m == dst and s_ + m == src:
                start, nxt = (d, dst) if device == DST else (s_, src)
                if not lo <= start < hi:
                    lo, hi = allocation(start)
                if nxt < hi:
                    out[-1] = (d, s_, m + n)
                    continue
        out.append((dst, src, n))
    return out


def _merged(chunks: list[_Chunk], allocation: Callable[[int], tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Arena-to-device copies of T0 chunks, merged."""
    return merge_copies([(ch.dst, ch.src, ch.length) for ch in chunks], allocation, DST)


# A T0 chunk of a read plan: (item, device address, length, checksum, arena
# address). A tuple, not a _Chunk: a layer-wise load plans one per block and
# layer (98,304 at 48k tokens of an 8B model), and making an object each was
# a large share of the control work that delays the first layer.
T0Copy = tuple[int, int, int, bytes, int]


def _t0_chunks(copies: list[T0Copy]) -> list[_Chunk]:
    """T0 copies as _Chunks, for the paths that hash what landed (verify="full")."""
    return [_Chunk(i, dst, n, c, src=src) for i, dst, n, c, src in copies]


# --------------------------------------------------------------------- plane
@dataclass
class _Chunk:
    item: int  # index in the batch
    dst: int  # device address
    length: int
    checksum: bytes
    # T0: the arena address; T1: the segment file, payload offset and record identity
    src: int = 0
    path: str = ""
    offset: int = 0
    idx: int = 0


@dataclass
class GpuRead:
    t0: list[T0Copy] = field(default_factory=list)
    t1: list[_Chunk] = field(default_factory=list)
    after: list[Any] = field(default_factory=list)  # the destinations' producer events


class GpuPlane:
    """Runs device reads and puts for one Store."""

    def __init__(self, reader: DataPlane, copier: Any | None = None, kvikio: Any | None = None,
                 use_kvikio: bool = True) -> None:
        self.reader = reader
        self.copier = copier if copier is not None else CudaCopier()
        self.kvikio = kvikio if kvikio is not None else (_kvikio() if use_kvikio and self.copier.name == "cuda"
                                                         else None)
        if self.kvikio is not None and "KVIKIO_NTHREADS" not in os.environ:
            # kvikio's pool is process-wide and starts with one thread; T1
            # reads want as many as the host data plane uses
            try:
                if int(self.kvikio.defaults.get("num_threads")) < reader.threads:
                    self.kvikio.defaults.set("num_threads", reader.threads)
            except Exception:  # noqa: BLE001 - an older kvikio: its default stays
                pass
        self._files: dict[str, Any] = {}
        self._registered: dict[int, bool] = {}
        self._local = threading.local()  # per thread: staging slabs
        self._pool: Any = None
        self._hasher: Any = False  # False: not made yet; None: hash on the host
        self._lock = threading.Lock()
        self.counters = {"t0_chunks": 0, "t0_copies": 0, "t1_chunks": 0, "staged_bytes": 0, "header_checks": 0,
                         "header_mismatches": 0, "device_hashed_values": 0,
                         "device_verified_chunks": 0}

    # -- capability report -------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        gds = None
        if self.kvikio is not None:
            try:
                gds = not bool(self.kvikio.defaults.is_compat_mode_preferred())
            except Exception:  # noqa: BLE001 - older kvikio: unknown
                gds = None
        h = self.hasher()
        return {"copier": self.copier.name, "kvikio": self.kvikio is not None,
                "gds": gds, "arena_pinned": self.arena_pinned(),
                "device_hashing": "host" if h is None else f"{h.name} (xxh3 lanes)"}

    def hasher(self) -> Any:
        """What hashes device memory (put sources; with verify="full", what
        reads delivered): the GPU (gpu_hash.CudaHasher; HostHasher where
        HostCopier plays CUDA), or None: the host, through a copy
        (KVFS_GPU_HASH=0, or the kernels cannot be built here)."""
        if self._hasher is False:
            with self._lock:
                if self._hasher is False:
                    self._hasher = None
                    if os.environ.get("KVFS_GPU_HASH", "1") != "0":
                        from . import gpu_hash
                        try:
                            self._hasher = (gpu_hash.CudaHasher(self.copier.cp) if self.copier.name == "cuda"
                                            else gpu_hash.HostHasher())
                        except Exception as e:  # noqa: BLE001 - no NVRTC: the host hashes instead
                            import warnings
                            warnings.warn(f"kvfs: device put checksums fall back to the host: {e}", stacklevel=2)
        return self._hasher

    def producer_events(self, bufs: Sequence[DeviceBuffer]) -> list[Any]:
        """Events after the work queued so far on the streams that produce
        or consume ``bufs`` (their owners' streams): kvfs's own streams wait
        for them before touching those bytes, so a put never copies a tensor
        its kernel is still writing, and a read never overwrites one a
        kernel is still reading."""
        handles = {b.stream for b in bufs if b.stream is not None}
        if not handles:
            return []
        if TORCH_STREAM in handles:
            handles.discard(TORCH_STREAM)
            import torch
            for dev in {b.owner.device for b in bufs if b.stream == TORCH_STREAM}:
                handles.add(int(torch.cuda.current_stream(dev).cuda_stream))
        return [ev for ev in (self.copier.record_on(h) for h in handles) if ev is not None]

    # -- arena -----------------------------------------------------------
    def arena_address(self, arena: Any) -> int:
        """The arena's address, registered with CUDA on first use."""
        addr = address_of(arena.ro)
        if addr not in self._registered:
            with self._lock:
                if addr not in self._registered:
                    self._registered[addr] = self.copier.register(addr, arena.size, arena.writable)
        return addr

    def arena_pinned(self) -> bool:
        return any(self._registered.values())

    def pool(self) -> Any:
        """Threads that wait for copies and hash what landed (GIL released in both)."""
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(max(1, self.reader.threads), thread_name_prefix="kvfs-gpu")
            return self._pool

    def staging(self) -> list[memoryview]:
        """This thread's two pinned slabs (a Store is shared by threads: each
        stages through its own)."""
        slabs: list[memoryview] | None = getattr(self._local, "staging", None)
        if slabs is None:
            slabs = self._local.staging = [self.copier.pinned(STAGING_SLAB) for _ in range(2)]
        return slabs

    # -- reads -----------------------------------------------------------
    def plan(self, ns: str, ks: list[str], found: dict[int, list[Any]], outs: Sequence[DeviceBuffer],
             arena: Any, path_of: Callable[[int, int], str], sizes: list[int]) -> GpuRead:
        p = GpuRead()
        base = self.arena_address(arena) if arena is not None else 0
        t0_copies = p.t0
        add = t0_copies.append
        for i, item in found.items():
            size = item[0]
            exts = item[3]
            t0 = item[4] if len(item) > 4 else None
            if t0 is not None and arena is None and not t0[1]:
                continue  # only in T0, and this client cannot map it
            dest = outs[i]
            if size > dest.nbytes:
                raise InvalidArgument(f"device buffer of {dest.nbytes} bytes is too small for "
                                      f"{ns}/{ks[i]} ({size} bytes)")
            pos = 0
            if t0 is not None and arena is not None:
                if len(exts) == 1:  # the usual block: one chunk, copied whole
                    if exts[0][3]:
                        add((i, dest.ptr, exts[0][3], exts[0][4], base + t0[0]))
                else:
                    for ext in exts:
                        if ext[3]:  # (the empty value: nothing to copy)
                            add((i, dest.ptr + pos, ext[3], ext[4], base + t0[0] + pos))
                        pos += ext[3]
            else:
                for ci, (stripe, seg, off, length, ccsum) in enumerate(exts):
                    if length:
                        p.t1.append(_Chunk(i, dest.ptr + pos, length, ccsum, path=path_of(stripe, seg),
                                           offset=off, idx=ci))
                    pos += length
            sizes[i] = size
        p.after = self.producer_events([outs[i] for i in found])
        return p

    def _staged_only(self, p: GpuRead, full: bool) -> bool:
        """Whether this plan must go through pinned staging: T1 chunks and
        no kvikio, or ``full`` verification without a device hasher (with
        one, every chunk is hashed on the GPU where it landed)."""
        return bool(p.t1 and self.kvikio is None) or (full and self.hasher() is None)

    def run(self, ns: str, ks: list[str], found: dict[int, list[Any]], p: GpuRead, full: bool) -> set[int]:
        """Run a plan to completion (every copy finished). Returns the items
        that failed (missing file, short read, bad header or checksum)."""
        if self._staged_only(p, full):
            return self._run_staged(ns, ks, found, p, full)
        return self.start(ns, ks, found, p, full, max(1, len(ks))).finish()

    def _run_staged(self, ns: str, ks: list[str], found: dict[int, list[Any]], p: GpuRead, full: bool) -> set[int]:
        """Reads that go through pinned staging: every chunk with ``full``
        (hashed there), else the T1 chunks (T0 is copied from the arena)."""
        c = self.copier
        c.wait_on_stream(p.after)
        if full:
            bad = self._staged(_t0_chunks(p.t0) + p.t1, verify=True)
        else:
            merged = merge_copies([(dst, src, n) for _i, dst, n, _c, src in p.t0], c.allocation, DST)
            self.counters["t0_copies"] += len(merged)
            for dst, src, n in merged:
                c.h2d(dst, src, n)
            headers = self._headers_in_background(ns, ks, found, p.t1)
            try:
                bad = self._staged(p.t1, verify=False)
            finally:
                bad_headers = headers()
            bad |= bad_headers
        c.sync()
        self.counters["t0_chunks"] += len(p.t0)
        self.counters["t1_chunks"] += len(p.t1)
        return bad

    def _headers_in_background(self, ns: str, ks: list[str], found: dict[int, list[Any]],
                               chunks: list[_Chunk]) -> Callable[[], set[int]]:
        """Check the chunks' record headers in a thread while their payloads
        are on their way (an item whose header is wrong is reported failed:
        its destination bytes are then undefined, never "delivered").
        Returns the join: the failed items."""
        out: list[set[int]] = []

        def check() -> None:
            try:
                out.append(self._check_headers(ns, ks, found, chunks))
            except BaseException:  # noqa: BLE001 - an unchecked header is a failed item
                out.append({ch.item for ch in chunks})
        th = threading.Thread(target=check, name="kvfs-gpu-headers", daemon=True)
        th.start()

        def join() -> set[int]:
            th.join()
            return out[0] if out else {ch.item for ch in chunks}
        return join

    def start(self, ns: str, ks: list[str], found: dict[int, list[Any]], p: GpuRead, full: bool,
              group_size: int, items: range | None = None) -> "PendingRead":
        """Start a plan and return at once; items are in groups of
        ``group_size`` consecutive items, and ``PendingRead.wait(g)`` returns
        when group g's copies have landed (T0 copies are queued group by
        group, with an event after each; kvikio reads all go to its pool in
        order, their headers checked beside them; with ``full``, each group
        is hashed on the GPU once landed, instead). Staged reads run to
        completion here. ``items``: the plan covers only these (a wave of a
        larger read); the other groups' waits return at once."""
        ngroups = max(1, -(-len(ks) // group_size))
        mine = range(ngroups) if items is None or not len(items) else \
            range(items[0] // group_size, (items[-1]) // group_size + 1)
        if self._staged_only(p, full):
            return PendingRead(self, group_size, ngroups, done_bad=self._run_staged(ns, ks, found, p, full))
        c = self.copier
        c.wait_on_stream(p.after)
        if p.t1:
            for ev in p.after:  # kvikio's threads write the destinations themselves
                c.wait(ev)
        events: dict[int, Any] = {}
        # verify="full": T0 copies are hashed on the GPU part by part, each
        # part as soon as its copies land (queued now, behind an event), so
        # hashing overlaps the copies still under way
        t0_checks: dict[int, list[Callable[[], set[int]]]] = {}
        # group by group in item order: a plan's chunks come in the order of
        # its ``found`` (known locations first, then what was looked up), and
        # a chunk left behind here would be reported loaded and never copied.
        # (A stable sort: an item's chunks keep their order.)
        in_order = sorted(p.t0, key=itemgetter(0))
        if in_order and in_order[0][0] < mine.start * group_size:
            raise AssertionError(f"item {in_order[0][0]} is in no group of this read")
        if full:
            self._queue_t0_verified(_t0_chunks(in_order), mine, group_size, events, t0_checks)
        else:
            self._queue_t0(in_order, mine, group_size, events)
        submit_bad: set[int] = set()
        futs = self._kvikio_submit(p.t1, submit_bad) if p.t1 else []
        verify = None
        if full:
            # every byte is hashed where it landed (a stale location cannot
            # match the checksum either: no header checks needed); T1 chunks
            # once kvikio has read them
            t1_by_group: dict[int, list[_Chunk]] = {}
            for ch in p.t1:
                t1_by_group.setdefault(ch.item // group_size, []).append(ch)

            def verify(g: int) -> set[int]:
                bad: set[int] = set()
                for check in t0_checks.pop(g, []):
                    bad |= check()
                if g in t1_by_group:
                    bad |= self._start_verify(t1_by_group.pop(g), None)()
                return bad
            headers = None
        else:
            headers = self._headers_in_background(ns, ks, found, p.t1) if p.t1 else None
        pending = PendingRead(self, group_size, ngroups, events=events, futs=futs, bad=submit_bad, headers=headers,
                              verify=verify, groups=mine)
        self.counters["t0_chunks"] += len(p.t0)
        self.counters["t1_chunks"] += len(p.t1)
        return pending

    def _queue_t0(self, copies: list[T0Copy], mine: range, group_size: int, events: dict[int, Any]) -> None:
        """Queue the T0 copies (in item order) group by group, those adjacent
        at both ends merged, with an event after each group. One pass, no
        object per chunk: this runs once per block and layer of a layer-wise
        load, before the copies it issues can start. (It merges as
        ``merge_copies`` does, inline: building that one's tuples per group
        cost 0.3-0.5 us a key more on the VM.)"""
        c = self.copier
        h2d = c.h2d
        issued = 0
        k, end = 0, len(copies)
        lo = hi = 0  # the device allocation of the run's start (merge_copies' invariant)
        for g in mine:
            lim = (g + 1) * group_size
            run_dst = run_src = run_n = 0
            while k < end and copies[k][0] < lim:
                _i, dst, n, _c, src = copies[k]
                k += 1
                if run_n and run_dst + run_n == dst and run_src + run_n == src:
                    if not lo <= run_dst < hi:
                        lo, hi = c.allocation(run_dst)
                    if dst < hi:
                        run_n += n
                        continue
                if run_n:
                    h2d(run_dst, run_src, run_n)
                    issued += 1
                run_dst, run_src, run_n = dst, src, n
            if run_n:
                h2d(run_dst, run_src, run_n)
                issued += 1
            events[g] = c.record()
        if k < end:  # outside this plan's groups: a caller's bug, never a silent loss
            raise AssertionError(f"item {copies[k][0]} is in no group of this read")
        self.counters["t0_copies"] += issued

    def _queue_t0_verified(self, chunks: list[_Chunk], mine: range, group_size: int, events: dict[int, Any],
                           t0_checks: dict[int, list[Callable[[], set[int]]]]) -> None:
        """``_queue_t0`` for verify="full": each group's copies in parts of
        VERIFY_PART bytes, each part hashed on the GPU once it landed."""
        c = self.copier
        it = iter(chunks)
        nxt = next(it, None)
        for g in mine:
            grp: list[_Chunk] = []
            while nxt is not None and nxt.item // group_size == g:
                grp.append(nxt)
                nxt = next(it, None)
            parts: list[list[_Chunk]] = [[]]
            size = 0
            for ch in grp:
                if size >= VERIFY_PART:
                    parts.append([])
                    size = 0
                parts[-1].append(ch)
                size += ch.length
            for part in parts:
                merged = _merged(part, c.allocation)
                self.counters["t0_copies"] += len(merged)
                for dst, src, n in merged:
                    c.h2d(dst, src, n)
                if part:
                    t0_checks.setdefault(g, []).append(self._start_verify(part, c.record()))
            events[g] = c.record()
        if nxt is not None:  # outside this plan's groups: a caller's bug, never a silent loss
            raise AssertionError(f"item {nxt.item} is in no group of this read")

    def verify_ranges(self, ranges: Sequence[tuple[int, int, int, bytes]]) -> set[int]:
        """Check device memory that something else filled (NIXL): per range
        ``(item, address, length, checksum)``; returns the items whose bytes
        do not match. On the GPU where it can hash them, else on the host
        through a copy."""
        chunks = [_Chunk(item, dst, n, csum) for item, dst, n, csum in ranges]
        if self.hasher() is None:
            bad: set[int] = set()
            for ch in chunks:
                if xxhash.xxh3_128_digest(self._to_host(ch.dst, ch.length)) != ch.checksum:
                    bad.add(ch.item)
            return bad
        return self._start_verify(chunks, None)()

    def hash_values(self, values: Sequence[tuple[int, int]], chunk: int) -> list[tuple[bytes, list[bytes]]]:
        """Per device value ``(address, length)``: (whole xxh3-128, [sums of
        its ``chunk``-byte chunks]), as a put's commit wants them."""
        h = self.hasher()
        out: list[tuple[bytes, list[bytes]] | None] = [None] * len(values)
        on_gpu = [i for i, (p, n) in enumerate(values) if h is not None and h.usable(p, n)]
        job = h.start([values[i] for i in on_gpu], chunk) if on_gpu else None
        gpu_set = set(on_gpu)
        for i, (p, n) in enumerate(values):
            if i not in gpu_set:
                v = self._to_host(p, n)
                w = xxhash.xxh3_128_digest(v)
                out[i] = (w, [xxhash.xxh3_128_digest(v[o:o + chunk]) for o in range(0, n, chunk)] if n > chunk else [w])
        if job is not None:
            for i, (whole, parts) in zip(on_gpu, job.result()):
                p, n = values[i]
                fixed: list[bytes] = []
                for ci, c in enumerate(parts):  # a last chunk of <= 240 bytes: the host's
                    fixed.append(c if c is not None else xxhash.xxh3_128_digest(
                        self._to_host(p + ci * chunk, min(chunk, n - ci * chunk))))
                out[i] = (whole if whole is not None else xxhash.xxh3_128_digest(self._to_host(p, n)), fixed)
        return [x for x in out if x is not None]

    def _to_host(self, ptr: int, n: int) -> memoryview:
        host = memoryview(bytearray(n))
        if n:
            self.copier.d2h(address_of(host), ptr, n)
            self.copier.sync()
        return host

    def _start_verify(self, chunks: list[_Chunk], after: Any) -> Callable[[], set[int]]:
        """verify="full" in device memory: queue the hashing of each chunk's
        destination on the GPU, behind the event ``after`` (None: the bytes
        are there already, as after kvikio reads); returns the join, which
        compares the sums with the checksums and gives the failed items.
        Chunks the GPU does not hash (at most 240 bytes, or a destination
        not 8-byte aligned) are copied back and hashed on the host there."""
        h = self.hasher()
        on_gpu = [ch for ch in chunks if h.usable(ch.dst, ch.length)]
        rest = [ch for ch in chunks if not h.usable(ch.dst, ch.length)]
        job = h.start([(ch.dst, ch.length) for ch in on_gpu], 1 << 62, [after] if after is not None else [])
        self.counters["device_verified_chunks"] += len(chunks)

        def join() -> set[int]:
            bad: set[int] = set()
            if rest:
                self.copier.wait(after)
                for ch in rest:
                    if xxhash.xxh3_128_digest(self._to_host(ch.dst, ch.length)) != ch.checksum:
                        bad.add(ch.item)
            for ch, (whole, _parts) in zip(on_gpu, job.result()):
                if whole != ch.checksum:
                    bad.add(ch.item)
            return bad
        return join

    def _check_headers(self, ns: str, ks: list[str], found: dict[int, list[Any]], chunks: list[_Chunk]) -> set[int]:
        """Read each T1 chunk's record header (host, in parallel) and check it
        names exactly this record: magic and version, namespace and key,
        chunk index, length, object size, sequence number and checksum,
        field by field (the header's own checksum adds nothing to that)."""
        nsb = ns.encode()
        heads: list[tuple[bytes, int]] = []  # (expected names, header length)
        tasks = []
        total = 0
        for ch in chunks:
            names = nsb + ks[ch.item].encode()
            hlen = fmt.HEADER_SIZE + len(names)
            heads.append((names, hlen))
            total += hlen
        buf = memoryview(bytearray(total))
        pos = 0
        for ch, (names, hlen) in zip(chunks, heads):
            hdr_off = (ch.offset - hlen) // fmt.RECORD_ALIGN * fmt.RECORD_ALIGN
            tasks.append(ReadTask(ch.path, hdr_off, buf[pos:pos + hlen], None))
            pos += hlen
        ok = self.reader.run(tasks)
        bad: set[int] = set()
        unpack = fmt.HEADER_STRUCT.unpack_from
        nsl = len(nsb)
        for ch, t, good, (names, hlen) in zip(chunks, tasks, ok, heads):
            item = found[ch.item]
            right = False
            if good:
                (magic, version, _kind, ns_len, key_len, _r, cidx, _ccnt, _r2, length, osize,
                 _coff, seq, csum, _hsum) = unpack(t.dest)
                right = (magic == fmt.MAGIC and version == fmt.FORMAT_VERSION and ns_len == nsl
                         and key_len == len(names) - nsl and cidx == ch.idx and length == ch.length
                         and osize == item[0] and seq == item[2] and csum == ch.checksum
                         and t.dest[fmt.HEADER_SIZE:] == names)
            if not right:
                self.counters["header_mismatches"] += 1
                bad.add(ch.item)
        self.counters["header_checks"] += len(chunks)
        return bad

    def _file(self, path: str) -> Any:
        f = self._files.get(path)
        if f is None:
            assert self.kvikio is not None
            f = self._files[path] = self.kvikio.CuFile(path, "r")
        return f

    def _kvikio_submit(self, chunks: list[_Chunk], bad: set[int]) -> list[tuple[_Chunk, Any]]:
        """Start every chunk's read (kvikio's pool runs them); files that
        cannot be opened mark their items in ``bad``."""
        futs = []
        for ch in chunks:
            try:
                f = self._file(ch.path)
            except (OSError, RuntimeError):
                bad.add(ch.item)
                continue
            futs.append((ch, f.pread(self.copier.device_view(ch.dst, ch.length), ch.length, ch.offset)))
        return futs

    def _kvikio_wait(self, futs: list[tuple[_Chunk, Any]]) -> set[int]:
        bad: set[int] = set()
        for ch, fut in futs:
            try:
                if fut.get() != ch.length:
                    bad.add(ch.item)
            except (OSError, RuntimeError):
                bad.add(ch.item)
        return bad

    def _staged(self, chunks: list[_Chunk], verify: bool) -> set[int]:
        """Chunks through pinned staging: read (T1) or copy (T0) into a slab,
        verified there by the native data plane when ``verify``, then copied
        to the device while the next slab fills."""
        bad: set[int] = set()
        slabs = self.staging()
        c = self.copier
        pending: list[Any] = [None, None]
        batch: list[_Chunk] = []
        used = 0
        k = 0

        def flush(batch: list[_Chunk], k: int) -> None:
            c.wait(pending[k])  # the slab's previous copies are done
            slab = slabs[k]
            base = address_of(slab)
            pos = 0
            views = []
            addrs = {}  # chunk -> its place in the slab
            for ch in batch:
                views.append(slab[pos:pos + ch.length])
                addrs[id(ch)] = base + pos
                pos += ch.length
            reads = [(ch, v) for ch, v in zip(batch, views) if ch.path]
            copies = [(ch, v) for ch, v in zip(batch, views) if not ch.path]
            ok: list[bool] = []
            if reads:
                ok += self.reader.run([ReadTask(ch.path, ch.offset, v, ch.checksum if verify else None)
                                       for ch, v in reads])
            if copies:
                ok += self.reader.copy([v for _c, v in copies],
                                       [memoryview((ctypes.c_char * ch.length).from_address(ch.src)).cast("B")
                                        for ch, _v in copies], [ch.checksum if verify else None for ch, _v in copies])
            for (ch, _v), good in zip(reads + copies, ok):
                if good:
                    c.h2d(ch.dst, addrs[id(ch)], ch.length)
                else:
                    bad.add(ch.item)
            self.counters["staged_bytes"] += sum(ch.length for ch in batch)
            pending[k] = c.record()

        for ch in chunks:
            if ch.length > STAGING_SLAB:
                raise InvalidArgument("a chunk is larger than the staging buffer")
            if used + ch.length > STAGING_SLAB:
                flush(batch, k)
                k ^= 1
                batch, used = [], 0
            batch.append(ch)
            used += ch.length
        if batch:
            flush(batch, k)
        c.sync()
        return bad

    # -- puts --------------------------------------------------------------
    def to_host(self, dst: memoryview, src: DeviceBuffer) -> None:
        """Queue a device-to-host copy into a pinned (or registered) range."""
        if len(dst):
            self.copier.d2h(address_of(dst), src.ptr, len(dst))

    def sync(self) -> None:
        self.copier.sync()

    def forget_arena(self, arena: Any) -> None:
        """The arena is about to be dropped (a restarted daemon, or close)."""
        addr = address_of(arena.ro)
        with self._lock:
            if self._registered.pop(addr, False):
                self.copier.unregister(addr)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            for addr, reg in self._registered.items():
                if reg:
                    self.copier.unregister(addr)
            self._registered.clear()
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing at exit
                pass
        self._files.clear()
