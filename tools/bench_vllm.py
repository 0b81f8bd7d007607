"""`kvfs bench --vllm`: the vLLM connector, end to end and block by block.

Engine (the real vLLM, CPU build, a random-weight Llama built here): for
one prompt, the time to first token of
  cold        a process with the connector, its first sight of the prompt
              (it saves it)
  vLLM cache  the prompt again in that process (vLLM's own prefix cache)
  kvfs async  a new process on the same daemon: loaded from kvfs, async
  kvfs sync   the same with kvfs.load_async false (loaded before the forward)
and the same cold and cached in a process with no connector configured
(vLLM runs prefill otherwise then, so it is shown, not used as the base)
and the connector's load and save rates (its counters in the daemon).
Every process first serves an unrelated warm-up prompt, so no figure
carries a first forward's costs; each figure is the median over --repeat
distinct prompts. A smoke figure at small-model scale on
CPU, not a serving benchmark: on a GPU with a real model, prefill costs
far more per token and the kvfs row gains accordingly.

Granularity (no engine: the connector's own BlockCodec on a paged cache
of a real model's geometry, against a real daemon): one kvfs object per
vLLM block holding every layer, against one object per layer per block,
for saves (gather + put_many) and loads (get_many_into + scatter), and
the lookup each needs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .bench_util import clean_up, commit, work_dirs
from .table import render

MiB = 1 << 20
# (name, layers, kv heads, head size, block size): vLLM's CPU block is 128
# tokens, its GPU block 16; Llama-3.1-8B has 32 layers of 8 KV heads of 128
GEOMETRIES = [("Llama-3.1-8B, block 16 (GPU)", 32, 8, 128, 16),
              ("Llama-3.1-8B, block 128 (CPU)", 32, 8, 128, 128)]


def _serve(spec: dict[str, Any]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "kvfstools.vllm_serve", json.dumps(spec)], capture_output=True,
                       text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM engine failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]))


def _connector_counters(daemon: Any) -> dict[str, int]:
    """The vLLM connector's counters the daemon holds (after their last report)."""
    time.sleep(1.5)  # kvblocks.REPORT_S: a report still due is sent by then
    with daemon.connect() as s:
        conns = s.stats().get("connectors", {})
    out: dict[str, int] = {}
    for ns, r in conns.items():
        if ns.startswith("vllm."):
            for k, v in r["counters"].items():
                out[k] = out.get(k, 0) + v
    return out


def run_engine(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    from kvfsd.testing import DaemonProcess

    from .vllm_model import build

    model = str(build(base / "model", args.vllm_model_size))
    n, reps = args.vllm_prompt, max(1, args.repeat)
    # one prompt per repetition, each new to every engine until it is meant to be seen again
    prompts = [[5 + (i * 7 + r * 13) % 500 for i in range(n)] for r in range(reps)]
    warm = [[7 + (i * 11) % 400 for i in range(256)]]
    one_by_one = [[p] for p in prompts]
    common = {"model": model, "max_tokens": 1, "max_model_len": max(4096, n + 64)}
    print(f"  vLLM, {n}-token prompts x {reps}, {args.vllm_model_size} model: engine without kvfs",
          file=sys.stderr, flush=True)
    plain = _serve(dict(common, socket=None, prompts=[warm] + one_by_one + one_by_one))
    d = DaemonProcess(base / "store", stripes=1, shm_size="1G", log=base / "daemon.log")
    try:
        d.start()
        print("  engine A with kvfs: cold (saves), then vLLM's own cache", file=sys.stderr, flush=True)
        a = _serve(dict(common, socket=str(d.socket), prompts=[warm] + one_by_one + one_by_one))
        saved = _connector_counters(d)
        print("  engine B, a new process: loads from kvfs (async)", file=sys.stderr, flush=True)
        b = _serve(dict(common, socket=str(d.socket), prompts=[warm] + one_by_one))
        loaded = _connector_counters(d)
        print("  engine C, a new process: loads from kvfs (sync)", file=sys.stderr, flush=True)
        c = _serve(dict(common, socket=str(d.socket), prompts=[warm] + one_by_one, load_async=False))
    finally:
        d.stop()
        d.remove_shm()
    first, again = slice(1, 1 + reps), slice(1 + reps, 1 + 2 * reps)
    # a prefix from kvfs is computed on exactly as one from vLLM's own cache is (the same
    # bytes, the same suffix kernels), so those must agree token for token; a cold prefill's
    # bf16 rounding differs, and a random-weight model's near-tied logits can show it
    def toks(x: dict[str, Any], i: int) -> list[int]:
        return list(x["runs"][i][0]["tokens"])
    tokens = {"cold": [toks(plain, 1 + r) for r in range(reps)],
              "cold_with_kvfs": [toks(a, 1 + r) for r in range(reps)],
              "vllm_cache": [toks(plain, 1 + reps + r) for r in range(reps)],
              "vllm_cache_with_kvfs": [toks(a, 1 + reps + r) for r in range(reps)],
              "kvfs_async": [toks(b, 1 + r) for r in range(reps)], "kvfs_sync": [toks(c, 1 + r) for r in range(reps)]}
    # an engine with a KV connector configured runs its prefill otherwise than one without
    # (its cold TTFT differs, and in bf16 so can near-tied greedy tokens): kvfs's rows are
    # checked against the same engine configuration, the connector-less one shown beside
    same = tokens["kvfs_async"] == tokens["kvfs_sync"] == tokens["vllm_cache_with_kvfs"] == tokens["cold_with_kvfs"]
    same_plain = tokens["cold"] == tokens["cold_with_kvfs"]
    block = int(a.get("block_size", 128))
    load_tokens = (loaded.get("blocks_loaded", 0) - saved.get("blocks_loaded", 0)) * block
    load_s = (loaded.get("load_us", 0) - saved.get("load_us", 0)) / 1e6
    save_tokens = saved.get("blocks_saved", 0) * block
    save_s = saved.get("save_us", 0) / 1e6
    med = statistics.median
    return {
        "prompt_tokens": n, "repeat": reps, "model": args.vllm_model_size, "same_tokens": same, "same_as_no_connector": same_plain,
        "tokens": tokens,
        "ttft_s": {"cold": med(plain["seconds"][first]), "vllm_cache": med(plain["seconds"][again]),
                   "cold_with_kvfs": med(a["seconds"][first]), "vllm_cache_with_kvfs": med(a["seconds"][again]),
                   "kvfs_async": med(b["seconds"][first]), "kvfs_sync": med(c["seconds"][first])},
        "cached_tokens": {"kvfs_async": b["runs"][1][0]["cached"], "kvfs_sync": c["runs"][1][0]["cached"],
                          "vllm_cache": a["runs"][1 + reps][0]["cached"], "cold": a["runs"][1][0]["cached"],
                          "no_connector_cold": plain["runs"][1][0]["cached"],
                          "no_connector_cache": plain["runs"][1 + reps][0]["cached"]},
        "load_tokens_per_s": load_tokens / load_s if load_s else 0.0,
        "save_tokens_per_s": save_tokens / save_s if save_s else 0.0,
        "load_bytes": loaded.get("bytes_loaded", 0) - saved.get("bytes_loaded", 0),
        "save_bytes": saved.get("bytes_saved", 0),
    }


def _seconds(fn: Any) -> float:
    """One timed run (a warm-up would store the blocks the timed run stores)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_granularity(args: argparse.Namespace, store: Any) -> list[dict[str, Any]]:
    import torch

    from kvfs.integrations.paged import BlockCodec, Staging, buffers

    rows_out = []
    for name, layers, heads, hd, bs in GEOMETRIES:
        nblocks = max(2, int(args.vllm_prompt // bs))
        shape = (nblocks, heads, bs, 2 * hd)  # vLLM's CPU layout per layer
        src = {f"layer.{i:02d}": torch.randn(shape).to(torch.bfloat16) for i in range(layers)}
        dst = {k: torch.zeros_like(t) for k, t in src.items()}
        ids = list(range(nblocks))
        whole_src, whole_dst = BlockCodec(src, nblocks), BlockCodec(dst, nblocks)
        per_src = [BlockCodec({k: t}, nblocks) for k, t in sorted(src.items())]
        per_dst = [BlockCodec({k: t}, nblocks) for k, t in sorted(dst.items())]
        keys = [f"{i:032x}" for i in ids]
        rnd = [0]
        # loads land in a reused staging buffer, as the connector's do (its pages already touched)
        stage_w = Staging(whole_dst.block_bytes, whole_dst.device, nblocks * whole_dst.block_bytes)
        stage_l = Staging(per_dst[0].block_bytes, whole_dst.device, nblocks * per_dst[0].block_bytes)
        stage_w.rows(nblocks)
        stage_l.rows(nblocks)

        def ns(kind: str) -> str:
            return f"bench.gran.{kind}.{bs}.{rnd[0]}"

        def save_whole() -> None:
            rows = whole_src.gather(ids)
            store.put_many(keys, buffers(rows), ns=ns("w"))

        def load_whole() -> None:
            rows = stage_w.rows(nblocks)
            assert store.prefix_match(keys, ns=ns("w")) == nblocks
            store.get_many_into(keys, buffers(rows), ns=ns("w"))
            whole_dst.scatter(ids, rows)

        def save_layers() -> None:
            for li, c in enumerate(per_src):
                rows = c.gather(ids)
                store.put_many([f"{k}.{li}" for k in keys], buffers(rows), ns=ns("l"))

        def load_layers() -> None:
            assert store.prefix_match([f"{k}.0" for k in keys], ns=ns("l")) == nblocks
            for li, c in enumerate(per_dst):
                rows = stage_l.rows(nblocks)
                store.get_many_into([f"{k}.{li}" for k in keys], buffers(rows), ns=ns("l"))
                c.scatter(ids, rows)

        res: dict[str, list[float]] = {"save_whole": [], "load_whole": [], "save_layers": [], "load_layers": []}
        for r in range(args.repeat):  # interleaved rounds, fresh namespaces each
            rnd[0] = r
            res["save_whole"].append(_seconds(save_whole))
            res["save_layers"].append(_seconds(save_layers))
            for kind, fn in (("load_whole", load_whole), ("load_layers", load_layers)):
                for t in dst.values():
                    t.zero_()
                res[kind].append(_seconds(fn))
                assert all(torch.equal(dst[k], src[k]) for k in src), f"{kind}: loaded bytes differ"
            store.delete(keys, ns=ns("w"))
            store.delete([f"{k}.{li}" for li in range(layers) for k in keys], ns=ns("l"))
        tokens = nblocks * bs
        row = {"geometry": name, "block_tokens": bs, "blocks": nblocks, "layers": layers,
               "object_bytes_whole": whole_src.block_bytes, "object_bytes_layer": per_src[0].block_bytes,
               "objects_whole": nblocks, "objects_layers": nblocks * layers}
        for kind, xs in res.items():
            row[kind + "_tokens_per_s"] = tokens / statistics.median(xs)
        rows_out.append(row)
        print(f"  {name}: load {row['load_whole_tokens_per_s']:.0f} tok/s whole vs "
              f"{row['load_layers_tokens_per_s']:.0f} per layer", file=sys.stderr, flush=True)
    return rows_out


def run_vllm_bench(args: argparse.Namespace) -> dict[str, Any]:
    from kvfsd.testing import DaemonProcess

    base, work = work_dirs(args.dir, "kvfs-bench-vllm-")
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "commit": commit()}
    d = DaemonProcess(work / "gran", stripes=args.stripes, shm_size="2G", capacity="16G", log=work / "gran.log")
    try:
        d.start()
        with d.connect(threads=8) as store:
            out["granularity"] = run_granularity(args, store)
        d.stop()
        d.remove_shm()
        if not args.vllm_no_engine:
            out["engine"] = run_engine(args, work)
    finally:
        clean_up(work, base, bool(args.dir), [d])
    return out


def format_vllm(res: dict[str, Any]) -> str:
    parts = []
    e = res.get("engine")
    if e:
        t = e["ttft_s"]
        base = t["cold_with_kvfs"]
        c = e["cached_tokens"]
        rows = [["cold (the baseline)", f"{base * 1e3:.0f}", "1.00", c["cold"]],
                ["vLLM's own prefix cache", f"{t['vllm_cache_with_kvfs'] * 1e3:.0f}",
                 f"{t['vllm_cache_with_kvfs'] / base:.2f}", c["vllm_cache"]],
                ["new process, from kvfs (async load)", f"{t['kvfs_async'] * 1e3:.0f}",
                 f"{t['kvfs_async'] / base:.2f}", c["kvfs_async"]],
                ["new process, from kvfs (sync load)", f"{t['kvfs_sync'] * 1e3:.0f}",
                 f"{t['kvfs_sync'] / base:.2f}", c["kvfs_sync"]],
                ["no connector configured: cold", f"{t['cold'] * 1e3:.0f}", f"{t['cold'] / base:.2f}",
                 c["no_connector_cold"]],
                ["no connector configured: own cache", f"{t['vllm_cache'] * 1e3:.0f}",
                 f"{t['vllm_cache'] / base:.2f}", c["no_connector_cache"]]]
        parts.append(render([f"vLLM TTFT, {e['prompt_tokens']}-token prompt ({e['model']} model, CPU; median "
                             f"of {e['repeat']})", "ms", "/ cold", "cached tokens"], rows))
        parts.append(f"connector: loaded {e['load_tokens_per_s']:.0f} tokens/s "
                     f"({e['load_bytes'] / MiB:.1f} MiB), saved {e['save_tokens_per_s']:.0f} tokens/s "
                     f"({e['save_bytes'] / MiB:.1f} MiB, in the background); greedy tokens from kvfs "
                     + ("identical to those from vLLM's own cache and to cold" if e["same_tokens"] else "DIFFER")
                     + ("" if e.get("same_as_no_connector", True) else
                        " (an engine with no connector configured rounds otherwise and differs on some prompt)"))
    g = res.get("granularity")
    if g:
        rows = [[r["geometry"], f"{r['object_bytes_whole'] / MiB:.1f} MiB x {r['objects_whole']}",
                 f"{r['object_bytes_layer'] / 1024:.0f} KiB x {r['objects_layers']}",
                 f"{r['save_whole_tokens_per_s'] / 1e3:.1f}", f"{r['save_layers_tokens_per_s'] / 1e3:.1f}",
                 f"{r['load_whole_tokens_per_s'] / 1e3:.1f}", f"{r['load_layers_tokens_per_s'] / 1e3:.1f}",
                 f"{r['load_whole_tokens_per_s'] / r['load_layers_tokens_per_s']:.2f}"] for r in g]
        parts.append(render(["granularity", "per block (all layers)", "per layer", "save ktok/s block",
                             "save ktok/s layer", "load ktok/s block", "load ktok/s layer", "load block/layer"],
                            rows))
    parts.append(f"commit {res.get('commit', 'unknown')}, {res['machine']['cpus']} CPUs")
    return "\n\n".join(parts)
