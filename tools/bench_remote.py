"""`kvfs bench --remote`: the shared tier (T2) between two nodes, next to
the S3 client's own PUTs and GETs of the same bytes on the same server,
all in one run on loopback: a SeaweedFS S3 server and a 3-master Redis
Cluster started for the run, two daemons (node A puts, node B reads).

- write-through: A's uploads of its committed blocks (from the put to the
  last upload) against raw PUTs of the same blocks by as many threads as A
  has uploaders;
- read-through: B's ``get_many_into`` of blocks it does not hold (fetched,
  checked, installed, copied out) against raw GETs of the same objects by
  as many threads as B fetches with;
- the client choice: obstore's and boto3's raw GET/PUT of the same objects,
  and the presence index's batch of 1024 EXISTS against redis-py's cluster
  pipeline;
- cross-node ``prefix_match`` and ``contains`` of 1024 keys on B, p50/p99;
- what an outage costs a client call: B's calls while a Redis master is
  killed, and while the S3 server hangs (SIGSTOP), p50/p99/max.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .bench_util import clean_up, latencies, percentile, work_dirs
from .table import render

MiB = 1 << 20
BUCKET = "kvfs-bench"
BATCH = 64  # keys per get_many_into / put_many call (as kvfs bench)


def _t2(s: Any) -> dict[str, Any]:
    return s.stats()["tiers"]["T2"]


def _pool_seconds(threads: int, n: int, op: Callable[[int], Any]) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(op, range(n)))
    return time.perf_counter() - t


def _boto3_client(endpoint: str) -> Any:
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError:
        return None
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED, max_pool_connections=32,
                                      retries={"max_attempts": 1}))


def _size_round(a: Any, b: Any, s3: Any, boto: Any, prefix: str, bs: int, count: int, src: Any, dst: Any,
                uploaders: int, fetchers: int, tag: str) -> dict[str, float]:
    import numpy as np
    import obstore
    from obstore.store import S3Store

    from kvfs.remote_object import object_name

    store = S3Store(BUCKET, endpoint=s3.endpoint, region="us-east-1", skip_signature=True, allow_http=True,
                    virtual_hosted_style_request=False)
    total = count * bs
    ns = f"bench.{bs}.{tag}"
    keys = [f"b{i:05d}" for i in range(count)]
    views = [memoryview(src[i * bs:(i + 1) * bs]) for i in range(count)]
    dviews = [dst[i * bs:(i + 1) * bs] for i in range(count)]
    out: dict[str, float] = {}

    # raw PUT, as many threads as A's uploaders (before A's, so neither finds the other's objects)
    out["raw_put_s"] = _pool_seconds(uploaders, count, lambda i: obstore.put(
        store, f"{prefix}-raw/{bs}/{tag}/{i}", views[i], mode="create", use_multipart=False))
    if bs > 5 * MiB:  # multipart (5 MiB parts, obstore's default), which cannot be conditional in obstore
        out["multipart_put_s"] = _pool_seconds(uploaders, count, lambda i: obstore.put(
            store, f"{prefix}-mp/{bs}/{tag}/{i}", views[i], use_multipart=True))
    if boto is not None:
        out["boto3_put_s"] = _pool_seconds(uploaders, count, lambda i: boto.put_object(
            Bucket=BUCKET, Key=f"{prefix}-boto/{bs}/{tag}/{i}", Body=bytes(views[i])))
    # write-through: A's put, then its uploads
    before = _t2(a)["uploaded"]
    t = time.perf_counter()
    for i in range(0, count, BATCH):
        a.put_many(keys[i:i + BATCH], views[i:i + BATCH], ns=ns)
    out["local_put_s"] = time.perf_counter() - t
    if not a.flush(600, remote=True):  # (not stats in a loop: they cost the daemon more than they see)
        raise TimeoutError("bench --remote: A's uploads did not end in 600 s")
    out["write_through_s"] = time.perf_counter() - t
    if _t2(a)["uploaded"] - before != count:
        raise RuntimeError("bench --remote: A did not upload every block")

    # raw GET of the objects A uploaded, as many threads as B fetches with
    names = [object_name(f"{prefix}", ns, k) for k in keys]

    def raw_get(i: int) -> None:
        got = memoryview(obstore.get(store, names[i]).bytes())
        dviews[i][:] = np.frombuffer(got[len(got) - bs:], dtype=np.uint8)
    out["raw_get_s"] = _pool_seconds(fetchers, count, raw_get)
    if boto is not None:
        out["boto3_get_s"] = _pool_seconds(fetchers, count, lambda i: boto.get_object(
            Bucket=BUCKET, Key=names[i])["Body"].read())
    # read-through: B holds none of them
    dst[:total] = 0
    fetched = _t2(b)["hits"]
    t = time.perf_counter()
    for i in range(0, count, BATCH):
        got = b.get_many_into(keys[i:i + BATCH], dviews[i:i + BATCH], ns=ns)
        if min(got) < 0:
            raise RuntimeError(f"bench --remote: B missed {got.count(-1)} blocks it should have read through")
    out["read_through_s"] = time.perf_counter() - t
    if not np.array_equal(dst[:total], src[:total]):
        raise RuntimeError("bench --remote: read-through bytes differ")
    if _t2(b)["hits"] - fetched != count:
        raise RuntimeError("bench --remote: B did not fetch every block")
    # the raw copies go (the bench writes several GB through a server on this disk)
    for pre in ("raw", "mp", "boto"):
        for page in obstore.list(store, prefix=f"{prefix}-{pre}/{bs}/{tag}/"):
            for m in page:
                obstore.delete(store, m["path"])
    # and again: local now
    t = time.perf_counter()
    for i in range(0, count, BATCH):
        b.get_many_into(keys[i:i + BATCH], dviews[i:i + BATCH], ns=ns)
    out["local_get_s"] = time.perf_counter() - t
    return {k: total / v / 1e9 for k, v in out.items()} | {"objects": count, "block": bs,
                                                            "read_through_objs": count / out["read_through_s"],
                                                            "raw_get_objs": count / out["raw_get_s"]}


def _presence_clients(url: str, keys: list[bytes], n: int) -> dict[str, float]:
    """1024 EXISTS in one batch: kvfs's presence module against redis-py's cluster pipeline (p50 ms)."""
    from kvfsd.presence import Presence

    p = Presence(url)
    out = {"kvfs_presence_p50_ms": statistics.median(latencies(lambda: p.exists_many(keys), n)) * 1e3}
    try:
        from redis.cluster import ClusterNode, RedisCluster
    except ImportError:
        return out
    host, port = url.split("//")[1].split(",")[0].split(":")
    rc = RedisCluster(startup_nodes=[ClusterNode(host, int(port))])

    def pipe() -> None:
        pl = rc.pipeline(transaction=False)
        for k in keys:
            pl.exists(k)
        pl.execute()
    out["redis_py_cluster_p50_ms"] = statistics.median(latencies(pipe, max(n // 4, 5))) * 1e3
    rc.close()
    return out


def run_remote_bench(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from kvfs.remote_object import presence_key, tier_tag
    from kvfs.sizes import parse_size
    from kvfsd.testing import DaemonProcess
    from kvfsd.testing_servers import RedisCluster, SeaweedS3

    quick = args.quick
    sizes = [1 * MiB] if quick else [1 * MiB, 8 * MiB]
    total = 16 * MiB if quick else int(parse_size(args.total) * args.scale)
    samples = 20 if quick else 200
    base, work = work_dirs(args.dir, "kvfs-bench-remote-")
    prefix = f"bench{os.getpid()}"
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "sizes": [], "total_bytes": total}
    s3 = SeaweedS3(work / "weed")
    rc = RedisCluster(work / "redis")
    nodes: list[DaemonProcess] = []
    try:
        s3.start()
        rc.start()
        s3.make_bucket(BUCKET)
        remote = ["--remote", f"s3://{BUCKET}/{prefix}", "--remote-endpoint", s3.endpoint, "--presence", rc.url,
                  "--remote-timeout", "2"]
        cap = str(4 * total + (1 << 30))
        nodes = [DaemonProcess(work / n, capacity=cap, shm_size="256M", extra=remote, log=work / f"{n}.log")
                 for n in ("a", "b")]
        for d in nodes:
            d.start()
        a, b = (d.connect(threads=8) for d in nodes)
        cfg_up, cfg_get = 4, 16  # RemoteConfig's uploaders and fetchers
        src = np.random.default_rng(0).integers(0, 256, size=total, dtype=np.uint8)
        dst = np.ones(total, dtype=np.uint8)
        boto = _boto3_client(s3.endpoint)
        # warm-up: the bucket's first writes make its volumes, the first reads open them
        _size_round(a, b, s3, boto, prefix, 1 * MiB, 8, src, dst, cfg_up, cfg_get, "warm")
        for bs in sizes:
            count = max(1, total // bs)
            rounds = [_size_round(a, b, s3, boto, prefix, bs, count, src, dst, cfg_up, cfg_get, f"r{r}")
                      for r in range(1 if quick else args.repeat)]
            # the median of each figure; the ratios are per round, then their median
            row = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            row["write_vs_raw"] = statistics.median(r["write_through_s"] / r["raw_put_s"] for r in rounds)
            row["read_vs_raw"] = statistics.median(r["read_through_s"] / r["raw_get_s"] for r in rounds)
            res["sizes"].append(row)
            print(f"  {count} x {bs // MiB} MiB: write-through {row['write_through_s']:.2f} GB/s "
                  f"(raw PUT {row['raw_put_s']:.2f}), read-through {row['read_through_s']:.2f} GB/s "
                  f"(raw GET {row['raw_get_s']:.2f})", file=sys.stderr, flush=True)
        # cross-node metadata: 1024 blocks put on A, asked on B
        keys = [f"m{i:05d}" for i in range(1024)]
        a.put_many(keys, [b"k" * 4096] * len(keys), ns="bench.meta")
        a.flush(300, remote=True)
        lp = latencies(lambda: b.prefix_match(keys, ns="bench.meta"), samples)
        if b.prefix_match(keys, ns="bench.meta") != len(keys):
            raise RuntimeError("bench --remote: B's prefix_match did not see A's blocks")
        lc = latencies(lambda: b.contains(keys, ns="bench.meta"), samples)
        ll = latencies(lambda: a.prefix_match(keys, ns="bench.meta"), samples)
        tag = tier_tag(BUCKET, prefix)
        pkeys = [presence_key(tag, "bench.meta", k) for k in keys]
        res["meta"] = {"prefix_match_p50_ms": percentile(lp, .5) * 1e3, "prefix_match_p99_ms": percentile(lp, .99) * 1e3,
                       "contains_p50_ms": percentile(lc, .5) * 1e3, "contains_p99_ms": percentile(lc, .99) * 1e3,
                       "local_prefix_match_p50_ms": percentile(ll, .5) * 1e3,
                       **_presence_clients(rc.url, pkeys, samples)}
        res["outage"] = _outages(a, b, s3, rc, samples)
        for s in (a, b):
            s.close()
    finally:
        for d in nodes:  # the daemons first (they talk to the servers), then the servers, then the files
            if d.alive():
                d.stop()
        s3.stop()
        rc.stop()
        clean_up(work, base, bool(args.dir), nodes)
    return res


def _outages(a: Any, b: Any, s3: Any, rc: Any, samples: int) -> dict[str, Any]:
    """B's calls for blocks only A holds (so T2 must be asked), while a Redis
    master is killed, then while S3 hangs."""
    out: dict[str, Any] = {}
    n = max(samples // 4, 10)
    keys = [f"o{i:05d}" for i in range(64 * 2 * n)]
    a.put_many(keys, [b"o" * 16384] * len(keys), ns="bench.outage")
    a.flush(300, remote=True)
    groups = [keys[i * 64:(i + 1) * 64] for i in range(2 * n)]
    outs = [bytearray(16384) for _ in range(64)]

    def lat(fn: Callable[[Any], Any], items: list[Any]) -> dict[str, float]:
        xs = []
        for it in items:
            t = time.perf_counter()
            fn(it)
            xs.append(time.perf_counter() - t)
        return {"p50_ms": percentile(xs, .5) * 1e3, "p99_ms": percentile(xs, .99) * 1e3, "max_ms": max(xs) * 1e3}

    def get(g: list[str]) -> Any:
        return b.get_many_into(g, outs, ns="bench.outage")

    def prefix(ks: list[str]) -> Any:
        return b.prefix_match(ks, ns="bench.outage")
    remote_only = keys[-1024:]  # never read on B before the S3 outage: every prefix_match asks the presence index

    healthy = lat(get, groups[:n // 2])
    rc.kill(1)
    try:
        out["redis_master_killed"] = {"prefix_match": lat(prefix, [remote_only] * n),
                                      "get_many_into": lat(get, groups[n // 2:n])}
    finally:
        rc.start_node(1)
        rc.wait_ok()
    s3.pause()
    try:
        out["s3_hung"] = {"prefix_match": lat(prefix, [remote_only] * n), "get_many_into": lat(get, groups[n:])}
    finally:
        s3.resume()
    out["healthy_get_many_into"] = healthy
    return out


def format_remote(res: dict[str, Any]) -> str:
    rows = []
    for r in res["sizes"]:
        rows.append([f"{r['objects']} x {r['block'] // MiB} MiB",
                     f"{r['raw_put_s']:.2f}", f"{r['multipart_put_s']:.2f}" if "multipart_put_s" in r else "-",
                     f"{r.get('boto3_put_s', float('nan')):.2f}",
                     f"{r['write_through_s']:.2f}", f"{r['write_vs_raw']:.2f}",
                     f"{r['raw_get_s']:.2f}", f"{r.get('boto3_get_s', float('nan')):.2f}",
                     f"{r['read_through_s']:.2f}", f"{r['read_vs_raw']:.2f}",
                     f"{r['read_through_objs']:.0f}", f"{r['local_get_s']:.2f}"])
    out = render(["blocks", "raw PUT GB/s", "multipart", "boto3 PUT", "write-through", "vs raw PUT",
                  "raw GET GB/s", "boto3 GET", "read-through", "vs raw GET", "read-through obj/s",
                  "then local GB/s"], rows)
    m = res["meta"]
    out += "\n\n" + render(["1024 keys on node B, held only remotely", "p50 ms", "p99 ms"], [
        ["prefix_match (local miss, then the presence index)", f"{m['prefix_match_p50_ms']:.2f}",
         f"{m['prefix_match_p99_ms']:.2f}"],
        ["contains", f"{m['contains_p50_ms']:.2f}", f"{m['contains_p99_ms']:.2f}"],
        ["prefix_match on node A (all local)", f"{m['local_prefix_match_p50_ms']:.3f}", ""],
        ["1024 EXISTS: kvfsd.presence (in the daemon)", f"{m['kvfs_presence_p50_ms']:.2f}", ""],
        ["1024 EXISTS: redis-py cluster pipeline", f"{m.get('redis_py_cluster_p50_ms', float('nan')):.2f}", ""],
    ])
    o = res["outage"]
    rows = [["healthy", "get_many_into (64 remote blocks)", *(f"{o['healthy_get_many_into'][k]:.1f}"
                                                              for k in ("p50_ms", "p99_ms", "max_ms"))]]
    for case, label in (("redis_master_killed", "one Redis master killed"), ("s3_hung", "S3 server hung (SIGSTOP)")):
        for call, r in o[case].items():
            rows.append([label, call + (" (1024 keys)" if call == "prefix_match" else " (64 remote blocks)"),
                         f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}"])
    out += "\n\n" + render(["outage", "B's call", "p50 ms", "p99 ms", "max ms"], rows)
    return out
