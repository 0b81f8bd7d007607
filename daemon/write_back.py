"""Write-back of fast-mode T0 puts to T1, by a small pool of threads.

A fast-mode T0 put is acknowledged once its bytes are in the arena and its
mirror entry is published; its plan then waits in ``Engine.wb_pending``
(insertion order) until a pool thread takes it.

Invariants:
- A queued plan is taken by exactly one taker: a pool thread (``_take``) or
  ``Engine.close`` (``Engine.take_write_backs``), each popping under the
  queue's own lock (``Engine._wb_lock``, never held with another: queueing
  a put on the event loop does not wait for the engine lock). Sync puts are never queued: their caller writes them.
- A thread takes what is queued, oldest first, up to ``BATCH_BYTES`` and
  ``BATCH_PLANS``, and writes it as one batch: every record with pwritev
  (the GIL is released, so threads write different stripes at once), then
  one writer job publishes the whole batch, then the mirror follows.
- A failing write drops only the plans it hit (T0 may not keep what T1
  refused), logged; the thread goes on with the next batch.
- A small backlog lingers up to ``LINGER_S`` for more to join it (one
  thread at a time waits so; an ``EAGER_*`` backlog is taken at once). A
  stream of single puts then makes one write-back batch every ``LINGER_S``
  instead of a wake-up of the pool, a pwritev and an LMDB commit per put,
  each taking the GIL from the event loop while it answers the next put;
  writes of neighbouring records coalesce (``t0_write_records``). Nothing waits
  on this but T1: a fast-mode put is acknowledged from T0, a sync put is
  never queued, and ``settle`` waits at most ``LINGER_S`` longer.
- Backpressure is the arena: dirty values are never evicted, so when
  write-back falls behind, the arena fills, reservations fail and clients
  put straight to T1 (alloc/commit) at disk speed. No put waits for the pool.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from .threadnames import name_os_thread

if TYPE_CHECKING:
    from .engine import Engine
    from .segments import PutPlan

log = logging.getLogger("kvfsd")

BATCH_BYTES = 32 << 20
BATCH_PLANS = 256
LINGER_S = 0.002
EAGER_PLANS = 32
EAGER_BYTES = 4 << 20
# The pool's threads run this much nicer than the daemon: where the CPUs are all busy
# (a waited put on a 2-core machine: the client and the event loop each
# spin for the other's answer) a write-back thread that wakes no longer
# takes a core from them on equal terms, which put one waited put in four
# in a 400-600 us slow mode (a spin ran out, then a wake-up on each side).
# On the 2-core VM, lone waited 64 KiB puts: p75 160-175 us against
# 260-440 at nice 0, p50 unchanged. Backpressure is unchanged: what the
# pool does not write in time fills the arena, and puts then go to T1.
NICE = 10


def pool_size(stripes: int) -> int:
    """One thread per stripe (each keeps one disk busy), two at least (one
    copies while the other waits on the writer), eight at most."""
    return max(2, min(8, stripes))


class WriteBackPool:
    def __init__(self, engine: "Engine", threads: int):
        self.engine = engine
        self._cv = threading.Condition()
        self._stopping = False
        self._lingering = False  # a thread waits for a small backlog to grow
        self.batches = 0
        self._threads = [threading.Thread(target=self._run, name=f"kvfs-wb{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def kick(self) -> None:
        """Something was queued."""
        with self._cv:
            if not self._lingering or self._eager():
                self._cv.notify()

    def _eager(self) -> bool:
        """The backlog is worth a batch now (read without the engine lock:
        a stale answer only shortens or lengthens one linger)."""
        eng = self.engine
        return len(eng.wb_pending) >= EAGER_PLANS or (eng.t0 is not None and eng.t0.backlog_bytes >= EAGER_BYTES)

    def stop(self) -> None:
        """Let every thread finish its batch and end; what is still queued
        stays queued (``Engine.close`` writes it)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def _take(self) -> list["PutPlan"]:
        eng = self.engine
        with eng._wb_lock:
            plans: list[PutPlan] = []
            size = 0
            for key in list(eng.wb_pending):
                if len(plans) >= BATCH_PLANS or (plans and size >= BATCH_BYTES):
                    break
                p = eng.wb_pending.pop(key)
                plans.append(p)
                size += sum(p.sizes)
            return plans

    def _run(self) -> None:
        name_os_thread()
        try:  # this thread only (a Linux thread is its own task), NICE below the daemon's own
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
        except OSError:
            pass  # (lowering one's own priority is always allowed; a refusal only costs the latency above)
        while True:
            with self._cv:
                while not self._stopping and not self.engine.wb_pending:
                    self._cv.wait()
                if self._stopping:
                    return
                if not self._lingering and not self._eager():
                    self._lingering = True
                    self._cv.wait(LINGER_S)  # an eager kick or stop ends it early
                    self._lingering = False
            plans = self._take()
            if not plans:
                continue
            if self.engine.wb_pending:
                self.kick()  # more is queued: another thread takes it meanwhile
            try:
                self.engine.write_back_many(plans, False)
            except Exception as e:  # noqa: BLE001 - the daemon must outlive a failing disk
                # write_back_many dropped the affected objects (T0 may not hold what T1 refused)
                log.error("write-back to T1 failed: %s: %s", type(e).__name__, e)
            self.batches += 1
