"""LMCache uses kvfs: a remote storage plugin (LMCache 0.5's RemoteConnector).

Turned on by LMCache's configuration alone::

    remote_storage_plugins: ["kvfs"]
    extra_config:
      remote_storage_plugin.kvfs.module_path: kvfs.integrations.lmcache
      remote_storage_plugin.kvfs.class_name: KvfsConnector
      remote_storage_plugin.kvfs.socket: /path/kvfs.sock   # default: $KVFS_SOCKET

(or the same keys through LMCache's environment variables). What it does:

- A key is LMCache's key string (``CacheEngineKey.to_string()``), kept as
  it is when it obeys kvfs's key rules and hashed (sha256) when it does not.
  The namespace fingerprints the model, world size, worker, KV dtype and
  shape, and kvfs's record format (kvblocks.namespace), so two workers or
  models never share a chunk. A chunk's shapes, dtypes and format go in the
  object's ``meta``.
- Reads land straight in the MemoryObj buffers LMCache allocates from its
  local CPU backend (``byte_array``: pinned memory on GPU hosts), with no
  copy between; puts store from them. A short read is a partial chunk,
  reshaped as LMCache's own connectors do.
- Ownership follows LMCache's rules: a get that fails gives back what it
  allocated; a put never drops a reference (LMCache's wrapper does).
- Failures are misses: any kvfs error (a daemon that is down, a corrupted
  or evicted chunk) is counted and answered as "not there", never raised
  into LMCache (kvblocks.Guarded), and a daemon that comes back is used
  again.

Only this module and its L2 adapter (lmcache_l2) import LMCache.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, List, Optional

from kvfs.optional import need

from .kvblocks import Guarded, Reporter, fit_key, namespace

need("lmcache")
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.memory_management import MemoryObj  # noqa: E402
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector  # noqa: E402

log = logging.getLogger("kvfs.integrations.lmcache")

PLUGIN = "kvfs"  # remote_storage_plugin.<PLUGIN>.* in LMCache's extra_config


def kvfs_key(key: Any) -> str:
    """LMCache's key string as a kvfs key: itself when kvfs's rules allow
    it, else ``h.<sha256>`` (too long, or a character a key may not hold)."""
    return fit_key(key.to_string() if hasattr(key, "to_string") else str(key))


def chunk_namespace(metadata: Any) -> str:
    """The namespace of one LMCache worker's chunks."""
    fields = {"world_size": metadata.world_size, "worker_id": metadata.worker_id,
              "kv_dtype": str(metadata.kv_dtype), "kv_shape": list(metadata.kv_shape),
              "use_mla": bool(getattr(metadata, "use_mla", False))}
    return namespace("lmcache", str(metadata.model_name), fields)


class KvfsConnector(RemoteConnector):
    """LMCache's remote tier, in kvfs (see the module's docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any, config: Any,
                 plugin_name: Optional[str] = None):
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        extra = (getattr(config, "extra_config", None) or {}) if config is not None else {}
        prefix = f"remote_storage_plugin.{plugin_name or PLUGIN}."
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.ns = chunk_namespace(local_cpu_backend.metadata)
        self.counters: Counter[str] = Counter()
        self.kv = Guarded(extra.get(prefix + "socket"), self.counters)
        self.reporter = Reporter(self.kv, self.ns, self.counters)
        log.info("kvfs: LMCache's remote tier in namespace %s", self.ns)

    # ------------------------------------------------------------- lookups
    def exists_sync(self, key: CacheEngineKey) -> bool:
        return bool(self.kv.call(lambda s: s.contains([kvfs_key(key)], ns=self.ns)[0], False))

    async def exists(self, key: CacheEngineKey) -> bool:
        return await asyncio.to_thread(self.exists_sync, key)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: List[CacheEngineKey]) -> int:
        """How many of ``keys``, from the first, kvfs holds: one round trip."""
        ks = [kvfs_key(k) for k in keys]
        self.counters["lookups"] += 1
        n = int(self.kv.call(lambda s: s.prefix_match(ks, ns=self.ns), 0))
        self.counters["hit_chunks"] += n
        self.reporter.maybe_report()
        return n

    async def batched_async_contains(self, lookup_id: str, keys: List[CacheEngineKey], pin: bool = False) -> int:
        return await asyncio.to_thread(self.batched_contains, keys)

    # --------------------------------------------------------------- reads
    def _allocate(self, n: int) -> list[MemoryObj]:
        """n full-chunk buffers from LMCache's CPU backend (fewer if it is full)."""
        out: list[MemoryObj] = []
        for _ in range(n):
            obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
            if obj is None:
                break
            out.append(obj)
        return out

    def _get_run(self, keys: List[CacheEngineKey]) -> list[MemoryObj]:
        """The leading run of ``keys`` that reads back whole, each in a
        buffer of LMCache's; every other buffer allocated is given back."""
        objs = self._allocate(len(keys))
        ks = [kvfs_key(k) for k in keys[:len(objs)]]
        sizes = self.kv.call(lambda s: s.get_many_into(ks, [o.byte_array for o in objs], ns=self.ns),
                             [-1] * len(ks)) if ks else []
        good: list[MemoryObj] = []
        for i, (obj, n) in enumerate(zip(objs, sizes)):
            if len(good) == i and n > 0:
                try:
                    good.append(self.reshape_partial_chunk(obj, n))
                    continue
                except ValueError as e:  # a size no chunk has: not ours to hand over
                    log.warning("kvfs: chunk %s has %d bytes (%s); treated as a miss", ks[i], n, e)
            obj.ref_count_down()
        for obj in objs[len(sizes):]:
            obj.ref_count_down()
        self.counters["chunks_loaded"] += len(good)
        self.counters["bytes_loaded"] += sum(int(s) for s in sizes[:len(good)])
        self.counters["misses"] += len(keys) - len(good)
        self.reporter.maybe_report()
        return good

    async def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        got = await asyncio.to_thread(self._get_run, [key])
        return got[0] if got else None

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: List[CacheEngineKey]) -> List[Optional[MemoryObj]]:
        got: list[Optional[MemoryObj]] = list(await asyncio.to_thread(self._get_run, keys))
        return got + [None] * (len(keys) - len(got))

    async def batched_get_non_blocking(self, lookup_id: str, keys: List[CacheEngineKey]) -> List[MemoryObj]:
        return await asyncio.to_thread(self._get_run, keys)

    # -------------------------------------------------------------- writes
    def _meta(self, obj: MemoryObj) -> dict[str, Any]:
        return {"shapes": [list(s) for s in obj.get_shapes()], "dtypes": [str(d) for d in obj.get_dtypes()],
                "fmt": int(obj.get_memory_format().value)}

    def _put_many(self, keys: List[CacheEngineKey], objs: List[MemoryObj]) -> None:
        """Store, in one batch (each chunk with its own meta); the caller
        keeps its references (LMCache's wrapper drops them)."""
        if not keys:
            return
        views = [o.byte_array for o in objs]
        stored = self.kv.call(lambda s: s.put_many([kvfs_key(k) for k in keys], views, ns=self.ns,
                                                   metas=[self._meta(o) for o in objs]), None)
        if stored is None:
            self.counters["puts_failed"] += len(keys)
        else:
            self.counters["chunks_saved"] += len(keys)
            self.counters["bytes_saved"] += sum(len(v) for v in views)
        self.reporter.maybe_report()

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await asyncio.to_thread(self._put_many, [key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: List[CacheEngineKey], memory_objs: List[MemoryObj]) -> None:
        await asyncio.to_thread(self._put_many, keys, memory_objs)

    # --------------------------------------------------------------- admin
    async def list(self) -> List[str]:
        return list(await asyncio.to_thread(lambda: self.kv.call(lambda s: list(s.keys(self.ns)), [])))

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return bool(self.kv.call(lambda s: s.delete([kvfs_key(key)], ns=self.ns), 0))

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        return 0 if await asyncio.to_thread(self.kv.store) is not None else 1

    async def close(self) -> None:
        self.reporter.close()
        self.kv.close()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)


# LMCache's MP server loads its L2 adapter from this module too (module_path
# kvfs.integrations.lmcache); it lives in its own.
from .lmcache_l2 import KvfsL2Adapter, KvfsL2AdapterConfig  # noqa: E402,F401
