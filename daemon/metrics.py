"""Request latency histograms, and the Prometheus endpoint.

Every request the daemon serves is timed per op (``Server._handle``) into a
fixed-bucket histogram: cheap to update on the event loop, exact counts,
quantiles to the bucket. ``kvfs stats`` shows p50/p99 per op; with
``--metrics-port`` the daemon also serves Prometheus metrics on loopback
(prometheus-client, imported only then), read from the same numbers at
scrape time, so nothing is counted twice. The endpoint answers only the
users the trust model admits (kvfsd.access), like every other path.
"""
from __future__ import annotations

import bisect
from typing import Any, Callable, Iterator

from .access import Policy
from .peers import tcp_peer_ids
from .threadnames import name_os_thread

# upper bounds in seconds: 25 us .. 10 s, about x2.5 apart
BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
           500e-3, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("counts", "count", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (inf past the last)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for bound, n in zip(BUCKETS + (float("inf"),), self.counts):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")

    def snapshot(self) -> dict[str, Any]:
        cum, out = 0, []
        for bound, n in zip(BUCKETS, self.counts):
            cum += n
            out.append([bound, cum])
        return {"count": self.count, "sum_s": self.sum, "p50_s": self.quantile(0.5), "p99_s": self.quantile(0.99),
                "buckets": out}


class RequestStats:
    def __init__(self) -> None:
        self.ops: dict[str, Histogram] = {}

    def observe(self, op: str, seconds: float) -> None:
        h = self.ops.get(op)
        if h is None:
            h = self.ops[op] = Histogram()
        h.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        return {op: h.snapshot() for op, h in sorted(self.ops.items())}


def prometheus_families(st: dict[str, Any]) -> Iterator[Any]:
    """Metric families from one ``stats`` snapshot (names per Prometheus
    conventions: base units, ``_total`` for counters)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Any:
        g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
        g.add_metric(list((labels or {}).values()), value)
        return g

    yield gauge("kvfs_capacity_bytes", "Bytes the stripes may use.", st["capacity_bytes"])
    yield gauge("kvfs_disk_bytes", "Bytes the segments take on disk.", st["disk_bytes"])
    yield gauge("kvfs_live_bytes", "Bytes of published records.", st["live_bytes"])
    yield gauge("kvfs_dead_bytes", "Bytes of segments no object needs (compaction and eviction free them).",
                st["dead_bytes"])
    yield gauge("kvfs_objects", "Objects stored.", st["objects"])
    yield gauge("kvfs_logical_bytes", "Bytes of the values stored.", st["logical_bytes"])
    yield gauge("kvfs_segments", "Segment files.", st["segments"])
    yield gauge("kvfs_leases", "Leases held by readers.", st["leases"])
    if st.get("index"):
        yield gauge("kvfs_index_used_bytes", "Bytes of the LMDB index's map in use (through its last page).",
                    st["index"]["used_bytes"])
        yield CounterMetricFamily("kvfs_index_commits", "LMDB write transactions committed since start.",
                                  value=st["index"]["commits"])  # exposed as kvfs_index_commits_total
    yield gauge("kvfs_connections", "Client connections open.", st.get("connections", 0))
    stripe = GaugeMetricFamily("kvfs_stripe_disk_bytes", "Bytes on disk per stripe.", labels=["stripe"])
    chunks = GaugeMetricFamily("kvfs_stripe_chunks", "Published records (chunks) per stripe.", labels=["stripe"])
    for s in st["stripes"]:
        stripe.add_metric([s["path"]], s["disk_bytes"])
        chunks.add_metric([s["path"]], s["chunks"])
    yield stripe
    yield chunks
    ns = GaugeMetricFamily("kvfs_namespace_objects", "Objects per namespace.", labels=["namespace"])
    for name, n in st["namespaces"].items():
        ns.add_metric([name], n)
    yield ns
    tier_bytes = GaugeMetricFamily("kvfs_tier_bytes", "Bytes of values held per tier.", labels=["tier"])
    tier_objs = GaugeMetricFamily("kvfs_tier_objects", "Objects held per tier.", labels=["tier"])
    hits = CounterMetricFamily("kvfs_tier_hits", "Lookups answered per tier.", labels=["tier"])
    for tier, t in st["tiers"].items():
        if t is not None and "bytes" in t:
            tier_bytes.add_metric([tier], t["bytes"])
            tier_objs.add_metric([tier], t["objects"])
            hits.add_metric([tier], t["hits"])
    yield tier_bytes
    yield tier_objs
    yield hits
    yield from _shared_tier(st["tiers"].get("T2"))
    c = st["counters"]
    for key, doc in (("puts", "Objects stored by puts."), ("put_bytes", "Bytes stored by puts."),
                     ("hits", "Lookups that found the key."), ("misses", "Lookups that did not."),
                     ("deletes", "Objects deleted."), ("evictions", "Objects evicted."),
                     ("corrupt_dropped", "Objects dropped for failing their checksums."),
                     ("compactions", "Segments freed by compaction."),
                     ("compacted_bytes", "Bytes copied forward by compaction."),
                     ("segments_deleted", "Segment files removed.")):
        yield CounterMetricFamily("kvfs_" + key, doc, value=c.get(key, 0))  # exposed as kvfs_<key>_total
    lat = HistogramMetricFamily("kvfs_request_duration_seconds", "Time to serve a request, per op.",
                                labels=["op"])
    for op, h in st.get("requests", {}).items():
        buckets = [(repr(b), n) for b, n in h["buckets"]] + [("+Inf", h["count"])]
        lat.add_metric([op], buckets, h["sum_s"])
    yield lat
    conn = CounterMetricFamily("kvfs_connector", "Engine adapters' own counters (lookups, hit_tokens, "
                               "bytes_loaded, ...), per namespace.", labels=["namespace", "counter"])
    for name, r in st.get("connectors", {}).items():
        for key, v in sorted(r["counters"].items()):
            conn.add_metric([name, key], v)
    yield conn


def serve_prometheus(port: int, snapshot: Callable[[], dict[str, Any]], policy: Policy) -> Any:
    """Serve /metrics on 127.0.0.1:``port`` from ``snapshot()`` at each scrape
    (threads of its own), to the users ``policy`` admits with any right: the
    uid owning the scraper's end of the connection is looked up in
    /proc/net/tcp (loopback only), its groups where needed (kvfsd.peers),
    and anyone else gets 403. Returns the HTTP
    server (``shutdown()`` stops it)."""
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app

    class Collector:
        def collect(self) -> Iterator[Any]:
            yield from prometheus_families(snapshot())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    app = make_wsgi_app(registry)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Handler(WSGIRequestHandler):
        def get_environ(self) -> dict[str, Any]:
            env = super().get_environ()
            local = self.server.server_address
            assert isinstance(local, tuple)  # an AF_INET server
            env["kvfs.peer"] = tcp_peer_ids(self.client_address, local, policy.needs_groups)
            return env

        def log_message(self, *a: Any) -> None:
            pass

    def gated(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        uid, gids = environ["kvfs.peer"]
        right = None if uid is None else policy.right_of(uid, gids)
        if right is None:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [f"kvfs: uid {uid} is not admitted to this store's metrics "
                    f"(the daemon admits its own user, root and --allow-uid/--allow-gid)\n".encode()]
        return app(environ, start_response)

    httpd = make_server("127.0.0.1", port, gated, Server, handler_class=Handler)
    def serve() -> None:
        name_os_thread()
        httpd.serve_forever()
    threading.Thread(target=serve, name="kvfs-metrics", daemon=True).start()
    return httpd


def _shared_tier(t2: dict[str, Any] | None) -> Iterator[Any]:
    """The shared tier's (T2) health, queue and traffic, if configured."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    if t2 is None:
        return
    up = GaugeMetricFamily("kvfs_remote_up", "1 while the shared tier's part answers (s3, presence).",
                           labels=["part"])
    up.add_metric(["s3"], 1 if t2["s3"]["state"] == "up" else 0)
    if t2["presence"] is not None:
        up.add_metric(["presence"], 1 if t2["presence"]["state"] == "up" else 0)
    yield up
    yield GaugeMetricFamily("kvfs_remote_upload_queue", "Uploads waiting for the shared tier.", value=t2["queue"])
    for key, doc in (("uploaded", "Objects uploaded to the shared tier."),
                     ("upload_dropped", "Uploads dropped: the queue was full."),
                     ("bytes_up", "Bytes uploaded to the shared tier."),
                     ("bytes_down", "Bytes fetched from the shared tier."),
                     ("hits", "Local misses read through from the shared tier."),
                     ("misses", "Local misses the shared tier did not have (or could not serve)."),
                     ("errors", "Failed requests to S3 or the presence index."),
                     ("corrupt", "Remote objects refused for failing their checks.")):
        yield CounterMetricFamily("kvfs_remote_" + key, doc, value=t2[key])
