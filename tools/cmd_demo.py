"""`kvfs demo`: store and reload KV-cache-shaped blocks through a running
daemon, as an inference engine would, and print throughput and stats."""
from __future__ import annotations

import argparse
import time

from .cli import add_socket_arg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="store and reload KV blocks of a fake prompt; print stats and throughput")
    add_socket_arg(p)
    p.add_argument("--tokens", type=int, default=8192, help="prompt length in tokens (default 8192)")
    p.add_argument("--block-tokens", type=int, default=256, help="tokens per KV block (default 256)")
    return p


def run(args: argparse.Namespace) -> int:
    import kvfs
    from kvfs.optional import need

    np = need("numpy")

    from .cmd_stats import format_stats

    # Llama-3.1-8B shape: 32 layers, 8 KV heads, head dim 128, bf16 -> 128 KiB of K+V per token.
    layers, kv_heads, head_dim, elt = 32, 8, 128, 2
    per_token = 2 * layers * kv_heads * head_dim * elt
    bt = args.block_tokens
    n_blocks = args.tokens // bt
    block_bytes = per_token * bt
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128000, size=args.tokens).tolist()
    keys = kvfs.keys.block_hashes(tokens, block_size=bt, salt=b"llama-3.1-8b/bf16")
    kv = rng.integers(0, 256, size=n_blocks * block_bytes, dtype=np.uint8)  # the "prefilled" cache
    blocks = [kv[i * block_bytes:(i + 1) * block_bytes] for i in range(n_blocks)]
    print(f"demo: a {args.tokens}-token prompt of a Llama-3.1-8B-shaped model -> {n_blocks} KV blocks of "
          f"{bt} tokens ({block_bytes / 2**20:.0f} MiB each, {n_blocks * block_bytes / 2**30:.2f} GiB)")
    ns = "demo.llama-3.1-8b.bf16"
    with kvfs.connect(args.socket) as store:
        t = time.perf_counter()
        created = store.put_many(keys, blocks, ns=ns, metas=[{"layer_major": True, "tokens": bt}] * n_blocks)
        dt = time.perf_counter() - t
        print(f"  stored   {sum(created)} new blocks ({len(created) - sum(created)} already there) "
              f"in {dt * 1e3:.0f} ms: {n_blocks * block_bytes / dt / 1e9:.2f} GB/s")
        # A new request sharing the first 3/4 of the prompt plus a new suffix.
        shared = n_blocks * 3 // 4 * bt
        new_tokens = tokens[:shared] + rng.integers(0, 128000, size=args.tokens - shared).tolist()
        new_keys = kvfs.keys.block_hashes(new_tokens, block_size=bt, salt=b"llama-3.1-8b/bf16")
        t = time.perf_counter()
        hit = store.prefix_match(new_keys, ns=ns)
        t_lookup = time.perf_counter() - t
        out = np.ones(hit * block_bytes, dtype=np.uint8)  # a preallocated (faulted-in) KV buffer
        t = time.perf_counter()
        got = store.get_many_into(new_keys[:hit], [out[i * block_bytes:(i + 1) * block_bytes] for i in range(hit)],
                                  ns=ns)
        dt = time.perf_counter() - t
        ok = all(g == block_bytes for g in got) and np.array_equal(out, kv[:hit * block_bytes])
        print(f"  new request shares {hit}/{len(new_keys)} blocks (prefix_match {t_lookup * 1e3:.2f} ms)")
        print(f"  reloaded {hit} blocks in {dt * 1e3:.0f} ms: {hit * block_bytes / dt / 1e9:.2f} GB/s, "
              f"bytes {'identical' if ok else 'WRONG'}")
        print()
        print(format_stats(store.stats()))
    return 0 if ok else 1
