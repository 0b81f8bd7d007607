"""The shared tier (T2): objects written through to an S3 bucket, with a
presence index in Redis/Valkey, and read through on a local miss.

Keys are content addresses, so nodes share without locks: a key means the
same bytes on every node, a second upload of it is a no-op, and a node
that finds it remotely can install it as its own.

Invariants:
- **failure means local only**: no client call fails because of T2. An
  outage, a timeout or a 5xx makes a remote lookup a miss and a read-through
  a miss; S3's failures open a back-off (0.25 s doubling to 10 s) during
  which T2 is not asked at all, so an outage costs one timeout, not one per
  call. Uploads wait through it in their bounded queue; what does not fit
  is dropped and counted;
- **never wrong bytes**: a fetched object is checked (header sum, the
  namespace and key it names, payload length and xxh3-128) before it is
  installed; one that fails is counted, never installed, and removed from
  T2 with its presence record, so no node fetches it again;
- **presence follows the bytes**: a presence record is written only after
  its upload succeeded (or found the object there); one that names an
  object S3 lacks is deleted when a read-through finds it missing;
- an object installed by a read-through is not uploaded again;
- uploads read the object back from T1 under a lease and check its chunk
  sums, as any reader does.
"""
from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from kvfs.errors import KvfsError
from kvfs.remote_object import (BadObject, ObjectHead, check_payload, decode_head, encode_head, object_name,
                                presence_key, presence_keys, tier_tag)

from .backoff import Backoff
from .presence import UNKNOWN, Presence, command
from .s3_bucket import Bucket, RemoteError

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("kvfsd")

# fetched bytes installed by one put (one commit): large enough that a commit
# costs little, small enough that installing overlaps the fetches still running
INSTALL_BATCH = 16 << 20

# rewrites a presence record's last access, keeping its length; nothing if it is gone
_TOUCH = (b"local v = redis.call('GET', KEYS[1]) if not v then return 0 end "
          b"local n = string.match(v, '^(%d+)') if not n then return 0 end "
          b"redis.call('SET', KEYS[1], n .. ' ' .. ARGV[1]) return 1")


@dataclass
class RemoteConfig:
    url: str  # s3://bucket/prefix
    endpoint: str | None = None
    credentials: Path | None = None
    presence: str | None = None  # redis://host:port[,host:port...] or valkey://...
    namespaces: list[str] = field(default_factory=lambda: ["*"])  # globs of namespaces written through
    queue: int = 65536  # uploads waiting, at most (objects)
    uploaders: int = 4
    fetchers: int = 16
    timeout: float = 2.0  # one S3 request (a part of at most ``part`` bytes), at most (seconds)
    part: int = 16 << 20  # an object larger than this is fetched as that many equal ranges, concurrently
    touch_every: float = 3600.0  # a key's last access is written at most this often (seconds)
    touch_rate: int = 1000  # last-access writes per second, at most
    gc_older_than: float | None = None  # the daemon removes T2 objects not accessed for this long

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "endpoint": self.endpoint, "presence": self.presence,
                "namespaces": self.namespaces, "queue_max": self.queue}


def presence_value(length: int, atime: float) -> bytes:
    """A presence record: the S3 object's length (so a read-through fetches
    its parts at once) and its last access, unix seconds."""
    return b"%d %d" % (length, int(atime))


def parse_presence_value(v: bytes) -> tuple[int, int] | None:
    try:
        a, b = v.split(b" ", 1)
        return int(a), int(b)
    except ValueError:
        return None


class SharedTier:
    def __init__(self, cfg: RemoteConfig, engine: "Engine"):
        self.cfg = cfg
        self.engine = engine
        self.bucket = Bucket(cfg.url, endpoint=cfg.endpoint, credentials=cfg.credentials, timeout=cfg.timeout)
        self.tag = tier_tag(self.bucket.bucket, self.bucket.prefix)
        self.presence = Presence(cfg.presence) if cfg.presence else None
        self.s3 = Backoff(f"shared tier: S3 ({cfg.url})", "the shared tier is local-only until it answers again")
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()  # many threads count (fetches run 16 at a time)
        self._ns_match: dict[str, bool] = {}
        self._installing = threading.local()
        self._q: deque[tuple[str, str]] = deque()
        self._cv = threading.Condition()
        self._busy = 0  # uploads taken from the queue and not finished
        self._stop = False
        self._fetching: dict[tuple[str, str], threading.Event] = {}
        self._fetch_lock = threading.Lock()
        self._touch_pending: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._touched: OrderedDict[tuple[str, str], float] = OrderedDict()  # when each was last written
        self._pool = ThreadPoolExecutor(cfg.fetchers, thread_name_prefix="kvfs-t2-get")
        self._threads = [threading.Thread(target=self._upload_loop, name=f"kvfs-t2-up{i}", daemon=True)
                         for i in range(cfg.uploaders)]
        self._threads.append(threading.Thread(target=self._probe_loop, name="kvfs-t2-probe", daemon=True))
        if self.presence is not None:
            self._threads.append(threading.Thread(target=self._touch_loop, name="kvfs-t2-touch", daemon=True))
        for t in self._threads:
            t.start()

    def _add(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[name] += n

    # -- the engine's side ------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop; uploads still queued are given up (they were best effort)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def written_through(self, ns: str) -> bool:
        hit = self._ns_match.get(ns)
        if hit is None:
            hit = self._ns_match[ns] = any(fnmatch.fnmatchcase(ns, g) for g in self.cfg.namespaces)
        return hit

    def committed(self, ns: str, keys: Iterable[str]) -> None:
        """Objects just committed locally: queue their uploads (memory
        only, never blocks). Not those a read-through is installing."""
        if getattr(self._installing, "on", False) or not self.written_through(ns):
            return
        with self._cv:
            room = self.cfg.queue - len(self._q)
            for k in keys:
                if room <= 0:
                    self._add("upload_dropped")
                    continue
                self._q.append((ns, k))
                room -= 1
            self._cv.notify()

    def accessed(self, items: Iterable[tuple[str, str]]) -> None:
        """Keys read on this node: their last access goes to the presence
        index later, at a bounded rate (memory only)."""
        if self.presence is None:
            return
        now = time.time()
        with self._cv:
            for it in items:
                if len(self._touch_pending) >= 4 * self.cfg.touch_rate and it not in self._touch_pending:
                    self._add("touch_dropped")
                    continue
                self._touch_pending[it] = now

    def drain(self, timeout: float) -> bool:
        """Wait until no upload is queued or running (tests, benchmarks)."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._q or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    # -- uploads ----------------------------------------------------------

    def _upload_loop(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                batch = [self._q.popleft() for _ in range(min(len(self._q), 32))]
                self._busy += 1
            try:
                self._upload_batch(batch)
            except Exception:  # noqa: BLE001 - an uploader never dies
                log.exception("shared tier: upload failed")
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def _requeue(self, items: Sequence[tuple[str, str]]) -> None:
        with self._cv:
            room = self.cfg.queue - len(self._q)
            self._add("upload_dropped", max(0, len(items) - room))
            for it in reversed(items[:max(room, 0)]):
                self._q.appendleft(it)

    def _wait_s3(self) -> bool:
        """Sleep through S3's back-off; False if stopping."""
        while self.s3.down():
            with self._cv:
                if self._stop:
                    return False
                self._cv.wait(min(max(self.s3.until - time.monotonic(), 0.01), 0.5))
        return not self._stop

    def _upload_batch(self, batch: list[tuple[str, str]]) -> None:
        done: list[tuple[tuple[str, str], bytes, bytes]] = []  # (item, presence key, record) to write
        for i, (ns, key) in enumerate(batch):
            if not self._wait_s3():
                return
            got = self.engine.read_verified(ns, key, lambda size, csum, meta: encode_head(ns, key, size, csum, meta))
            if got is None:
                self._add("upload_skipped")  # deleted or evicted meanwhile, or failed its check
                continue
            size, _csum, _meta, obj = got  # obj: the head, then the value
            try:
                fresh = self.bucket.put_new(object_name(self.bucket.prefix, ns, key), obj)
            except RemoteError as e:
                self.s3.failed(e)
                self._add("upload_errors")
                self._requeue(batch[i:])  # they wait for S3 to answer again
                break
            self.s3.ok()
            self._add("uploaded" if fresh else "upload_existing")
            if fresh:
                self._add("bytes_up", len(obj))
            done.append(((ns, key), presence_key(self.tag, ns, key), presence_value(len(obj), time.time())))
        if done and self.presence is not None:
            took = self.presence.set_many([(pk, v) for _it, pk, v in done])
            failed = [it for (it, _pk, _v), ok in zip(done, took) if not ok]
            if failed:
                self._add("presence_errors", len(failed))
                self._requeue(failed)  # uploaded already: the retry's PUT is a no-op, then the record
                with self._cv:
                    self._cv.wait(0.25)

    # -- read-through -----------------------------------------------------

    def has(self, ns: str, keys: Sequence[str]) -> list[bool]:
        """Whether T2 holds each key (the presence index, or parallel HEADs
        without one). Unknown reads as False."""
        if not keys:
            return []
        self._add("remote_lookups", len(keys))
        if self.presence is not None:
            got = self.presence.exists_many(presence_keys(self.tag, ns, list(keys)))
            out = [g is True for g in got]
        else:
            if not self.s3.usable():
                return [False] * len(keys)
            out = [n is not None for n in self._heads(ns, keys)]
        self._add("remote_lookup_hits", sum(out))
        return out  # (an access is recorded when a block is read, not when it is asked about)

    def prefix(self, ns: str, keys: Sequence[str]) -> int:
        n = 0
        for hit in self.has(ns, keys):
            if not hit:
                break
            n += 1
        return n

    def _heads(self, ns: str, keys: Sequence[str]) -> list[int | None]:
        def head(k: str) -> int | None:
            if not self.s3.usable():  # failed meanwhile: the rest are misses at once
                return None
            try:
                n = self.bucket.head(object_name(self.bucket.prefix, ns, k))
                self.s3.ok()
                return n
            except RemoteError as e:
                self.s3.failed(e)
                self._add("remote_errors")
                return None
        return list(self._pool.map(head, keys))

    def fetch(self, ns: str, keys: Sequence[str]) -> int:
        """Read through: fetch what T2 holds of ``keys`` (concurrently),
        check it, install it locally in one batch. How many were installed.
        Never raises for a remote failure: what cannot be fetched is a miss."""
        if not keys:
            return 0
        self._add("fetch_asked", len(keys))
        if not self.s3.usable():
            self._add("fetch_skipped", len(keys))
            return 0
        lengths: list[int | None]
        if self.presence is not None:
            pks = presence_keys(self.tag, ns, list(keys))
            lengths = []
            for v in self.presence.get_many(pks):
                pv = None if v is None or v is UNKNOWN else parse_presence_value(v)
                lengths.append(None if pv is None else pv[0])
        else:
            lengths = self._heads(ns, keys)
        todo: list[tuple[str, int]] = []
        waits: list[threading.Event] = []
        mine: list[str] = []
        with self._fetch_lock:  # a key another request fetches now is waited for, not fetched twice
            for k, n in zip(keys, lengths):
                if n is None:
                    continue
                ev = self._fetching.get((ns, k))
                if ev is not None:
                    waits.append(ev)
                    continue
                self._fetching[(ns, k)] = threading.Event()
                todo.append((k, n))
                mine.append(k)
        installed = 0
        try:
            if todo:
                # installed as they arrive, a batch at a time, while the rest are still fetched
                t = time.perf_counter()
                futs = [self._pool.submit(self._fetch_checked, ns, k, n) for k, n in todo]
                ready: list[tuple[str, ObjectHead, memoryview]] = []
                size = 0
                for f in as_completed(futs):
                    g = f.result()
                    if g is None:
                        continue
                    ready.append(g)
                    size += len(g[2])
                    if size >= INSTALL_BATCH:
                        installed += self._install(ns, ready)
                        ready, size = [], 0
                if ready:
                    installed += self._install(ns, ready)
                self._add("read_through_us", int((time.perf_counter() - t) * 1e6))
        finally:
            with self._fetch_lock:
                for k in mine:
                    self._fetching.pop((ns, k)).set()
        for ev in waits:
            ev.wait(self.cfg.timeout * 4)
            self._add("fetch_joined")
        return installed + len(waits)

    def _install(self, ns: str, got: list[tuple[str, ObjectHead, memoryview]]) -> int:
        """Install checked objects as one put (one commit). How many are now
        stored here (stored, or there already: put meanwhile)."""
        self._installing.on = True
        t = time.perf_counter()
        try:
            stored = self.engine.install_many(ns, [(k, h.meta, v) for k, h, v in got])
        except KvfsError as e:
            self._add("install_failed", len(got))
            log.warning("shared tier: %d objects fetched but not installed: %s", len(got), e)
            return 0
        finally:
            self._installing.on = False
            self._add("install_us", int((time.perf_counter() - t) * 1e6))
        self._add("fetched", len(stored))
        self.accessed((ns, k) for k, _h, _v in got)
        return len(stored)

    def _fetch_checked(self, ns: str, key: str, length: int) -> tuple[str, ObjectHead, memoryview] | None:
        """One object fetched and checked: (key, head, payload), or None (a
        miss: S3 failed, the object is gone, or it failed its checks)."""
        if not self.s3.usable():  # failed meanwhile (another part of this batch): a miss at once
            self._add("fetch_skipped")
            return None
        name = object_name(self.bucket.prefix, ns, key)
        try:
            data = self.bucket.get(name, length, self.cfg.part)
            self.s3.ok()
        except RemoteError as e:
            self.s3.failed(e)
            self._add("remote_errors")
            return None
        if data is None:  # the presence index named an object S3 lacks: repair it
            self._add("remote_stale")
            if self.presence is not None:
                self.presence.delete_many([presence_key(self.tag, ns, key)])
            return None
        try:
            head = decode_head(data, ns, key)
            payload = data[head.head_len:]
            check_payload(head, payload)
        except BadObject as e:
            self._add("remote_corrupt")
            log.warning("shared tier: %s/%s refused: %s (removed from the shared tier)", ns, key, e)
            self._remove_remote([(ns, key)])
            return None
        self._add("bytes_down", len(data))
        return key, head, payload

    def _remove_remote(self, items: Sequence[tuple[str, str]]) -> None:
        """Presence records first (no node is sent to them any more), then the objects."""
        if self.presence is not None:
            self.presence.delete_many([presence_key(self.tag, ns, k) for ns, k in items])
        for ns, k in items:
            try:
                self.bucket.delete(object_name(self.bucket.prefix, ns, k))
            except RemoteError as e:
                log.warning("shared tier: %s", e)

    def _probe_loop(self) -> None:
        """While S3 is down and no upload is waiting to retry, a HEAD once
        each back-off finds out when it answers again (clients never do)."""
        while True:
            with self._cv:
                self._cv.wait(0.1)
                if self._stop:
                    return
                idle = not self._q and not self._busy
            if self.s3.usable() or self.s3.down() or not idle:
                continue
            try:
                self.bucket.head(f"{self.bucket.prefix}/.kvfs-probe" if self.bucket.prefix else ".kvfs-probe")
                self.s3.ok()
            except RemoteError as e:
                self.s3.failed(e)

    # -- last access ------------------------------------------------------

    def _touch_loop(self) -> None:
        assert self.presence is not None
        while True:
            with self._cv:
                self._cv.wait(1.0)
                if self._stop:
                    return
                now = time.time()
                batch: list[tuple[str, str]] = []
                while self._touch_pending and len(batch) < self.cfg.touch_rate:
                    it, _at = self._touch_pending.popitem(last=False)
                    last = self._touched.get(it)
                    if last is not None and now - last < self.cfg.touch_every:
                        continue
                    batch.append(it)
            if not batch:
                continue
            keys = [presence_key(self.tag, ns, k) for ns, k in batch]
            arg = b"%d" % int(now)
            got = self.presence.run(keys, [command(b"EVAL", _TOUCH, b"1", k, arg) for k in keys])
            with self._cv:
                for it, v in zip(batch, got):
                    if v is UNKNOWN:
                        continue
                    self._touched[it] = now
                    self._touched.move_to_end(it)
                while len(self._touched) > 16 * self.cfg.touch_rate:
                    self._touched.popitem(last=False)
                self._add("touches", sum(v == 1 for v in got))

    # -- space ------------------------------------------------------------

    def gc(self, older_than: float, progress: Callable[[str, int, int], None] | None = None,
           dry_run: bool = False) -> dict[str, Any]:
        """Remove T2 objects not accessed for ``older_than`` seconds: by the
        presence index's last access, then objects with no presence record
        whose upload is as old (their record was never written or was
        lost). Presence records go before their objects."""
        cutoff = time.time() - older_than
        out: Counter[str] = Counter()
        seen: set[str] = set()  # digests that have a record, old or not
        if self.presence is not None:
            match = f"kvfs:{self.tag}:*".encode()
            for _addr, page in self.presence.scan(match):
                vals = self.presence.get_many(page)
                old: list[bytes] = []
                for k, v in zip(page, vals):
                    d = k.decode().rsplit(":", 1)[1]
                    seen.add(d)
                    pv = None if v is None or v is UNKNOWN else parse_presence_value(v)
                    out["records_scanned"] += 1
                    if pv is not None and pv[1] < cutoff:
                        old.append(k)
                if old and not dry_run:
                    self.presence.delete_many(old)
                for k in old:
                    d = k.decode().rsplit(":", 1)[1]
                    seen.discard(d)
                    if not dry_run:
                        self.bucket.delete(self._name_of(d))
                    out["removed"] += 1
                if progress is not None:
                    progress("presence records", out["records_scanned"], 0)
        for listed in self.bucket.listing():
            for obj in listed:
                out["objects_scanned"] += 1
                d = obj.name.rsplit("/", 1)[-1]
                if d in seen or obj.modified >= cutoff:
                    continue
                if self.presence is not None:
                    if self.presence.exists_many([f"kvfs:{self.tag}:{d}".encode()])[0] is not False:
                        continue  # written meanwhile, or unknown: keep
                if not dry_run:
                    self.bucket.delete(obj.name)
                out["removed_unindexed"] += 1
            if progress is not None:
                progress("objects", out["objects_scanned"], 0)
        self._add("gc_removed", out["removed"] + out["removed_unindexed"])
        return dict(out, older_than_s=older_than, dry_run=dry_run)

    def _name_of(self, d: str) -> str:
        p = self.bucket.prefix
        return f"{p}/{d[:2]}/{d}" if p else f"{d[:2]}/{d}"

    # -- stats ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._cv:
            queued, busy = len(self._q), self._busy
        with self._counters_lock:
            c = Counter(self.counters)
        out: dict[str, Any] = {
            **self.cfg.describe(),
            "s3": {**self.bucket.describe(), "state": self.s3.state(), "failures": self.s3.failures},
            "presence": None if self.presence is None else {**self.presence.health(),
                                                            "unknown_keys": self.presence.stats.unknown},
            "queue": queued, "uploading": busy,
            "uploaded": c["uploaded"], "upload_existing": c["upload_existing"],
            "upload_dropped": c["upload_dropped"], "upload_errors": c["upload_errors"],
            "upload_skipped": c["upload_skipped"],
            "bytes_up": c["bytes_up"], "bytes_down": c["bytes_down"],
            "hits": c["fetched"], "misses": c["fetch_asked"] - c["fetched"],
            "errors": c["remote_errors"] + c["upload_errors"] + c["presence_errors"],
            "corrupt": c["remote_corrupt"], "stale_repaired": c["remote_stale"],
            "lookups": c["remote_lookups"], "lookup_hits": c["remote_lookup_hits"],
        }
        out["counters"] = dict(c)
        return out
