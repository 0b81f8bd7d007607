"""One vLLM engine (CPU) serving prompts, with or without the kvfs
connector; prints one JSON line: per prompt the greedy output tokens and
vLLM's cached-token count, and vLLM's external prefix-cache counters.

    python -m kvfstools.vllm_serve SPEC_JSON
                                 {"model", "prompts": [[ids]...], "max_tokens", "max_model_len",
                                  "socket" (none: no connector), "block_size", "kv_dtype",
                                  "load_failure_policy", "load_async" (default true)}
    Each group's wall seconds are reported too (with max_tokens 1: its TTFT).
"""
from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw: dict = {}
    if spec.get("socket") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvfsConnector", kv_connector_module_path="kvfs.integrations.vllm", kv_role="kv_both",
            kv_connector_extra_config={"kvfs.socket": spec["socket"],
                                       "kvfs.load_async": spec.get("load_async", True)},
            kv_load_failure_policy=spec.get("load_failure_policy", "fail"))
    if spec.get("block_size"):
        kw["block_size"] = spec["block_size"]
    if spec.get("kv_dtype"):
        kw["kv_cache_dtype"] = spec["kv_dtype"]
    llm = LLM(model=spec["model"], enforce_eager=True, dtype="bfloat16", max_model_len=spec.get("max_model_len", 4096), seed=0,
              disable_log_stats=False, **kw)
    sp = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8))
    runs, seconds = [], []
    for group in spec["prompts"]:  # each group is served together, then the next
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in group], sp, use_tqdm=False)  # type: ignore[arg-type]
        seconds.append(time.perf_counter() - t)
        runs.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens} for o in outs])
    metrics = {}
    try:
        for m in llm.get_metrics():
            if "prefix_cache" in m.name:
                metrics[m.name] = getattr(m, "value", None)
            elif m.name.startswith("vllm:kvfs_connector"):  # one per counter label
                metrics[f"{m.name}.{m.labels.get('counter')}"] = getattr(m, "value", None)
    except Exception as e:  # noqa: BLE001 - reported
        metrics["error"] = repr(e)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    print("RESULT " + json.dumps({"runs": runs, "seconds": seconds, "metrics": metrics, "block_size": block}),
          flush=True)


if __name__ == "__main__":
    main()
