"""vLLM uses kvfs: a KV connector (vLLM 0.32's KVConnectorBase_V1).

Turned on by configuration alone::

    --kv-transfer-config '{"kv_connector": "KvfsConnector",
                           "kv_connector_module_path": "kvfs.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"kvfs.socket": "/path/kvfs.sock"}}'

(no extra config: ``$KVFS_SOCKET``, as the client). What it does:

- Keys are vLLM's own block hashes (``request.block_hashes[i]``, hex; they
  already cover ``cache_salt`` and LoRA). The namespace fingerprints the
  model and revision, the KV dtype, block size, KV layout and attention
  backend, tensor- and pipeline-parallel rank and size, and kvfs's record
  format (kvblocks.namespace).
- One kvfs object per vLLM block holds that block of every layer, in layer
  order (kvfs.integrations.paged).
- Scheduler: ``get_num_new_matched_tokens`` is one ``prefix_match`` per
  request (never the last prompt token); the blocks to load, and the newly
  full blocks to save, travel to the workers in the step's metadata.
- Loads are asynchronous (vLLM's WAITING_FOR_REMOTE_KVS): the worker reads
  and scatters them on a thread of its own (a CUDA stream of its own on a
  GPU) while the engine goes on with other requests, and reports them
  through ``get_finished``; the request is scheduled once its blocks are
  in. ``kvfs.load_async: false`` loads in ``start_load_kv`` instead,
  before the forward (one engine step sooner on an idle engine).
- Under vLLM's default ``kv_load_failure_policy`` ('fail') a block that
  then failed to load would fail its request, so what is claimed is first
  read back and verified, on a thread: the lookup answers "not yet"
  (None) until that is done, and the scheduler never waits. Under
  'recompute' nothing is read twice: a block that fails is recomputed.
- Worker: loads land in vLLM's paged cache (one batched read, then one
  index_copy per layer); saves are gathered after the forward
  (``wait_for_save``: one index_select per layer) and stored in the
  background, bounded (kvblocks.SaveQueue).
- Failures are misses: a block that does not load is reported through
  ``get_block_ids_with_load_errors`` and vLLM recomputes it; kvfs errors
  never reach the engine, and a daemon that comes back is used again.
- Counters go to vLLM (``get_kv_connector_stats``) and to the daemon
  (``kvfs stats``, per namespace), at most once a second.

Only this module imports vLLM (and only when the connector is used).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from kvfs.optional import need

from .kvblocks import Guarded, LoadQueue, Reporter, SaveQueue, namespace
from .paged import BlockCodec, SideStream, Staging, buffers, load_blocks, ready_after

need("vllm")
import torch  # noqa: E402 - vLLM brings it
import vllm  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # noqa: E402
    KVConnectorPromMetrics,
    KVConnectorStats,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvfs.integrations.vllm")

TESTED_VLLM = ("0.32.",)  # the versions this connector was tested against
UNSTABLE_HASHES = ("xxhash", "xxhash_cbor")  # random per-process seed unless PYTHONHASHSEED is set


def _check_version() -> None:
    v = getattr(vllm, "__version__", "?")
    if not v.startswith(TESTED_VLLM) and os.environ.get("KVFS_VLLM_ANY_VERSION") != "1":
        raise RuntimeError(f"kvfs's vLLM connector is tested with vLLM {', '.join(t + 'x' for t in TESTED_VLLM)}; "
                           f"this is vLLM {v}. Install a tested one (pip install 'kvfs[vllm]'), or set "
                           f"KVFS_VLLM_ANY_VERSION=1 to try it anyway")


def fingerprint(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None",
                ranks: tuple[int, int] | None = None) -> tuple[str, dict[str, Any]]:
    """The namespace of one rank's blocks (``ranks``: its tensor- and
    pipeline-parallel ranks; default this process's), and what went into it."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    fields: dict[str, Any] = {
        "revision": getattr(mc, "revision", None), "dtype": str(mc.dtype), "kv_dtype": str(cc.cache_dtype),
        "block_size": cc.block_size, "tp_size": pc.tensor_parallel_size, "pp_size": pc.pipeline_parallel_size,
        "device": str(vllm_config.device_config.device_type),
        "hash_algo": cc.prefix_caching_hash_algo,
    }
    if ranks is None:
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group
            ranks = get_tp_group().rank_in_group, get_pp_group().rank_in_group
        except Exception:  # noqa: BLE001 - the scheduler has no groups: rank 0's view
            ranks = (0, 0)
    fields["tp_rank"], fields["pp_rank"] = ranks
    if kv_cache_config is not None:
        fields["layout"] = kv_cache_config.kv_cache_layout
        fields["groups"] = [(type(g.kv_cache_spec).__name__, getattr(g.kv_cache_spec, "num_kv_heads", None),
                             getattr(g.kv_cache_spec, "head_size", None), str(getattr(g.kv_cache_spec, "dtype", "")),
                             len(g.layer_names)) for g in kv_cache_config.kv_cache_groups]
    try:
        fields["attn_backend"] = str(vllm_config.attention_config.backend)
    except AttributeError:
        pass
    return namespace("vllm", str(mc.model), fields), fields


def every_rank(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> list[str]:
    """The namespaces of every tensor- and pipeline-parallel rank: a block
    is a hit only if every rank stored its part of it."""
    pc = vllm_config.parallel_config
    return [fingerprint(vllm_config, kv_cache_config, (t, p))[0]
            for p in range(pc.pipeline_parallel_size) for t in range(pc.tensor_parallel_size)]


@dataclass
class KvfsConnectorStats(KVConnectorStats):
    """Counter deltas of one interval (vLLM's KV transfer metrics log)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KvfsConnectorStats":
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# what the connector counts (on vLLM's Prometheus: vllm:kvfs_connector_total{counter="..."})
COUNTERS = ("lookups", "hit_tokens", "probe_misses", "blocks_loaded", "bytes_loaded", "load_us", "loads_async",
            "load_errors", "blocks_saved", "bytes_saved", "save_us", "saves_dropped", "saves_failed", "errors",
            "unavailable")


class KvfsPromMetrics(KVConnectorPromMetrics):
    """The connector's counters on vLLM's own /metrics, per engine."""

    def __init__(self, vllm_config: "VllmConfig", metric_types: dict[Any, Any], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._total = self._counter_cls(name="vllm:kvfs_connector", labelnames=labelnames + ["counter"],
                                        documentation="The kvfs connector's counters: lookups, hit_tokens, "
                                                      "blocks/bytes loaded and saved, load_us/save_us, errors")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = getattr(transfer_stats_data, "data", transfer_stats_data) or {}
        for k, v in data.items():
            if k in COUNTERS and v > 0:
                self._total.labels(*self.per_engine_labelvalues[engine_idx], k).inc(v)  # type: ignore[union-attr]


@dataclass
class _Transfer:
    req_id: str
    keys: list[str]
    block_ids: list[int]


@dataclass
class KvfsConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    saves: list[_Transfer] = field(default_factory=list)


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    next_save: int = 0  # blocks below this are in kvfs or vLLM's own cache


class KvfsConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        _check_version()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.block_size = vllm_config.cache_config.block_size
        self.ns, self.fields = fingerprint(vllm_config, kv_cache_config)
        # the scheduler looks up every rank's part of a block (each worker stores its own)
        self.lookup_ns = every_rank(vllm_config, kv_cache_config) if role == KVConnectorRole.SCHEDULER \
            else [self.ns]
        self.counters: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()  # what get_kv_connector_stats reported so far
        self.kv = Guarded(extra.get("kvfs.socket"), self.counters)
        self.enabled = self._usable(vllm_config, kv_cache_config)
        self.reporter = Reporter(self.kv, self.ns, self.counters)
        self.load_async = str(extra.get("kvfs.load_async", True)).lower() not in ("false", "0", "no")
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._to_load: list[_Transfer] = []  # allocated this step, for the next metadata
        # 'fail' (vLLM's default) fails a request whose load fails: claim only what reads back,
        # checked on a thread while the lookup answers None ("ask again")
        self.probe = getattr(self._kv_transfer_config, "kv_load_failure_policy", "fail") != "recompute"
        self._probes: dict[str, tuple[int, Future[int]]] = {}
        self._probe_pool: ThreadPoolExecutor | None = None
        # worker side
        self._codec: BlockCodec | None = None
        self._load_errors: set[int] = set()  # of loads done in start_load_kv (kvfs.load_async: false)
        self._loads: LoadQueue | None = None
        self._stream: SideStream | None = None
        self._staging: Staging | None = None
        self._staging_bytes = int(extra.get("kvfs.staging_bytes", 64 << 20))
        self._saves: SaveQueue | None = None
        self._save_bytes = int(extra.get("kvfs.save_queue_bytes", 256 << 20))
        log.info("kvfs connector (%s): namespace %s %s", role.name, self.ns, "" if self.enabled else "(off)")
        if self.enabled and role == KVConnectorRole.SCHEDULER:
            self.kv.store()  # connect now, not in the first request's lookup

    def _usable(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> bool:
        algo = vllm_config.cache_config.prefix_caching_hash_algo
        if algo in UNSTABLE_HASHES and os.environ.get("PYTHONHASHSEED") is None:
            log.error("kvfs: vLLM's %s block hashes differ in every process unless PYTHONHASHSEED is set, so "
                      "no block saved to kvfs could ever be found again: kvfs is off for this engine (set "
                      "PYTHONHASHSEED to one value on every engine, or use --prefix-caching-hash-algo sha256)",
                      algo)
            return False
        if kv_cache_config is not None:
            groups = kv_cache_config.kv_cache_groups
            hbs = kv_cache_config.hash_block_size
            if len(groups) != 1 or (hbs is not None and hbs != self.block_size):
                log.error("kvfs: this connector handles one KV cache group whose blocks are hashed at the block "
                          "size; this model has %d groups (hash block %s, block %d): kvfs is off",
                          len(groups), hbs, self.block_size)
                return False
        return True

    # ------------------------------------------------------------ scheduler
    def _state(self, request: "Request") -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request)
        return st

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.enabled:
            return 0, False
        first = num_computed_tokens // self.block_size
        st = self._state(request)
        st.next_save = max(st.next_save, first)  # blocks vLLM has itself are not saved again
        prompt = len(request.prompt_token_ids or [])
        usable = min((prompt - 1) // self.block_size, len(request.block_hashes))  # never the last prompt token
        if usable <= first:
            return 0, False
        if self.probe:
            hit = self._probed(request.request_id, request, first, usable)
            if hit is None:
                return None, False  # being read back: vLLM asks again next step
        else:
            hit = self._lookup(request, usable)
        if hit <= first:
            return 0, False
        self.counters["hit_tokens"] += (hit - first) * self.block_size
        self.reporter.maybe_report()
        return (hit - first) * self.block_size, self.load_async

    def _keys(self, request: "Request", lo: int, hi: int) -> list[str]:
        return [request.block_hashes[i].hex() for i in range(lo, hi)]

    def _lookup(self, request: "Request", usable: int) -> int:
        """How many blocks of the prompt, from the first, kvfs holds for
        every rank: one round trip per rank (one without parallelism)."""
        self.counters["lookups"] += 1
        keys = self._keys(request, 0, usable)
        return int(self.kv.call(lambda s: min(s.prefix_match(keys, ns=ns) for ns in self.lookup_ns), 0))

    def _probed(self, req_id: str, request: "Request", first: int, usable: int) -> int | None:
        """The verified hit (a block count from the prompt's start), or None
        while a thread is still reading it back."""
        pending = self._probes.get(req_id)
        if pending is not None and pending[0] == first:
            if not pending[1].done():
                return None
            del self._probes[req_id]
            return pending[1].result()
        if self._probe_pool is None:
            self._probe_pool = ThreadPoolExecutor(1, thread_name_prefix="kvfs-lookups")

        def probe() -> int:
            hit = self._lookup(request, usable)
            return first + self._verified_run(self._keys(request, first, hit)) if hit > first else hit
        self._probes[req_id] = (first, self._probe_pool.submit(probe))
        return None

    def _verified_run(self, keys: list[str]) -> int:
        """How many of ``keys``, from the first, read back intact now."""
        if not keys:
            return 0

        def run(s: Any) -> int:
            n = len(keys)
            for ns in self.lookup_ns:
                with s.get_views(keys[:n], ns=ns) as views:
                    n = next((i for i, v in enumerate(views) if v is None), n)
            return n
        n = int(self.kv.call(run, 0))
        self.counters["probe_misses"] += len(keys) - n
        return n

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if not self.enabled or num_external_tokens <= 0:
            return  # (an async load's second call, once it is in, has no external tokens)
        st = self._state(request)
        first = st.next_save
        ids = blocks.get_block_ids()[0]
        n = num_external_tokens // self.block_size
        self._to_load.append(_Transfer(request.request_id, self._keys(request, first, first + n),
                                       list(ids[first:first + n])))
        st.next_save = first + n

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvfsConnectorMetadata()
        if not self.enabled:
            return meta
        # loads go out in the step that allocated them, scheduled or not (an
        # async load's request waits, unscheduled, until it is in)
        meta.loads, self._to_load = self._to_load, []
        after: dict[str, int] = {}
        for nr in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(nr.req_id)
            if st is None:
                continue
            st.block_ids = list(nr.block_ids[0])
            # what vLLM counts as computed now: its own cache, and what loaded (a
            # failed async load is cut back to its first bad block, recomputed and saved again)
            st.next_save = min(st.next_save, nr.num_computed_tokens // self.block_size)
            after[nr.req_id] = nr.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(nr.req_id, 0)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new is not None:
                st.block_ids = list(new[0])
            elif new is not None:
                st.block_ids += new[0]
            after[req_id] = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        for req_id, computed in after.items():
            st = self._reqs[req_id]
            full = min(computed // self.block_size, len(st.request.block_hashes), len(st.block_ids))
            if full > st.next_save:
                meta.saves.append(_Transfer(req_id, self._keys(st.request, st.next_save, full),
                                            st.block_ids[st.next_save:full]))
                st.next_save = full
        self.reporter.maybe_report()
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._probes.pop(request.request_id, None)
        return False, None  # saves were gathered when the blocks filled; vLLM may free them now

    # --------------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            self._codec = BlockCodec(kv_caches, self._kv_cache_config.num_blocks)
        except ValueError as e:
            log.error("kvfs: cannot address this KV cache's blocks (%s): kvfs is off", e)
            self.enabled = False
            return
        self._saves = SaveQueue(self.kv, self.ns, self.counters, self._save_bytes)
        self._loads = LoadQueue(self.counters)
        self._stream = SideStream(self._codec.device)
        self._staging = Staging(self._codec.block_bytes, self._codec.device, self._staging_bytes)
        # now, not in the first load: the connection, and the staging buffer's pages
        self._staging.rows(1)
        self.kv.store()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if not self.enabled or self._loads is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfsConnectorMetadata)
        for ld in meta.loads:
            if self.load_async:
                self._loads.submit(ld.req_id, ld.block_ids, partial(self._load, ld))
            else:
                self._load_errors.update(self._load(ld))

    def _load(self, ld: _Transfer) -> list[int]:
        """Read one request's blocks from kvfs into vLLM's cache, through
        the staging buffer a chunk at a time; the block ids that did not
        load. On a GPU the copies run on the loader's own stream and are
        complete when this returns."""
        assert self._codec is not None and self._stream is not None and self._staging is not None
        codec = self._codec
        t = time.perf_counter()
        bad = load_blocks(self.kv, self.ns, codec, self._staging, self._stream, ld.keys, ld.block_ids)
        if bad:
            self.counters["load_errors"] += len(bad)
            log.warning("kvfs: %d of %d blocks of request %s did not load; vLLM recomputes them",
                        len(bad), len(ld.keys), ld.req_id)
        self.counters["blocks_loaded"] += len(ld.keys) - len(bad)
        self.counters["bytes_loaded"] += (len(ld.keys) - len(bad)) * codec.block_bytes
        self.counters["load_us"] += int((time.perf_counter() - t) * 1e6)
        return bad

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Loads that are in (their failed blocks are in the same step's
        get_block_ids_with_load_errors, which vLLM asks next)."""
        if self._loads is None:
            return None, None
        done = self._loads.take_finished()
        self.counters["loads_async"] += len(done)
        return None, (done or None)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # a load is whole before its request is scheduled (async) or before the forward (sync)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # every layer is gathered at once in wait_for_save, after the forward

    def wait_for_save(self) -> None:
        if not self.enabled or self._codec is None or self._saves is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfsConnectorMetadata)
        for sv in meta.saves:
            # gathered now, so vLLM may reuse the blocks; stored later, off the step
            rows = self._codec.gather(sv.block_ids)
            self._saves.offer(sv.keys, buffers(rows), rows.numel(), ready_after(rows))

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        if self._loads is not None:
            out |= self._loads.take_errors()
        return out

    def shutdown(self) -> None:
        if self._loads is not None:
            self._loads.close()
        if self._saves is not None:
            self._saves.close()
        if self._probe_pool is not None:
            self._probe_pool.shutdown(wait=False, cancel_futures=True)
        self.reporter.close()
        log.info("kvfs connector stats: %s", dict(self.counters))
        self.kv.close()

    def get_kv_connector_stats(self) -> KvfsConnectorStats | None:
        self.reporter.maybe_report()
        delta = {k: v - self._reported.get(k, 0) for k, v in self.counters.items() if v != self._reported.get(k, 0)}
        self._reported = Counter(self.counters)
        return KvfsConnectorStats(data=delta) if delta else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvfsConnectorStats:
        return KvfsConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KvfsPromMetrics:
        return KvfsPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def stats(self) -> dict[str, int]:
        """The connector's counters (lookups, hit tokens, blocks and bytes
        loaded and saved, load and save time, dropped saves, errors)."""
        return dict(self.counters)
