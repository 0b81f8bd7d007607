"""A paged KV cache's blocks as kvfs values, for any layout (pure torch).

One value per block holds that block of every layer: the layers' block
slices, in sorted layer-name order, as raw bytes end to end. The block
dimension of each layer's tensor is found from the tensor (the one of size
num_blocks), so the same code serves vLLM's CPU layout ([blocks, heads,
block size, 2 x head size]) and the GPU ones ([2, blocks, ...]). Moving n
blocks costs one index_select or index_copy_ per layer, never a loop over
tokens.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class BlockCodec:
    """How one vLLM block of every layer becomes one kvfs value and back:
    the layers' block slices (in sorted layer-name order) as raw bytes, end
    to end. Works for any layout, found from the tensors: the block
    dimension is the one of size num_blocks."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int):
        self.layers = sorted(kv_caches)
        self.tensors = [kv_caches[n] for n in self.layers]
        self.dims = []
        self.nbytes = []
        for n, t in zip(self.layers, self.tensors):
            dims = [d for d, s in enumerate(t.shape) if s == num_blocks]
            if not dims:
                raise ValueError(f"layer {n}: no dimension of {num_blocks} blocks in shape {tuple(t.shape)}")
            self.dims.append(dims[0])
            self.nbytes.append(t[(slice(None),) * dims[0] + (0,)].numel() * t.element_size())
        self.block_bytes = sum(self.nbytes)
        self.device = self.tensors[0].device

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        """The ids on the cache's device, queued on the current stream (a
        pageable copy would wait for every stream of the device)."""
        if self.device.type != "cuda":
            return torch.tensor(block_ids, dtype=torch.long)
        return torch.tensor(block_ids, dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """[n, block_bytes] uint8: the blocks' bytes, one row per block."""
        ids = self._index(block_ids)
        out = torch.empty((len(block_ids), self.block_bytes), dtype=torch.uint8, device=self.device)
        pos = 0
        for t, d, nb in zip(self.tensors, self.dims, self.nbytes):
            rows = t.index_select(d, ids).movedim(d, 0).contiguous()
            out[:, pos:pos + nb] = rows.view(len(block_ids), -1).view(torch.uint8) if rows.dtype != torch.uint8 \
                else rows.view(len(block_ids), -1)
            pos += nb
        return out

    def scatter(self, block_ids: list[int], rows: torch.Tensor) -> None:
        """The inverse of gather: ``rows`` [n, block_bytes] into the cache."""
        ids = self._index(block_ids)
        pos = 0
        for t, d, nb in zip(self.tensors, self.dims, self.nbytes):
            shape = t.movedim(d, 0).shape[1:]
            # a view of this layer's columns (no copy: the row stride is a whole block)
            src = rows[:, pos:pos + nb].view(t.dtype).unflatten(1, shape)
            t.index_copy_(d, ids, src.movedim(0, d))
            pos += nb


class Staging:
    """Where loads land before they are scattered: one buffer of up to
    ``max_bytes`` of whole blocks, allocated once and reused (a fresh host
    buffer per load pays a page fault per 4 KiB, which at these sizes costs
    more than the read). A load longer than it goes in chunks of ``per``
    blocks. One user at a time (the loader thread)."""

    def __init__(self, block_bytes: int, device: torch.device, max_bytes: int = 64 << 20):
        self.block_bytes, self.device = block_bytes, device
        self.per = max(1, max_bytes // block_bytes)
        self._buf: torch.Tensor | None = None

    def rows(self, n: int) -> torch.Tensor:
        """[n, block_bytes] uint8, n <= per."""
        assert n <= self.per
        if self._buf is None:
            self._buf = torch.zeros((self.per, self.block_bytes), dtype=torch.uint8, device=self.device)
        return self._buf[:n]


def buffers(rows: torch.Tensor) -> list[Any]:
    """Per-block buffers kvfs can read into or store from: NumPy views of
    host rows, the tensors themselves for device memory (kvfs's GPU path)."""
    if rows.device.type == "cpu":
        arr = rows.numpy()
        return [arr[i] for i in range(arr.shape[0])]
    if rows.is_contiguous():
        from kvfs.gpu import device_rows
        return device_rows(rows)  # one call into torch, not several per block
    return [rows[i] for i in range(rows.shape[0])]


def ready_after(rows: torch.Tensor) -> Any:
    """For device rows: a wait for the work queued so far on this thread's
    stream (the gather that filled them), to run on the thread that stores
    them, whose own stream knows nothing of it. None for host rows."""
    if rows.device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(rows.device))
    return ev.synchronize


class SideStream:
    """A background thread's device work (an async load) on a CUDA stream
    of its own, so it neither waits for the engine's forward nor delays it;
    the work is complete when ``with stream.run():`` ends, so whatever the
    thread reports done may be used from any stream. On CPU: nothing."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def run(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield
        self.stream.synchronize()


def load_blocks(kv: Any, ns: str, codec: BlockCodec, staging: Staging, stream: SideStream,
                keys: list[str], block_ids: list[int]) -> list[int]:
    """Read ``keys`` from kvfs into the cache's ``block_ids`` (``kv`` is a
    kvblocks.Guarded: a failure is a miss), through ``staging`` a chunk at
    a time, the copies on ``stream``; the block ids that did not load.
    Everything it wrote is in the cache when it returns."""
    bad: list[int] = []
    for lo in range(0, len(keys), staging.per):
        ks, ids = keys[lo:lo + staging.per], block_ids[lo:lo + staging.per]
        with stream.run():
            rows = staging.rows(len(ks))
            sizes = kv.call(lambda s: s.get_many_into(ks, buffers(rows), ns=ns), [-1] * len(ks))
            good = [i for i, n in enumerate(sizes) if n == codec.block_bytes]
            if good:
                codec.scatter([ids[i] for i in good], rows[good] if len(good) < len(ks) else rows)
        bad += [ids[i] for i, n in enumerate(sizes) if n != codec.block_bytes]
    return bad
