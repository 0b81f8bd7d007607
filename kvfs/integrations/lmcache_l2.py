"""LMCache's multi-process server keeps its L2 in kvfs (an L2 adapter).

Turned on by the server's configuration alone::

    lmcache server ... --l2-adapter '{"type": "plugin",
        "module_path": "kvfs.integrations.lmcache", "class_name": "KvfsL2Adapter",
        "adapter_params": {"socket": "/path/kvfs.sock"}}'

(``socket`` defaults to $KVFS_SOCKET; ``workers``, default 2, is how many
threads move bytes.) LMCache's plugin loader finds ``KvfsL2AdapterConfig``
beside the class. What it does:

- An ``ObjectKey`` is ``<object group>.<chunk hash>`` in a namespace of its
  model, kv rank (world size and rank), cache salt and memory layout
  (shapes and dtypes: what the bytes mean), plus kvfs's record format, so
  a chunk is only ever read back into a buffer of the layout it was
  stored from. Each object's ``meta`` carries those fields, which is how
  ``list_l2_keys`` gives ObjectKeys back.
- Store, lookup-and-lock and load run on threads of the adapter's own and
  signal their three event fds when done; results are popped once.
- A lock is a kvfs hold (``Store.hold``): a lease that keeps the object
  from eviction and its segment from compaction until LMCache unlocks it
  (or the daemon's lease timeout, 30 s, passes). Lookups and unlocks keep
  their order on one thread.
- Loads land straight in the L1 buffers LMCache gives (``byte_array``) and
  are verified by kvfs's checksums; a chunk that is gone, of another size,
  or corrupt is a 0 bit, never wrong bytes.
- kvfs owns capacity: its own eviction keeps the store within its size, so
  the adapter declares none (LMCache's aggregate L2 eviction stays off);
  ``get_usage`` counts what this server stored and deleted through it.
- Failures are misses (kvblocks.Guarded): a daemon that is down gives 0
  bits and failed stores, never an exception into the server.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from kvfs.optional import need

from .kvblocks import Guarded, Reporter, fit_key, namespace

need("lmcache")
from lmcache.lmcache_native import Bitmap  # noqa: E402
from lmcache.v1.distributed.api import EncodedObjectKey, KeyEntry, KeyListPage, ObjectKey  # noqa: E402
from lmcache.v1.distributed.internal_api import L2StoreResult  # noqa: E402
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId  # noqa: E402
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase  # noqa: E402
from lmcache.v1.platform import create_event_notifier  # noqa: E402

log = logging.getLogger("kvfs.integrations.lmcache")

ENGINE = "lmcache-mp"  # every namespace of this adapter starts with it
REPORT_NS = "lmcache-mp"  # the label of its counters in `kvfs stats`


class KvfsL2AdapterConfig(L2AdapterConfigBase):
    """``adapter_params``: ``socket`` (default $KVFS_SOCKET), ``workers`` (2)."""

    def __init__(self, socket: Optional[str] = None, workers: int = 2):
        self.socket = socket
        self.workers = workers

    @classmethod
    def from_dict(cls, d: dict) -> "KvfsL2AdapterConfig":
        socket = d.get("socket")
        if socket is not None and (not isinstance(socket, str) or not socket):
            raise ValueError("socket must be a non-empty string (the kvfs daemon's socket)")
        cfg = cls(socket=socket, workers=cls._validate_num_workers(d.get("workers", 2)))
        cfg.eviction_config = cls._parse_eviction_config(d)
        return cfg

    @classmethod
    def help(cls) -> str:
        return ("kvfs L2 adapter fields:\n"
                "- socket (str): the kvfs daemon's socket (default: $KVFS_SOCKET)\n"
                "- workers (int): threads that move bytes (default 2)")


# ------------------------------------------------------------------- naming
def layout_of(shapes: Any, dtypes: Any) -> str:
    """What a chunk's bytes mean: its tensors' shapes and dtypes."""
    return json.dumps([[list(s) for s in shapes], [str(d) for d in dtypes]])


@functools.lru_cache(maxsize=4096)
def _identity(model: str, kv_rank: int, salt: str) -> str:
    world = ObjectKey.WorldSizeFromKVRank(kv_rank)
    return namespace(ENGINE, model, {"kv_rank": f"{kv_rank:#010x}", "world_size": world, "cache_salt": salt})


@functools.lru_cache(maxsize=4096)
def _layout_digest(layout: str) -> str:
    return hashlib.sha256(layout.encode()).hexdigest()[:8]


def identity_ns(key: ObjectKey) -> str:
    """The prefix of every namespace that holds ``key``'s chunks (one per layout)."""
    return _identity(key.model_name, key.kv_rank, key.cache_salt)


def object_ns(key: ObjectKey, layout: str) -> str:
    return identity_ns(key) + "." + _layout_digest(layout)


def object_name(key: ObjectKey) -> str:
    return fit_key(f"{key.object_group_id:x}.{key.chunk_hash.hex()}")


def _meta(key: ObjectKey, layout: str) -> dict[str, Any]:
    return {"model": key.model_name, "kv_rank": key.kv_rank, "cache_salt": key.cache_salt,
            "layout": json.loads(layout)}


def _obj_layout(obj: Any) -> str:
    return layout_of(obj.get_shapes(), obj.get_dtypes())


def _groups(ids: list[int], ns_of: Callable[[int], Optional[str]]) -> dict[str, list[int]]:
    """Indices by namespace, in order (None: left out)."""
    out: dict[str, list[int]] = {}
    for i in ids:
        ns = ns_of(i)
        if ns is not None:
            out.setdefault(ns, []).append(i)
    return out


class KvfsL2Adapter(L2AdapterInterface):
    """LMCache's MP-server L2, in kvfs (see the module's docstring)."""

    def __init__(self, config: KvfsL2AdapterConfig | dict, l1_memory_desc: Any = None):
        super().__init__(max_capacity_bytes=0)
        if isinstance(config, dict):
            config = KvfsL2AdapterConfig.from_dict(config)
        self.config = config
        self.counters: Counter[str] = Counter()
        self.kv = Guarded(config.socket, self.counters)
        self.reporter = Reporter(self.kv, REPORT_NS, self.counters)
        self._store_efd = create_event_notifier()
        self._lookup_efd = create_event_notifier()
        self._load_efd = create_event_notifier()
        self._io = ThreadPoolExecutor(config.workers, thread_name_prefix="kvfs-l2")
        # lookups and unlocks on one thread, in the order they were submitted:
        # an unlock never overtakes the lookup that took its lock
        self._locker = ThreadPoolExecutor(1, thread_name_prefix="kvfs-l2-lock")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the three result tables
        self._stores: dict[L2TaskId, L2StoreResult] = {}
        self._lookups: dict[L2TaskId, Bitmap] = {}
        self._loads: dict[L2TaskId, Bitmap] = {}
        # locker thread only: the holds locking each key (one per lock taken),
        # and how many key locks each hold still backs
        self._locks: dict[ObjectKey, list[Any]] = {}
        self._backing: dict[int, int] = {}
        self._closed = False
        log.info("kvfs: LMCache's L2 at %s", config.socket or "$KVFS_SOCKET")

    # ---------------------------------------------------------- event fds
    def get_store_event_fd(self) -> int:
        return self._store_efd.fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._lookup_efd.fileno()

    def get_load_event_fd(self) -> int:
        return self._load_efd.fileno()

    def _submit(self, pool: ThreadPoolExecutor, kind: str, fn: Callable[..., None], *args: Any) -> L2TaskId:
        tid = next(self._ids)
        pool.submit(self._guard, kind, fn, tid, *args)
        return tid

    def _guard(self, kind: str, fn: Callable[..., None], tid: L2TaskId, keys: list[ObjectKey], *args: Any) -> None:
        """A task that raises still completes (as a failure): the server never waits forever."""
        try:
            fn(tid, keys, *args)
        except Exception:  # noqa: BLE001 - a bug here must not hang LMCache
            log.exception("kvfs: L2 task %d failed", tid)
            self.counters["errors"] += 1
            self._finish(kind, tid, L2StoreResult(False, 0) if kind == "store" else Bitmap(len(keys)))
        self.reporter.maybe_report()

    def _finish(self, kind: str, tid: L2TaskId, result: Any) -> None:
        """Publish a task's result (the first one only) and signal its event fd."""
        table, efd = {"store": (self._stores, self._store_efd), "lookup": (self._lookups, self._lookup_efd),
                      "load": (self._loads, self._load_efd)}[kind]
        with self._lock:
            table.setdefault(tid, result)
        efd.notify()

    # -------------------------------------------------------------- store
    def submit_store_task(self, keys: list[ObjectKey], objects: list[Any]) -> L2TaskId:
        return self._submit(self._io, "store", self._do_store, list(keys), list(objects))

    def _do_store(self, tid: L2TaskId, keys: list[ObjectKey], objects: list[Any]) -> None:
        ok, written = True, 0
        stored: list[ObjectKey] = []
        sizes: list[int] = []
        layouts = [_obj_layout(o) for o in objects]
        for ns, idx in _groups(list(range(len(keys))), lambda i: object_ns(keys[i], layouts[i])).items():
            new = self.kv.call(lambda s: s.put_many([object_name(keys[i]) for i in idx],
                                                    [objects[i].byte_array for i in idx], ns=ns,
                                                    metas=[_meta(keys[i], layouts[i]) for i in idx]), None)
            if new is None:
                ok = False
                self.counters["puts_failed"] += len(idx)
                continue
            for i, fresh in zip(idx, new):
                if fresh:  # False: kvfs had it already (objects are immutable)
                    n = len(objects[i].byte_array)
                    stored.append(keys[i])
                    sizes.append(n)
                    written += n
        self.counters["chunks_saved"] += len(stored)
        self.counters["bytes_saved"] += written
        if stored:
            self._notify_keys_stored(stored, sizes)
        self._finish("store", tid, L2StoreResult(ok, written))

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        with self._lock:
            done, self._stores = self._stores, {}
        return done

    # ---------------------------------------------------- lookup and lock
    def submit_lookup_and_lock_task(self, keys: list[ObjectKey], group_layout_descs: dict[int, Any]
                                    ) -> L2TaskId:
        layouts = {g: layout_of(d.shapes, d.dtypes) for g, d in (group_layout_descs or {}).items()}
        return self._submit(self._locker, "lookup", self._do_lookup, list(keys), layouts)

    def _do_lookup(self, tid: L2TaskId, keys: list[ObjectKey], layouts: dict[int, str]) -> None:
        bitmap = Bitmap(len(keys))

        def ns_of(i: int) -> Optional[str]:
            layout = layouts.get(keys[i].object_group_id)
            return None if layout is None else object_ns(keys[i], layout)  # no layout: a miss

        for ns, idx in _groups(list(range(len(keys))), ns_of).items():
            hold = self.kv.call(lambda s: s.hold([object_name(keys[i]) for i in idx], ns=ns), None)
            if hold is None:
                continue
            locked = 0
            for i, found in zip(idx, hold.found):
                if found:
                    bitmap.set(i)
                    self._locks.setdefault(keys[i], []).append(hold)
                    locked += 1
            if locked:
                self._backing[id(hold)] = self._backing.get(id(hold), 0) + locked
            else:
                hold.release()
        hits = bitmap.popcount()
        self.counters["lookups"] += 1
        self.counters["hit_chunks"] += hits
        self.counters["misses"] += len(keys) - hits
        self._finish("lookup", tid, bitmap)

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Optional[Bitmap]:
        with self._lock:
            return self._lookups.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        if not self._closed:
            self._locker.submit(self._do_unlock, list(keys))

    def _do_unlock(self, keys: list[ObjectKey]) -> None:
        for key in keys:
            holds = self._locks.get(key)
            if not holds:
                continue  # not locked (a miss, or unlocked already)
            hold = holds.pop()
            if not holds:
                del self._locks[key]
            left = self._backing[id(hold)] - 1
            if left:
                self._backing[id(hold)] = left
            else:
                del self._backing[id(hold)]
                hold.release()

    # --------------------------------------------------------------- load
    def submit_load_task(self, keys: list[ObjectKey], objects: list[Any]) -> L2TaskId:
        return self._submit(self._io, "load", self._do_load, list(keys), list(objects))

    def _do_load(self, tid: L2TaskId, keys: list[ObjectKey], objects: list[Any]) -> None:
        bitmap = Bitmap(len(keys))
        loaded: list[ObjectKey] = []
        nbytes = 0
        for ns, idx in _groups(list(range(len(keys))),
                               lambda i: object_ns(keys[i], _obj_layout(objects[i]))).items():
            outs = [objects[i].byte_array for i in idx]
            sizes = self.kv.call(lambda s: s.get_many_into([object_name(keys[i]) for i in idx], outs, ns=ns),
                                 [-1] * len(idx))
            for i, out, n in zip(idx, outs, sizes):
                if n == len(out):  # a whole chunk of this layout, verified; anything else is a miss
                    bitmap.set(i)
                    loaded.append(keys[i])
                    nbytes += n
        self.counters["chunks_loaded"] += len(loaded)
        self.counters["bytes_loaded"] += nbytes
        self.counters["load_misses"] += len(keys) - len(loaded)
        if loaded:
            self._notify_keys_accessed(loaded)
        self._finish("load", tid, bitmap)

    def query_load_result(self, task_id: L2TaskId) -> Optional[Bitmap]:
        with self._lock:
            return self._loads.pop(task_id, None)

    # ------------------------------------------------------------- delete
    def delete(self, keys: list[ObjectKey]) -> None:
        """Remove ``keys`` in every layout kvfs holds them in (synchronous)."""
        spaces = self.kv.call(lambda s: [n for n in s.namespaces() if n.startswith(ENGINE + ".")], [])
        deleted: list[ObjectKey] = []
        sizes: list[int] = []
        for prefix, idx in _groups(list(range(len(keys))), lambda i: identity_ns(keys[i]) + ".").items():
            for ns in (n for n in spaces if n.startswith(prefix)):
                names = [object_name(keys[i]) for i in idx]
                hold = self.kv.call(lambda s: s.hold(names, ns=ns), None)
                if hold is None:
                    continue
                hold.release()
                there = [(i, item[0]) for i, item in zip(idx, hold.items) if item is not None]
                if there and self.kv.call(lambda s: s.delete([object_name(keys[i]) for i, _ in there], ns=ns),
                                          None) is not None:
                    deleted += [keys[i] for i, _ in there]
                    sizes += [int(size) for _, size in there]
        self.counters["chunks_deleted"] += len(deleted)
        if deleted:
            self._notify_keys_deleted(deleted, sizes)

    # ------------------------------------------------------------ listing
    def list_l2_keys(self, model_name: Optional[str] = None, page_size: int = 500,
                     cursor: Optional[str] = None) -> KeyListPage:
        """The chunks kvfs holds for LMCache, by namespace then key. The
        cursor is ``[namespace, last key]`` as JSON."""
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        start_ns, after = "", None
        if cursor is not None:
            try:
                start_ns, after = json.loads(cursor)
                assert isinstance(start_ns, str) and isinstance(after, str)
            except Exception:  # noqa: BLE001 - any malformed cursor is the caller's error
                raise ValueError(f"malformed cursor {cursor!r}") from None
        empty = KeyListPage(entries=(), next_page_token=None)
        return self.kv.call(lambda st: self._list(st, model_name, page_size, start_ns, after), empty)

    def _list(self, st: Any, model_name: Optional[str], page_size: int, start_ns: str, after: Optional[str]
              ) -> KeyListPage:
        entries: list[KeyEntry] = []
        for ns in sorted(n for n in st.namespaces() if n.startswith(ENGINE + ".") and n >= start_ns):
            fields: Optional[dict[str, Any]] = None
            for obj in st.objects(ns, page=min(page_size, 10000), after=after if ns == start_ns else None):
                if fields is None:
                    fields = st.stat(obj["key"], ns=ns).meta or {}
                    if "model" not in fields or (model_name is not None and fields["model"] != model_name):
                        break  # not ours, or another model's: so is the whole namespace
                group, _, digest = obj["key"].partition(".")
                try:
                    ek = EncodedObjectKey(chunk_hash_hex=bytes.fromhex(digest).hex(), model_name=fields["model"],
                                          kv_rank=int(fields["kv_rank"]), object_group_id=int(group, 16),
                                          cache_salt=str(fields.get("cache_salt", "")))
                except ValueError:
                    continue  # a name hashed to fit kvfs's key rules: not listable
                entries.append(KeyEntry(key=ek, size_bytes=int(obj["size"])))
                if len(entries) == page_size:
                    return KeyListPage(entries=tuple(entries), next_page_token=json.dumps([ns, obj["key"]]))
        return KeyListPage(entries=tuple(entries), next_page_token=None)

    # ------------------------------------------------------------- status
    def report_status(self) -> dict:
        st = self.kv.store()
        return {"is_healthy": st is not None, "type": "KvfsL2Adapter",
                "socket": self.config.socket or "$KVFS_SOCKET", "locked_keys": len(self._locks),
                **dict(self.counters)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._io.shutdown(wait=True)
        self._locker.submit(self._release_all)
        self._locker.shutdown(wait=True)
        self.reporter.close()
        self.kv.close()
        for efd in (self._store_efd, self._lookup_efd, self._load_efd):
            efd.close()

    def _release_all(self) -> None:
        for holds in self._locks.values():
            for hold in holds:
                hold.release()
        self._locks.clear()
        self._backing.clear()
