"""The `kvfs` command against a real daemon."""
import json
import os
import subprocess
import sys


def kvfs_cmd(*args, check=True, input=None):
    return subprocess.run([sys.executable, "-m", "kvfstools.cli", *args], capture_output=True,
                          check=check, input=input)


def test_put_get_ls_rm_stats(daemon, tmp_path):
    sock = str(daemon.socket)
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    kvfs_cmd("put", "--socket", sock, "ns1", "blk0", str(src))
    kvfs_cmd("put", "--socket", sock, "ns1", "blk1", "-", input=b"from stdin")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    kvfs_cmd("put", "--socket", sock, "ns1", "empty", str(empty))
    out = tmp_path / "out.bin"
    kvfs_cmd("get", "--socket", sock, "ns1", "blk0", str(out))
    assert out.read_bytes() == src.read_bytes()
    assert kvfs_cmd("get", "--socket", sock, "ns1", "blk1", "-").stdout == b"from stdin"
    assert kvfs_cmd("ls", "--socket", sock).stdout.decode().split() == ["ns1"]
    assert kvfs_cmd("ls", "--socket", sock, "ns1").stdout.decode().split() == ["blk0", "blk1", "empty"]
    st = json.loads(kvfs_cmd("stats", "--socket", sock, "--json").stdout)
    assert st["objects"] == 3 and st["namespaces"] == {"ns1": 3}
    table = kvfs_cmd("stats", "--socket", sock).stdout.decode()
    assert "objects" in table and "3 (" in table and "stripe" in table
    assert "T0 shm" in table and "T1 disk" in table and "write-back backlog" in table
    assert "of LMDB pages" in table and st["index"]["commits"] >= 1  # the index's row
    assert set(st["tiers"]) == {"T0", "T1", "T2"} and st["tiers"]["T0"]["capacity_bytes"] > 0
    assert st["tiers"]["T2"] is None  # no shared tier configured
    assert st["gc"]["frozen"] > 0 and st["gc"]["freezes"] >= 1  # the daemon's collector policy is on
    kvfs_cmd("rm", "--socket", sock, "ns1", "blk0")
    r = kvfs_cmd("get", "--socket", sock, "ns1", "blk0", str(out), check=False)
    assert r.returncode == 2 and b"NotFound" in r.stderr


def test_ls_long_and_du(daemon):
    """Sizes per object and per namespace, as tables and JSON; the listing
    pages through the daemon (more objects than one page)."""
    import kvfs
    sock = str(daemon.socket)
    with kvfs.connect(sock) as s:
        s.put_many([f"k{i:03d}" for i in range(250)], [bytes(i * 10) for i in range(250)], ns="a")
        s.put("big", os.urandom(5 * 1024 * 1024), ns="b")
        s.flush()
        objs = list(s.objects("a", page=100))
    assert [o["key"] for o in objs] == [f"k{i:03d}" for i in range(250)]
    assert [o["size"] for o in objs] == [i * 10 for i in range(250)]
    assert all(o["tier"] in ("T1", "T0+T1") and o["created"] > 0 for o in objs)
    listed = json.loads(kvfs_cmd("ls", "--socket", sock, "b", "--long", "--json").stdout)
    assert [(o["key"], o["size"]) for o in listed] == [("big", 5 * 1024 * 1024)]
    table = kvfs_cmd("ls", "--socket", sock, "b", "-l").stdout.decode()
    assert "big" in table and "5.0 MiB" in table
    du = json.loads(kvfs_cmd("du", "--socket", sock, "--json").stdout)
    per = {r["ns"]: (r["objects"], r["bytes"]) for r in du["namespaces"]}
    assert per == {"a": (250, sum(i * 10 for i in range(250))), "b": (1, 5 * 1024 * 1024)}
    assert du["objects"] == 251 and du["bytes"] == sum(i * 10 for i in range(250)) + 5 * 1024 * 1024
    assert json.loads(kvfs_cmd("du", "--socket", sock, "b", "--json").stdout)["objects"] == 1
    table = kvfs_cmd("du", "--socket", sock).stdout.decode()
    assert "total" in table and "251" in table
    r = kvfs_cmd("ls", "--socket", sock, "no/such", "--long", check=False)
    assert r.returncode == 2 and b"InvalidKey" in r.stderr


def test_evict_command(daemon):
    import kvfs
    sock = str(daemon.socket)
    with kvfs.connect(sock) as s:
        s.put_many([f"e{i}" for i in range(4)], [os.urandom(300_000)] * 4, ns="ev")
        s.put("keep", b"k" * 1000, ns="other")
    r = json.loads(kvfs_cmd("evict", "--socket", sock, "--to", "600K", "--ns", "ev", "--json").stdout)
    assert r["objects"] == 2 and r["bytes_after"] == 600_000 and r["reached"]
    table = kvfs_cmd("evict", "--socket", sock, "--to", "0", "--ns", "ev").stdout.decode()
    assert "objects evicted" in table and "-> 0 B" in table
    with kvfs.connect(sock) as s:
        assert list(s.keys("ev")) == [] and s.get("keep", ns="other") == b"k" * 1000
    r = kvfs_cmd("evict", "--socket", sock, "--to", "-5", check=False)
    assert r.returncode == 2 and b"--to" in r.stderr


def test_no_daemon_is_a_clear_error(tmp_path):
    r = kvfs_cmd("stats", "--socket", str(tmp_path / "none.sock"), check=False)
    assert r.returncode == 2 and b"kvfs daemon --socket" in r.stderr


def test_demo_runs(daemon):
    r = kvfs_cmd("demo", "--socket", str(daemon.socket), "--tokens", "2048")
    assert b"identical" in r.stdout and b"GB/s" in r.stdout


def test_bench_quick(tmp_path):
    r = kvfs_cmd("bench", "--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "b.json"))
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["patterns"] and all(p["get_gbs"] > 0 and p["put_gbs"] > 0 for p in res["patterns"])
    assert b"get/raw" in r.stdout


def test_bench_remote_quick(tmp_path):
    """kvfs bench --remote starts its S3 server and Redis Cluster, reads
    through and writes through every block (it checks the bytes itself),
    and times the outages."""
    r = kvfs_cmd("bench", "--remote", "--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json"))
    res = json.loads((tmp_path / "r.json").read_text())
    (row,) = res["sizes"]
    assert row["read_through_s"] > 0 and row["write_through_s"] > 0 and row["raw_get_s"] > 0
    assert res["meta"]["prefix_match_p50_ms"] > 0 and set(res["outage"]) == {
        "redis_master_killed", "s3_hung", "healthy_get_many_into"}
    assert b"read-through" in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # servers and daemons stopped, their files removed


def test_bench_meta_quick(tmp_path):
    """kvfs bench --meta runs both answers (the directory, the round trip)
    idle and under a putter, with the CPU-only step that bounds their tail
    (a busy loop as long as the idle directory call), and records the
    putter's rate."""
    r = kvfs_cmd("bench", "--meta", "--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "m.json"))
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["directory"] and set(res["states"]) == {"idle", "1 putting"} and res["puts_per_s"] > 0
    for cases in res["states"].values():
        assert set(cases) == {"contains (directory)", "contains (round trip)", "prefix_match (directory)",
                              "prefix_match (round trip)", "CPU-only step (bound)"}
        assert all(v["p50_us"] > 0 and v["p99_us"] >= v["p50_us"] for v in cases.values())
        # a busy loop of the given length never returns sooner
        assert cases["CPU-only step (bound)"]["p50_us"] >= res["cpu_step_us"] > 0
    assert b"faster than the round trip" in r.stdout


def test_bench_durability_quick(tmp_path):
    """kvfs bench --durability runs the same puts against the index with its
    power-cut rule and without it (two daemons, same run) and reports both."""
    r = kvfs_cmd("bench", "--durability", "--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "d.json"))
    res = json.loads((tmp_path / "d.json").read_text())
    (case,) = res["cases"]
    assert case["gbs"] > 0 and case["nosync_gbs"] > 0 and case["p50_s"] > 0 and case["nosync_p50_s"] > 0
    assert b"NOSYNC" in r.stdout


def test_bench_puts_quick(tmp_path):
    r = kvfs_cmd("bench", "--puts", "--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "p.json"))
    res = json.loads((tmp_path / "p.json").read_text())
    assert set(res["batches"]) == {"wait", "no wait"}
    assert set(res["single"]) == {"wait", "no wait", "wait, 4 KiB values"}
    assert all(v["p50_us"] > 0 for v in res["single"].values())
    assert all(v["objects_s"] > 0 and v["daemon_cpu_us"] > 0 for v in res["batches"].values())
    # user and system apart come from /proc in clock ticks (10 ms): a quick run's batches may take
    # fewer user ticks than one, so only the split's bounds are sure
    assert all(0 <= v["daemon_user_us"] <= v["daemon_cpu_us"] for v in res["batches"].values())
    assert res["handler_us_per_object"] > 0 and res["pwrite_gbs"] > 0 and res["memcpy_gbs"] > 0
    assert res["request_rtt"]["p50_us"] > 0
    assert res["no_polling"]["request_rtt"]["p50_us"] > 0 and res["no_polling"]["wait"]["p50_us"] > 0
    assert all(res["phases"][v][p] > 0 for v in ("4096", "65536") for p in ("prepare", "publish T0", "LMDB"))
    # the event loop is one of the daemon's threads: its share of the CPU per object, never more than the whole
    for kind in ("steady", "steady_sequential"):
        sd = res[kind]
        assert 0 < sd["loop_cpu_us"] <= sd["daemon_cpu_us"]
        # the daemon's threads are told apart by their OS names: loop, index writer and write-back all ran
        assert all(sd["threads_us"][t] > 0 for t in ("event loop", "index writer", "write-back")), sd
        assert sd["index_alone_us"] > 0 and sd["commits"] >= 1
    assert res["steady"]["keys"] == "hash" and res["steady_sequential"]["keys"] == "sequential"
    assert b"daemon CPU" in r.stdout and b"round trip" in r.stdout and b"in-process" in r.stdout
    assert b"round trip, no polling" in r.stdout and b"one put at a time, wait, 4 KiB values" in r.stdout


def test_bench_compare_quick(tmp_path):
    """The comparison runs every system on the same bytes (each get is
    checked against the source inside the benchmark) and writes a table,
    JSON and a PNG chart."""
    import shutil
    r = kvfs_cmd("bench", "--compare", "--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "c.json"),
                 "--png", str(tmp_path / "c.png"))
    res = json.loads((tmp_path / "c.json").read_text())
    want_get = {"memcpy", "raw preadv", "kvfs T0 get_into", "kvfs T0 get_view", "kvfs T1 get_into",
                "file-per-block", "diskcache"}
    want_put = {"raw pwrite", "kvfs T0 put", "kvfs T0 put_many", "kvfs T1 put", "file-per-block", "diskcache"}
    if shutil.which("redis-server"):
        want_get.add("redis")
        want_put.add("redis")
    assert {c["block"] for c in res["cells"]} == {64 << 10, 1 << 20, 2 << 20, 8 << 20}  # 64M > the quick total
    for c in res["cells"]:
        assert want_get <= set(c["get"]) and want_put <= set(c["put"]), (c, res["unavailable"])
        assert all(v > 0 for v in c["get"].values()) and all(v > 0 for v in c["put"].values())
    assert res["meta"]["contains_1024_p50_ms"] > 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"x memcpy" in r.stdout and b"kvfs T0 get_into" in r.stdout


def test_bench_native_quick(tmp_path):
    r = kvfs_cmd("bench", "--native", "--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "n.json"))
    res = json.loads((tmp_path / "n.json").read_text())
    assert {row["backend"] for row in res["rows"]} == {"native", "python"}
    assert all(row[k] > 0 for row in res["rows"] for k in ("read_gbs", "copy_gbs", "get_many_gbs"))
    assert b"C / Python" in r.stdout


def test_daemon_on_a_huge_page_tmpfs_of_its_own(tmp_path):
    """--shm-dir: the arena, the directory and the T0 journal live on the
    tmpfs given (here one mounted huge=advise, as the README's tuning
    section says), the arena on 2 MiB pages, which `kvfs stats` reports;
    T0 puts and gets work from it, and a stopped daemon leaves it empty."""
    import kvfs
    from kvfsd.testing import DaemonProcess
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m,huge=advise", "tmpfs", str(shm)], check=True)
    try:
        d = DaemonProcess(tmp_path / "root", shm_size="64M", shm_dir=shm).start()
        try:
            assert sorted(p.suffix for p in shm.iterdir()) == [".arena", ".dir", ".journal"]
            with kvfs.connect(d.socket) as s:
                vals = [os.urandom(1 << 20) for _ in range(8)]
                s.put_many([f"k{i}" for i in range(8)], vals)
                with kvfs.connect(d.socket) as r:
                    assert [r.get(f"k{i}") for i in range(8)] == vals
                st = s.stats()["tiers"]["T0"]
                assert st["path"].startswith(str(shm)) and st["huge_page_bytes"] >= 32 << 20
            table = kvfs_cmd("stats", "--socket", str(d.socket)).stdout.decode()
            assert "on 2 MiB pages" in table
        finally:
            d.stop()
        assert list(shm.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=True)  # lazily: this process may still map the arena
