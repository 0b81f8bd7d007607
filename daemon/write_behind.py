"""Write-behind for files written through the mount.

A FUSE write is answered as soon as its bytes are queued; a task writes the
queue to T1 in a worker thread, in batches. The kernel then sends the next
write while the previous one is on its way to disk, so the FUSE round trip
and the disk write overlap (without this, each 1 MiB write waits for both,
one after the other).

Invariants:
- Writes of one file are applied in the order they were received (one
  consumer task per file, FIFO queue).
- At most ``limit`` bytes per file are queued; a writer past it waits.
- An error of a queued write is kept and raised by the next ``write`` or by
  ``settle`` (which flush and truncate call): `cp` sees it at close(2) at
  the latest, and a file with a failed write is never committed.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import trio

from .stream_put import StreamPut

QUEUE_LIMIT = 16 << 20  # bytes queued per file


class WriteBehind:
    def __init__(self, put: StreamPut, nursery: trio.Nursery, limit: int = QUEUE_LIMIT) -> None:
        self.put = put
        self.limit = limit
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued = 0  # bytes in the queue and in the batch being written
        self.end = 0  # the end of the furthest write received
        self.error: BaseException | None = None
        self.changed = trio.Event()  # set whenever the queue or ``queued`` changes
        self.closed = False
        nursery.start_soon(self._run)

    def _kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def write(self, buf: bytes, off: int) -> int:
        self.raise_error()
        while self.queued and self.queued + len(buf) > self.limit:
            await self._wait()
            self.raise_error()
        self.queue.append((buf, off))
        self.queued += len(buf)
        self.end = max(self.end, off + len(buf))
        self._kick()
        return len(buf)

    async def _wait(self) -> None:
        await self.changed.wait()

    async def settle(self) -> None:
        """Wait until every queued write is on disk; raise the first error."""
        while self.queued and self.error is None:
            await self._wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """No more writes: the task ends once the queue is empty."""
        self.closed = True
        self._kick()

    async def _run(self) -> None:
        while True:
            if not self.queue:
                if self.closed:
                    return
                await self._wait()
                continue
            batch = list(self.queue)
            self.queue.clear()
            try:
                if self.error is None:
                    await trio.to_thread.run_sync(self._write_batch, batch)
            except Exception as e:  # noqa: BLE001 - kept for the writer's next call
                self.error = e
            finally:
                self.queued -= sum(len(b) for b, _o in batch)
                self._kick()

    def _write_batch(self, batch: list[tuple[bytes, int]]) -> Any:
        for buf, off in batch:
            self.put.write(buf, off)
