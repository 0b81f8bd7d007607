"""`kvfs demo-ttft`: time to first token, KV cache from kvfs vs recompute
(see kvfstools.demo_ttft)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo-ttft", help="TTFT with the prefix KV cache loaded from kvfs vs recomputed "
                                         "(transformers, random Llama-3.1-8B-shaped model)")
    p.add_argument("--tokens", default=None, help="prompt lengths (default 8192,32768 on GPU, 1024 on CPU)")
    p.add_argument("--suffix", type=int, default=64, help="tokens the new request adds (default 64)")
    p.add_argument("--model", choices=["llama-3.1-8b", "tiny"], default=None,
                   help="model shape (default llama-3.1-8b on GPU, tiny on CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--dir", default=None, help="where the demo's stores go, kept (default: a temp dir, removed at the end)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write results as JSON")
    p.add_argument("--load", choices=["layerwise", "whole"], default="layerwise",
                   help="layerwise: load layer l+1 while layer l computes (default); whole: load it all, then prefill")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="leave the model's objects to the garbage collector (by default they are frozen "
                        "after the warm-up, as vLLM does at start)")
    p.add_argument("--profile", action="store_true",
                   help="print where the suffix prefill's time goes (torch profiler; largest prompt, T0)")
    return p


def run(args: argparse.Namespace) -> int:
    from kvfs.optional import need

    need("torch")
    need("transformers")
    from .demo_ttft import format_demo, run_demo

    res = run_demo(args)
    print(format_demo(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if all(r["logits_ok"] for r in res["runs"]) else 1
