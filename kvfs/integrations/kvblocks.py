"""What every engine adapter needs, with no engine imported (DESIGN.md §9).

- ``fit_key``: an engine's key string as a valid kvfs key.
- ``namespace``: the fingerprint of everything that changes a block's
  bytes, as a kvfs namespace, so two engines that differ never share a
  block and two that agree always do.
- ``SaveQueue``: saves in the background with a bounded backlog; a save
  that does not fit is dropped and counted, never waited for.
- ``LoadQueue``: loads on a background thread, handed back as finished
  (with the blocks that failed), so an engine never waits for bytes.
- ``Guarded``: a kvfs client that is never an engine's problem: every
  failure is counted and becomes a miss, and a daemon that went away is
  tried again (at most once a second) until it is back.
- ``Reporter``: an adapter's counters, sent to the daemon at most once a
  second, so ``kvfs stats`` shows them per namespace.
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections import Counter
from typing import Any, Callable, Sequence

from kvfs import format as fmt
from kvfs.errors import DaemonUnavailable, InvalidKey
from kvfs.keys import normalize_key

log = logging.getLogger("kvfs.integrations")

RETRY_S = 1.0  # how often a client without a daemon tries to connect again
REPORT_S = 1.0  # how often an adapter's counters go to the daemon


def namespace(engine: str, model: str, fields: dict[str, Any]) -> str:
    """``<engine>.<model>.<hash>``: the hash covers the engine, the model
    and every field given (dtype, block size, layout, parallel ranks, ...),
    plus the kvfs record format. Readable where it can be, exact always."""
    ident = json.dumps({"engine": engine, "model": model, "kvfs_format": fmt.FORMAT_VERSION, **fields},
                       sort_keys=True, default=str)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", model.rstrip("/").split("/")[-1])[:40] or "model"
    return f"{engine}.{name}.{digest}"


def fit_key(text: str) -> str:
    """An engine's key string as a kvfs key: itself when kvfs's key rules
    allow it, else ``h.<sha256>`` (too long, or a character a key may not hold)."""
    try:
        return normalize_key(text)
    except InvalidKey:
        return "h." + hashlib.sha256(text.encode()).hexdigest()


class Guarded:
    """A kvfs.Store behind a wall: ``call(fn, default)`` runs ``fn(store)``
    and answers ``default`` on any failure (counted under ``errors``)."""

    def __init__(self, socket: str | None, counters: Counter[str], connect: Callable[..., Any] | None = None):
        import kvfs

        self.socket = socket
        self.counters = counters
        self._connect = connect or kvfs.connect
        self._store: Any = None
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._warned = False

    def store(self) -> Any:
        with self._lock:
            if self._store is None and time.monotonic() >= self._next_try:
                try:
                    self._store = self._connect(self.socket)
                    if self._warned:
                        log.warning("kvfs: the daemon at %s is back; using it again", self.socket or "$KVFS_SOCKET")
                    self._warned = False
                except Exception as e:  # noqa: BLE001 - no daemon: misses until there is one
                    self._next_try = time.monotonic() + RETRY_S
                    self.counters["unavailable"] += 1
                    if not self._warned:
                        log.warning("kvfs: no daemon (%s); serving without it, retrying", e)
                        self._warned = True
            return self._store

    def call(self, fn: Callable[[Any], Any], default: Any) -> Any:
        s = self.store()
        if s is None:
            return default
        try:
            return fn(s)
        except Exception as e:  # noqa: BLE001 - an engine never sees a kvfs failure
            self.counters["errors"] += 1
            if isinstance(e, (DaemonUnavailable, ConnectionError, OSError)):
                with self._lock:
                    try:
                        self._store.close()
                    except Exception:  # noqa: BLE001
                        pass
                    self._store = None  # reconnect on a later call
            log.warning("kvfs: %s: %s (treated as a miss)", type(e).__name__, e)
            return default

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                try:
                    self._store.close()
                except Exception:  # noqa: BLE001
                    pass
                self._store = None


class SaveQueue:
    """Puts on one background thread. ``offer`` never blocks: past
    ``max_bytes`` queued, a save is dropped (counted ``saves_dropped``)."""

    def __init__(self, kv: Guarded, ns: str, counters: Counter[str], max_bytes: int = 256 << 20):
        self.kv = kv
        self.ns = ns
        self.counters = counters
        self.max_bytes = max_bytes
        self._queued = 0
        self._lock = threading.Lock()
        self._q: queue.Queue[tuple[list[str], Sequence[Any], int, Callable[[], Any] | None] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="kvfs-saves", daemon=True)
        self._thread.start()

    def offer(self, keys: list[str], values: Sequence[Any], nbytes: int,
              ready: Callable[[], Any] | None = None) -> bool:
        """Queue a put of ``values`` (which the caller no longer changes);
        ``ready``, if given, is waited for on the saving thread first (the
        event after the device copy that filled them)."""
        with self._lock:
            if self._queued + nbytes > self.max_bytes:
                self.counters["saves_dropped"] += len(keys)
                return False
            self._queued += nbytes
            self._idle.clear()
        self._q.put((keys, values, nbytes, ready))
        return True

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            keys, values, nbytes, ready = job
            t = time.perf_counter()
            if ready is not None:
                ready()
            stored = self.kv.call(lambda s: s.put_many(keys, values, ns=self.ns), None)
            with self._lock:
                self._queued -= nbytes
                if stored is not None:
                    self.counters["blocks_saved"] += sum(1 for x in stored if x)
                    self.counters["bytes_saved"] += nbytes
                    self.counters["save_us"] += int((time.perf_counter() - t) * 1e6)
                else:
                    self.counters["saves_failed"] += len(keys)
                if self._queued == 0 and self._q.empty():
                    self._idle.set()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until what was offered is stored (or failed)."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.drain(timeout)
        self._q.put(None)
        self._thread.join(timeout)


class LoadQueue:
    """Loads on one background thread. ``submit(tag, block_ids, job)``
    queues ``job()``, which fills those blocks and returns the ones it could
    not; ``take_finished`` and ``take_errors`` hand over what finished since
    the last call. A job's failed blocks are recorded before its tag is
    finished, so they never reach the engine later than the tag does (vLLM
    needs them no later than the step that reports the load finished)."""

    def __init__(self, counters: Counter[str], name: str = "kvfs-loads"):
        self.counters = counters
        self._lock = threading.Lock()
        self._finished: set[str] = set()
        self._errors: set[int] = set()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._q: queue.Queue[tuple[str, list[int], Callable[[], Sequence[int]]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, tag: str, block_ids: list[int], job: Callable[[], Sequence[int]]) -> None:
        with self._lock:
            self._pending += 1
        self._q.put((tag, block_ids, job))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            tag, block_ids, job = item
            try:
                failed = set(job())
            except Exception as e:  # noqa: BLE001 - a load that breaks is a miss of every block in it
                log.warning("kvfs: a load failed (%s: %s); its blocks are recomputed", type(e).__name__, e)
                self.counters["errors"] += 1
                failed = set(block_ids)
            with self._lock:
                self._errors |= failed
                self._finished.add(tag)
                self._pending -= 1
                self._idle.notify_all()

    def take_finished(self) -> set[str]:
        with self._lock:
            out, self._finished = self._finished, set()
        return out

    def take_errors(self) -> set[int]:
        with self._lock:
            out, self._errors = self._errors, set()
        return out

    def in_flight(self) -> int:
        with self._lock:
            return self._pending

    def drain(self, timeout: float = 30.0) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.drain(timeout)
        self._q.put(None)
        self._thread.join(timeout)


class Reporter:
    """Sends the growth of ``counters`` to the daemon under ``ns`` (op
    ``report``), at most once every REPORT_S, on a timer thread: a call
    leaves a report due (now, or when REPORT_S since the last is up), so
    the engine's thread never waits for the daemon and what was counted
    last, like saves that finish after the engine's last step, still
    arrives. A report that fails is sent again with the next one: nothing
    is counted twice, or lost while the daemon lives."""

    def __init__(self, kv: Guarded, ns: str, counters: Counter[str]):
        self.kv, self.ns, self.counters = kv, ns, counters
        self._sent: Counter[str] = Counter()
        self._next = 0.0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False

    def maybe_report(self, force: bool = False) -> None:
        """Leave a report due; ``force``: send it now, on this thread."""
        if force:
            self._send()
            return
        with self._lock:
            if self._timer is None and not self._closed:
                self._timer = threading.Timer(max(0.0, self._next - time.monotonic()), self._due)
                self._timer.daemon = True
                self._timer.start()

    def _send(self) -> None:
        with self._lock:
            self._next = time.monotonic() + REPORT_S
            cur = Counter(self.counters)
            delta = {k: v - self._sent.get(k, 0) for k, v in cur.items() if v > self._sent.get(k, 0)}
            if delta and self.kv.call(lambda s: s.report(self.ns, delta), False) is not False:
                self._sent = cur

    def _due(self) -> None:
        with self._lock:
            self._timer = None
        self._send()

    def close(self) -> None:
        """Send what is left; no timer runs after this."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._send()
