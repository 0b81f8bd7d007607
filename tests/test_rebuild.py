"""`kvfs rebuild-index`: the index rebuilt from the segments alone, with a
real daemon before and after, real files and a real LMDB."""
import json
import os
import shutil
import subprocess
import sys

import xxhash

from helpers import put_and_corrupt
from kvfsd.testing import DaemonProcess

MiB = 1 << 20


def kvfs_cmd(*args, check=True):
    return subprocess.run([sys.executable, "-m", "kvfstools.cli", *args], capture_output=True, check=check)


def test_rebuild_index_from_segments_alone(tmp_path):
    """Every valid object comes back byte for byte (small, one-chunk and
    striped multi-chunk values, empty ones, several namespaces, T0 puts
    written back); a record with a flipped payload byte is not rebuilt and
    is reported; the old index is kept aside; the daemon starts on the new
    one and goes on storing."""
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", extra=["--stripe-unit", "1M"])
    vals = {("a", f"k{i}"): os.urandom(n) for i, n in enumerate([0, 1, 5000, 70_000, MiB, 3 * MiB + 17, 9 * MiB])}
    vals.update({("b", f"x{i}"): os.urandom(2000 + i) for i in range(50)})
    with d, d.connect() as s:
        for (ns, k), v in vals.items():
            s.put(k, v, ns=ns)
        s.flush()
        put_and_corrupt(s, "rotten", "a", 2 * MiB, 12345)  # a payload byte flipped on disk
        r = kvfs_cmd("rebuild-index", "--root", str(d.root), check=False)
        assert r.returncode == 2 and b"in use by a kvfs daemon" in r.stderr  # not under a running daemon
    shutil.rmtree(d.root / "index")  # lost entirely
    (d.root / "index").mkdir()
    rep = json.loads(kvfs_cmd("rebuild-index", "--root", str(d.root), "--json").stdout)
    assert rep["objects"] == len(vals) and rep["records_bad"] == 1 and rep["objects_incomplete"] == 1
    assert rep["namespaces"] == 2 and rep["segments"] >= 2 and rep["old_index"]
    assert any("rotten" in line for line in rep["details"])
    with d, d.connect() as s:
        assert sorted(s.namespaces()) == ["a", "b"]
        assert s.contains(["rotten"], ns="a") == [False]
        for (ns, k), v in vals.items():
            assert s.get(k, ns=ns) == v, (ns, k)
            assert s.stat(k, ns=ns).checksum == xxhash.xxh3_128_hexdigest(v)
        assert s.put("after", b"new" * 1000, ns="a")  # new segments and sequence numbers do not collide
        s.flush()
        assert s.get("after", ns="a") == b"new" * 1000
        assert s.get("k6", ns="a") == vals[("a", "k6")]
    table = kvfs_cmd("rebuild-index", "--root", str(d.root)).stdout.decode()
    assert "objects rebuilt" in table and str(len(vals) + 1) in table
    r = kvfs_cmd("rebuild-index", "--root", str(tmp_path / "nothing"), check=False)
    assert r.returncode == 2 and b"not a kvfs store" in r.stderr
