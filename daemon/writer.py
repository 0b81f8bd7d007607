"""The writer thread: the only thread that opens LMDB write transactions.

Jobs are functions ``job(txn) -> result``. The thread takes every job that
is waiting, runs them all in one write transaction (group commit), commits,
and, if any job asked for durability, calls ``env.sync(True)`` before any of
them is answered. So a ``sync`` put is acknowledged only after its index
entry is on disk (its payload was fdatasync'd before the job was queued).
A job that raises is answered with its exception; its writes are rolled back
by running it inside a nested transaction, so it cannot spoil the batch.

In fast mode the index is synced every couple of seconds
(``fast_sync_interval``: what a power cut may take from fast puts) by a
separate syncer thread, never by the writer, after ``before_sync`` has
fdatasync'd the segments its commits may point into. On ext4
(data=ordered) an fsync of the index waits for the writeback of every
newly allocated segment block, and doing that on the writer would stall
every put behind the disk.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import lmdb

from .threadnames import name_os_thread

Job = Callable[[lmdb.Transaction], Any]


class WriterThread:
    def __init__(self, env: lmdb.Environment, *, fast_sync_interval: float = 2.0,
                 on_idle: Callable[[lmdb.Transaction], None] | None = None,
                 before_sync: Callable[[], None] | None = None):
        self.env = env
        self.fast_sync_interval = fast_sync_interval
        self.on_idle = on_idle
        self.before_sync = before_sync
        self._q: queue.Queue[tuple[Job, bool, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kvfs-writer", daemon=True)
        self._last_sync = time.monotonic()
        self._dirty = False
        self.commits = 0
        self._stopping = False
        self._sync_wanted = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="kvfs-index-sync", daemon=True)
        self._thread.start()
        self._syncer.start()

    def submit(self, job: Job, *, sync: bool = False) -> "Future[Any]":
        fut: Future[Any] = Future()
        self._q.put((job, sync, fut))
        return fut

    def call(self, job: Job, *, sync: bool = False) -> Any:
        return self.submit(job, sync=sync).result()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._stopping = True
        self._sync_wanted.set()
        self._syncer.join()
        self._sync_index()

    def _sync_loop(self) -> None:
        name_os_thread()
        while True:
            self._sync_wanted.wait()
            self._sync_wanted.clear()
            if self._stopping:
                return
            try:
                self._sync_index()
            except Exception:  # noqa: BLE001 - retried at the next interval and at stop
                import logging
                logging.getLogger("kvfsd").exception("index sync failed")

    def _sync_index(self) -> None:
        # payloads before the index that points at them (before_sync:
        # Placement.durable_round), unless a sync put's caller did it
        if self.before_sync is not None:
            self.before_sync()
        self.env.sync(True)

    def _run(self) -> None:
        name_os_thread()
        stopping = False
        while not stopping:
            try:
                first = self._q.get(timeout=self.fast_sync_interval)
            except queue.Empty:
                self._idle()
                continue
            batch = []
            item = first
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                if len(batch) >= 512:
                    break
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run_batch(batch)
            if time.monotonic() - self._last_sync > self.fast_sync_interval:
                self._idle()

    def _idle(self) -> None:
        if self.on_idle is not None:
            try:
                with self.env.begin(write=True) as txn:
                    self.on_idle(txn)
                self._dirty = True
            except Exception:  # background upkeep must never kill the writer
                import logging
                logging.getLogger("kvfsd").exception("writer idle job failed")
        if self._dirty:
            self._sync_wanted.set()  # the syncer thread fsyncs; the writer goes on
            self._dirty = False
        self._last_sync = time.monotonic()

    def _run_batch(self, batch: list[tuple[Job, bool, Future]]) -> None:
        results: list[tuple[Future, bool, Any]] = []
        want_sync = False
        try:
            with self.env.begin(write=True) as txn:
                for job, sync, fut in batch:
                    want_sync |= sync
                    try:
                        with self.env.begin(write=True, parent=txn) as sub:
                            res = job(sub)
                        results.append((fut, True, res))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        results.append((fut, False, e))
            self.commits += 1
            self._dirty = True
            if want_sync:
                self.env.sync(True)
                self._dirty = False
        except BaseException as e:  # the commit itself failed: every job fails
            for _job, _sync, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for fut, ok, res in results:
            if ok:
                fut.set_result(res)
            else:
                fut.set_exception(res)
