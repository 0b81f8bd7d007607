"""Request latency histograms, `kvfs stats` (table, JSON, --watch), and the
Prometheus endpoint of a real daemon."""
import json
import os
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvfsd.metrics import BUCKETS, Histogram
from kvfsd.testing import DaemonProcess


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_histogram_counts_and_quantiles():
    h = Histogram()
    for _ in range(98):
        h.observe(30e-6)  # -> the 50 us bucket
    h.observe(3e-3)
    h.observe(20.0)  # past the last bound
    assert h.count == 100 and abs(h.sum - (98 * 30e-6 + 3e-3 + 20.0)) < 1e-9
    assert h.quantile(0.5) == 50e-6 and h.quantile(0.99) == 5e-3 and h.quantile(1.0) == float("inf")
    snap = h.snapshot()
    assert snap["buckets"][-1] == [BUCKETS[-1], 99] and snap["p99_s"] == 5e-3


def test_stats_and_prometheus(tmp_path):
    port = _free_port()
    d = DaemonProcess(tmp_path / "s", capacity="256M", extra=["--metrics-port", str(port)])
    with d, d.connect() as s:
        s.put_many([f"k{i}" for i in range(20)], [os.urandom(100_000)] * 20, ns="m")
        for i in range(20):
            s.get(f"k{i}", ns="m")
        s.flush()
        st = s.stats()
        assert sum(x["chunks"] for x in st["stripes"]) == 20  # one chunk each, once written back
        req = st["requests"]
        assert {"hello", "reserve", "put_t0"} <= set(req)  # a batch put: one put_t0 (after a reservation)
        assert all(h["count"] > 0 and 0 < h["p50_s"] <= h["p99_s"] for h in req.values())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        value = {f.name: f.samples[0].value for f in fams.values() if len(f.samples) == 1}
        assert value["kvfs_objects"] == 20 and value["kvfs_logical_bytes"] == 2_000_000
        assert fams["kvfs_puts"].samples[0].name == "kvfs_puts_total" and fams["kvfs_puts"].samples[0].value == 20
        lat = [x for x in fams["kvfs_request_duration_seconds"].samples if x.name.endswith("_count")]
        assert {x.labels["op"] for x in lat} >= {"hello"} and all(x.value > 0 for x in lat)
        assert {x.labels["tier"] for x in fams["kvfs_tier_bytes"].samples} == {"T0", "T1"}
        assert sum(x.value for x in fams["kvfs_stripe_chunks"].samples) == 20
        # the index: the puts' publications were committed, and its pages are in use
        assert fams["kvfs_index_commits"].samples[0].name == "kvfs_index_commits_total"
        assert fams["kvfs_index_commits"].samples[0].value >= 1 and value["kvfs_index_used_bytes"] >= 4096
        table = subprocess.run([sys.executable, "-m", "kvfstools.cli", "stats", "--socket", str(d.socket)],
                               capture_output=True, check=True).stdout.decode()
        assert "request" in table and "p99" in table and "compactions" in table
        w = subprocess.Popen([sys.executable, "-m", "kvfstools.cli", "stats", "--socket", str(d.socket),
                              "--watch", "0.2", "--json"], stdout=subprocess.PIPE)
        try:
            lines = [json.loads(w.stdout.readline()) for _ in range(2)]
        finally:
            w.kill()
            w.wait()
        assert all("puts" in x["rates"] and x["stats"]["objects"] == 20 for x in lines)
